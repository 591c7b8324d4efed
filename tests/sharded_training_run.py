"""Two-process runs of spartan.training.train on CPU (gloo), sharded and not, for test_training.py.

    ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 tests/sharded_training_run.py ROOT

Four runs of one tiny wrapped BERT on the same data and seed, each in ROOT/<name>: ``ddp``
(sharding="none"), ``fsdp`` (sharding="fsdp"), and ``resumed``: a sharded run interrupted
mid-epoch, then resumed. Each process writes ROOT/<name>-<process index>.json (what train
returned, the rows of each memory table this process held during training, whether the model came
back with plain tensors) and ROOT/<name>-<process index>.safetensors (the model's trainable
parameters after train, and its logits on the first evaluation examples).
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from safetensors.torch import save_file
from toy_data import CrashingDataset, Interrupted, toy_dataset
from torch.distributed.tensor import DTensor
from transformers import BertConfig, BertForSequenceClassification

import spartan
from spartan.training import TrainingConfig, padding_collator, train


def wrapped_bert():
    torch.manual_seed(0)  # tiny_models.tiny("bert"); importing tiny_models loads every architecture
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, vocab_size=99)
    # 9 parents x 3 children: 27 rows in keys and values, cut 14 + 13 across two processes
    return spartan.wrap_model(BertForSequenceClassification(config), num_parents=9, top_k=4, parent_keys="product")


def main(root: str) -> None:
    torch.set_num_threads(1)
    train_data, eval_data = toy_dataset(64), toy_dataset(24, seed=1)
    # 64 examples, batches of 8 per process, 2 per update: 2 updates per epoch, 6 in all, each saved
    # (1 and 2 in epoch 1, ...); the clipping norm is below the gradients' so that clipping acts.
    options = {"learning_rate": 1e-2, "num_epochs": 3, "batch_size": 8, "gradient_accumulation_steps": 2}
    options |= {"eval_every_steps": 1, "max_grad_norm": 0.05, "progress": False}
    for name, sharding in [("ddp", "none"), ("fsdp", "fsdp"), ("resumed", "fsdp")]:
        config = TrainingConfig(str(Path(root, name)), sharding=sharding, **options)
        if name == "resumed":  # reads fail in epoch 2 after update 3's save (batch 2 of 4)
            try:
                train(wrapped_bert(), CrashingDataset(train_data, crash_after=32 + 3 * 8), eval_data, config)
            except Interrupted:
                pass
            else:
                raise AssertionError("the interrupted run finished")
        model = wrapped_bert()
        rows = set()

        def table_rows(predictions, references):  # evaluated during training: the tables as they are then
            for table in ("keys", "values", "sub_keys"):
                tensor = getattr(spartan.get_memories(model)[0], table)
                local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
                rows.add((table, tuple(tensor.shape), local.shape[0]))
            return {}

        result = train(model, train_data, eval_data, config, compute_metrics=table_rows)
        rank = PartialState().process_index  # after train, whose Accelerator sets up the processes
        trained = {key: p.detach() for key, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():
            logits = model(**padding_collator(eval_data[:8])).logits
        summary = {
            "global_step": result.global_step,
            "best_step": result.best_step,
            "log": [{k: v for k, v in record.items() if k != "time"} for record in result.log_history],
            "table_rows": sorted(rows),
            "plain_after_training": not any(isinstance(p, DTensor) for p in model.parameters()),
        }
        Path(root, f"{name}-{rank}.json").write_text(json.dumps(summary))
        tensors = {**{f"trained.{key}": value for key, value in trained.items()}, "logits": logits}
        save_file(tensors, Path(root, f"{name}-{rank}.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])
