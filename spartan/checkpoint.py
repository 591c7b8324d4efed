"""Memory-only checkpoints: one task's memories and task modules (head, trained norms) in
safetensors, its description in JSON. The task file format.

A checkpoint is a folder holding ``spartan_config.json`` and ``spartan_memory.safetensors``.
Format version 2 (written since spartan 0.2) records the memory config, the task's label count, problem
type and label names, the backbone's shape, the module paths of the wrapped layers and of the task
modules, and the SHA-256 of the weights file; version-1 checkpoints load too. Saving swaps the
whole folder in at once (other plain files already in it are kept), so a crash leaves the old
checkpoint or the new one, never a mix; loading checks the checksum and never unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from . import _validate as check
from ._io import atomic_write_text, existing_folder, replace_folder
from ._state import copy_tensors
from .config import SpartanConfig
from .inject import (
    TaskLabels,
    active_memory_name,
    add_memory,
    find_layers,
    get_config,
    get_hidden_size,
    get_layer_paths,
    get_model_type,
    get_task_labels,
    get_task_module_paths,
    is_wrapped,
    memory_names,
    remove_memory,
    set_active_memory,
    task_state_dict,
    unwrap_model,
    wrap_model,
)
from .memory import upgrade_memory_state_dict

WEIGHTS_NAME = "spartan_memory.safetensors"
CONFIG_NAME = "spartan_config.json"
FORMAT_VERSION = 2
KNOWN_FORMAT_VERSIONS = (1, 2)

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "load_memory",
    "load_task_weights",
    "read_checkpoint",
    "save_memory",
]


def save_memory(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> Path:
    """Save task ``name``'s memories and task modules (the active task by default) to the folder ``path``.

    Writes ``spartan_memory.safetensors`` (weights) and ``spartan_config.json`` (the config, the
    task's labels, the backbone's shape and layers, the weights' checksum). The backbone is not saved.
    """
    folder = Path(path)
    name = name or active_memory_name(model)
    config = get_config(model, name)
    tensors = {key: value.detach().contiguous().cpu() for key, value in task_state_dict(model, name).items()}
    checkpoint_id = uuid.uuid4().hex
    description = {
        "format_version": FORMAT_VERSION,
        "checkpoint_id": checkpoint_id,
        "name": name,
        "config": config.to_dict(),
        "task": get_task_labels(model, name).to_dict(),
        "backbone": {
            "model_type": get_model_type(model),
            "hidden_size": get_hidden_size(model),
            "num_layers": len(get_layer_paths(model)),
            "layers": get_layer_paths(model),
        },
        "module_paths": get_task_module_paths(model),
    }
    kept = _other_files(folder)

    def write(staging: Path) -> None:
        weights = staging / WEIGHTS_NAME
        save_file(tensors, weights, metadata={"checkpoint_id": checkpoint_id})
        description["weights_sha256"] = _sha256(weights)
        atomic_write_text(staging / CONFIG_NAME, json.dumps(description, indent=2) + "\n")
        for file in kept:
            shutil.copy2(file, staging / file.name)

    return replace_folder(folder, write)


def load_memory(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> nn.Module:
    """Load a task saved by ``save_memory`` onto ``model`` and make it the active task.

    An unwrapped model is wrapped first; a wrapped one gets the task added beside its others, with
    a head of the task's own label count. ``name`` defaults to the name the task was saved under.
    Returns the same model object.
    """
    description, tensors = read_checkpoint(path)
    name = check.identifier("name", name or description["name"])
    config = SpartanConfig.from_dict(description["config"])
    _check_backbone(model, description, config, path)
    labels = TaskLabels(**description["task"])
    was_wrapped = is_wrapped(model)
    if was_wrapped and name in memory_names(model):
        raise ValueError(f"model already has a memory named {name!r}: pass load_memory(..., name='another_name')")
    label_args = {"num_labels": labels.num_labels, "problem_type": labels.problem_type, "id2label": labels.id2label}
    if labels.num_labels is None:
        label_args = {}
    if was_wrapped:
        add_memory(model, name, config, **label_args)
    else:
        wrap_model(model, config, name=name, **label_args)
    try:
        _copy_task(model, name, tensors, path)
    except ValueError:
        if was_wrapped:
            remove_memory(model, name)
        else:
            unwrap_model(model)
        raise
    set_active_memory(model, name)
    return model


def load_task_weights(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> None:
    """Copy a saved task's weights into task ``name`` (the active task by default) of a wrapped
    model that already has it, e.g. to go back to a best checkpoint. The shapes must agree."""
    description, tensors = read_checkpoint(path)
    config = get_config(model, name)
    _check_backbone(model, description, config, path)
    if description["config"] != config.to_dict():
        saved = description["config"]
        differences = [f"{key}: {saved[key]} saved, {value} here" for key, value in config.to_dict().items() if saved.get(key) != value]
        raise ValueError(
            f"the task at {path} was saved with other memory settings ({'; '.join(differences)}): "
            "load it as a task of its own with spartan.load_memory"
        )
    _copy_task(model, name or active_memory_name(model), tensors, path)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The checked description and the weights of a checkpoint folder, in the current format.

    The description holds ``name``, ``config`` (SpartanConfig fields), ``task`` (``num_labels``,
    ``problem_type``, ``id2label``),
    ``backbone`` (``model_type``, ``hidden_size``, ``num_layers``, ``layers`` or None for version 1),
    ``module_paths`` (None for version 1) and ``format_version`` (as saved).
    """
    folder = existing_folder(path) or Path(path)
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for file in (config_file, weights_file):
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} does not exist: {Path(path)} is not a spartan memory checkpoint "
                f"(save_memory writes {CONFIG_NAME} and {WEIGHTS_NAME} into the folder)"
            )
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_file} is corrupt ({error}): save the memory again") from None
    description = _parse_description(raw, config_file)
    expected_sha = raw.get("weights_sha256")
    if description["format_version"] >= 2 and _sha256(weights_file) != expected_sha:
        raise ValueError(
            f"{weights_file} does not match the checksum in {config_file} (corrupt or altered): save the memory again"
        )
    try:
        tensors = load_file(weights_file)
        with safe_open(weights_file, framework="pt") as handle:
            saved_id = (handle.metadata() or {}).get("checkpoint_id")
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{weights_file} is corrupt ({error}): save the memory again") from None
    if saved_id != raw.get("checkpoint_id"):
        raise ValueError(
            f"{weights_file} and {config_file} come from different saves (interrupted write?): save the memory again"
        )
    if description["format_version"] == 1:
        tensors = _upgrade_v1_tensors(tensors)
    return description, tensors


# -- internals -------------------------------------------------------------------------------


def _parse_description(raw: Any, file: Path) -> dict[str, Any]:
    """The description of ``file`` with every field checked; a ValueError names the bad field."""

    def bad(field: str, problem: str) -> ValueError:
        return ValueError(f"{file}: {field} {problem}: save the memory again (or fix the file by hand)")

    if not isinstance(raw, dict):
        raise bad("the file", "is not a JSON object")
    version = raw.get("format_version", 1)
    if version not in KNOWN_FORMAT_VERSIONS:
        raise ValueError(
            f"{file} has format_version {version!r}; this spartan reads versions {list(KNOWN_FORMAT_VERSIONS)}: "
            "upgrade spartan to load it"
        )
    missing = sorted({"config", "backbone", "name", "checkpoint_id"} - set(raw))
    if missing:
        raise bad(f"field(s) {missing}", "are missing")
    try:
        config = SpartanConfig.from_dict(raw["config"])
    except (ValueError, TypeError) as error:
        raise bad("config", f"is invalid ({error})") from None
    backbone = raw["backbone"]
    if not isinstance(backbone, dict):
        raise bad("backbone", f"must be an object with model_type, hidden_size and num_layers, got {backbone!r}")
    try:
        hidden_size = check.positive_int("backbone.hidden_size", backbone.get("hidden_size"))
        num_layers = check.positive_int("backbone.num_layers", backbone.get("num_layers"))
        layers = check.string_list("backbone.layers", backbone.get("layers"))
        module_paths = raw.get("module_paths")
        if module_paths is not None and not (
            isinstance(module_paths, list) and all(isinstance(p, str) for p in module_paths)
        ):
            raise ValueError(f"module_paths must be a list of module paths, got {module_paths!r}")
        task = raw.get("task") or {}
        if not isinstance(task, dict):
            raise ValueError(f"task must be an object with num_labels and problem_type, got {task!r}")
        labels = TaskLabels(task.get("num_labels"), task.get("problem_type"), task.get("id2label"))
        name = check.identifier("name", raw["name"])
    except ValueError as error:
        raise ValueError(f"{file}: {error}: save the memory again (or fix the file by hand)") from None
    model_type = backbone.get("model_type")
    return {
        "format_version": version,
        "name": name,
        "config": config.to_dict(),
        "task": labels.to_dict(),
        "backbone": {
            "model_type": model_type if isinstance(model_type, str) else "unknown",
            "hidden_size": hidden_size,
            "num_layers": num_layers,
            "layers": layers,
        },
        "module_paths": module_paths,
    }


def _check_backbone(model: nn.Module, description: dict[str, Any], config: SpartanConfig, path: Any) -> None:
    saved = description["backbone"]
    hidden_size = get_hidden_size(model)
    if is_wrapped(model):
        layers = get_layer_paths(model)
    else:
        try:
            layers = find_layers(model, config.layers)
        except ValueError:  # the saved layer list is not in this model: another architecture
            layers = []
    same_layers = layers == saved["layers"] if saved["layers"] is not None else len(layers) == saved["num_layers"]
    if hidden_size != saved["hidden_size"] or not same_layers:
        if hidden_size == saved["hidden_size"] and is_wrapped(model):
            difference = (
                f"is wrapped at the layers {layers} where the memory had {saved['layers']} (its tasks wrap other "
                "layers: load the memory onto a fresh copy of the backbone)"
            )
        elif hidden_size == saved["hidden_size"] and len(layers) == saved["num_layers"]:
            difference = f"wraps the layers {layers} where the memory had {saved['layers']}"
        elif not layers:
            difference = f"({get_model_type(model)}) has none of the layers {saved['layers'] or []}"
        else:
            difference = f"has hidden size {hidden_size} and {len(layers)} layers"
        raise ValueError(
            f"the memory at {path} was trained on a {saved['model_type']} backbone with hidden size "
            f"{saved['hidden_size']} and {saved['num_layers']} layers, but this model {difference}: "
            "load it onto the backbone it was trained with"
        )


def _copy_task(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], path: Any) -> None:
    targets = task_state_dict(model, name)
    memories = {k: v for k, v in targets.items() if k.startswith("memories.")}
    modules = {k: v for k, v in targets.items() if not k.startswith("memories.")}
    copy_tensors(
        memories,
        {k: v for k, v in tensors.items() if k.startswith("memories.")},
        path,
        "the memory config in the checkpoint does not describe its weights: save the memory again",
    )
    copy_tensors(
        modules,
        {k: v for k, v in tensors.items() if not k.startswith("memories.")},
        path,
        "its task modules (head, norms) are not this model's: was it saved from another architecture?",
    )


def _upgrade_v1_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Version-1 names (``head.<path>``, memories as parent_keys / child_keys / child_values) in the current layout."""
    renamed = {(f"modules.{k[len('head.'):]}" if k.startswith("head.") else k): v for k, v in tensors.items()}
    return upgrade_memory_state_dict(renamed, prefix="memories.")


def _other_files(folder: Path) -> list[Path]:
    """Plain files in ``folder`` besides a checkpoint's own, to keep when it is replaced."""
    if not folder.exists():
        return []
    if not folder.is_dir():
        raise ValueError(f"{folder} is a file: save the memory into a folder")
    others = [entry for entry in folder.iterdir() if entry.name not in (CONFIG_NAME, WEIGHTS_NAME)]
    folders = [entry.name for entry in others if not entry.is_file()]
    if folders:
        raise ValueError(
            f"{folder} holds other folders ({', '.join(sorted(folders)[:3])}): save the memory into a folder of its own"
        )
    return others


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
