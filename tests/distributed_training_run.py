"""A two-process data-parallel run of spartan.training.train on CPU (gloo), for test_training.py.

    ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 tests/distributed_training_run.py OUTPUT_DIR

(``accelerate launch --cpu`` starts CPU processes through MPI only.) Each process writes its
TrainResult to OUTPUT_DIR/result-<process index>.json.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from toy_data import accuracy, toy_dataset
from transformers import BertConfig, BertForSequenceClassification

import spartan
from spartan.training import TrainingConfig, train


def accuracy_and_count(predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    return {**accuracy(predictions, references), "examples": float(len(references))}


def main(output_dir: str) -> None:
    torch.manual_seed(0)  # a tiny BERT like tiny_models.tiny("bert"); importing tiny_models loads every architecture
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, vocab_size=99)
    model = spartan.wrap_model(BertForSequenceClassification(config), num_parents=8, top_k=4)
    training = TrainingConfig(
        output_dir, learning_rate=5e-2, num_epochs=2, batch_size=8, progress=False, metric_for_best="accuracy"
    )
    result = train(model, toy_dataset(64), toy_dataset(45, seed=1), training, compute_metrics=accuracy_and_count)
    summary = {
        "best_metrics": result.best_metrics,
        "global_step": result.global_step,
        "train_samples": result.train_samples,
    }
    Path(output_dir, f"result-{PartialState().process_index}.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main(sys.argv[1])
