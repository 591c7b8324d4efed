"""Running a wrapped model over batches and gathering the routing of its active memories into ``RoutingStats``."""

from __future__ import annotations

import contextlib
import inspect
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._validate import optional_positive_int, positive_int
from ..inject import get_layer_paths, get_memories
from .stats import RoutingAccumulator, RoutingStats

__all__ = ["collect_routing"]


def collect_routing(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    tokenizer: Any | None = None,
    labels_key: str = "labels",
    max_batches: int | None = None,
    progress: bool = True,
    top_n: int = 20,
    min_occurrences: int = 3,
) -> RoutingStats:
    """Run a wrapped model over ``batches`` and gather the routing statistics of its active memories.

    The model runs in eval mode without gradients (its training mode is restored); each batch is
    moved to the model's device and passed as keyword arguments, keeping only the keys that
    ``model.forward`` names (so ``labels``, ``idx``, ... are not passed). Tokens where the
    attention mask is 0 are left out.

    Args:
        model: a model wrapped by ``spartan.wrap_model`` (encoder or decoder, any head).
        batches: dicts of tensors as a DataLoader yields them, e.g. ``input_ids`` [B, T] and
            ``attention_mask`` [B, T]. Examples are numbered in iteration order.
        tokenizer: spells the top tokens (``convert_ids_to_tokens``); without it they are ids only.
        labels_key: per-example integer class labels [B] under this key give usage by label;
            other labels (per token, regression scores) and negative labels (unlabelled rows) are ignored.
        max_batches: stop after this many batches.
        progress: show a progress bar.
        top_n: tokens (per ranking) and examples kept per (layer, parent).
        min_occurrences: occurrences a token needs to be ranked by specificity.
    """
    top_n = positive_int("top_n", top_n)
    min_occurrences = positive_int("min_occurrences", min_occurrences)
    max_batches = optional_positive_int("max_batches", max_batches)
    memories = list(get_memories(model))
    layer_paths = get_layer_paths(model)
    accumulator = RoutingAccumulator(len(memories), memories[0].num_parents, memories[0].top_k, top_n, min_occurrences)
    argument_names = _forward_argument_names(model)
    device = next(model.parameters()).device
    batches, total = _limited(batches, max_batches)
    with _eval_mode(model), torch.no_grad():
        for batch in tqdm(batches, total=total, desc="Collecting routing", disable=not progress):
            inputs = _model_inputs(model, batch, argument_names, device)
            indices, weights = _run(model, memories, layer_paths, inputs)
            accumulator.add(
                indices=indices,
                weights=weights,
                mask=_token_mask(inputs.get("attention_mask"), indices.shape[1:-1]),
                input_ids=inputs.get("input_ids"),
                labels=batch.get(labels_key),
            )
    if accumulator.num_tokens == 0:
        raise ValueError("no tokens to analyse: the batches were empty or entirely padding")
    return accumulator.result(layer_paths, tokenizer)


def _limited(batches: Iterable, max_batches: int | None) -> tuple[Iterable, int | None]:
    """The batches, cut after ``max_batches``, and how many there will be (None when unknown)."""
    total = len(batches) if hasattr(batches, "__len__") else None
    if max_batches is None:
        return batches, total
    return itertools.islice(batches, max_batches), max_batches if total is None else min(total, max_batches)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _forward_argument_names(model: nn.Module) -> set[str]:
    parameters = inspect.signature(model.forward).parameters.values()
    return {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _model_inputs(
    model: nn.Module, batch: Mapping[str, Any], argument_names: set[str], device: torch.device
) -> dict[str, Any]:
    """The batch entries ``model.forward`` takes, tensors moved to ``device``."""
    inputs = {
        key: value.to(device) if isinstance(value, Tensor) else value
        for key, value in batch.items()
        if key in argument_names
    }
    if not inputs:
        raise ValueError(
            f"no batch key is an argument of {type(model).__name__}.forward: the batch has "
            f"{sorted(batch)}; pass the model's inputs, e.g. input_ids and attention_mask"
        )
    return inputs


def _run(
    model: nn.Module, memories: Sequence[nn.Module], layer_paths: Sequence[str], inputs: Mapping[str, Any]
) -> tuple[Tensor, Tensor]:
    """One forward pass; the memories' parent indices (int64) and weights (float64), each [L, B, T, k] on the CPU."""
    for memory in memories:
        memory.last_routing = None
    model(**inputs)
    missing = [path for path, memory in zip(layer_paths, memories) if memory.last_routing is None]
    if missing:
        raise RuntimeError(f"the memory of {missing[0]} did not run in the forward pass")
    indices = torch.stack([memory.last_routing.indices for memory in memories]).cpu()
    weights = torch.stack([memory.last_routing.weights for memory in memories]).cpu().double()
    return indices, weights


def _token_mask(attention_mask: Any, token_shape: torch.Size) -> Tensor:
    """[B, T] bool: the tokens to count (all of them without a tensor attention mask)."""
    if not isinstance(attention_mask, Tensor):
        return torch.ones(token_shape, dtype=torch.bool)
    if attention_mask.shape != token_shape:
        raise ValueError(
            f"the attention mask has shape {list(attention_mask.shape)} but the memories routed tokens of shape "
            f"{list(token_shape)}: pass a 2-D attention mask [batch, sequence] (1 for tokens, 0 for padding)"
        )
    return attention_mask.cpu().bool()
