"""``TrainingConfig`` (how ``train`` runs, validated and normalised) and ``TrainResult`` (what it did)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import _validate as check
from ..config import JsonConfig

MIXED_PRECISIONS = ("no", "bf16", "auto")
SHARDINGS = ("none", "fsdp")
POSITIVE_INTS = ("num_epochs", "batch_size", "eval_batch_size", "gradient_accumulation_steps", "log_every_steps")
OPTIONAL_POSITIVE_INTS = ("max_steps", "eval_every_steps", "early_stopping_patience")
FLAGS = ("greater_is_better", "resume", "progress")


@dataclass
class TrainingConfig(JsonConfig):
    """How ``train`` runs.

    Values are checked and normalised when the config is made: numbers may come as strings (YAML
    reads ``3e-3`` as one) or NumPy scalars and are stored as ``int`` or ``float``; booleans are
    never taken as numbers, nor strings as booleans; NaN and infinity are refused.

    Args:
        output_dir: where ``last/`` (resume state), ``best/`` (best weights) and ``log.jsonl`` go.
        learning_rate: peak AdamW learning rate; memories and heads want large ones (the few-shot
            GLUE sweeps behind the default: benchmarks/results/glue_tuning.md).
        parameter_learning_rates: other peak rates for some parameters, a dict ``{pattern: rate}``
            with ``fnmatch`` patterns over parameter names, e.g. ``{"*LayerNorm*": 1e-4}``; a
            parameter takes the rate of the first pattern it matches, the others ``learning_rate``.
            Every pattern must match a trainable parameter.
        weight_decay: AdamW's decoupled weight decay, applied to every trainable parameter.
        num_epochs: passes over the training data.
        max_steps: optimizer updates to run; overrides ``num_epochs``.
        batch_size: training examples per process and forward pass.
        eval_batch_size: evaluation examples per process and forward pass.
        gradient_accumulation_steps: forward passes per optimizer update.
        warmup_ratio: share of the updates over which the learning rate rises linearly from
            ``learning_rate / warmup_steps`` to ``learning_rate``; it then falls linearly towards 0.
        max_grad_norm: gradients are clipped to this norm; ``None`` turns clipping off.
        mixed_precision: ``"no"``, ``"bf16"``, or ``"auto"`` (bf16 on an accelerator that supports
            it, full precision on CPU).
        eval_every_steps: evaluate (and save ``last/``) every this many updates; ``None``: only at
            each epoch's end, which always happens, as does the end of training.
        metric_for_best: key of the ``compute_metrics`` output that picks the best checkpoint, e.g.
            ``"accuracy"``; ``None``: the lowest evaluation loss.
        greater_is_better: whether a larger ``metric_for_best`` is better (the loss: lower is).
        early_stopping_patience: stop after this many evaluations without improvement; ``None``: never.
        seed: ``train`` seeds Python, NumPy and torch with it before it makes anything, and it
            fixes the order of the training data. The model is built before ``train`` is called:
            seed before building it too, for runs that repeat exactly.
        resume: continue from ``output_dir/last`` when it exists, with the same data order, RNG
            states and optimizer state; ``False`` starts afresh (and deletes the previous
            ``last/``, ``best/`` and log). Changing seed, batch sizes or optimizer settings
            between the two is refused; changing ``num_epochs`` or ``max_steps`` is allowed.
        log_every_steps: log the training loss and learning rate every this many updates.
        num_workers: DataLoader worker processes.
        progress: show a tqdm progress bar (main process only).
        sharding: how several processes split the work. ``"none"``: data-parallel (DDP), every
            process holds all trainable parameters, their gradients and optimizer state.
            ``"fsdp"``: each module that holds trainable parameters (each memory with its
            ``keys``, ``values`` and ``sub_keys``, the head, the trained norms) is sharded on its
            own with PyTorch's FSDP2 (``fully_shard``): each process holds one slice of every
            table and its AdamW moments, and a table whole only while its layer runs. The frozen
            backbone is not sharded (every process holds it). Checkpoints hold full tensors, as
            an unsharded run's, and the model returned holds the full trained weights on every
            process. On one process there is nothing to shard across and the run is the
            unsharded one. Sparse gradients (``SpartanConfig(sparse_gradients=True)``) are refused.
    """

    output_dir: str
    learning_rate: float = 3e-3
    parameter_learning_rates: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.0
    num_epochs: int = 3
    max_steps: int | None = None
    batch_size: int = 32
    eval_batch_size: int = 64
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.06
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "auto"
    eval_every_steps: int | None = None
    metric_for_best: str | None = None
    greater_is_better: bool = True
    early_stopping_patience: int | None = None
    seed: int = 42
    resume: bool = True
    log_every_steps: int = 10
    num_workers: int = 0
    progress: bool = True
    sharding: str = "none"

    def __post_init__(self) -> None:
        output_dir = os.fspath(self.output_dir) if isinstance(self.output_dir, (str, os.PathLike)) else None
        if not isinstance(output_dir, str) or not output_dir:
            raise ValueError(f"output_dir must name a folder, got {self.output_dir!r}")
        self.output_dir = output_dir
        for name in POSITIVE_INTS:
            setattr(self, name, check.positive_int(name, getattr(self, name)))
        for name in OPTIONAL_POSITIVE_INTS:
            setattr(self, name, check.optional_positive_int(name, getattr(self, name)))
        self.num_workers = check.integer("num_workers", self.num_workers, minimum=0)
        self.seed = check.integer("seed", self.seed, minimum=0, maximum=2**32 - 1)
        self.learning_rate = check.positive_number("learning_rate", self.learning_rate)
        self.parameter_learning_rates = _learning_rates(self.parameter_learning_rates)
        self.weight_decay = check.number("weight_decay", self.weight_decay, minimum=0)
        self.warmup_ratio = check.number("warmup_ratio", self.warmup_ratio, minimum=0, maximum=1)
        if self.max_grad_norm is not None:
            self.max_grad_norm = check.positive_number("max_grad_norm (or None: no clipping)", self.max_grad_norm)
        self.mixed_precision = check.choice("mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        self.sharding = check.choice("sharding", self.sharding, SHARDINGS)
        if self.metric_for_best is not None and (not isinstance(self.metric_for_best, str) or not self.metric_for_best):
            raise ValueError(
                "metric_for_best must be None (lowest eval loss) or a key of compute_metrics' output, "
                f"got {self.metric_for_best!r}"
            )
        for name in FLAGS:
            setattr(self, name, check.boolean(name, getattr(self, name)))


@dataclass
class TrainResult:
    """What ``train`` did. The model it trained holds the best checkpoint's weights."""

    best_metrics: dict[str, float]  # evaluation metrics of the best checkpoint ({} without eval_dataset)
    best_step: int | None  # update at which the best checkpoint was taken (None without eval_dataset)
    global_step: int  # optimizer updates done, including those before a resume
    train_runtime_s: float  # wall-clock seconds of this call
    checkpoint_runtime_s: float  # of train_runtime_s, the seconds spent evaluating and saving checkpoints
    train_samples: int  # training examples processed by all processes, including those before a resume
    log_history: list[dict[str, Any]]  # the records of log.jsonl
    stopped_early: bool
    output_dir: Path
    best_checkpoint: Path | None  # output_dir/best (None without eval_dataset), see last_checkpoint
    last_checkpoint: Path  # output_dir/last (or .last.previous after a crash between the renames of a save)
    log_file: Path  # output_dir/log.jsonl


def _learning_rates(value: Any) -> dict[str, float]:
    """``parameter_learning_rates`` as a new dict of non-empty patterns to rates > 0."""
    if not isinstance(value, Mapping):
        raise ValueError(
            f"parameter_learning_rates must be a dict {{pattern: rate}}, e.g. {{'*LayerNorm*': 1e-4}}, got {value!r}"
        )
    rates = {}
    for pattern, rate in value.items():
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"parameter_learning_rates keys must be parameter name patterns, got {pattern!r}")
        rates[pattern] = check.positive_number(f"parameter_learning_rates[{pattern!r}]", rate)
    return rates
