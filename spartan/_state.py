"""Copy saved tensors into a model's tensors: the package's one implementation, with one clear
error for missing, unexpected or mis-shaped entries."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["copy_tensors"]


def copy_tensors(
    targets: Mapping[str, Tensor],
    tensors: Mapping[str, Tensor],
    source: str | os.PathLike,
    hint: str = "was it saved from a model of another architecture?",
) -> None:
    """Copy ``tensors[key]`` into ``targets[key]`` in place for every key, after checking that both
    hold the same keys and shapes; ``hint`` ends the error message (what the user should check)."""
    missing, unexpected = sorted(set(targets) - set(tensors)), sorted(set(tensors) - set(targets))
    if missing or unexpected:
        raise ValueError(
            f"the weights in {source} do not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]} ({hint})"
        )
    for key, target in targets.items():
        if target.shape != tensors[key].shape:
            raise ValueError(
                f"{key} has shape {list(tensors[key].shape)} in {source} but {list(target.shape)} in this model ({hint})"
            )
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(tensors[key])
