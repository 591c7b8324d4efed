"""The run folder of ``train``: everything a run writes, and reading it back to resume.

``output_dir/`` holds:

- ``last/``: the state to resume from. ``trainable_weights.safetensors`` (the optimised
  parameters by name), ``training_state.safetensors`` (the optimizer's tensors and the torch and
  CUDA RNG states) and ``training_state.json`` (progress, config, optimizer and scheduler
  structure, Python and NumPy RNG states, the running loss, the number of processes); the RNG
  states and running loss of each process, which resumes with its own.
- ``best/``: the best evaluated weights, as ``weights.save_trainable`` writes them, and
  ``best_metrics.json`` (``{"step": ..., "metrics": {...}}``).
- ``log.jsonl``: one JSON record per line.

Each folder is replaced whole and the log atomically (``spartan._io``), so a crash leaves the
previous or the new version, never a mix; files hold safetensors and JSON only, nothing is ever
unpickled. Methods that write are for the main process only, but for ``save_last``, which every
process calls: a sharded run's tensors (DTensors) are gathered whole from all processes, so that
``last/`` holds full tensors, as an unsharded run's does, and ``restore_last`` cuts them again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler

from .._io import atomic_write_text, existing_folder, remove_folder, replace_folder
from .config import TrainingConfig
from .sharding import gather, shard_like
from .weights import load_parameters, load_trainable, save_parameters, save_trainable

LAST_NAME = "last"  # output_dir/last: the state to resume from
BEST_NAME = "best"  # output_dir/best: the best evaluated weights
LOG_NAME = "log.jsonl"
STATE_TENSORS_NAME = "training_state.safetensors"
STATE_NAME = "training_state.json"
BEST_INFO_NAME = "best_metrics.json"
# Settings a resumed run must share with the interrupted one: the data order and the optimizer state depend on them.
RESUME_FIELDS = (
    "seed",
    "batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "parameter_learning_rates",
    "weight_decay",
)


@dataclass
class Progress:
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


@dataclass
class LoopState:
    """The objects of a running loop that ``last/`` saves; restoring loads into them in place.

    ``parameters`` are the optimised parameters by name, in the order of the optimizer's (in a
    sharded run, DTensors holding this process's slices).
    """

    config: TrainingConfig
    num_processes: int
    train_size: int
    parameters: Mapping[str, Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    model_description: Mapping[str, Any]  # weights.describe_trainable: what shapes the trained state besides its tensors
    process_index: int = 0  # of this process, among num_processes


class Resumed(NamedTuple):
    """What ``RunFolder.restore_last`` hands back to the loop besides the objects it loaded into."""

    progress: Progress
    running_loss: float  # sum of the training losses since the latest loss record
    running_batches: int  # batches in running_loss


class RunFolder:
    """``output_dir`` of one run: names, writes and reads of ``last/``, ``best/`` and ``log.jsonl``."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.root = Path(output_dir)

    @property
    def log_file(self) -> Path:
        return self.root / LOG_NAME

    @property
    def last_path(self) -> Path:
        return self.root / LAST_NAME

    def last(self) -> Path | None:
        """``last/``, or its previous version after a crash between the renames of a save; ``None`` if neither."""
        return existing_folder(self.root / LAST_NAME)

    def best(self) -> Path | None:
        """``best/``, as ``last`` finds it."""
        return existing_folder(self.root / BEST_NAME)

    def start_afresh(self) -> None:
        """Delete a previous run's ``last/`` and ``best/`` and empty the log."""
        remove_folder(self.root / LAST_NAME)
        remove_folder(self.root / BEST_NAME)
        self.write_log([])

    def write_log(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Replace ``log.jsonl`` with ``records``, one JSON object per line."""
        atomic_write_text(self.log_file, "".join(json.dumps(record) + "\n" for record in records))

    def read_log(self, up_to_step: int | None = None) -> list[dict[str, Any]]:
        """The records of ``log.jsonl`` (none if it does not exist), those of steps <= ``up_to_step`` if given."""
        if not self.log_file.is_file():
            return []
        records = [json.loads(line) for line in self.log_file.read_text().splitlines() if line.strip()]
        return [record for record in records if up_to_step is None or record["step"] <= up_to_step]

    def save_best(self, model: nn.Module, step: int, metrics: Mapping[str, float]) -> None:
        """Replace ``best/`` with the trainable state of ``model`` and ``best_metrics.json``."""
        info = {"step": step, "metrics": dict(metrics)}

        def write(folder: Path) -> None:
            save_trainable(model, folder)  # first: it may replace the folder it is given
            (folder / BEST_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")

        replace_folder(self.root / BEST_NAME, write)

    def load_best(self, model: nn.Module) -> Path | None:
        """Load ``best/`` into ``model`` in place; returns the folder read, or ``None`` (nothing loaded) without one."""
        folder = self.best()
        if folder is not None:
            load_trainable(model, folder)
        return folder

    def save_last(
        self, state: LoopState, progress: Progress, running_loss: float, running_batches: int, write: bool = True
    ) -> None:
        """Replace ``last/`` with what resuming needs: parameters, optimizer, scheduler, RNG states, progress.

        Every process calls it (collectives): the sharded parameters and optimizer state are gathered
        whole, and each process's RNG states and running loss collected, from all processes; only the
        one with ``write`` (the main one) writes.
        """
        parameters = gather(state.parameters, keep=write)
        optimizer_state = state.optimizer.state_dict()
        optimizer_state["state"] = {
            index: gather(optimizer_state["state"][index], keep=write) for index in sorted(optimizer_state["state"])
        }
        # Each process draws its own dropout masks and sums its own losses: each resumes with its own.
        processes = _from_every_process((*_rng_state(), [running_loss, running_batches]), state.num_processes)
        if not write:
            return
        optimizer_tensors, optimizer_structure = _flatten_optimizer_state(optimizer_state)
        (rng_tensors, rng_structure, running), *others = processes
        description = {
            "progress": dataclasses.asdict(progress),
            "config": state.config.to_dict(),
            "num_processes": state.num_processes,
            "running_loss": running,  # of the main process, since the latest loss record
            "train_size": state.train_size,
            "parameter_names": list(state.parameters),
            "model": dict(state.model_description),
            "optimizer": optimizer_structure,
            "scheduler": state.scheduler.state_dict(),
            "rng": rng_structure,  # of the main process; its tensors are rng.*
            # processes 1, 2, ...: their running losses and RNG states (tensors rng1.*, rng2.*, ...)
            "other_processes": [{"running_loss": running, "rng": structure} for _, structure, running in others],
        }
        tensors = {
            **{f"optimizer.{key}": value for key, value in optimizer_tensors.items()},
            **{f"rng.{key}": value for key, value in rng_tensors.items()},
            **{f"rng{index}.{key}": value for index, (rng, _, _) in enumerate(others, 1) for key, value in rng.items()},
        }

        def write_into(folder: Path) -> None:
            save_parameters(parameters, folder)
            save_file(tensors, folder / STATE_TENSORS_NAME)
            (folder / STATE_NAME).write_text(json.dumps(description, indent=2) + "\n")

        replace_folder(self.root / LAST_NAME, write_into)

    def restore_last(self, folder: Path, state: LoopState) -> Resumed:
        """Load ``folder`` (a ``last/``) into the objects of ``state`` and the global RNGs; a sharded
        run's parameters and optimizer state take this process's slices of the saved full tensors.

        Raises a ValueError, before changing anything, when the saved run is not this one
        continued: other ``RESUME_FIELDS``, number of processes, training set size or trainable
        parameters.
        """
        description = json.loads((folder / STATE_NAME).read_text())
        _check_resumable(folder, description, state)
        load_parameters(state.parameters, folder)
        tensors = load_file(folder / STATE_TENSORS_NAME)
        optimizer_state = _unflatten_optimizer_state(
            _strip_prefix(tensors, "optimizer."), description["optimizer"], state.optimizer
        )
        state.optimizer.load_state_dict(_cut_as_parameters(optimizer_state, state.optimizer))
        state.scheduler.load_state_dict(description["scheduler"])
        rng_prefix, rng, running = "rng.", description["rng"], description["running_loss"]
        others = description.get("other_processes", [])  # a folder without: every process takes the main one's
        if 0 < state.process_index <= len(others):
            own = others[state.process_index - 1]
            rng_prefix, rng, running = f"rng{state.process_index}.", own["rng"], own["running_loss"]
        _set_rng_state(_strip_prefix(tensors, rng_prefix), rng)
        running_loss, running_batches = running
        return Resumed(Progress(**description["progress"]), running_loss, running_batches)


def _check_resumable(folder: Path, description: Mapping[str, Any], state: LoopState) -> None:
    saved_config = description["config"]
    differences = [
        f"{name}: {saved_config[name]} then, {getattr(state.config, name)} now"
        for name in RESUME_FIELDS
        if saved_config[name] != getattr(state.config, name)
    ]
    if description["num_processes"] != state.num_processes:
        differences.append(f"processes: {description['num_processes']} then, {state.num_processes} now")
    if description["train_size"] != state.train_size:
        differences.append(f"training examples: {description['train_size']} then, {state.train_size} now")
    if description["parameter_names"] != list(state.parameters):
        differences.append("the model's trainable parameters differ")
    saved_model, model = description.get("model", {}), dict(state.model_description)
    differences += [
        f"{key}: {saved_model.get(key)} then, {model.get(key)} now"
        for key in sorted(set(saved_model) | set(model))
        if saved_model.get(key) != model.get(key)
    ]
    if differences:
        raise ValueError(
            f"cannot resume from {folder}: {'; '.join(differences)}. Use another output_dir, "
            "or resume=False to start afresh"
        )


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


def _cut_as_parameters(state_dict: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``state_dict`` with each state tensor shaped like its parameter (AdamW's moments) cut as the
    parameter is: this process's slice when the parameter is sharded."""
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    for index, values in state_dict["state"].items():
        for name, value in values.items():
            if isinstance(value, Tensor):
                values[name] = shard_like(value, parameters[index])
    return state_dict


def _from_every_process(value: Any, num_processes: int) -> list[Any]:
    """``value`` of every process, in process order (a collective when there are several)."""
    if num_processes == 1:
        return [value]
    values: list[Any] = [None] * num_processes
    torch.distributed.all_gather_object(values, value)
    return values


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
