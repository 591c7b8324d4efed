"""Deploy trained SPARTAN memories on ONNX Runtime: one backbone graph, every task a small file.

    python examples/glue_finetune.py --task sst2 --data-dir ../shared/glue_data      # writes runs/sst2-spartan/
    python examples/deploy_onnx.py --checkpoint runs/sst2-spartan/best --checkpoint runs/mrpc-spartan/best \\
        --data-dir ../shared/glue_data --output-dir deploy/minilm --int8

Each --checkpoint is a memory checkpoint (spartan.save_memory's folder, e.g. a run's best/). Its
task and backbone come from the run's run.json beside it (or inside it); a checkpoint without one
needs --task (one checkpoint only) and the backbone from --model. The backbone is loaded once, every
checkpoint is loaded onto it under its GLUE task's name, and spartan.export_onnx writes OUTPUT
(--output-dir, replaced whole):

  manifest.json          inputs, tasks, memory shape, graphs
  backbone.onnx          the backbone graph, shared by every task (with --int8: backbone.int8.onnx too)
  tasks/<task>/          one memory checkpoint per task
  deploy_report.json     what this script measured: per task the dev-set metric on ONNX Runtime (each
                         graph) and in eager PyTorch, how many predictions agree, batch-1 latency (one
                         dev example at its own length and padded to --max-length), and the file sizes

Serve the folder with spartan.OnnxRuntimeModel(OUTPUT).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

import spartan
from spartan import _io, _validate, glue
from spartan.export import GRAPH_NAMES, TASKS_FOLDER

_EXAMPLES = str(Path(__file__).resolve().parent)
if _EXAMPLES not in sys.path:  # examples/ is no package: import the fine-tuning script beside this one
    sys.path.insert(0, _EXAMPLES)
from glue_finetune import DEFAULT_MODEL, RUN_NAME, resolve_model  # noqa: E402

REPORT_NAME = "deploy_report.json"
DEFAULT_MAX_LENGTH = 128


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deploy_onnx.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, action="append", required=True,
                        help="memory checkpoint folder (e.g. runs/sst2-spartan/best); repeat for more tasks")
    parser.add_argument("--task", help="GLUE task of a single checkpoint that has no run.json")
    parser.add_argument("--data-dir", type=Path, help="folder in the official GLUE layout (default: the Hub)")
    parser.add_argument("--output-dir", type=Path, required=True, help="the folder to write (replaced whole)")
    parser.add_argument("--int8", action="store_true", help="also export and evaluate an int8 backbone")
    parser.add_argument("--model", help=f"backbone name or path (default: the runs' model, else {DEFAULT_MODEL})")
    parser.add_argument("--max-length", type=int,
                        help=f"tokens per example (default: the runs', else {DEFAULT_MAX_LENGTH})")
    parser.add_argument("--batch-size", type=int, default=32, help="dev-set batch size (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="intra-op threads for ONNX Runtime and PyTorch")
    parser.add_argument("--max-eval-samples", type=int, help="evaluate each task on its first N dev examples")
    parser.add_argument("--latency-calls", type=int, default=50, help="batch-1 calls timed (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    try:
        for option in ("batch_size", "latency_calls"):
            _validate.positive_int(f"--{option.replace('_', '-')}", getattr(args, option))
        for option in ("max_length", "threads", "max_eval_samples"):
            _validate.optional_positive_int(f"--{option.replace('_', '-')}", getattr(args, option))
    except ValueError as error:
        parser.error(str(error))
    if args.task is not None and len(args.checkpoint) > 1:
        parser.error("--task names the task of a single checkpoint; with several, each needs its run's run.json")
    return args


def read_run(parser: argparse.ArgumentParser, checkpoint: Path, task_option: str | None) -> dict[str, Any]:
    """The checkpoint's task (a GlueTask), the run settings it came with (or {}) and its description."""
    if _io.existing_folder(checkpoint) is None:
        parser.error(f"--checkpoint {checkpoint} does not exist: pass a folder written by spartan.save_memory")
    try:
        description, _ = spartan.read_checkpoint(checkpoint)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    settings: dict[str, Any] = {}
    for candidate in (checkpoint / RUN_NAME, checkpoint.parent / RUN_NAME):
        if candidate.is_file():
            try:
                settings = json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                parser.error(f"{candidate} cannot be read ({error}): pass --task, or fine-tune again")
            break
    name = task_option or settings.get("task")
    if name is None:
        parser.error(f"--checkpoint {checkpoint} has no {RUN_NAME} beside it to name its task: pass --task")
    try:
        task = glue.get_task(name)
    except ValueError as error:
        parser.error(str(error))
    if task.validation_split not in task.split_files:
        parser.error(f"{task.name} has no labelled dev set to evaluate on: choose another task")
    labels = description["task"]["num_labels"]
    if labels is not None and labels != task.num_labels:
        parser.error(f"--checkpoint {checkpoint} has a head of {labels} outputs but {task.name} has {task.num_labels}")
    max_length = (settings.get("training") or {}).get("max_length")
    return {"checkpoint": checkpoint, "task": task, "model": settings.get("model"), "max_length": max_length}


def load_dev(parser: argparse.ArgumentParser, task: glue.GlueTask, args: argparse.Namespace):
    try:
        data = glue.load_glue(task, data_dir=args.data_dir)[task.validation_split]
    except ConnectionError as error:
        parser.error(f"{str(error).splitlines()[0]} (pass --data-dir)")
    except (OSError, ValueError) as error:  # a missing or unreadable file
        message = " ".join(str(error).split())
        parser.error(f"{f'--data-dir {args.data_dir}: ' if args.data_dir is not None else ''}{message}")
    if args.max_eval_samples is not None and args.max_eval_samples < len(data):
        data = data.select(range(args.max_eval_samples))
    return data


def folder_sizes(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Bytes of each backbone graph (with any weights file beside it), of each task's folder, and of the whole."""

    def size(path: Path) -> int:
        return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())

    graphs = {file: sum(size(p) for p in folder.glob(f"{file}*")) for file in manifest["graphs"].values()}
    tasks = {name: size(folder / TASKS_FOLDER / name) for name in manifest["tasks"]}
    return {"backbone": graphs, "tasks": tasks, "total": size(folder)}


def median_ms(call, calls: int) -> float:
    for _ in range(min(3, calls)):  # warm-up
        call()
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def evaluate(model, runtimes, tokenizer, entry, args) -> dict[str, Any]:
    """The task's dev metrics in eager PyTorch and on each ONNX graph (the same batches), their
    agreement, and batch-1 latency."""
    task, name = entry["task"], entry["task"].name
    spartan.set_active_memory(model, name)
    tokenized = glue.tokenize_glue(entry["dev"], tokenizer, task, entry["max_length"])
    inputs = tokenized.select_columns([c for c in tokenized.column_names if c in tokenizer.model_input_names])
    loader = DataLoader(inputs, batch_size=args.batch_size, collate_fn=DataCollatorWithPadding(tokenizer))
    logits: dict[str, list[np.ndarray]] = {"pytorch": [], **{graph: [] for graph in runtimes}}
    with torch.no_grad():
        for batch in tqdm(loader, desc=f"{name} dev", disable=args.no_progress):
            logits["pytorch"].append(model(**batch).logits.float().numpy())
            for graph, runtime in runtimes.items():
                logits[graph].append(runtime(name, **onnx_inputs(runtime, batch)))
    references = np.asarray(entry["dev"]["label"])
    outputs = {key: np.concatenate(values) for key, values in logits.items()}
    predictions = {key: value[:, 0] if task.is_regression else value.argmax(-1) for key, value in outputs.items()}
    result: dict[str, Any] = {
        "checkpoint": str(entry["checkpoint"]),
        "glue_task": task.name,
        "main_metric": task.main_metric,
        "dev_examples": len(references),
        "max_length": entry["max_length"],
        "pytorch": glue.compute_metrics(task, outputs["pytorch"], references),
        "onnx": {graph: glue.compute_metrics(task, outputs[graph], references) for graph in runtimes},
        "max_abs_logit_difference": {
            graph: float(np.abs(outputs[graph] - outputs["pytorch"]).max()) for graph in runtimes
        },
    }
    if not task.is_regression:
        result["same_predictions"] = {
            graph: float(np.mean(predictions[graph] == predictions["pytorch"])) for graph in runtimes
        }
    result["latency_ms"] = latency(model, runtimes, tokenizer, tokenized[0], entry["max_length"], name, args)
    return result


def onnx_inputs(runtime: spartan.OnnxRuntimeModel, batch) -> dict[str, np.ndarray]:
    keep = [key for key in ("input_ids", "attention_mask", "token_type_ids") if key in runtime.manifest["inputs"]]
    return {key: batch[key].numpy() for key in keep if key in batch}


def latency(model, runtimes, tokenizer, example, padded_length, name, args) -> dict[str, Any]:
    """Median milliseconds of one batch-1 call: one dev example at its own length, and padded."""
    features = {key: example[key] for key in tokenizer.model_input_names if key in example}
    shapes = {
        "real_length": tokenizer.pad([features], return_tensors="pt"),
        "padded": tokenizer.pad([features], padding="max_length", max_length=padded_length, return_tensors="pt"),
    }
    result: dict[str, Any] = {"tokens": {"real_length": len(example["input_ids"]), "padded": padded_length}}
    for label, runtime in [("pytorch", None), *runtimes.items()]:
        result[label] = {}
        for shape, batch in shapes.items():
            if runtime is None:
                with torch.no_grad():
                    result[label][shape] = median_ms(lambda: model(**batch), args.latency_calls)
            else:
                feeds = onnx_inputs(runtime, batch)
                result[label][shape] = median_ms(lambda: runtime(name, **feeds), args.latency_calls)
    return result


def print_summary(report: dict[str, Any]) -> None:
    for name, result in report["tasks"].items():
        metric = result["main_metric"]
        tokens = result["latency_ms"]["tokens"]
        print(f"{name}: {metric} on {result['dev_examples']} dev examples; batch-1 latency at "
              f"{tokens['real_length']} / {tokens['padded']} tokens")
        for label in ["pytorch", *result["onnx"]]:
            metrics = result["pytorch"] if label == "pytorch" else result["onnx"][label]
            times = result["latency_ms"][label]
            agree = "" if label == "pytorch" or "same_predictions" not in result else (
                f"   same predictions as pytorch {100 * result['same_predictions'][label]:.1f}%")
            title = label if label == "pytorch" else f"onnx {label}"
            print(f"  {title:<10} {metric} {metrics[metric]:.4f}   "
                  f"{times['real_length']:.2f} ms / {times['padded']:.2f} ms{agree}")
    sizes = report["sizes"]
    parts = [f"{file} {spartan.format_bytes(size)}" for file, size in sizes["backbone"].items()]
    parts += [f"{TASKS_FOLDER}/{name} {spartan.format_bytes(size)}" for name, size in sizes["tasks"].items()]
    print(f"sizes: {', '.join(parts)}; total {spartan.format_bytes(sizes['total'])}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parse_args(parser, argv)
    entries = [read_run(parser, checkpoint, args.task) for checkpoint in args.checkpoint]
    names = [entry["task"].name for entry in entries]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        parser.error(f"several checkpoints are for {', '.join(repeated)}: deploy one checkpoint per task")
    models = {entry["model"] for entry in entries if entry["model"] is not None}
    if args.model is None and len(models) > 1:
        parser.error(f"the checkpoints were trained on different models ({', '.join(sorted(models))}): pass --model")
    model_name = args.model or next(iter(models), DEFAULT_MODEL)
    for entry in entries:
        entry["max_length"] = args.max_length or entry["max_length"] or DEFAULT_MAX_LENGTH
        entry["dev"] = load_dev(parser, entry["task"], args)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        parser.error("ONNX Runtime is not installed: pip install 'spartan[deploy]'")

    model_path = resolve_model(model_name)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(model_path)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except OSError as error:
        parser.error(f"cannot load the model {model_name}: {(str(error).strip().splitlines() or ['not found'])[0]}")
    try:
        for entry in entries:
            spartan.load_memory(model, entry["checkpoint"], name=entry["task"].name)
        model.eval()
        folder = spartan.export_onnx(model, args.output_dir, quantize="int8" if args.int8 else None)
    except (OSError, RuntimeError, ValueError) as error:
        parser.error(str(error).splitlines()[0])

    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        graphs = [graph for graph in GRAPH_NAMES if graph == "fp32" or args.int8]
        runtimes = {graph: spartan.OnnxRuntimeModel(folder, graph=graph, threads=args.threads) for graph in graphs}
        tasks = {entry["task"].name: evaluate(model, runtimes, tokenizer, entry, args) for entry in entries}
    finally:
        torch.set_num_threads(threads)
    report = {
        "model": model_name,
        "output_dir": str(folder),
        "graphs": {graph: GRAPH_NAMES[graph] for graph in graphs},
        "threads": args.threads,
        "batch_size": args.batch_size,
        "latency_calls": args.latency_calls,
        "sizes": folder_sizes(folder, runtimes["fp32"].manifest),
        "tasks": tasks,
    }
    _io.atomic_write_text(folder / REPORT_NAME, json.dumps(report, indent=2) + "\n")
    print_summary(report)
    print(f"report: {folder / REPORT_NAME}")
    return report


if __name__ == "__main__":
    main()
