"""``train``: a training loop on Hugging Face Accelerate for any model whose forward returns ``loss`` and ``logits``.

What the loop knows: it takes datasets and a ``compute_metrics``, so nothing of the task; it
trains the model's ``requires_grad`` parameters, whatever they are, and does not look inside
memories (a wrapped model adds its load-balancing loss to ``outputs.loss`` itself). It keeps the
best checkpoint by an evaluation metric, stops early, and resumes an interrupted run exactly where
it stopped. Everything it writes goes through ``run_folder``; the model's trainable state goes
through ``weights``, the one place that tells a model wrapped by spartan (``best/`` holds a memory
checkpoint, which ``spartan.load_memory`` reads) from any other (``best/`` holds the trainable
parameters in safetensors).

Launched on several processes (``accelerate launch`` or ``torchrun`` on GPUs; on CPU,
``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N``), it runs data-parallel (DDP: every process
holds all trainable parameters) or, with ``TrainingConfig(sharding="fsdp")``, sharded: each module
holding trainable parameters (each memory) is sharded across the processes with FSDP2
(``sharding.py``), the frozen backbone is not. Checkpoints hold full tensors either way, gathered
from every process; only the main process writes files.
"""

from __future__ import annotations

import fnmatch
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, is_bf16_available, parse_flag_from_env, set_seed
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from .config import TrainingConfig, TrainResult
from .run_folder import LoopState, Progress, RunFolder
from .optim import clip_grad_norm, has_sparse_gradients, make_optimizer
from .sharding import ShardedModules, sharded_module_paths
from .weights import describe_trainable, requires_grad_parameters

EVAL_LOSS = "eval_loss"
LOG_KEYS = ("step", "epoch", "time", "loss", "lr", EVAL_LOSS)  # compute_metrics may not return these names
PADDED_FIELDS = ("input_ids", "attention_mask", "token_type_ids")

ComputeMetrics = Callable[[np.ndarray, np.ndarray], Mapping[str, float]]


def padding_collator(examples: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
    """Batch token examples: pad ``input_ids``, ``attention_mask`` and ``token_type_ids`` with 0 to
    the longest example and stack ``labels`` (or ``label``). Other fields (``idx``, texts) are left
    out; without an ``attention_mask``, one is made (1 on real tokens).

    Shape: each padded field ``[batch, longest]``, ``labels`` ``[batch, ...]``.
    """
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
    model: nn.Module, train_dataset: Dataset, eval_dataset: Dataset | None = None, config: TrainingConfig | None = None,
    compute_metrics: ComputeMetrics | None = None, data_collator: Callable[[list[Any]], Mapping[str, Tensor]] | None = None,
) -> TrainResult:
    """Train the trainable parameters (``requires_grad``) of ``model`` and leave the best checkpoint in it.

    AdamW with linear warm-up and decay, gradient clipping and accumulation, evaluation every
    ``eval_every_steps`` updates and at each epoch's end. Python, NumPy and torch are seeded with
    ``config.seed`` first, before anything is made, so all ``train`` draws (dropout, data order)
    comes from the seed. The best evaluated weights are saved to ``output_dir/best`` (a memory
    checkpoint, ``spartan.save_memory``'s, for a wrapped model; the trainable parameters in
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

    On several processes the run is data-parallel, or with ``config.sharding="fsdp"`` sharded
    (see ``TrainingConfig.sharding``); either way every process's ``model`` ends up holding the
    full best weights, as plain tensors.

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
    if config.sharding == "fsdp":  # refused on one process too, not first on many
        if any(has_sparse_gradients(p) for p in model.parameters() if p.requires_grad):
            raise ValueError(
                "sharding='fsdp' cannot reduce-scatter sparse gradients: build the memory with "
                "SpartanConfig(sparse_gradients=False), or train with sharding='none'"
            )
        sharded_module_paths(model)
    set_seed(config.seed)  # before the Accelerator, the optimizer and the loaders: all that follows draws from it
    run = _TrainingRun(model, train_dataset, eval_dataset, config, compute_metrics, data_collator or padding_collator)
    return run.run()


# -- internals -------------------------------------------------------------------------------


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
        self.folder = RunFolder(config.output_dir)
        self.model = model
        self.accelerator = Accelerator(
            mixed_precision=_resolve_mixed_precision(config.mixed_precision),
            gradient_accumulation_steps=config.gradient_accumulation_steps,
        )
        model_description = describe_trainable(model)
        self.shards: ShardedModules | None = None
        if config.sharding == "fsdp" and self.accelerator.num_processes > 1:
            if self.accelerator.distributed_type == DistributedType.FSDP:
                raise ValueError(
                    "sharding='fsdp' shards the model itself: launch without Accelerate's FSDP plugin "
                    "(no --use_fsdp, no fsdp_config), or train with sharding='none' under it"
                )
            # Device placement and mixed precision only, no DDP: the shards reduce their own gradients.
            self.prepared_model = self.accelerator.prepare_model(model, evaluation_mode=True)
            self.shards = ShardedModules(model, self.accelerator.device, self.accelerator.num_processes)
        self.parameters = requires_grad_parameters(model)  # the shards' DTensors when sharded
        optimizer = make_optimizer(
            _parameter_groups(self.parameters, config.learning_rate, config.parameter_learning_rates),
            config.learning_rate,
            config.weight_decay,
        )
        self.sparse = any(has_sparse_gradients(p) for p in self.parameters.values())
        self.shuffler = _EpochShuffler(len(train_dataset), config.seed)
        loaders = [_data_loader(train_dataset, config, config.batch_size, collate, self.shuffler)]
        if eval_dataset is not None:
            loaders.append(_data_loader(eval_dataset, config, config.eval_batch_size, collate, None))
        if self.shards is None:
            self.prepared_model, self.optimizer, self.train_loader, *eval_loader = self.accelerator.prepare(
                model, optimizer, *loaders
            )
        else:
            self.optimizer, self.train_loader, *eval_loader = self.accelerator.prepare(optimizer, *loaders)
        self.eval_loader = eval_loader[0] if eval_loader else None
        self.steps_per_epoch = math.ceil(len(self.train_loader) / config.gradient_accumulation_steps)
        self.total_steps = config.max_steps or config.num_epochs * self.steps_per_epoch
        warmup_steps = math.ceil(config.warmup_ratio * self.total_steps)
        self.scheduler = LambdaLR(optimizer, _linear_warmup_decay(self.total_steps, warmup_steps))
        self.state = LoopState(
            config=config,
            num_processes=self.accelerator.num_processes,
            process_index=self.accelerator.process_index,
            train_size=len(train_dataset),
            parameters=self.parameters,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            model_description=model_description,
        )
        self.progress = Progress()
        self.log_history: list[dict[str, Any]] = []
        self.running_loss = torch.zeros((), device=self.accelerator.device)
        self.running_batches = 0
        self.checkpoint_seconds = 0.0
        self.shown: dict[str, str] = {}  # the latest loss and metric, on the progress bar
        last = self.folder.last()
        if config.resume and last is not None:
            resumed = self.folder.restore_last(last, self.state)
            self.progress, self.running_batches = resumed.progress, resumed.running_batches
            self.running_loss.fill_(resumed.running_loss)
            self.log_history = self.folder.read_log(up_to_step=self.progress.global_step)
            if self.accelerator.is_main_process:  # drop what the interrupted run logged after its last save
                self.folder.write_log(self.log_history)
        elif self.accelerator.is_main_process:
            self.folder.start_afresh()
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
        # Every process: the model's own modules return, with the full weights. (After an exception
        # they stay out, emptied, and the sharded copies in: gathering needs all processes.)
        if self.shards is not None:
            self.shards.restore()
            self.model.eval()
        best_checkpoint = self.folder.load_best(self.model) if progress.best_step is not None else None
        return TrainResult(
            best_metrics=dict(progress.best_metrics),
            best_step=progress.best_step,
            global_step=progress.global_step,
            train_runtime_s=time.perf_counter() - started,
            checkpoint_runtime_s=self.checkpoint_seconds,
            train_samples=progress.train_samples,
            log_history=self.log_history,
            stopped_early=progress.stopped_early,
            output_dir=self.folder.root,
            best_checkpoint=best_checkpoint,
            last_checkpoint=self.folder.last() or self.folder.last_path,
            log_file=self.folder.log_file,
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
                if self.sparse:  # torch's clipping takes dense gradients only
                    clip_grad_norm(self.parameters, self.config.max_grad_norm)
                else:
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
        if self.eval_loader is not None:
            metrics = self._evaluate()
            self._track_best(metrics)
            self._log(metrics)
        self.folder.save_last(  # every process: sharded tensors are gathered from all
            self.state, self.progress, self.running_loss.item(), self.running_batches,
            write=self.accelerator.is_main_process,
        )
        self.accelerator.wait_for_everyone()
        self.checkpoint_seconds += time.perf_counter() - started

    def _evaluate(self) -> dict[str, float]:
        self.prepared_model.eval()
        logits, labels, losses = [], [], []
        with torch.no_grad():
            batches = tqdm(
                self.eval_loader,
                desc="evaluating",
                leave=False,
                disable=not (self.config.progress and self.accelerator.is_main_process),
            )
            for batch in batches:
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
            self._save_best(progress.global_step, metrics)
        else:
            progress.evaluations_without_improvement += 1
            patience = config.early_stopping_patience
            progress.stopped_early = patience is not None and progress.evaluations_without_improvement >= patience

    def _save_best(self, step: int, metrics: dict[str, float]) -> None:
        """Replace ``best/`` with the model's trainable state (every process takes part in gathering
        sharded weights; the main process writes)."""
        main = self.accelerator.is_main_process
        with nullcontext() if self.shards is None else self.shards.full_weights(keep=main):
            if main:
                self.folder.save_best(self.model, step, metrics)

    def _log(self, values: dict[str, float]) -> None:
        progress = self.progress
        epoch = progress.epoch + progress.batches_done / len(self.train_loader)
        record = {"step": progress.global_step, "epoch": round(epoch, 4), **values, "time": time.time()}
        self.log_history.append(record)
        if self.accelerator.is_main_process:
            self.folder.write_log(self.log_history)
        for name in ("loss", self.config.metric_for_best or EVAL_LOSS):
            if name in values:
                self.shown[name] = f"{values[name]:.4f}"
        self.bar.set_postfix(self.shown, refresh=False)


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
            f"parameter_learning_rates pattern(s) {unmatched} match no trainable parameter that an earlier "
            f"pattern left; trainable names look like {list(parameters)[:3]}"
        )
    return [{"params": params, "lr": overrides.get(pattern, learning_rate)} for pattern, params in groups.items()]
