"""The trainable state of a model, written into a folder and loaded back: the one place in
``spartan.training`` that tells a model wrapped by spartan from any other model.

- A wrapped model (``spartan.is_wrapped``): the state is its active task, written as a memory
  checkpoint by ``spartan.save_memory`` (its memories, head and trained norms, and its config),
  which ``spartan.load_memory`` also reads onto a fresh backbone; ``load_trainable`` copies it
  back into the model's active task with ``spartan.checkpoint.load_task_weights``.
- Any other model: the state is its ``requires_grad`` parameters, by name, in
  ``trainable_weights.safetensors``.

Nothing here looks inside a memory: the checkpoint module knows the format.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from typing import Any

from .. import checkpoint
from .._state import copy_tensors
from ..inject import active_memory_name, get_config, is_wrapped
from .sharding import shard_like

WEIGHTS_NAME = "trainable_weights.safetensors"


def save_trainable(model: nn.Module, folder: str | os.PathLike) -> None:
    """Write the trainable state of ``model`` into ``folder``.

    ``folder`` is a folder being written whole, such as the staging folder of
    ``spartan._io.replace_folder``: a memory checkpoint replaces the folder it is given, so write
    any other files into it after this call.
    """
    if is_wrapped(model):
        checkpoint.save_memory(model, folder)
    else:
        save_parameters(requires_grad_parameters(model), folder)


def load_trainable(model: nn.Module, folder: str | os.PathLike) -> None:
    """Copy the trainable state that ``save_trainable`` wrote into ``folder`` back into ``model``,
    in place (a wrapped model: into its active task)."""
    if is_wrapped(model):
        checkpoint.load_task_weights(model, folder)
    else:
        load_parameters(requires_grad_parameters(model), folder)


def describe_trainable(model: nn.Module) -> dict[str, Any]:
    """What shapes the trainable state besides its tensors' names and shapes, as JSON: for a wrapped
    model its active task and memory settings (``top_k``, ``temperature``, ...), else nothing. A run
    resumes only onto a model with the same description."""
    if not is_wrapped(model):
        return {}
    return {"task": active_memory_name(model), **{f"memory.{k}": v for k, v in get_config(model).to_dict().items()}}


def requires_grad_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of ``model`` that an optimizer trains (``requires_grad``), by name, in model order."""
    return {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}


def save_parameters(parameters: Mapping[str, Tensor], folder: str | os.PathLike) -> None:
    """Write ``parameters`` (copied to the CPU) to ``folder/trainable_weights.safetensors``; ``folder``
    is a staging folder of ``spartan._io.replace_folder``, which makes the write atomic."""
    tensors = {name: parameter.detach().cpu().contiguous() for name, parameter in parameters.items()}
    save_file(tensors, Path(folder) / WEIGHTS_NAME)


def load_parameters(parameters: Mapping[str, Tensor], folder: str | os.PathLike) -> None:
    """Copy ``folder/trainable_weights.safetensors`` into ``parameters`` in place; the names and
    shapes must match exactly. A sharded parameter (a DTensor) takes its slice of the saved tensor."""
    file = Path(folder) / WEIGHTS_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist: {folder} was not written by spartan.training for this model")
    hint = "were they saved from another model, or with other parameters trainable?"
    saved = load_file(file)
    tensors = {name: shard_like(t, parameters[name]) if name in parameters else t for name, t in saved.items()}
    copy_tensors(parameters, tensors, file, hint=hint)
