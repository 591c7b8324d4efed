"""A training loop on Hugging Face Accelerate for any model whose forward returns ``loss`` and ``logits``.

It knows nothing of the task (it takes datasets and a ``compute_metrics``) and nothing of the
memories (a wrapped model adds its load-balancing loss to ``outputs.loss`` itself). It keeps the
best checkpoint by an evaluation metric, stops early, and resumes an interrupted run exactly
where it stopped. Checkpoints hold safetensors and JSON only: nothing is ever unpickled.

Runs data-parallel when launched on several processes (``accelerate launch`` on GPUs; on CPU,
``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N``); only the main process writes files.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import is_bf16_available, parse_flag_from_env, set_seed
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from .checkpoint import read_checkpoint, save_memory
from .config import JsonConfig
from .inject import is_wrapped, task_state_dict

MIXED_PRECISIONS = ("no", "bf16", "auto")
LAST_NAME = "last"  # output_dir/last: the state to resume from
BEST_NAME = "best"  # output_dir/best: the best evaluated weights
LOG_NAME = "log.jsonl"
WEIGHTS_NAME = "trainable_weights.safetensors"
STATE_TENSORS_NAME = "training_state.safetensors"
STATE_NAME = "training_state.json"
BEST_INFO_NAME = "best_metrics.json"
EVAL_LOSS = "eval_loss"
LOG_KEYS = ("step", "epoch", "time", "loss", "lr", EVAL_LOSS)  # compute_metrics may not return these names
PADDED_FIELDS = ("input_ids", "attention_mask", "token_type_ids")
# Settings a resumed run must share with the interrupted one: the data order and the optimizer state depend on them.
RESUME_FIELDS = (
    "seed",
    "batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "parameter_learning_rates",
    "weight_decay",
)

ComputeMetrics = Callable[[np.ndarray, np.ndarray], Mapping[str, float]]


@dataclass
class TrainingConfig(JsonConfig):
    """How ``train`` runs.

    Args:
        output_dir: where ``last/`` (resume state), ``best/`` (best weights) and ``log.jsonl`` go.
        learning_rate: peak AdamW learning rate; memories and heads want large ones (3e-3 won the
            few-shot GLUE sweeps over 1e-3, which left RTE at chance: benchmarks/results/glue_tuning.md).
        parameter_learning_rates: other peak rates for some parameters, ``{pattern: rate}`` with
            ``fnmatch`` patterns over parameter names, e.g. ``{"*LayerNorm*": 1e-4}``; a parameter
            takes the rate of the first pattern it matches, the others ``learning_rate``. Every
            pattern must match a trainable parameter.
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
        seed: seeds Python, NumPy and torch, and the order of the training data.
        resume: continue from ``output_dir/last`` when it exists, with the same data order, RNG
            states and optimizer state; ``False`` starts afresh (and deletes the previous
            ``last/``, ``best/`` and log). Changing seed, batch sizes or optimizer settings
            between the two is refused; changing ``num_epochs`` or ``max_steps`` is allowed.
        log_every_steps: log the training loss and learning rate every this many updates.
        num_workers: DataLoader worker processes.
        progress: show a tqdm progress bar (main process only).
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

    def __post_init__(self) -> None:
        self.output_dir = os.fspath(self.output_dir)
        _require(bool(self.output_dir), "output_dir must name a folder")
        for name in ("num_epochs", "batch_size", "eval_batch_size", "gradient_accumulation_steps", "log_every_steps"):
            _require(
                _is_int(getattr(self, name), minimum=1), f"{name} must be an integer >= 1, got {getattr(self, name)!r}"
            )
        for name in ("max_steps", "eval_every_steps", "early_stopping_patience"):
            value = getattr(self, name)
            _require(
                value is None or _is_int(value, minimum=1), f"{name} must be None or an integer >= 1, got {value!r}"
            )
        _require(_is_int(self.num_workers, minimum=0), f"num_workers must be an integer >= 0, got {self.num_workers!r}")
        _require(
            _is_int(self.seed, minimum=0) and self.seed < 2**32,
            f"seed must be an integer in [0, 2**32), got {self.seed!r}",
        )
        _require(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        for pattern, rate in self.parameter_learning_rates.items():
            _require(
                isinstance(pattern, str) and isinstance(rate, (int, float)) and rate > 0,
                f"parameter_learning_rates maps name patterns to rates > 0, got {pattern!r}: {rate!r}",
            )
        _require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _require(0 <= self.warmup_ratio <= 1, f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        _require(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            f"max_grad_norm must be None (no clipping) or > 0, got {self.max_grad_norm}",
        )
        _require(
            self.mixed_precision in MIXED_PRECISIONS,
            f"mixed_precision must be one of {', '.join(map(repr, MIXED_PRECISIONS))}, got {self.mixed_precision!r}",
        )
        _require(
            self.metric_for_best is None or (isinstance(self.metric_for_best, str) and bool(self.metric_for_best)),
            "metric_for_best must be None (lowest eval loss) or a key of compute_metrics' output, "
            f"got {self.metric_for_best!r}",
        )


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


def padding_collator(examples: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
    """Batch token examples: pad ``input_ids``, ``attention_mask`` and ``token_type_ids`` with 0 to
    the longest example and stack ``labels`` (or ``label``). Other fields (``idx``, texts) are left
    out; without an ``attention_mask``, one is made (1 on real tokens)."""
    if "input_ids" not in examples[0]:
        raise ValueError(
            f"the default collator needs examples with input_ids, got fields {sorted(examples[0])}: "
            "tokenize the data or pass train(..., data_collator=...)"
        )
    sequences = {
        name: [torch.as_tensor(example[name]) for example in examples] for name in PADDED_FIELDS if name in examples[0]
    }
    sequences.setdefault("attention_mask", [torch.ones_like(ids) for ids in sequences["input_ids"]])
    batch = {
        name: nn.utils.rnn.pad_sequence(values, batch_first=True, padding_value=0) for name, values in sequences.items()
    }
    label_field = next((name for name in ("labels", "label") if name in examples[0]), None)
    if label_field is not None:
        batch["labels"] = torch.stack([torch.as_tensor(example[label_field]) for example in examples])
    return batch


def train(
    model: nn.Module,
    train_dataset: Dataset,
    eval_dataset: Dataset | None = None,
    config: TrainingConfig | None = None,
    compute_metrics: ComputeMetrics | None = None,
    data_collator: Callable[[list[Any]], Mapping[str, Tensor]] | None = None,
) -> TrainResult:
    """Train the trainable parameters (``requires_grad``) of ``model`` and leave the best checkpoint in it.

    AdamW with linear warm-up and decay, gradient clipping and accumulation, evaluation every
    ``eval_every_steps`` updates and at each epoch's end. The best evaluated weights are saved to
    ``output_dir/best`` (``spartan.save_memory`` for a wrapped model, the trainable parameters in
    safetensors otherwise) and loaded back into ``model`` at the end, which is left in eval mode.

    Args:
        model: returns ``loss`` (in training and evaluation) and ``logits`` for a batch with ``labels``.
        train_dataset, eval_dataset: map-style datasets (torch or ``datasets.Dataset``) of examples
            that ``data_collator`` batches. Without ``eval_dataset`` nothing is evaluated and the
            final weights stay in the model.
        config: the run's settings; ``output_dir`` is required.
        compute_metrics: ``(logits, labels) -> {name: value}`` over the whole evaluation set
            (gathered from all processes; it runs on each). The evaluation loss is always
            reported as ``eval_loss``.
        data_collator: examples -> batch of tensors; ``padding_collator`` by default.

    ``output_dir/log.jsonl`` gets one JSON object per line: ``step``, ``epoch``, ``time`` (Unix
    seconds) and either ``loss`` and ``lr`` (mean training loss since the previous record, the
    learning rate of the latest update) or ``eval_loss`` and the metrics.
    """
    if config is None:
        raise ValueError("train needs a TrainingConfig: train(..., config=TrainingConfig(output_dir=...))")
    if len(train_dataset) == 0:
        raise ValueError("train_dataset is empty")
    if eval_dataset is None:
        if config.metric_for_best is not None or config.early_stopping_patience is not None:
            raise ValueError("metric_for_best and early_stopping_patience need an eval_dataset")
    elif len(eval_dataset) == 0:
        raise ValueError("eval_dataset is empty: pass a non-empty one, or None to train without evaluation")
    if config.metric_for_best is not None and compute_metrics is None:
        raise ValueError(f"metric_for_best={config.metric_for_best!r} needs a compute_metrics that returns it")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters (requires_grad): nothing to train")
    run = _TrainingRun(model, train_dataset, eval_dataset, config, compute_metrics, data_collator or padding_collator)
    return run.run()


# -- internals -------------------------------------------------------------------------------


@dataclass
class _Progress:
    """Where a run stands; saved as JSON in ``last/`` and restored on resume."""

    global_step: int = 0
    epoch: int = 0
    batches_done: int = 0  # batches of the current epoch each process has consumed
    train_samples: int = 0
    best_value: float | None = None
    best_step: int | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    evaluations_without_improvement: int = 0
    stopped_early: bool = False


class _EpochShuffler(Sampler[int]):
    """A random order of the dataset that depends only on ``seed`` and ``epoch`` (set before each epoch).

    It holds no generator across epochs, so a resumed run sees the very order the interrupted one saw.
    """

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


class _TrainingRun:
    def __init__(
        self,
        model: nn.Module,
        train_dataset: Dataset,
        eval_dataset: Dataset | None,
        config: TrainingConfig,
        compute_metrics: ComputeMetrics | None,
        collate: Callable[[list[Any]], Mapping[str, Tensor]],
    ) -> None:
        self.config = config
        self.compute_metrics = compute_metrics
        self.output_dir = Path(config.output_dir)
        self.model = model
        self.accelerator = Accelerator(
            mixed_precision=_resolve_mixed_precision(config.mixed_precision),
            gradient_accumulation_steps=config.gradient_accumulation_steps,
        )
        self.parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
        optimizer = torch.optim.AdamW(
            _parameter_groups(self.parameters, config.learning_rate, config.parameter_learning_rates),
            lr=config.learning_rate,
            weight_decay=config.weight_decay,
        )
        self.shuffler = _EpochShuffler(len(train_dataset), config.seed)
        loaders = [_data_loader(train_dataset, config, config.batch_size, collate, self.shuffler)]
        if eval_dataset is not None:
            loaders.append(_data_loader(eval_dataset, config, config.eval_batch_size, collate, None))
        self.prepared_model, self.optimizer, self.train_loader, *eval_loader = self.accelerator.prepare(
            model, optimizer, *loaders
        )
        self.eval_loader = eval_loader[0] if eval_loader else None
        self.train_size = len(train_dataset)
        self.steps_per_epoch = math.ceil(len(self.train_loader) / config.gradient_accumulation_steps)
        self.total_steps = config.max_steps or config.num_epochs * self.steps_per_epoch
        warmup_steps = math.ceil(config.warmup_ratio * self.total_steps)
        self.scheduler = LambdaLR(optimizer, _linear_warmup_decay(self.total_steps, warmup_steps))
        set_seed(config.seed)
        self.progress = _Progress()
        self.log_history: list[dict[str, Any]] = []
        self.running_loss = torch.zeros((), device=self.accelerator.device)
        self.running_batches = 0
        self.checkpoint_seconds = 0.0
        self.shown: dict[str, str] = {}  # the latest loss and metric, on the progress bar
        last = _existing_folder(self.output_dir / LAST_NAME)
        if config.resume and last is not None:
            self._restore(last)
        elif self.accelerator.is_main_process:
            for stale in (LAST_NAME, BEST_NAME):
                for folder in (self.output_dir / stale, _previous_folder(self.output_dir / stale)):
                    shutil.rmtree(folder, ignore_errors=True)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / LOG_NAME).write_text("")
        self.accelerator.wait_for_everyone()

    def run(self) -> TrainResult:
        started = time.perf_counter()
        progress = self.progress
        self.bar = tqdm(
            total=self.total_steps,
            initial=progress.global_step,
            desc="training",
            disable=not (self.config.progress and self.accelerator.is_main_process),
        )
        self.prepared_model.train()
        try:
            while not self._finished():
                self._train_epoch()
        finally:
            self.bar.close()
            self.accelerator.unwrap_model(self.prepared_model, keep_fp32_wrapper=False)  # drops the autocast wrapper
            self.accelerator.free_memory()
            self.model.eval()
        self.accelerator.wait_for_everyone()
        best_checkpoint = _existing_folder(self.output_dir / BEST_NAME) if progress.best_step is not None else None
        if best_checkpoint is not None:
            _load_best(self.model, best_checkpoint, self.parameters)
        return TrainResult(
            best_metrics=dict(progress.best_metrics),
            best_step=progress.best_step,
            global_step=progress.global_step,
            train_runtime_s=time.perf_counter() - started,
            checkpoint_runtime_s=self.checkpoint_seconds,
            train_samples=progress.train_samples,
            log_history=self.log_history,
            stopped_early=progress.stopped_early,
            output_dir=self.output_dir,
            best_checkpoint=best_checkpoint,
            last_checkpoint=_existing_folder(self.output_dir / LAST_NAME) or self.output_dir / LAST_NAME,
            log_file=self.output_dir / LOG_NAME,
        )

    def _train_epoch(self) -> None:
        """Train on the current epoch's batches (its rest, after a resume) until it or the training ends."""
        progress = self.progress
        self.shuffler.epoch = progress.epoch
        loader = self.train_loader
        if progress.batches_done:  # resumed mid-epoch: skip what the interrupted run consumed
            loader = self.accelerator.skip_first_batches(self.train_loader, progress.batches_done)
        for batch in loader:
            self._train_on(batch)
            progress.batches_done += 1
            if not self.accelerator.sync_gradients:
                continue
            self._after_update()
            if self._finished():
                return

    def _finished(self) -> bool:
        return self.progress.global_step >= self.total_steps or self.progress.stopped_early

    def _train_on(self, batch: Mapping[str, Tensor]) -> None:
        with self.accelerator.accumulate(self.prepared_model):
            loss = self.prepared_model(**batch).loss
            if loss is None:
                raise ValueError("the model returned no loss: the training examples need labels")
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients and self.config.max_grad_norm is not None:
                self.accelerator.clip_grad_norm_(self.parameters.values(), self.config.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad()
        self.running_loss += loss.detach().float()
        self.running_batches += 1
        self.progress.train_samples += len(next(iter(batch.values()))) * self.accelerator.num_processes

    def _after_update(self) -> None:
        """Book-keeping after an optimizer update: schedule, log, and evaluate and save when due."""
        progress, config = self.progress, self.config
        learning_rate = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        progress.global_step += 1
        self.bar.update(1)
        epoch_ended = progress.batches_done == len(self.train_loader)
        if epoch_ended:
            progress.epoch, progress.batches_done = progress.epoch + 1, 0
        if progress.global_step % config.log_every_steps == 0 or progress.global_step == self.total_steps:
            loss = self.accelerator.reduce(self.running_loss, "mean").item() / self.running_batches
            self.running_loss.zero_()
            self.running_batches = 0
            self._log({"loss": loss, "lr": learning_rate})
        evaluation_due = config.eval_every_steps is not None and progress.global_step % config.eval_every_steps == 0
        if epoch_ended or evaluation_due or progress.global_step == self.total_steps:
            self._checkpoint()

    def _checkpoint(self) -> None:
        """Evaluate, keep the best weights, decide on early stopping, and save the state to resume from."""
        started = time.perf_counter()
        self._evaluate_and_save()
        self.checkpoint_seconds += time.perf_counter() - started

    def _evaluate_and_save(self) -> None:
        if self.eval_loader is not None:
            metrics = self._evaluate()
            self._track_best(metrics)
            self._log(metrics)
        if self.accelerator.is_main_process:
            self._save_last()
        self.accelerator.wait_for_everyone()

    def _evaluate(self) -> dict[str, float]:
        self.prepared_model.eval()
        logits, labels, losses = [], [], []
        with torch.no_grad():
            for batch in self.eval_loader:
                if "labels" not in batch:
                    raise ValueError("the evaluation examples need labels")
                outputs = self.prepared_model(**batch)
                if outputs.loss is None:
                    raise ValueError("the model returned no loss on an evaluation batch")
                batch_loss = outputs.loss.detach().float().repeat(len(outputs.logits))  # weights batches by size
                gathered = self.accelerator.gather_for_metrics((outputs.logits.detach(), batch["labels"], batch_loss))
                for collected, tensor in zip((logits, labels, losses), gathered):
                    collected.append(tensor.cpu())
        self.prepared_model.train()
        metrics = {EVAL_LOSS: torch.cat(losses).mean().item()}
        if self.compute_metrics is not None:
            predictions = torch.cat(logits).float().numpy()
            computed = self.compute_metrics(predictions, torch.cat(labels).numpy())
            clashes = sorted(set(computed) & set(LOG_KEYS))
            if clashes:
                raise ValueError(f"compute_metrics returned {clashes}: these names are reserved for the training log")
            metrics.update({name: float(value) for name, value in computed.items()})
        return metrics

    def _track_best(self, metrics: dict[str, float]) -> None:
        progress, config = self.progress, self.config
        key = config.metric_for_best or EVAL_LOSS
        if key not in metrics:
            raise ValueError(f"metric_for_best={key!r} is not among the evaluation metrics {sorted(metrics)}")
        value = metrics[key]
        greater = config.greater_is_better and config.metric_for_best is not None
        best = progress.best_value
        if best is None or (value > best if greater else value < best):
            progress.best_value, progress.best_step, progress.best_metrics = value, progress.global_step, metrics
            progress.evaluations_without_improvement = 0
            if self.accelerator.is_main_process:
                self._save_best()
        else:
            progress.evaluations_without_improvement += 1
            patience = config.early_stopping_patience
            progress.stopped_early = patience is not None and progress.evaluations_without_improvement >= patience

    def _log(self, values: dict[str, float]) -> None:
        progress = self.progress
        epoch = progress.epoch + progress.batches_done / len(self.train_loader)
        record = {"step": progress.global_step, "epoch": round(epoch, 4), **values, "time": time.time()}
        self.log_history.append(record)
        if self.accelerator.is_main_process:
            with open(self.output_dir / LOG_NAME, "a") as log:
                log.write(json.dumps(record) + "\n")
        for name in ("loss", self.config.metric_for_best or EVAL_LOSS):
            if name in values:
                self.shown[name] = f"{values[name]:.4f}"
        self.bar.set_postfix(self.shown, refresh=False)

    def _save_best(self) -> None:
        info = {"step": self.progress.global_step, "metrics": self.progress.best_metrics}

        def write(folder: Path) -> None:
            if is_wrapped(self.model):
                save_memory(self.model, folder)
            else:
                save_file(_detached(self.parameters), folder / WEIGHTS_NAME)
            (folder / BEST_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")

        _replace_folder(self.output_dir / BEST_NAME, write)

    def _save_last(self) -> None:
        optimizer_tensors, optimizer_structure = _flatten_optimizer_state(self.optimizer.state_dict())
        rng_tensors, rng_structure = _rng_state()
        state = {
            "progress": dataclasses.asdict(self.progress),
            "config": self.config.to_dict(),
            "num_processes": self.accelerator.num_processes,  # on resume, every process takes these RNG states
            "running_loss": [self.running_loss.item(), self.running_batches],  # since the latest loss record
            "train_size": self.train_size,
            "parameter_names": list(self.parameters),
            "optimizer": optimizer_structure,
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_structure,
        }
        tensors = {
            **{f"optimizer.{k}": v for k, v in optimizer_tensors.items()},
            **{f"rng.{k}": v for k, v in rng_tensors.items()},
        }

        def write(folder: Path) -> None:
            save_file(_detached(self.parameters), folder / WEIGHTS_NAME)
            save_file(tensors, folder / STATE_TENSORS_NAME)
            (folder / STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")

        _replace_folder(self.output_dir / LAST_NAME, write)

    def _restore(self, folder: Path) -> None:
        state = json.loads((folder / STATE_NAME).read_text())
        saved_config = state["config"]
        differences = [
            f"{name}: {saved_config[name]} then, {getattr(self.config, name)} now"
            for name in RESUME_FIELDS
            if saved_config[name] != getattr(self.config, name)
        ]
        if state["num_processes"] != self.accelerator.num_processes:
            differences.append(f"processes: {state['num_processes']} then, {self.accelerator.num_processes} now")
        if state["train_size"] != self.train_size:
            differences.append(f"training examples: {state['train_size']} then, {self.train_size} now")
        if state["parameter_names"] != list(self.parameters):
            differences.append("the model's trainable parameters differ")
        if differences:
            raise ValueError(
                f"cannot resume from {folder}: {'; '.join(differences)}. Use another output_dir, "
                "or resume=False to start afresh"
            )
        _copy_into(self.parameters, load_file(folder / WEIGHTS_NAME), folder)
        tensors = load_file(folder / STATE_TENSORS_NAME)
        self.optimizer.load_state_dict(
            _unflatten_optimizer_state(_strip_prefix(tensors, "optimizer."), state["optimizer"], self.optimizer)
        )
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(_strip_prefix(tensors, "rng."), state["rng"])
        self.progress = _Progress(**state["progress"])
        self.running_loss.fill_(state["running_loss"][0])
        self.running_batches = state["running_loss"][1]
        self.log_history = [
            record for record in _read_log(self.output_dir) if record["step"] <= self.progress.global_step
        ]
        if self.accelerator.is_main_process:  # drop what the interrupted run logged after its last save
            lines = "".join(json.dumps(record) + "\n" for record in self.log_history)
            _replace_file(self.output_dir / LOG_NAME, lines)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _resolve_mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    # The process state Accelerator would make (ACCELERATE_USE_CPU is how `accelerate launch --cpu` says it).
    device = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).device
    return "bf16" if device.type != "cpu" and is_bf16_available() else "no"


def _data_loader(
    dataset: Dataset, config: TrainingConfig, batch_size: int, collate: Callable, sampler: Sampler | None
) -> DataLoader:
    # An own generator: iterating the loader must not draw from torch's global RNG (dropout's).
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=config.num_workers,
        generator=torch.Generator().manual_seed(config.seed),
    )


def _linear_warmup_decay(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Learning-rate factor of update ``step`` (0-based): up linearly over the warm-up, then down
    linearly to ``1 / (total_steps - warmup_steps)`` at the last update (no update runs at 0)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def _parameter_groups(
    parameters: Mapping[str, Tensor], learning_rate: float, overrides: Mapping[str, float]
) -> list[dict[str, Any]]:
    """AdamW parameter groups: those matching no pattern at ``learning_rate`` first, then one per pattern."""
    groups: dict[str | None, list[Tensor]] = {None: [], **{pattern: [] for pattern in overrides}}
    for name, parameter in parameters.items():
        pattern = next((pattern for pattern in overrides if fnmatch.fnmatchcase(name, pattern)), None)
        groups[pattern].append(parameter)
    unmatched = [pattern for pattern in overrides if not groups[pattern]]
    if unmatched:
        raise ValueError(
            f"parameter_learning_rates pattern(s) {unmatched} match no trainable parameter that an earlier pattern left; "
            f"trainable names look like {list(parameters)[:3]}"
        )
    return [{"params": params, "lr": overrides.get(pattern, learning_rate)} for pattern, params in groups.items()]


def _detached(parameters: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in parameters.items()}


def _copy_into(targets: Mapping[str, Tensor], tensors: Mapping[str, Tensor], source: Path) -> None:
    if set(targets) != set(tensors):
        raise ValueError(
            f"the weights in {source} do not fit this model: missing {sorted(set(targets) - set(tensors))[:5]}, "
            f"unexpected {sorted(set(tensors) - set(targets))[:5]}"
        )
    with torch.no_grad():
        for name, target in targets.items():
            target.copy_(tensors[name])


def _load_best(model: nn.Module, folder: Path, parameters: Mapping[str, Tensor]) -> None:
    if is_wrapped(model):
        _, tensors = read_checkpoint(folder)
        _copy_into(task_state_dict(model), tensors, folder)
    else:
        _copy_into(parameters, load_file(folder / WEIGHTS_NAME), folder)


def _flatten_optimizer_state(state_dict: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors (``state.<index>.<name>``) and a JSON structure."""
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        scalars[str(index)] = {}
        for name, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[str(index)][name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer_state(
    tensors: Mapping[str, Tensor], structure: Mapping[str, Any], optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(index): dict(scalars) for index, scalars in structure["scalars"].items()}
    for key, tensor in tensors.items():
        _, index, name = key.split(".", 2)
        state[int(index)][name] = tensor
    groups = [
        {name: tuple(value) if isinstance(current.get(name), tuple) else value for name, value in saved.items()}
        for saved, current in zip(structure["param_groups"], optimizer.param_groups)
    ]  # JSON turned tuples (betas) into lists
    return {"state": state, "param_groups": groups}


def _rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The RNG states of Python, NumPy and torch: tensors for safetensors, the rest for JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    structure = {
        "python": [version, list(python_state), gauss_next],
        "numpy": [kind, keys.tolist(), position, has_gauss, cached_gauss],
    }
    return tensors, structure


def _set_rng_state(tensors: Mapping[str, Tensor], structure: Mapping[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda_states = [tensors[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in tensors]
    if cuda_states:
        torch.cuda.set_rng_state_all(cuda_states)
    version, python_state, gauss_next = structure["python"]
    random.setstate((version, tuple(python_state), gauss_next))
    kind, keys, position, has_gauss, cached_gauss = structure["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached_gauss))


def _strip_prefix(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}


def _read_log(output_dir: Path) -> list[dict[str, Any]]:
    log = output_dir / LOG_NAME
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []


def _previous_folder(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.previous")


def _existing_folder(folder: Path) -> Path | None:
    """``folder``, or its previous version when a crash hit between the two renames of ``_replace_folder``."""
    for candidate in (folder, _previous_folder(folder)):
        if candidate.is_dir():
            return candidate
    return None


def _replace_folder(folder: Path, write: Callable[[Path], None]) -> None:
    """Write a folder's new contents into a staging folder, then swap it in with renames.

    At every moment either ``folder`` or ``.<name>.previous`` beside it is complete; readers use
    ``_existing_folder``.
    """
    staging = folder.with_name(f".{folder.name}.staging")
    previous = _previous_folder(folder)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    write(staging)
    for file in staging.iterdir():
        with open(file, "rb") as written:
            os.fsync(written.fileno())
    if folder.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(folder, previous)
    os.replace(staging, folder)
    shutil.rmtree(previous, ignore_errors=True)


def _replace_file(file: Path, text: str) -> None:
    temporary = file.with_name(f".{file.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, file)
