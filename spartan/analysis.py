"""Which parent cells the tokens of a dataset select: usage, load balance, top tokens and examples, usage by label.

``collect_routing`` runs a wrapped model over batches and reads each memory's ``last_routing``;
``RoutingStats`` holds the counts as numpy arrays, saves them as JSON and writes a text report;
the ``plot_*`` functions draw them (matplotlib is imported only when they are called).
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .inject import get_attention_mask, get_layer_paths, get_memories

__all__ = [
    "ExampleStat",
    "RoutingStats",
    "TokenStat",
    "collect_routing",
    "plot_label_usage",
    "plot_load_balance",
    "plot_usage_heatmap",
]

# Token ids are kept in the low 32 bits of the (layer, parent, token) keys of the top-token candidates.
_TOKEN_ID_BITS = 32
# Each (layer, parent) keeps its heaviest candidate tokens between batches, at least this many: the
# top tokens are exact unless a token's weight was spread so thinly that it dropped out in between.
TOKEN_CANDIDATES = 1024
TOKEN_RANKINGS = ("weight", "specificity")
USAGE_MEASURES = ("selection_share", "weight_share")


class TokenStat(NamedTuple):
    """One token's routing to one parent, over all its (non-padding) occurrences."""

    token_id: int
    token: str | None  # as the tokenizer spells it; None without a tokenizer
    weight_sum: float  # total routing weight its occurrences gave the parent
    count: int  # occurrences that had the parent in their top-k
    occurrences: int  # occurrences in all
    mean_weight: float  # weight_sum / count: how strongly it selects the parent when it does
    specificity: float  # weight_sum / occurrences: how much of the token's routing goes to the parent


class ExampleStat(NamedTuple):
    """One example's routing to one parent."""

    example_index: int  # position in the iteration over the batches (dataset row for an unshuffled loader)
    mean_weight: float  # routing weight to the parent, averaged over the example's tokens


@dataclass
class RoutingStats:
    """Routing of ``num_tokens`` non-padding tokens through each layer's memory. L layers, P parents.

    "Weight" is a token's softmax weight over its top-k parents (it sums to 1 per token; 0 for
    parents outside its top-k), so ``weight_share`` sums to 1 per layer and is the load that the
    load-balancing loss evens out. Arrays indexed by label are empty along that axis (size 0)
    when the batches had no per-example class labels.

    Attributes:
        layer_paths: module path of each wrapped layer, [L].
        num_parents, top_k: P and the parents kept per token.
        num_examples, num_tokens: examples (rows of the batches) and non-padding tokens seen.
        selection_counts: [L, P] tokens that had the parent in their top-k.
        weight_sums: [L, P] total routing weight the parent received.
        label_selection_counts: [L, num_labels, P] selection counts of the tokens of each label's examples.
        label_weight_sums: [L, num_labels, P] routing weight from the tokens of each label's examples.
        label_token_counts, label_example_counts: [num_labels] tokens and examples of each label.
        top_token_ids: [L, P, N] token ids giving the parent the most total weight, best first; -1 pads.
        top_token_weight_sums, top_token_counts: [L, P, N] their total weight and selection count.
        specific_token_ids: [L, P, N] token ids with the highest specificity (the share of their
            routing weight that goes to the parent), among those occurring ``min_occurrences`` times
            or more, best first; -1 pads. Frequent tokens (punctuation, ``[CLS]``) lead the
            ranking by weight in every parent; this ranking shows what sets a parent apart.
        specific_token_weight_sums, specific_token_counts: [L, P, N] their total weight and selection count.
        min_occurrences: the occurrences a token needs to be ranked by specificity.
        token_occurrences: token id -> non-padding occurrences, for the ids listed.
        token_strings: token id -> the tokenizer's spelling, for the ids listed.
        top_example_ids: [L, P, N] examples with the highest mean weight to the parent, best first; -1 pads.
        top_example_weights: [L, P, N] those mean weights.
    """

    layer_paths: list[str]
    num_parents: int
    top_k: int
    num_examples: int
    num_tokens: int
    selection_counts: np.ndarray
    weight_sums: np.ndarray
    label_selection_counts: np.ndarray
    label_weight_sums: np.ndarray
    label_token_counts: np.ndarray
    label_example_counts: np.ndarray
    top_token_ids: np.ndarray
    top_token_weight_sums: np.ndarray
    top_token_counts: np.ndarray
    specific_token_ids: np.ndarray
    specific_token_weight_sums: np.ndarray
    specific_token_counts: np.ndarray
    min_occurrences: int
    token_occurrences: dict[int, int]
    token_strings: dict[int, str]
    top_example_ids: np.ndarray
    top_example_weights: np.ndarray

    @property
    def num_layers(self) -> int:
        return len(self.layer_paths)

    @property
    def num_labels(self) -> int:
        return len(self.label_token_counts)

    @property
    def has_labels(self) -> bool:
        return bool(self.label_example_counts.sum())

    @property
    def selection_rate(self) -> np.ndarray:
        """[L, P] fraction of tokens that have the parent in their top-k (sums to top_k per layer)."""
        return self.selection_counts / self.num_tokens

    @property
    def selection_share(self) -> np.ndarray:
        """[L, P] the parent's share of all top-k selections (sums to 1 per layer)."""
        return self.selection_counts / (self.num_tokens * self.top_k)

    @property
    def weight_share(self) -> np.ndarray:
        """[L, P] the parent's share of the routing weight, i.e. its load (sums to 1 per layer)."""
        return self.weight_sums / self.num_tokens

    @property
    def mean_weight(self) -> np.ndarray:
        """[L, P] mean routing weight of the parent when selected (0 where never selected)."""
        return np.divide(
            self.weight_sums,
            self.selection_counts,
            out=np.zeros_like(self.weight_sums),
            where=self.selection_counts > 0,
        )

    @property
    def entropy(self) -> np.ndarray:
        """[L] entropy (nats) of ``weight_share``: log P when every parent takes the same load."""
        shares = self.weight_share
        return -np.sum(shares * np.log(np.where(shares > 0, shares, 1.0)), axis=-1)

    @property
    def normalized_entropy(self) -> np.ndarray:
        """[L] ``entropy / log P``: 1 for perfectly balanced parents, 0 when one parent takes all."""
        return self.entropy / math.log(self.num_parents) if self.num_parents > 1 else np.ones(self.num_layers)

    @property
    def label_weight_share(self) -> np.ndarray:
        """[L, num_labels, P] each parent's share of the routing weight of each label's tokens."""
        tokens = self.label_token_counts[None, :, None]
        return np.divide(self.label_weight_sums, tokens, out=np.zeros_like(self.label_weight_sums), where=tokens > 0)

    def layer_index(self, layer: int) -> int:
        """``layer`` as an index in ``0..L-1`` (negative indices count from the end)."""
        if not -self.num_layers <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is out of range: the stats cover {self.num_layers} layers")
        return layer % self.num_layers

    def _parent_index(self, parent: int) -> int:
        if not 0 <= parent < self.num_parents:
            raise ValueError(f"parent {parent} is out of range: the memories have {self.num_parents} parents")
        return parent

    def top_tokens(self, layer: int, parent: int, n: int = 10, by: str = "weight") -> list[TokenStat]:
        """The ``n`` tokens that select ``parent`` of ``layer`` most strongly, best first.

        ``by="weight"``: the most total routing weight (frequent tokens first); ``by="specificity"``:
        the largest share of their own routing weight (see ``specific_token_ids``).
        """
        layer, parent = self.layer_index(layer), self._parent_index(parent)
        if by not in TOKEN_RANKINGS:
            raise ValueError(f"by must be one of {TOKEN_RANKINGS}, got {by!r}")
        prefix = "top" if by == "weight" else "specific"
        stats = []
        for token_id, weight_sum, count in zip(
            getattr(self, f"{prefix}_token_ids")[layer, parent, :n].tolist(),
            getattr(self, f"{prefix}_token_weight_sums")[layer, parent, :n].tolist(),
            getattr(self, f"{prefix}_token_counts")[layer, parent, :n].tolist(),
        ):
            if token_id < 0:
                break
            occurrences = self.token_occurrences[token_id]
            token = self.token_strings.get(token_id)
            stats.append(
                TokenStat(token_id, token, weight_sum, count, occurrences, weight_sum / count, weight_sum / occurrences)
            )
        return stats

    def top_examples(self, layer: int, parent: int, n: int = 10) -> list[ExampleStat]:
        """The ``n`` examples whose tokens route the highest mean weight to ``parent`` of ``layer``."""
        layer, parent = self.layer_index(layer), self._parent_index(parent)
        ids = self.top_example_ids[layer, parent, :n].tolist()
        weights = self.top_example_weights[layer, parent, :n].tolist()
        return [ExampleStat(index, weight) for index, weight in zip(ids, weights) if index >= 0]

    def report(self, n_tokens: int = 10) -> str:
        """A text report: per layer the usage entropy, and per parent its load and top tokens."""
        uniform = 100 / self.num_parents
        header = (
            f"Routing of {self.num_tokens:,} tokens in {self.num_examples:,} examples through {self.num_layers} "
            f"layers x {self.num_parents} parents (top-{self.top_k}; uniform load {uniform:.2f}%)."
        )
        lines = [
            header,
            "load: % of the layer's routing weight; selected: % of tokens with the parent in their top-k.",
            "top: the tokens giving the parent the most weight (times selected).",
            (
                f"specific: the tokens seen {self.min_occurrences}+ times that send the parent most of their weight "
                "(share)."
            ),
        ]
        for layer, path in enumerate(self.layer_paths):
            entropy, normalized = self.entropy[layer], self.normalized_entropy[layer]
            lines.append("")
            lines.append(
                f"Layer {layer} ({path}): entropy {entropy:.3f} nats = {normalized:.3f} x log {self.num_parents}"
            )
            lines.append(f"  {'parent':>6} {'load':>7} {'selected':>9}  tokens")
            for parent in range(self.num_parents):
                top = ", ".join(f"{_token_label(t)} ({t.count})" for t in self.top_tokens(layer, parent, n_tokens))
                specific = ", ".join(
                    f"{_token_label(t)} ({t.specificity:.2f})"
                    for t in self.top_tokens(layer, parent, n_tokens, by="specificity")
                )
                load, selected = 100 * self.weight_share[layer, parent], 100 * self.selection_rate[layer, parent]
                lines.append(f"  {parent:>6} {load:>6.2f}% {selected:>8.1f}%  {'top':>8}: {top}")
                lines.append(f"{'':>28}specific: {specific}")
            if self.has_labels:
                by_label = []
                for label in np.flatnonzero(self.label_example_counts):
                    shares = self.label_weight_share[layer, label]
                    largest = ", ".join(f"{p}: {100 * shares[p]:.1f}%" for p in np.argsort(-shares, kind="stable")[:3])
                    by_label.append(f"label {label} (top parents {largest})")
                lines.append("  load by label: " + "; ".join(by_label))
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every field (arrays as nested lists) plus the derived shares and entropies."""
        values: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            values[field.name] = value.tolist() if isinstance(value, np.ndarray) else value
        for name in ("token_occurrences", "token_strings"):  # JSON keys are strings
            values[name] = {str(token_id): value for token_id, value in getattr(self, name).items()}
        for name in (
            "selection_share",
            "selection_rate",
            "weight_share",
            "mean_weight",
            "entropy",
            "normalized_entropy",
        ):
            values[name] = getattr(self, name).tolist()
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RoutingStats:
        """Inverse of ``to_dict`` (the derived entries are recomputed, not read)."""
        kwargs: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            value = values[field.name]
            if field.name in ("token_occurrences", "token_strings"):
                value = {int(token_id): item for token_id, item in value.items()}
            elif field.name in _ARRAY_DTYPES:
                value = np.asarray(value, dtype=_ARRAY_DTYPES[field.name])
            kwargs[field.name] = value
        # An empty label axis does not survive nested lists: restore the [L, 0, P] shape.
        empty_by_label = (len(kwargs["layer_paths"]), 0, kwargs["num_parents"])
        for name in ("label_selection_counts", "label_weight_sums"):
            if kwargs[name].size == 0:
                kwargs[name] = kwargs[name].reshape(empty_by_label)
        return cls(**kwargs)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``to_dict()`` as JSON; returns the path."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict()) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> RoutingStats:
        return cls.from_dict(json.loads(Path(path).read_text()))


_ARRAY_DTYPES = {
    "selection_counts": np.int64,
    "weight_sums": np.float64,
    "label_selection_counts": np.int64,
    "label_weight_sums": np.float64,
    "label_token_counts": np.int64,
    "label_example_counts": np.int64,
    "top_token_ids": np.int64,
    "top_token_weight_sums": np.float64,
    "top_token_counts": np.int64,
    "specific_token_ids": np.int64,
    "specific_token_weight_sums": np.float64,
    "specific_token_counts": np.int64,
    "top_example_ids": np.int64,
    "top_example_weights": np.float64,
}


def _token_label(stat: TokenStat) -> str:
    return repr(stat.token) if stat.token is not None else f"#{stat.token_id}"


# ---------------------------------------------------------------------------------- collection


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
    for name, value in (("top_n", top_n), ("min_occurrences", min_occurrences)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    memories = list(get_memories(model))
    accumulator = _RoutingAccumulator(
        num_layers=len(memories),
        num_parents=memories[0].num_parents,
        top_k=memories[0].top_k,
        top_n=top_n,
        min_occurrences=min_occurrences,
    )
    argument_names = _forward_argument_names(model)
    device = next(model.parameters()).device
    total = len(batches) if hasattr(batches, "__len__") else None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
        batches = itertools.islice(batches, max_batches)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(batches, total=total, desc="Collecting routing", disable=not progress):
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
                for memory in memories:
                    memory.last_routing = None
                model(**inputs)
                routings = []
                for path, memory in zip(get_layer_paths(model), memories):
                    if memory.last_routing is None:
                        raise RuntimeError(f"the memory of {path} did not run in the forward pass")
                    routings.append(memory.last_routing)
                accumulator.add(
                    indices=torch.stack([routing.indices for routing in routings]).cpu(),
                    weights=torch.stack([routing.weights for routing in routings]).cpu().double(),
                    mask=_token_mask(get_attention_mask(model), routings[0].indices.shape[:-1]),
                    input_ids=inputs.get("input_ids"),
                    labels=batch.get(labels_key),
                )
    finally:
        model.train(was_training)
    if accumulator.num_tokens == 0:
        raise ValueError("no tokens to analyse: the batches were empty or entirely padding")
    return accumulator.result(get_layer_paths(model), tokenizer)


def _forward_argument_names(model: nn.Module) -> set[str]:
    parameters = inspect.signature(model.forward).parameters.values()
    return {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _token_mask(attention_mask: Tensor | None, token_shape: torch.Size) -> Tensor:
    """[B, T] bool: the tokens to count."""
    if attention_mask is None:
        return torch.ones(token_shape, dtype=torch.bool)
    if attention_mask.shape != token_shape:
        raise ValueError(
            f"the attention mask has shape {list(attention_mask.shape)} but the memories routed tokens of shape "
            f"{list(token_shape)}: pass a 2-D attention mask [batch, sequence] (1 for tokens, 0 for padding)"
        )
    return attention_mask.cpu().bool()


class _RoutingAccumulator:
    """Running sums over batches; routing tensors are [L, B, T, k] on the CPU."""

    def __init__(self, num_layers: int, num_parents: int, top_k: int, top_n: int, min_occurrences: int) -> None:
        self.num_layers, self.num_parents, self.top_k, self.top_n = num_layers, num_parents, top_k, top_n
        self.min_occurrences = min_occurrences
        self.num_examples = 0
        self.num_tokens = 0
        self.selection_counts = torch.zeros(num_layers, num_parents, dtype=torch.int64)
        self.weight_sums = torch.zeros(num_layers, num_parents, dtype=torch.float64)
        self.label_selection_counts = torch.zeros(num_layers, 0, num_parents, dtype=torch.int64)
        self.label_weight_sums = torch.zeros(num_layers, 0, num_parents, dtype=torch.float64)
        self.label_token_counts = torch.zeros(0, dtype=torch.int64)
        self.label_example_counts = torch.zeros(0, dtype=torch.int64)
        # Top-token candidates: key = (layer * P + parent) << _TOKEN_ID_BITS | token id, sorted by key.
        self.token_keys = torch.zeros(0, dtype=torch.int64)
        self.token_weight_sums = torch.zeros(0, dtype=torch.float64)
        self.token_counts = torch.zeros(0, dtype=torch.int64)
        self.token_occurrences = torch.zeros(0, dtype=torch.int64)  # [vocabulary seen so far]
        self.example_ids = torch.full((num_layers, num_parents, 0), -1, dtype=torch.int64)
        self.example_weights = torch.zeros(num_layers, num_parents, 0, dtype=torch.float64)

    def add(self, indices: Tensor, weights: Tensor, mask: Tensor, input_ids: Tensor | None, labels: Any) -> None:
        """indices, weights: [L, B, T, k]; mask: [B, T] bool; input_ids: [B, T] or None."""
        num_examples = mask.shape[0]
        keep = mask[None, :, :, None]
        # [L, B, T, P]: each token's routing weight to every parent (0 outside its top-k), padding zeroed.
        parent_weights = torch.zeros(*indices.shape[:-1], self.num_parents, dtype=torch.float64)
        parent_weights.scatter_(-1, indices, weights).mul_(keep)
        selected = torch.zeros(parent_weights.shape, dtype=torch.int64).scatter_(-1, indices, 1).mul_(keep)
        example_weight_sums = parent_weights.sum(dim=2)  # [L, B, P]
        example_tokens = mask.sum(dim=1)  # [B]

        self.selection_counts += selected.sum(dim=(1, 2))
        self.weight_sums += example_weight_sums.sum(dim=1)
        self._add_labels(labels, num_examples, selected.sum(dim=2), example_weight_sums, example_tokens)
        if input_ids is not None:
            token_ids = input_ids.cpu()[mask].long()
            occurrences = torch.bincount(token_ids, minlength=len(self.token_occurrences))
            occurrences[: len(self.token_occurrences)] += self.token_occurrences
            self.token_occurrences = occurrences
            self._add_tokens(token_ids, parent_weights[:, mask], selected[:, mask].bool())
        example_means = example_weight_sums / example_tokens.clamp_min(1)[None, :, None]
        example_means[:, example_tokens == 0] = -math.inf  # an all-padding row never ranks
        self._add_examples(example_means.transpose(1, 2), torch.arange(num_examples) + self.num_examples)
        self.num_examples += num_examples
        self.num_tokens += int(example_tokens.sum())

    def _add_labels(
        self,
        labels: Any,
        num_examples: int,
        example_counts: Tensor,
        example_weight_sums: Tensor,
        example_tokens: Tensor,
    ) -> None:
        """example_counts, example_weight_sums: [L, B, P]; example_tokens: [B]."""
        per_example_classes = (
            isinstance(labels, Tensor) and labels.shape == (num_examples,) and not labels.is_floating_point()
        )
        if not per_example_classes:
            return
        labels = labels.cpu().long()
        labelled = labels >= 0
        if not labelled.any():
            return
        self._grow_labels(int(labels.max()) + 1)
        one_hot = torch.zeros(num_examples, self.num_labels, dtype=torch.int64)
        one_hot[labelled] = nn.functional.one_hot(labels[labelled], self.num_labels)
        self.label_selection_counts += torch.einsum("lbp,bc->lcp", example_counts, one_hot)
        self.label_weight_sums += torch.einsum("lbp,bc->lcp", example_weight_sums, one_hot.double())
        self.label_token_counts += example_tokens.long() @ one_hot
        self.label_example_counts += one_hot.sum(dim=0)

    @property
    def num_labels(self) -> int:
        return len(self.label_token_counts)

    def _grow_labels(self, num_labels: int) -> None:
        extra = num_labels - self.num_labels
        if extra <= 0:
            return
        pad = (0, 0, 0, extra)  # the label axis of [L, labels, P]
        self.label_selection_counts = nn.functional.pad(self.label_selection_counts, pad)
        self.label_weight_sums = nn.functional.pad(self.label_weight_sums, pad)
        self.label_token_counts = nn.functional.pad(self.label_token_counts, (0, extra))
        self.label_example_counts = nn.functional.pad(self.label_example_counts, (0, extra))

    def _add_tokens(self, token_ids: Tensor, parent_weights: Tensor, selected: Tensor) -> None:
        """token_ids: [N]; parent_weights, selected: [L, N, P] for the N non-padding tokens."""
        layer, token, parent = selected.nonzero(as_tuple=True)
        keys = ((layer * self.num_parents + parent) << _TOKEN_ID_BITS) | token_ids[token]
        keys = torch.cat([self.token_keys, keys])
        weight_sums = torch.cat([self.token_weight_sums, parent_weights[layer, token, parent]])
        counts = torch.cat([self.token_counts, torch.ones_like(layer)])
        keys, inverse = keys.unique(return_inverse=True)  # sorted by (layer, parent), then token id
        weight_sums = torch.zeros(len(keys), dtype=torch.float64).index_add_(0, inverse, weight_sums)
        counts = torch.zeros(len(keys), dtype=torch.int64).index_add_(0, inverse, counts)
        # Keep each (layer, parent)'s heaviest candidates; ties go to the lower token id.
        by_weight = torch.sort(weight_sums, descending=True, stable=True).indices
        order = by_weight[torch.sort(keys[by_weight] >> _TOKEN_ID_BITS, stable=True).indices]
        groups = keys[order] >> _TOKEN_ID_BITS
        rank = torch.arange(len(order)) - torch.searchsorted(groups, groups)
        kept = order[rank < max(TOKEN_CANDIDATES, self.top_n)].sort().values
        self.token_keys, self.token_weight_sums, self.token_counts = keys[kept], weight_sums[kept], counts[kept]

    def _add_examples(self, example_means: Tensor, example_ids: Tensor) -> None:
        """example_means: [L, P, B] mean weight of each example's tokens to each parent; example_ids: [B]."""
        weights = torch.cat([self.example_weights, example_means], dim=-1)
        ids = torch.cat([self.example_ids, example_ids.expand_as(example_means)], dim=-1)
        order = torch.sort(weights, dim=-1, descending=True, stable=True).indices[..., : self.top_n]  # ties: earlier
        self.example_weights, self.example_ids = weights.gather(-1, order), ids.gather(-1, order)

    def result(self, layer_paths: list[str], tokenizer: Any | None) -> RoutingStats:
        L, P, n = self.num_layers, self.num_parents, self.top_n
        groups = (self.token_keys >> _TOKEN_ID_BITS).numpy()
        ids = (self.token_keys & ((1 << _TOKEN_ID_BITS) - 1)).numpy()
        weight_sums, counts = self.token_weight_sums.numpy(), self.token_counts.numpy()
        occurrences = self.token_occurrences.numpy()[ids]
        specificity = weight_sums / occurrences
        rankings = {  # ids, weight sums, counts, each [L, P, n]
            prefix: (np.full((L, P, n), -1, dtype=np.int64), np.zeros((L, P, n)), np.zeros((L, P, n), dtype=np.int64))
            for prefix in ("top", "specific")
        }
        for group in np.unique(groups):
            members = np.flatnonzero(groups == group)
            frequent = members[occurrences[members] >= self.min_occurrences]
            layer, parent = divmod(int(group), P)
            for prefix, best in (
                ("top", members[np.argsort(-weight_sums[members], kind="stable")[:n]]),
                # ties: more weight, then the lower id
                ("specific", frequent[np.lexsort((-weight_sums[frequent], -specificity[frequent]))[:n]]),
            ):
                for array, values in zip(rankings[prefix], (ids, weight_sums, counts)):
                    array[layer, parent, : len(best)] = values[best]
        listed = sorted(set(np.concatenate([r[0][r[0] >= 0] for r in rankings.values()]).tolist()))
        token_strings = {}
        if tokenizer is not None and listed:
            token_strings = dict(zip(listed, tokenizer.convert_ids_to_tokens(listed)))
        example_weights = self.example_weights.numpy()
        ranked = example_weights > 0  # examples that never selected the parent are not listed
        example_ids = np.where(ranked, self.example_ids.numpy(), -1)
        return RoutingStats(
            layer_paths=list(layer_paths),
            num_parents=P,
            top_k=self.top_k,
            num_examples=self.num_examples,
            num_tokens=self.num_tokens,
            selection_counts=self.selection_counts.numpy(),
            weight_sums=self.weight_sums.numpy(),
            label_selection_counts=self.label_selection_counts.numpy(),
            label_weight_sums=self.label_weight_sums.numpy(),
            label_token_counts=self.label_token_counts.numpy(),
            label_example_counts=self.label_example_counts.numpy(),
            top_token_ids=rankings["top"][0],
            top_token_weight_sums=rankings["top"][1],
            top_token_counts=rankings["top"][2],
            specific_token_ids=rankings["specific"][0],
            specific_token_weight_sums=rankings["specific"][1],
            specific_token_counts=rankings["specific"][2],
            min_occurrences=self.min_occurrences,
            token_occurrences={token_id: int(self.token_occurrences[token_id]) for token_id in listed},
            token_strings=token_strings,
            top_example_ids=example_ids,
            top_example_weights=np.where(ranked, example_weights, 0.0),
        )


# ------------------------------------------------------------------------------------------- plots

FIGURE_SIZE = (8, 4.5)
FIGURE_DPI = 150


def plot_usage_heatmap(stats: RoutingStats, path: str | os.PathLike, measure: str = "selection_share") -> Path:
    """Heatmap of each layer's parent usage (layers x parents) as a PNG at ``path``.

    ``measure``: ``"selection_share"`` (share of the top-k selections) or ``"weight_share"`` (share of
    the routing weight, i.e. the load).
    """
    if measure not in USAGE_MEASURES:
        raise ValueError(f"measure must be one of {USAGE_MEASURES}, got {measure!r}")
    percent = 100 * getattr(stats, measure)  # [L, P]
    fig, ax = _new_figure()
    image = ax.imshow(percent, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
    what = "top-k selections" if measure == "selection_share" else "routing weight"
    fig.colorbar(image, ax=ax, label=f"% of the layer's {what}")
    if stats.num_layers * stats.num_parents <= 400:
        threshold = percent.max() / 2
        for (layer, parent), value in np.ndenumerate(percent):
            ax.text(
                parent,
                layer,
                f"{value:.1f}",
                ha="center",
                va="center",
                fontsize=6,
                color="black" if value > threshold else "white",
            )
    _integer_ticks(ax.set_xticks, stats.num_parents)
    _integer_ticks(ax.set_yticks, stats.num_layers)
    ax.set_xlabel("parent")
    ax.set_ylabel("layer")
    ax.set_title(
        f"Parent usage: % of {what} (top-{stats.top_k} of {stats.num_parents}, "
        f"uniform {100 / stats.num_parents:.3g}%, {stats.num_tokens:,} tokens)",
        fontsize=10,
    )
    return _save(fig, path)


def plot_label_usage(
    stats: RoutingStats, layer: int, path: str | os.PathLike, label_names: list[str] | None = None
) -> Path:
    """Grouped bars of one layer's parent loads for the tokens of each label's examples, as a PNG."""
    if not stats.has_labels:
        raise ValueError(
            "the stats hold no usage by label: the batches had no per-example integer labels; pass "
            "collect_routing(..., labels_key=...) the key of the class labels [batch]"
        )
    layer = stats.layer_index(layer)
    labels = [label for label in range(stats.num_labels) if stats.label_example_counts[label]]
    if label_names is not None and len(label_names) < stats.num_labels:
        raise ValueError(
            f"label_names has {len(label_names)} names but the stats have labels 0..{stats.num_labels - 1}"
        )
    names = label_names if label_names is not None else [f"label {label}" for label in range(stats.num_labels)]
    fig, ax = _new_figure()
    width = 0.8 / len(labels)
    parents = np.arange(stats.num_parents)
    for position, label in enumerate(labels):
        ax.bar(
            parents - 0.4 + (position + 0.5) * width,
            100 * stats.label_weight_share[layer, label],
            width,
            label=f"{names[label]} ({stats.label_example_counts[label]:,} examples)",
        )
    ax.axhline(100 / stats.num_parents, color="gray", linestyle="--", linewidth=1, label="uniform")
    _integer_ticks(ax.set_xticks, stats.num_parents)
    ax.set_xlabel("parent")
    ax.set_ylabel("% of the label's routing weight")
    ax.set_title(f"Parent usage by label, layer {layer} ({stats.layer_paths[layer]})", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_load_balance(stats: RoutingStats, path: str | os.PathLike) -> Path:
    """Per layer, the parents' loads sorted from largest to smallest, against the uniform load, as a PNG."""
    from matplotlib import colormaps

    fig, ax = _new_figure()
    ranks = np.arange(1, stats.num_parents + 1)
    colors = colormaps["viridis"](np.linspace(0, 0.9, stats.num_layers))
    for layer in range(stats.num_layers):
        ax.plot(
            ranks,
            100 * np.sort(stats.weight_share[layer])[::-1],
            marker="o",
            markersize=3,
            color=colors[layer],
            label=f"layer {layer}: H / log P = {stats.normalized_entropy[layer]:.3f}",
        )
    ax.axhline(100 / stats.num_parents, color="black", linestyle="--", linewidth=1, label="uniform")
    _integer_ticks(ax.set_xticks, stats.num_parents, start=1)
    ax.set_xlabel("parent rank (largest load first)")
    ax.set_ylabel("% of the layer's routing weight")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Load balance of the {stats.num_parents} parents per layer (top-{stats.top_k})", fontsize=10)
    ax.legend(fontsize=7, ncol=2 if stats.num_layers > 8 else 1)
    return _save(fig, path)


def _new_figure():
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=FIGURE_SIZE, dpi=FIGURE_DPI, layout="constrained")
    return fig, fig.add_subplot()


def _integer_ticks(set_ticks, count: int, start: int = 0) -> None:
    """Tick every integer up to 32 of them; let matplotlib choose beyond."""
    if count <= 32:
        set_ticks(range(start, start + count))


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
