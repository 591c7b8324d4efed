r"""GLUE quality of spartan against head-only training, full fine-tuning, adapters and peft LoRA, and
the control ``norms`` (the LayerNorms that spartan's defaults train, and the head, without a memory).

    .venv-bench/bin/python benchmarks/glue.py --data-dir ../shared/glue_data                    # full data
    .venv-bench/bin/python benchmarks/glue.py --data-dir ../shared/glue_data --few-shot 200     # 200 examples per task
    .venv-bench/bin/python benchmarks/glue.py --data-dir ../shared/glue_data --tasks rte --methods spartan \
        --lrs 3e-3 --seeds 0
    .venv-bench/bin/python benchmarks/glue.py ... --methods spartan --spartan '{"temperature": 1.0}'   # a variant

Protocol (the same for every method): all-MiniLM-L6-v2, max length 128, the same epochs, batch size,
warm-up and linear decay; the best epoch is kept by the task's dev metric (as GLUE papers do); a
learning-rate sweep on the first seed picks each method's learning rate by the dev score, then the
other seeds run at that rate; the table gives mean +- std over seeds. SST-2's train set is
subsampled (--sst2-train-samples), the same subset for every method. Few-shot runs draw the
examples with the run's seed, so every method sees the same examples for a given seed.
``spartan`` is ``spartan.SpartanConfig()``, the library's defaults; --spartan JSON overrides them
and names the runs ``spartan{...}``, so variants sit beside the defaults in one table.

Each run's result is one JSON file in results/glue_runs/<setting>/ (``full``, ``fewshot200``; a
non-default schedule or dropout is a setting of its own, e.g. ``full-5ep``, ``full-dropout0``): an
interrupted protocol resumes where it stopped, and the tables (results/glue_<setting>.{md,json}) are rebuilt from every run present.
Wall-clock training time excludes evaluation and checkpoint saving.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, DataCollatorWithPadding

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, when run as a script
import common  # noqa: E402

from spartan import glue  # noqa: E402
from spartan.training import TrainingConfig, train  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TASKS = ("rte", "mrpc", "sst2")
# method -> the learning rates swept on the first seed
LEARNING_RATES = {
    "head": (1e-3, 3e-3, 1e-2),
    "norms": (1e-3, 3e-3, 1e-2),
    "full": (3e-5, 1e-4, 3e-4),
    "spartan": (1e-3, 3e-3, 1e-2),
    "seq_bn": (3e-4, 1e-3, 3e-3),
    "seq_bn_matched": (3e-4, 1e-3, 3e-3),
    "lora": (3e-4, 1e-3, 3e-3),
    "lora_matched": (3e-4, 1e-3, 3e-3),
}
METHOD_NAMES = {"head": "bare"}  # benchmark name -> common.METHODS name, where they differ


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="folder in the official GLUE layout")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--methods", nargs="+", default=list(LEARNING_RATES), choices=list(LEARNING_RATES))
    parser.add_argument("--spartan", type=json.loads, default={}, help="SpartanConfig overrides for spartan, as JSON")
    parser.add_argument(
        "--param-lrs",
        type=json.loads,
        default={},
        help='TrainingConfig.parameter_learning_rates, as JSON: {"*LayerNorm*": 1e-4}; names the runs <method>@{...}',
    )
    parser.add_argument("--lrs", nargs="+", type=float, help="learning rates to sweep (default: per method)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="the first one runs the sweep")
    parser.add_argument("--few-shot", type=int, help="train on this many examples per task (the paper: 200)")
    parser.add_argument("--sst2-train-samples", type=int, default=5000, help="SST-2 train subset (full-data setting)")
    parser.add_argument("--epochs", type=int, help="default: 3, or 5 with --few-shot")
    parser.add_argument(
        "--batch-size", type=int, help="default: 32, or 8 with --few-shot (125 updates on 200 examples)"
    )
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument(
        "--dropout", type=float, help="the backbone's dropout probabilities for every method (default: the model's, 0.1)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report-only", action="store_true", help="rebuild the tables from the saved runs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    default_epochs, default_batch_size = (5, 8) if args.few_shot else (3, 32)
    args.epochs = args.epochs or default_epochs
    args.batch_size = args.batch_size or default_batch_size
    args.setting = f"fewshot{args.few_shot}" if args.few_shot else "full"
    if args.epochs != default_epochs:
        args.setting += f"-{args.epochs}ep"
    if args.batch_size != default_batch_size:
        args.setting += f"-bs{args.batch_size}"
    if args.dropout is not None:
        args.setting += f"-dropout{args.dropout:g}"
    args.runs_dir = args.out / "glue_runs" / args.setting
    args.methods = [spartan_variant(args.spartan) if m == "spartan" else m for m in args.methods]
    if args.param_lrs:
        args.methods = [f"{m}@{json.dumps(args.param_lrs, separators=(',', ':'))}" for m in args.methods]
    return args


def run_name(task: str, method: str, lr: float, seed: int) -> str:
    """The run's file name; a spartan variant's overrides become key=value parts (spartan_temperature=1.0),
    parameter learning rates plr_ parts (spartan_plr_LayerNorm=0.0001)."""
    method, param_lrs = split_method(method)
    parts = [method]
    if method.startswith("spartan{"):
        overrides = spartan_overrides(method)
        parts = ["spartan", *(f"{key}={'+'.join(v) if isinstance(v, list) else v}" for key, v in overrides.items())]
    parts += [f"plr_{pattern}={rate:g}" for pattern, rate in param_lrs.items()]
    name = "_".join(re.sub(r"[^\w.=+-]+", "", part) for part in parts)
    return f"{task}-{name}-lr{lr:g}-seed{seed}"


def split_method(method: str) -> tuple[str, dict[str, float]]:
    """A method name's base method and its parameter learning rates: "spartan@{...}" -> ("spartan", {...})."""
    base, _, param_lrs = method.partition("@")
    return base, json.loads(param_lrs or "{}")


def spartan_variant(overrides: dict) -> str:
    """The method name of spartan with these SpartanConfig overrides ("spartan" for the defaults)."""
    return "spartan" + (json.dumps(overrides, sort_keys=True, separators=(",", ":")) if overrides else "")


def spartan_overrides(method: str) -> dict:
    """The SpartanConfig overrides a spartan method name carries ({} for "spartan")."""
    return json.loads(split_method(method)[0][len("spartan"):] or "{}")


def learning_rates(method: str) -> tuple[float, ...]:
    base = split_method(method)[0]
    return LEARNING_RATES["spartan" if base.startswith("spartan") else base]


def build(method: str, backbone):
    base = split_method(method)[0]
    if base.startswith("spartan"):
        spartan_method = common.Method(base, base, None, common.build_spartan(spartan_overrides(base)))
        return common.build_method(spartan_method, backbone)
    return common.build_method(common.METHODS[METHOD_NAMES.get(base, base)], backbone)


class Data:
    """Tokenised train subsets and dev sets, loaded once per task."""

    def __init__(self, args: argparse.Namespace, tokenizer) -> None:
        self.args, self.tokenizer, self.loaded = args, tokenizer, {}

    def get(self, task_name: str, seed: int):
        task = glue.get_task(task_name)
        if task_name not in self.loaded:
            self.loaded[task_name] = glue.load_glue(task, data_dir=self.args.data_dir)
        data = self.loaded[task_name]
        train_data = data["train"]
        size = self.args.few_shot or (self.args.sst2_train_samples if task_name == "sst2" else None)
        if size is not None and size < len(train_data):
            subset_seed = seed if self.args.few_shot else 0  # full data: one SST-2 subset for every run
            train_data = train_data.shuffle(seed=subset_seed).select(range(size))

        def tokenized(split):
            return glue.tokenize_glue(split, self.tokenizer, task, self.args.max_length).remove_columns("idx")

        return task, tokenized(train_data), tokenized(data[task.validation_split])


def run_one(args: argparse.Namespace, data: Data, task_name: str, method_name: str, lr: float, seed: int) -> dict:
    task, train_data, dev_data = data.get(task_name, seed)
    built = build(method_name, common.build_backbone("minilm", seed=seed, dropout=args.dropout))
    output_dir = Path(tempfile.mkdtemp(prefix=f"glue_{task_name}_"))
    try:
        config = TrainingConfig(
            output_dir=output_dir,
            learning_rate=lr,
            parameter_learning_rates=split_method(method_name)[1],
            num_epochs=args.epochs,
            batch_size=args.batch_size,
            metric_for_best=task.main_metric,
            seed=seed,
            resume=False,
            progress=False,
        )
        result = train(
            built.model,
            train_data,
            dev_data,
            config,
            compute_metrics=lambda logits, labels: glue.compute_metrics(task, logits, labels),
            data_collator=DataCollatorWithPadding(data.tokenizer),
        )
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
    metrics = {name: result.best_metrics[name] for name in task.metrics}
    return {
        "task": task_name,
        "method": method_name,
        "learning_rate": lr,
        "seed": seed,
        "setting": args.setting,
        "metrics": metrics,
        "score": glue.glue_score({task_name: metrics}),
        "best_step": result.best_step,
        "steps": result.global_step,
        "train_examples": len(train_data),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        **({"dropout": args.dropout} if args.dropout is not None else {}),
        "train_seconds": result.train_runtime_s - result.checkpoint_runtime_s,
        "trainable_params": built.trainable_params,
        **({"config": built.extra} if built.extra else {}),
    }


def planned_runs(args: argparse.Namespace) -> list[tuple[str, str, float, int]]:
    """Sweep runs (first seed, every learning rate) for every task and method; the rest come once chosen."""
    return [
        (task, method, lr, args.seeds[0])
        for task in args.tasks
        for method in args.methods
        for lr in (args.lrs or learning_rates(method))
    ]


def load_runs(runs_dir: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(runs_dir.glob("*.json"))]


def best_learning_rate(runs: list[dict], task: str, method: str, first_seed: int) -> float | None:
    sweep = [r for r in runs if (r["task"], r["method"], r["seed"]) == (task, method, first_seed)]
    # ties: the lower learning rate
    return max(sweep, key=lambda r: (r["score"], -r["learning_rate"]))["learning_rate"] if sweep else None


def execute(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    common.import_peers()
    tokenizer = AutoTokenizer.from_pretrained(common.minilm_path())
    data = Data(args, tokenizer)
    args.runs_dir.mkdir(parents=True, exist_ok=True)

    def run_missing(plan, description):
        todo = [cell for cell in plan if not (args.runs_dir / f"{run_name(*cell)}.json").exists()]
        for cell in tqdm(todo, desc=description):
            record = run_one(args, data, *cell)
            path = args.runs_dir / f"{run_name(*cell)}.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=2) + "\n")
            tmp.replace(path)  # atomic: a killed protocol never leaves half a record
            tqdm.write(f"{run_name(*cell)}: {record['metrics']} ({record['train_seconds']:.0f} s training)")
            gc.collect()

    run_missing(planned_runs(args), "learning-rate sweep")
    runs = load_runs(args.runs_dir)
    seeds_plan = []
    for task in args.tasks:
        for method in args.methods:
            lr = best_learning_rate(runs, task, method, args.seeds[0])
            seeds_plan += [(task, method, lr, seed) for seed in args.seeds[1:]]
    run_missing(seeds_plan, "other seeds")


def summarise(runs: list[dict], first_seed: int) -> list[dict]:
    """Per task and method: the learning rate chosen on the first seed, and mean/std over seeds at that rate."""
    rows = []
    variants = sorted({r["method"] for r in runs if r["method"] not in LEARNING_RATES})
    for method in [*LEARNING_RATES, *variants]:
        row = {"method": method, "tasks": {}}
        for task in TASKS:
            lr = best_learning_rate(runs, task, method, first_seed)
            if lr is None:
                continue
            chosen = [r for r in runs if (r["task"], r["method"], r["learning_rate"]) == (task, method, lr)]
            scores = [100 * r["score"] for r in chosen]
            row["tasks"][task] = {
                "learning_rate": lr,
                "seeds": sorted(r["seed"] for r in chosen),
                "score_mean": statistics.mean(scores),
                "score_std": statistics.stdev(scores) if len(scores) > 1 else None,  # one seed: no spread
                "metrics_mean": {
                    m: 100 * statistics.mean(r["metrics"][m] for r in chosen) for m in chosen[0]["metrics"]
                },
                "train_seconds_mean": statistics.mean(r["train_seconds"] for r in chosen),
                "trainable_params": chosen[0]["trainable_params"],
            }
        if row["tasks"]:
            if len(row["tasks"]) == len(TASKS):
                row["average"] = statistics.mean(t["score_mean"] for t in row["tasks"].values())
            rows.append(row)
    return rows


def markdown(rows: list[dict], runs: list[dict], setting: str, first_seed: int) -> str:
    example = runs[0]
    lines = [
        f"GLUE dev, all-MiniLM-L6-v2, setting `{setting}`: {example['epochs']} epochs, batch {example['batch_size']}, "
        + (f"dropout {example['dropout']:g}, " if "dropout" in example else "")
        + "best epoch by the task's dev metric, learning rate chosen on the first seed; mean +- std over seeds, "
        "a single seed's score alone (x100; MRPC = mean of accuracy and F1, as the GLUE score). "
        "Train s = wall-clock seconds of training per run (2 CPU threads), evaluation excluded.",
        "",
        "| method | trainable params | "
        + " | ".join(f"{t.upper()} | lr | seeds | train s" for t in TASKS)
        + " | average |",
        "|---|---|" + "---|---|---|---|" * len(TASKS) + "---|",
    ]
    for row in rows:
        cells = []
        params = next(iter(row["tasks"].values()))["trainable_params"]
        for task in TASKS:
            entry = row["tasks"].get(task)
            if entry is None:
                cells.append(" | | | ")
                continue
            spread = f" +- {entry['score_std']:.1f}" if entry["score_std"] is not None else ""
            cells.append(
                f"{entry['score_mean']:.1f}{spread} | {entry['learning_rate']:g} | "
                f"{len(entry['seeds'])} | {entry['train_seconds_mean']:.0f}"
            )
        average = f"{row['average']:.1f}" if "average" in row else ""
        lines.append(f"| `{row['method']}` | {params:,} | " + " | ".join(cells) + f" | {average} |")
    lines += [
        "",
        f"{len(runs)} runs in results/glue_runs/{setting}/ (every learning rate and seed, with all metrics).",
        "",
    ]
    lines += sweep_table(rows, runs, first_seed)
    return "\n".join(lines) + "\n"


def sweep_table(rows: list[dict], runs: list[dict], first_seed: int) -> list[str]:
    """Markdown lines: every method's score at each learning rate of the sweep on the first seed, the chosen one
    in bold."""
    lines = [
        "Learning-rate sweep on the first seed (score x100 at each rate; bold: chosen):",
        "",
        "| method | " + " | ".join(t.upper() for t in TASKS) + " |",
        "|---|" + "---|" * len(TASKS),
    ]
    for row in rows:
        cells = []
        for task in TASKS:
            entry = row["tasks"].get(task)
            if entry is None:
                cells.append("")
                continue
            sweep = sorted(
                (r["learning_rate"], 100 * r["score"])
                for r in runs
                if (r["task"], r["method"], r["seed"]) == (task, row["method"], first_seed)
            )
            cells.append(", ".join(
                f"**{lr:g}: {score:.1f}**" if lr == entry["learning_rate"] else f"{lr:g}: {score:.1f}"
                for lr, score in sweep
            ))
        lines.append(f"| `{row['method']}` | " + " | ".join(cells) + " |")
    return lines


def report(args: argparse.Namespace) -> None:
    runs = load_runs(args.runs_dir)
    if not runs:
        raise SystemExit(f"no runs in {args.runs_dir}: run the protocol first")
    rows = summarise(runs, args.seeds[0])
    table = markdown(rows, runs, args.setting, args.seeds[0])
    print(table)
    (args.out / f"glue_{args.setting}.md").write_text(table)
    (args.out / f"glue_{args.setting}.json").write_text(json.dumps(rows, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.report_only:
        execute(args)
    report(args)


if __name__ == "__main__":
    main()
