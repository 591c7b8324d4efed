"""Memory-only checkpoints: one task's memories, head and trained norms in safetensors, its config in JSON.

Writes are atomic (temporary file, fsync, rename), loading never unpickles.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .config import SpartanConfig
from .inject import (
    _find_layers,
    _hidden_size,
    active_memory_name,
    add_memory,
    get_config,
    get_layer_paths,
    is_wrapped,
    memory_names,
    remove_memory,
    set_active_memory,
    task_state_dict,
    unwrap_model,
    wrap_model,
)

WEIGHTS_NAME = "spartan_memory.safetensors"
CONFIG_NAME = "spartan_config.json"
FORMAT_VERSION = 1


def save_memory(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> Path:
    """Save task ``name``'s memories and head, and its LayerNorms with ``train_layer_norms`` (the
    active task by default), to the folder ``path``.

    Writes ``spartan_memory.safetensors`` (weights) and ``spartan_config.json`` (the
    SpartanConfig and the backbone's shape). The backbone is not saved.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = get_config(model, name)
    tensors = {key: value.detach().contiguous().cpu() for key, value in task_state_dict(model, name).items()}
    checkpoint_id = uuid.uuid4().hex  # ties the two files of one save together
    description = {
        "format_version": FORMAT_VERSION,
        "checkpoint_id": checkpoint_id,
        "name": name or active_memory_name(model),
        "config": config.to_dict(),
        "backbone": {
            "model_type": getattr(getattr(model, "config", None), "model_type", type(model).__name__),
            "hidden_size": _hidden_size(model),
            "num_layers": len(get_layer_paths(model)),
        },
    }
    _atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"checkpoint_id": checkpoint_id}))
    _atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(description, indent=2) + "\n"))
    return folder


def load_memory(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> nn.Module:
    """Load a task saved by ``save_memory`` onto ``model`` and make it the active task.

    An unwrapped model is wrapped first; a wrapped one gets the task added beside its others.
    ``name`` defaults to the name the task was saved under. Returns the same model object.
    """
    description, tensors = read_checkpoint(path)
    name = name or description["name"]
    config = SpartanConfig.from_dict(description["config"])
    _check_backbone(model, description["backbone"], path)
    was_wrapped = is_wrapped(model)
    if was_wrapped and name in memory_names(model):
        raise ValueError(f"model already has a memory named {name!r}: pass load_memory(..., name='another_name')")
    if was_wrapped:
        add_memory(model, name, config)
    else:
        wrap_model(model, config, name=name)
    try:
        _copy_into(task_state_dict(model, name), tensors, path)
    except ValueError:
        if was_wrapped:
            remove_memory(model, name)
        else:
            unwrap_model(model)
        raise
    set_active_memory(model, name)
    return model


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config description and the weights of a checkpoint folder, checked to belong together."""
    folder = Path(path)
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for file in (config_file, weights_file):
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} does not exist: {folder} is not a spartan memory checkpoint "
                f"(save_memory writes {CONFIG_NAME} and {WEIGHTS_NAME} into the folder)"
            )
    try:
        description = json.loads(config_file.read_text())
        missing = {"config", "backbone", "name", "checkpoint_id"} - set(description)
    except (json.JSONDecodeError, TypeError) as error:
        raise ValueError(f"{config_file} is corrupt ({error}): save the memory again") from None
    if missing:
        raise ValueError(f"{config_file} is not a spartan memory config (no {sorted(missing)}): save the memory again")
    try:
        tensors = load_file(weights_file)
        with safe_open(weights_file, framework="pt") as handle:
            saved_id = (handle.metadata() or {}).get("checkpoint_id")
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{weights_file} is corrupt ({error}): save the memory again") from None
    if saved_id != description.get("checkpoint_id"):
        raise ValueError(
            f"{weights_file} and {config_file} come from different saves (interrupted write?): save the memory again"
        )
    return description, tensors


def _check_backbone(model: nn.Module, saved: dict[str, Any], path: str | os.PathLike) -> None:
    hidden_size = _hidden_size(model)
    num_layers = len(get_layer_paths(model)) if is_wrapped(model) else len(_find_layers(model, None))
    if (hidden_size, num_layers) != (saved["hidden_size"], saved["num_layers"]):
        raise ValueError(
            f"the memory at {path} was trained on a {saved['model_type']} backbone with hidden size "
            f"{saved['hidden_size']} and {saved['num_layers']} layers, but this model has hidden size "
            f"{hidden_size} and {num_layers} layers: load it onto the backbone it was trained with"
        )


def _copy_into(targets: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    missing, unexpected = sorted(set(targets) - set(tensors)), sorted(set(tensors) - set(targets))
    if missing or unexpected:
        raise ValueError(
            f"the checkpoint at {path} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]} "
            "(was it saved from a model with another architecture or task head?)"
        )
    for key, target in targets.items():
        if target.shape != tensors[key].shape:
            raise ValueError(
                f"{key} has shape {list(tensors[key].shape)} in the checkpoint at {path} but "
                f"{list(target.shape)} in this model (a head for another number of labels? load the "
                "base model with the num_labels the task was trained with)"
            )
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(tensors[key])


def _atomic_write(target: Path, write) -> None:
    """Write ``target`` through a temporary file in its folder, so it is either old or complete."""
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
