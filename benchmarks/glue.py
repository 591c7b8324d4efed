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
and --param-lrs gives some parameters their own learning rate; such a variant is a table row of its
own (``spartan{...}``, ``<method>@{...}``), beside the defaults.

One run is a ``RunSpec`` (task, method, its overrides, learning rate, seed and ``Setting``: the
schedule). Its result is one JSON file, ``results/glue_runs/<setting>/<RunSpec.name>.json``
(settings: ``full``, ``fewshot200``; a non-default schedule or dropout is a setting of its own, e.g.
``full-5ep``, ``full-dropout0``): an interrupted protocol resumes where it stopped, and the tables
(results/glue_<setting>.{md,json}) are rebuilt from every run present (--report-only: from them alone).
Wall-clock training time excludes evaluation and checkpoint saving.

Tasks: the main table is the three-task protocol (``TASKS``: RTE, MRPC, SST-2) and its average, as
before CoLA. ``--tasks cola`` (``FOUR_TASKS``; the default stays ``TASKS``) adds CoLA, scored by its
main metric, the Matthews correlation x100. Where CoLA runs exist, a second table follows the main
one: each method with CoLA runs, its CoLA score (lr, seeds, train s), its three-task average and,
for methods with runs on all four tasks, the four-task average; the sweep table gains a CoLA column.
The JSON summary gives such a row ``tasks["cola"]`` and ``average_four_tasks``. Without CoLA runs
the tables are exactly the three-task ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import re
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, DataCollatorWithPadding

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, when run as a script
import common  # noqa: E402

import spartan  # noqa: E402
from spartan import _validate as check  # noqa: E402
from spartan import glue  # noqa: E402
from spartan._io import atomic_write_text  # noqa: E402
from spartan.training import TrainingConfig, train  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TASKS = ("rte", "mrpc", "sst2")  # the main table and its average
FOUR_TASKS = (*TASKS, "cola")  # what --tasks accepts; the CoLA table's four-task average
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


# -- what one run is ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """The schedule every run of a protocol shares; ``name`` is the folder of their records.

    ``epochs`` and ``batch_size`` default to 3 and 32 on full data, 5 and 8 with ``few_shot``
    (125 updates on 200 examples); ``dropout`` ``None`` keeps the model's own.
    """

    few_shot: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    dropout: float | None = None

    def __post_init__(self) -> None:
        default_epochs, default_batch_size = self.defaults(self.few_shot)
        object.__setattr__(self, "few_shot", check.optional_positive_int("few_shot", self.few_shot))
        object.__setattr__(self, "epochs", check.positive_int("epochs", self.epochs or default_epochs))
        object.__setattr__(self, "batch_size", check.positive_int("batch_size", self.batch_size or default_batch_size))
        if self.dropout is not None:
            object.__setattr__(self, "dropout", check.number("dropout", self.dropout, minimum=0, maximum=1))

    @staticmethod
    def defaults(few_shot: int | None) -> tuple[int, int]:
        return (5, 8) if few_shot else (3, 32)

    @property
    def name(self) -> str:
        """``full`` or ``fewshot<n>``, then the non-default parts: ``-<e>ep``, ``-bs<b>``, ``-dropout<p>``."""
        default_epochs, default_batch_size = self.defaults(self.few_shot)
        name = f"fewshot{self.few_shot}" if self.few_shot else "full"
        if self.epochs != default_epochs:
            name += f"-{self.epochs}ep"
        if self.batch_size != default_batch_size:
            name += f"-bs{self.batch_size}"
        if self.dropout is not None:
            name += f"-dropout{self.dropout:g}"
        return name

    @classmethod
    def from_name(cls, name: str) -> Setting:
        """The setting a folder name stands for: ``Setting.from_name(s.name) == s``."""
        match = re.fullmatch(r"(?:full|fewshot(\d+))(?:-(\d+)ep)?(?:-bs(\d+))?(?:-dropout([\d.e+-]+))?", name)
        if match is None:
            raise ValueError(f"{name!r} is not a setting name such as 'full', 'fewshot200' or 'full-5ep-dropout0'")
        few_shot, epochs, batch_size, dropout = match.groups()
        return cls(
            few_shot=int(few_shot) if few_shot else None,
            epochs=int(epochs) if epochs else None,
            batch_size=int(batch_size) if batch_size else None,
            dropout=float(dropout) if dropout is not None else None,
        )


@dataclass(frozen=True)
class RunSpec:
    """One run of the protocol: a task, a method with its overrides, a learning rate, a seed, a setting.

    ``label`` names the method and its overrides in the tables; ``name`` is the run's file name
    (without ``.json``) and ``RunSpec.from_name`` reads one back, including the names written
    before this class existed (they have the same form). A file name keeps only the characters
    ``[A-Za-z0-9_.=+-]`` of a parameter-learning-rate pattern (``*LayerNorm*`` -> ``LayerNorm``);
    the run's record holds the exact patterns, and ``RunSpec.from_record`` reads them from it.

    Args:
        task: a GLUE task name (``rte``).
        method: a key of ``LEARNING_RATES`` (``spartan``, ``lora``, ...).
        learning_rate: the peak learning rate.
        seed: the training seed (few-shot runs also draw their examples with it).
        spartan: ``SpartanConfig`` overrides (method ``spartan`` only); ``{}`` is the defaults.
        param_lrs: ``TrainingConfig.parameter_learning_rates``, ``{pattern: rate}``, in order.
        setting: the schedule.
    """

    task: str
    method: str
    learning_rate: float
    seed: int
    spartan: dict[str, Any] = field(default_factory=dict)
    param_lrs: dict[str, float] = field(default_factory=dict)
    setting: Setting = field(default_factory=Setting)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9]+", self.task):
            raise ValueError(f"task must be a GLUE task name such as 'rte', got {self.task!r}")
        if self.method not in LEARNING_RATES:
            raise ValueError(f"method must be one of {', '.join(LEARNING_RATES)}, got {self.method!r}")
        if self.spartan and self.method != "spartan":
            raise ValueError(f"SpartanConfig overrides apply to method 'spartan' only, got method {self.method!r}")
        object.__setattr__(self, "spartan", dict(sorted(self.spartan.items())))
        object.__setattr__(self, "param_lrs", dict(self.param_lrs))

    @property
    def label(self) -> str:
        """The table row: the method, then its SpartanConfig overrides and parameter learning rates as
        JSON: ``spartan{"temperature":1.0}@{"*LayerNorm*":0.001}``."""
        label = self.method
        if self.spartan:
            label += json.dumps(self.spartan, sort_keys=True, separators=(",", ":"))
        if self.param_lrs:
            label += "@" + json.dumps(self.param_lrs, separators=(",", ":"))
        return label

    @property
    def name(self) -> str:
        """The file name: ``<task>-<method>[_<key>=<value>...][_plr_<pattern>=<rate>...]-lr<lr>-seed<seed>``,
        e.g. ``rte-spartan_temperature=1.0_plr_LayerNorm=0.001-lr0.003-seed0`` (list values joined by ``+``)."""
        parts = [self.method]
        parts += [f"{key}={'+'.join(v) if isinstance(v, list) else v}" for key, v in self.spartan.items()]
        parts += [f"plr_{pattern}={rate:g}" for pattern, rate in self.param_lrs.items()]
        body = "_".join(re.sub(r"[^\w.=+-]+", "", part) for part in parts)
        return f"{self.task}-{body}-lr{self.learning_rate:g}-seed{self.seed}"

    @property
    def sweep(self) -> tuple[float, ...]:
        """The learning rates the protocol sweeps for this method."""
        return LEARNING_RATES[self.method]

    def replace(self, **changes: Any) -> RunSpec:
        return dataclasses.replace(self, **changes)

    def record(self) -> dict[str, Any]:
        """The fields a run's record starts with (``from_record`` reads them back)."""
        return {
            "task": self.task,
            "method": self.label,
            "learning_rate": self.learning_rate,
            "seed": self.seed,
            "setting": self.setting.name,
            "run": {"method": self.method, "spartan": self.spartan, "param_lrs": self.param_lrs},
            "epochs": self.setting.epochs,
            "batch_size": self.setting.batch_size,
            **({"dropout": self.setting.dropout} if self.setting.dropout is not None else {}),
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> RunSpec:
        """The run a record describes. Records written before ``RunSpec`` carry the method and its
        overrides only as the label (``spartan{...}@{...}``): that is read back here, and nowhere else."""
        if "run" in record:
            method, spartan_overrides, param_lrs = (record["run"][k] for k in ("method", "spartan", "param_lrs"))
        else:
            variant, _, param_lrs_json = record["method"].partition("@")
            method, spartan_overrides = variant, {}
            if variant.startswith("spartan{"):
                method, spartan_overrides = "spartan", json.loads(variant[len("spartan"):])
            param_lrs = json.loads(param_lrs_json or "{}")
        return cls(
            record["task"],
            method,
            record["learning_rate"],
            record["seed"],
            spartan_overrides,
            param_lrs,
            Setting.from_name(record["setting"]),
        )

    @classmethod
    def from_name(cls, name: str, setting: Setting | str = "full") -> RunSpec:
        """The run a file name (without ``.json``) stands for, in the folder of ``setting``:
        ``RunSpec.from_name(s.name, s.setting).name == s.name``. Values take the type of the
        SpartanConfig field they set; a pattern keeps only what the name kept of it."""
        match = re.fullmatch(r"(?P<task>[a-z0-9]+)-(?P<body>.+)-lr(?P<lr>[\d.e+-]+)-seed(?P<seed>\d+)", name)
        if match is None:
            raise ValueError(f"{name!r} is not a run name of the form <task>-<method>-lr<lr>-seed<seed>")
        body = match["body"]
        method = max((m for m in LEARNING_RATES if body == m or body.startswith(m + "_")), key=len, default=None)
        if method is None:
            raise ValueError(f"run name {name!r} starts with no method of {', '.join(LEARNING_RATES)}")
        overrides, param_lrs = {}, {}
        for key, value in _name_items(body[len(method) + 1:], name):
            if key.startswith("plr_"):
                param_lrs[key[4:]] = float(value)
            else:
                overrides[key] = _spartan_value(key, value)
        return cls(
            match["task"],
            method,
            float(match["lr"]),
            int(match["seed"]),
            overrides,
            param_lrs,
            setting if isinstance(setting, Setting) else Setting.from_name(setting),
        )


def _spartan_fields() -> dict[str, Any]:
    """SpartanConfig's field names and default values."""
    defaults = spartan.SpartanConfig()
    return {f.name: getattr(defaults, f.name) for f in dataclasses.fields(defaults)}


def _name_items(text: str, name: str) -> list[tuple[str, str]]:
    """The ``key=value`` items of a run name's method part, joined by ``_``; keys are SpartanConfig
    fields or ``plr_<pattern>``, so a value may hold ``_`` (``modules_to_save=pre_classifier``)."""
    if not text:
        return []
    keys = "|".join(sorted(map(re.escape, _spartan_fields()), key=len, reverse=True))
    starts = list(re.finditer(rf"(?:^|(?<=_))(?P<key>{keys}|plr_[^=]+)=", text))
    if not starts or starts[0].start() != 0:
        raise ValueError(
            f"run name {name!r}: {text!r} is not a list of <SpartanConfig field>=<value> or plr_<pattern>=<rate>"
        )
    ends = [m.start() - 1 for m in starts[1:]] + [len(text)]  # each value ends at the "_" before the next key
    return [(m["key"], text[m.end():end]) for m, end in zip(starts, ends)]


def _spartan_value(key: str, text: str) -> Any:
    """A SpartanConfig value as a run name writes it, with the type of the field's default (list
    fields: ``+``-joined names)."""
    default = _spartan_fields()[key]
    if isinstance(default, bool):
        return text == "True"
    if isinstance(default, int):
        return int(text)
    if isinstance(default, float):
        return float(text)
    if isinstance(default, str):
        return text
    return text.split("+")


# -- the command line -----------------------------------------------------------------------------


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data-dir", type=Path, help="folder in the official GLUE layout (not needed with --report-only)"
    )
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=FOUR_TASKS)
    parser.add_argument("--methods", nargs="+", default=list(LEARNING_RATES), choices=list(LEARNING_RATES))
    parser.add_argument("--spartan", type=json_object, default={}, help="SpartanConfig overrides for spartan, as JSON")
    parser.add_argument(
        "--param-lrs",
        type=json_object,
        default={},
        help='TrainingConfig.parameter_learning_rates, as JSON: {"*LayerNorm*": 1e-4}; labels the runs <method>@{...}',
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
        "--dropout",
        type=float,
        help="the backbone's dropout probabilities for every method (default: the model's, 0.1)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report-only", action="store_true", help="rebuild the tables from the saved runs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.data_dir is None and not args.report_only:
        parser.error("--data-dir is required (the GLUE data), unless --report-only rebuilds the tables from saved runs")
    for flag, check_value in (
        ("--spartan", lambda: spartan.SpartanConfig(**args.spartan)),
        ("--param-lrs", lambda: TrainingConfig(output_dir="unused", parameter_learning_rates=args.param_lrs)),
    ):
        try:
            check_value()
        except (TypeError, ValueError) as error:
            parser.error(f"{flag}: {error}")
    try:
        args.setting = Setting(args.few_shot, args.epochs, args.batch_size, args.dropout)
    except ValueError as error:
        parser.error(str(error))
    args.runs_dir = args.out / "glue_runs" / args.setting.name
    # one spec per method at the first task, rate and seed: the plan varies those
    args.variants = [
        RunSpec(args.tasks[0], m, 0.0, args.seeds[0], args.spartan if m == "spartan" else {}, args.param_lrs,
                args.setting)
        for m in args.methods
    ]
    return args


# -- running -----------------------------------------------------------------------------------------


def build(spec: RunSpec, backbone):
    if spec.method == "spartan":
        return common.build_method(common.Method(spec.label, spec.label, None, common.build_spartan(spec.spartan)),
                                   backbone)
    return common.build_method(common.METHODS[METHOD_NAMES.get(spec.method, spec.method)], backbone)


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
        few_shot = self.args.setting.few_shot
        size = few_shot or (self.args.sst2_train_samples if task_name == "sst2" else None)
        if size is not None and size < len(train_data):
            subset_seed = seed if few_shot else 0  # full data: one SST-2 subset for every run
            train_data = train_data.shuffle(seed=subset_seed).select(range(size))

        def tokenized(split):
            return glue.tokenize_glue(split, self.tokenizer, task, self.args.max_length).remove_columns("idx")

        return task, tokenized(train_data), tokenized(data[task.validation_split])


def run_one(data: Data, spec: RunSpec) -> dict:
    """Train one run and return its record."""
    task, train_data, dev_data = data.get(spec.task, spec.seed)
    built = build(spec, common.build_backbone("minilm", seed=spec.seed, dropout=spec.setting.dropout))
    with tempfile.TemporaryDirectory(prefix=f"glue_{spec.task}_") as output_dir:
        config = TrainingConfig(
            output_dir=output_dir,
            learning_rate=spec.learning_rate,
            parameter_learning_rates=spec.param_lrs,
            num_epochs=spec.setting.epochs,
            batch_size=spec.setting.batch_size,
            metric_for_best=task.main_metric,
            seed=spec.seed,
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
    metrics = {name: result.best_metrics[name] for name in task.metrics}
    return {
        **spec.record(),
        "metrics": metrics,
        "score": glue.glue_score({spec.task: metrics}),
        "best_step": result.best_step,
        "steps": result.global_step,
        "train_examples": len(train_data),
        "train_seconds": result.train_runtime_s - result.checkpoint_runtime_s,
        "threads": torch.get_num_threads(),  # train_seconds compare only between runs on as many threads
        "trainable_params": built.trainable_params,
        # every evaluation (at each epoch's end): the main metric by epoch, e.g. whether CoLA learns in epoch 1
        "evaluations": [
            {"step": r["step"], "epoch": r["epoch"], **{m: r[m] for m in task.metrics if m in r}}
            for r in result.log_history
            if "eval_loss" in r
        ],
        **({"config": built.extra} if built.extra else {}),
    }


def planned_runs(args: argparse.Namespace) -> list[RunSpec]:
    """Sweep runs (first seed, every learning rate) for every task and method; the rest come once chosen."""
    return [
        variant.replace(task=task, learning_rate=lr)
        for task in args.tasks
        for variant in args.variants
        for lr in (args.lrs or variant.sweep)
    ]


def load_runs(runs_dir: Path) -> list[dict]:
    """Every run record in ``runs_dir``; each file must be named by the run it holds."""
    runs = []
    for path in sorted(runs_dir.glob("*.json")):
        record = json.loads(path.read_text())
        spec = RunSpec.from_record(record)
        if spec.name != path.stem:
            raise SystemExit(f"error: {path} holds the run {spec.name}: rename the file to {spec.name}.json")
        runs.append(record)
    return runs


def sweep_seed(runs: list[dict], task: str, label: str) -> int | None:
    """The seed that ran ``label``'s learning-rate sweep on ``task``: its lowest seed with a run."""
    return min((r["seed"] for r in runs if (r["task"], r["method"]) == (task, label)), default=None)


def best_learning_rate(runs: list[dict], task: str, label: str, first_seed: int | None = None) -> float | None:
    """The learning rate whose first-seed run of ``label`` on ``task`` scored best (ties: the lower);
    the first seed defaults to the sweep's (``sweep_seed``)."""
    if first_seed is None:
        first_seed = sweep_seed(runs, task, label)
    sweep = [r for r in runs if (r["task"], r["method"], r["seed"]) == (task, label, first_seed)]
    return max(sweep, key=lambda r: (r["score"], -r["learning_rate"]))["learning_rate"] if sweep else None


def execute(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    common.import_peers()
    tokenizer = AutoTokenizer.from_pretrained(common.minilm_path())
    data = Data(args, tokenizer)

    def run_missing(plan: list[RunSpec], description: str) -> None:
        todo = [spec for spec in plan if not (args.runs_dir / f"{spec.name}.json").exists()]
        for spec in tqdm(todo, desc=description):
            record = run_one(data, spec)
            atomic_write_text(args.runs_dir / f"{spec.name}.json", json.dumps(record, indent=2) + "\n")
            tqdm.write(f"{spec.name}: {record['metrics']} ({record['train_seconds']:.0f} s training)")
            gc.collect()

    run_missing(planned_runs(args), "learning-rate sweep")
    runs = load_runs(args.runs_dir)
    seeds_plan = []
    for task in args.tasks:
        for variant in args.variants:
            lr = best_learning_rate(runs, task, variant.label, args.seeds[0])
            seeds_plan += [variant.replace(task=task, learning_rate=lr, seed=seed) for seed in args.seeds[1:]]
    run_missing(seeds_plan, "other seeds")


# -- the tables --------------------------------------------------------------------------------------


def summarise(runs: list[dict]) -> list[dict]:
    """Per task and method: the learning rate chosen on the sweep's seed, and mean/std over seeds at that
    rate (the same tables whichever ``--seeds`` the last invocation ran)."""
    rows = []
    variants = sorted({r["method"] for r in runs if r["method"] not in LEARNING_RATES})
    for method in [*LEARNING_RATES, *variants]:
        row = {"method": method, "tasks": {}}
        for task in FOUR_TASKS:
            lr = best_learning_rate(runs, task, method)
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
            if all(task in row["tasks"] for task in TASKS):
                row["average"] = statistics.mean(row["tasks"][task]["score_mean"] for task in TASKS)
            if all(task in row["tasks"] for task in FOUR_TASKS):
                row["average_four_tasks"] = statistics.mean(row["tasks"][task]["score_mean"] for task in FOUR_TASKS)
            rows.append(row)
    return rows


def markdown(rows: list[dict], runs: list[dict], setting: str) -> str:
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
    for row in (row for row in rows if any(task in row["tasks"] for task in TASKS)):
        cells = []
        params = next(entry for task, entry in row["tasks"].items() if task in TASKS)["trainable_params"]
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
    lines += cola_table(rows)
    lines += sweep_table(rows, runs)
    return "\n".join(lines) + "\n"


def cola_table(rows: list[dict]) -> list[str]:
    """Markdown lines: the methods with CoLA runs, their CoLA score (Matthews correlation x100), the
    three-task average and the four-task one (methods with all four tasks); no lines without CoLA runs."""
    with_cola = [row for row in rows if "cola" in row["tasks"]]
    if not with_cola:
        return []
    lines = [
        "With CoLA (Matthews correlation x100, learning rate chosen on the first seed as above); "
        "the four-task average is over " + ", ".join(t.upper() for t in FOUR_TASKS) + ", for methods with all four:",
        "",
        "| method | trainable params | COLA | lr | seeds | train s | average (3 tasks) | average (4 tasks) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in with_cola:
        entry = row["tasks"]["cola"]
        spread = f" +- {entry['score_std']:.1f}" if entry["score_std"] is not None else ""
        averages = [f"{row[key]:.1f}" if key in row else "" for key in ("average", "average_four_tasks")]
        lines.append(
            f"| `{row['method']}` | {entry['trainable_params']:,} | {entry['score_mean']:.1f}{spread} | "
            f"{entry['learning_rate']:g} | {len(entry['seeds'])} | {entry['train_seconds_mean']:.0f} | "
            + " | ".join(averages) + " |"
        )
    return [*lines, ""]


def sweep_table(rows: list[dict], runs: list[dict]) -> list[str]:
    """Markdown lines: every method's score at each learning rate of the sweep on the first seed, the chosen one
    in bold; a CoLA column where CoLA runs exist."""
    tasks = [task for task in FOUR_TASKS if task in TASKS or any(task in row["tasks"] for row in rows)]
    lines = [
        "Learning-rate sweep on the first seed (score x100 at each rate; bold: chosen):",
        "",
        "| method | " + " | ".join(t.upper() for t in tasks) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    for row in rows:
        cells = []
        for task in tasks:
            entry = row["tasks"].get(task)
            if entry is None:
                cells.append("")
                continue
            seed = sweep_seed(runs, task, row["method"])
            sweep = sorted(
                (r["learning_rate"], 100 * r["score"])
                for r in runs
                if (r["task"], r["method"], r["seed"]) == (task, row["method"], seed)
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
        raise SystemExit(f"error: no runs in {args.runs_dir}: run the protocol first (without --report-only)")
    rows = summarise(runs)
    table = markdown(rows, runs, args.setting.name)
    print(table)
    atomic_write_text(args.out / f"glue_{args.setting.name}.md", table)
    atomic_write_text(args.out / f"glue_{args.setting.name}.json", json.dumps(rows, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.report_only:
        execute(args)
    report(args)


if __name__ == "__main__":
    main()
