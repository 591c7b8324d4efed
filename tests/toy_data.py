"""A learnable toy classification task of token sequences, for the training tests."""

import numpy as np
import torch

VOCAB = 99  # as tests/tiny_models.py


def toy_dataset(size: int, seed: int = 0) -> list[dict]:
    """Unpadded sequences of 4-10 token ids; label 1 when they come from the upper half of the vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for index in range(size):
        label = index % 2
        length = int(torch.randint(4, 11, (), generator=generator))
        low, high = (3, 51) if label == 0 else (51, VOCAB)
        input_ids = torch.randint(low, high, (length,), generator=generator)
        examples.append({"input_ids": input_ids.tolist(), "labels": label})
    return examples


def accuracy(predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    return {"accuracy": float(np.mean(predictions.argmax(-1) == references))}


class Interrupted(Exception):
    pass


class CrashingDataset(torch.utils.data.Dataset):
    """Raises once ``crash_after`` examples have been read (by this process), as a run killed mid-epoch."""

    def __init__(self, examples, crash_after):
        self.examples, self.crash_after, self.reads = examples, crash_after, 0

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        self.reads += 1
        if self.reads > self.crash_after:
            raise Interrupted
        return self.examples[index]
