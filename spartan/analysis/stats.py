"""Routing statistics: the types that hold them and their computation from routing tensors. Pure torch and numpy.

``RoutingAccumulator`` sums the routing of batches ([L, B, T, k] parent indices and weights) and
returns a ``RoutingStats``: usage counts per (layer, parent), usage by label, and rankings of the
tokens (``TokenRanking``) and examples (``ExampleRanking``) that select each parent most.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from .._io import atomic_write_text
from .._validate import choice, positive_int


# Token ids are kept in the low 32 bits of the (layer, parent, token) keys of the top-token candidates.
_TOKEN_ID_BITS = 32
# Each (layer, parent) keeps its heaviest candidate tokens between batches, at least this many: the
# top tokens are exact unless a token's weight was spread so thinly that it dropped out in between.
TOKEN_CANDIDATES = 1024
TOKEN_RANKINGS = ("weight", "specificity")


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


@dataclass(frozen=True, eq=False)
class TokenRanking:
    """The best N tokens of every (layer, parent) under one ranking, best first. L layers, P parents.

    Attributes:
        ids: [L, P, N] int64 token ids; -1 pads where fewer than N tokens rank.
        weight_sums: [L, P, N] float64 total routing weight each token gave the parent (0 where padded).
        counts: [L, P, N] int64 occurrences of each token that had the parent in their top-k (0 where padded).
    """

    ids: np.ndarray
    weight_sums: np.ndarray
    counts: np.ndarray

    def __post_init__(self) -> None:
        shapes = {array.shape for array in (self.ids, self.weight_sums, self.counts)}
        if len(shapes) != 1 or self.ids.ndim != 3:
            raise ValueError(
                f"a TokenRanking's ids, weight_sums and counts must share one [layers, parents, N] shape, "
                f"got {[list(array.shape) for array in (self.ids, self.weight_sums, self.counts)]}"
            )

    def entries(self, layer: int, parent: int, n: int | None = None) -> list[tuple[int, float, int]]:
        """``(token id, weight sum, count)`` of the first ``n`` (default: all) ranked tokens of (layer, parent)."""
        entries = zip(
            self.ids[layer, parent, :n].tolist(),
            self.weight_sums[layer, parent, :n].tolist(),
            self.counts[layer, parent, :n].tolist(),
        )
        return [(token_id, weight_sum, count) for token_id, weight_sum, count in entries if token_id >= 0]

    def token_ids(self) -> np.ndarray:
        """The distinct token ids ranked anywhere, ascending."""
        return np.unique(self.ids[self.ids >= 0])

    def to_dict(self) -> dict[str, list]:
        return {"ids": self.ids.tolist(), "weight_sums": self.weight_sums.tolist(), "counts": self.counts.tolist()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TokenRanking:
        return cls(
            ids=np.asarray(values["ids"], dtype=np.int64),
            weight_sums=np.asarray(values["weight_sums"], dtype=np.float64),
            counts=np.asarray(values["counts"], dtype=np.int64),
        )


@dataclass(frozen=True, eq=False)
class ExampleRanking:
    """The N examples of every (layer, parent) whose tokens route the highest mean weight to it, best first.

    Attributes:
        ids: [L, P, N] int64 example indices; -1 pads (examples that never selected the parent are not listed).
        mean_weights: [L, P, N] float64 those mean weights (0 where padded).
    """

    ids: np.ndarray
    mean_weights: np.ndarray

    def __post_init__(self) -> None:
        if self.ids.shape != self.mean_weights.shape or self.ids.ndim != 3:
            raise ValueError(
                f"an ExampleRanking's ids and mean_weights must share one [layers, parents, N] shape, "
                f"got {list(self.ids.shape)} and {list(self.mean_weights.shape)}"
            )

    def entries(self, layer: int, parent: int, n: int | None = None) -> list[ExampleStat]:
        """The first ``n`` (default: all) ranked examples of (layer, parent)."""
        entries = zip(self.ids[layer, parent, :n].tolist(), self.mean_weights[layer, parent, :n].tolist())
        return [ExampleStat(index, weight) for index, weight in entries if index >= 0]

    def to_dict(self) -> dict[str, list]:
        return {"ids": self.ids.tolist(), "mean_weights": self.mean_weights.tolist()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ExampleRanking:
        return cls(
            ids=np.asarray(values["ids"], dtype=np.int64),
            mean_weights=np.asarray(values["mean_weights"], dtype=np.float64),
        )


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
        tokens_by_weight: per (layer, parent) the tokens giving the parent the most total weight.
        tokens_by_specificity: per (layer, parent) the tokens with the highest specificity (the share
            of their routing weight that goes to the parent), among those occurring ``min_occurrences``
            times or more. Frequent tokens (punctuation, ``[CLS]``) lead the ranking by weight in
            every parent; this ranking shows what sets a parent apart.
        min_occurrences: the occurrences a token needs to be ranked by specificity.
        token_occurrences: token id -> non-padding occurrences, for the ids ranked.
        token_strings: token id -> the tokenizer's spelling, for the ids ranked.
        examples_by_weight: per (layer, parent) the examples with the highest mean weight to the parent.
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
    tokens_by_weight: TokenRanking
    tokens_by_specificity: TokenRanking
    min_occurrences: int
    token_occurrences: dict[int, int]
    token_strings: dict[int, str]
    examples_by_weight: ExampleRanking

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

    def token_ranking(self, by: str = "weight") -> TokenRanking:
        """``tokens_by_weight`` (``by="weight"``) or ``tokens_by_specificity`` (``by="specificity"``)."""
        return self.tokens_by_weight if choice("by", by, TOKEN_RANKINGS) == "weight" else self.tokens_by_specificity

    def top_tokens(self, layer: int, parent: int, n: int = 10, by: str = "weight") -> list[TokenStat]:
        """The ``n`` tokens that select ``parent`` of ``layer`` most strongly, best first.

        ``by="weight"``: the most total routing weight (frequent tokens first); ``by="specificity"``:
        the largest share of their own routing weight (see ``tokens_by_specificity``).
        """
        layer, parent = self.layer_index(layer), self._parent_index(parent)
        return [
            self._token_stat(token_id, weight_sum, count)
            for token_id, weight_sum, count in self.token_ranking(by).entries(layer, parent, n)
        ]

    def _token_stat(self, token_id: int, weight_sum: float, count: int) -> TokenStat:
        occurrences = self.token_occurrences[token_id]
        token = self.token_strings.get(token_id)
        return TokenStat(token_id, token, weight_sum, count, occurrences, weight_sum / count, weight_sum / occurrences)

    def top_examples(self, layer: int, parent: int, n: int = 10) -> list[ExampleStat]:
        """The ``n`` examples whose tokens route the highest mean weight to ``parent`` of ``layer``."""
        layer, parent = self.layer_index(layer), self._parent_index(parent)
        return self.examples_by_weight.entries(layer, parent, n)

    def report(self, n_tokens: int = 10) -> str:
        """A text report: per layer the usage entropy, and per parent its load and top tokens."""
        uniform = 100 / self.num_parents
        lines = [
            (
                f"Routing of {self.num_tokens:,} tokens in {self.num_examples:,} examples through {self.num_layers} "
                f"layers x {self.num_parents} parents (top-{self.top_k}; uniform load {uniform:.2f}%)."
            ),
            "load: % of the layer's routing weight; selected: % of tokens with the parent in their top-k.",
            "top: the tokens giving the parent the most weight (times selected).",
            (
                f"specific: the tokens seen {self.min_occurrences}+ times that send the parent most of their weight "
                "(share)."
            ),
        ]
        for layer in range(self.num_layers):
            lines += self._layer_report(layer, n_tokens)
        return "\n".join(lines) + "\n"

    def _layer_report(self, layer: int, n_tokens: int) -> list[str]:
        entropy, normalized = self.entropy[layer], self.normalized_entropy[layer]
        lines = [
            "",
            (
                f"Layer {layer} ({self.layer_paths[layer]}): entropy {entropy:.3f} nats = {normalized:.3f} x log "
                f"{self.num_parents}"
            ),
            f"  {'parent':>6} {'load':>7} {'selected':>9}  tokens",
        ]
        for parent in range(self.num_parents):
            top = ", ".join(f"{_token_label(t)} ({t.count})" for t in self.top_tokens(layer, parent, n_tokens))
            specific = ", ".join(
                f"{_token_label(t)} ({t.specificity:.2f})"
                for t in self.top_tokens(layer, parent, n_tokens, by="specificity")
            )
            load, selected = 100 * self.weight_share[layer, parent], 100 * self.selection_rate[layer, parent]
            lines.append(f"  {parent:>6} {load:>6.2f}% {selected:>8.1f}%  {'top':>8}: {top}")
            lines.append(f"{'':>28}specific: {specific}")
        if not self.has_labels:
            return lines
        by_label = []
        for label in np.flatnonzero(self.label_example_counts):
            shares = self.label_weight_share[layer, label]
            largest = ", ".join(f"{p}: {100 * shares[p]:.1f}%" for p in np.argsort(-shares, kind="stable")[:3])
            by_label.append(f"label {label} (top parents {largest})")
        lines.append("  load by label: " + "; ".join(by_label))
        return lines

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every field (arrays as nested lists, rankings as dicts of them) plus the derived
        shares and entropies."""
        values: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, np.ndarray):
                value = value.tolist()
            elif isinstance(value, (TokenRanking, ExampleRanking)):
                value = value.to_dict()
            values[field.name] = value
        values["token_occurrences"] = {str(token_id): n for token_id, n in self.token_occurrences.items()}
        values["token_strings"] = {str(token_id): token for token_id, token in self.token_strings.items()}
        values["selection_share"] = self.selection_share.tolist()
        values["selection_rate"] = self.selection_rate.tolist()
        values["weight_share"] = self.weight_share.tolist()
        values["mean_weight"] = self.mean_weight.tolist()
        values["entropy"] = self.entropy.tolist()
        values["normalized_entropy"] = self.normalized_entropy.tolist()
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RoutingStats:
        """Inverse of ``to_dict`` (the derived entries are recomputed, not read)."""
        empty_by_label = (len(values["layer_paths"]), 0, values["num_parents"])

        def by_label(name: str, dtype: type) -> np.ndarray:
            # An empty label axis does not survive nested lists: restore the [L, 0, P] shape.
            array = np.asarray(values[name], dtype=dtype)
            return array.reshape(empty_by_label) if array.size == 0 else array

        return cls(
            layer_paths=list(values["layer_paths"]),
            num_parents=values["num_parents"],
            top_k=values["top_k"],
            num_examples=values["num_examples"],
            num_tokens=values["num_tokens"],
            selection_counts=np.asarray(values["selection_counts"], dtype=np.int64),
            weight_sums=np.asarray(values["weight_sums"], dtype=np.float64),
            label_selection_counts=by_label("label_selection_counts", np.int64),
            label_weight_sums=by_label("label_weight_sums", np.float64),
            label_token_counts=np.asarray(values["label_token_counts"], dtype=np.int64),
            label_example_counts=np.asarray(values["label_example_counts"], dtype=np.int64),
            tokens_by_weight=TokenRanking.from_dict(values["tokens_by_weight"]),
            tokens_by_specificity=TokenRanking.from_dict(values["tokens_by_specificity"]),
            min_occurrences=values["min_occurrences"],
            token_occurrences={int(token_id): n for token_id, n in values["token_occurrences"].items()},
            token_strings={int(token_id): token for token_id, token in values["token_strings"].items()},
            examples_by_weight=ExampleRanking.from_dict(values["examples_by_weight"]),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``to_dict()`` as JSON (atomically); returns the path."""
        return atomic_write_text(path, json.dumps(self.to_dict()) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> RoutingStats:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def _token_label(stat: TokenStat) -> str:
    return repr(stat.token) if stat.token is not None else f"#{stat.token_id}"


class RoutingAccumulator:
    """Running routing sums over batches, turned into a ``RoutingStats`` by ``result``.

    Args:
        num_layers, num_parents, top_k: L, P and the parents each token keeps.
        top_n: tokens (per ranking) and examples kept per (layer, parent).
        min_occurrences: occurrences a token needs to be ranked by specificity.
    """

    def __init__(self, num_layers: int, num_parents: int, top_k: int, top_n: int, min_occurrences: int) -> None:
        self.num_layers = positive_int("num_layers", num_layers)
        self.num_parents = positive_int("num_parents", num_parents)
        self.top_k = positive_int("top_k", top_k)
        self.top_n = positive_int("top_n", top_n)
        self.min_occurrences = positive_int("min_occurrences", min_occurrences)
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

    @property
    def num_labels(self) -> int:
        return len(self.label_token_counts)

    def add(self, indices: Tensor, weights: Tensor, mask: Tensor, input_ids: Tensor | None, labels: Any) -> None:
        """Add one batch of B examples of T tokens.

        Args:
            indices: [L, B, T, k] int64 selected parents, on the CPU.
            weights: [L, B, T, k] float64 their routing weights, on the CPU.
            mask: [B, T] bool, the tokens to count (False for padding).
            input_ids: [B, T] token ids, or None (no token rankings then).
            labels: per-example integer class labels [B] (negative: unlabelled); anything else is ignored.
        """
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
        if _is_per_example_classes(labels, num_examples):
            self._add_labels(labels.cpu().long(), selected.sum(dim=2), example_weight_sums, example_tokens)
        if input_ids is not None:
            self._add_tokens(input_ids.cpu()[mask].long(), parent_weights[:, mask], selected[:, mask].bool())
        example_means = example_weight_sums / example_tokens.clamp_min(1)[None, :, None]
        example_means[:, example_tokens == 0] = -math.inf  # an all-padding row never ranks
        self._add_examples(example_means.transpose(1, 2), torch.arange(num_examples) + self.num_examples)
        self.num_examples += num_examples
        self.num_tokens += int(example_tokens.sum())

    def _add_labels(
        self, labels: Tensor, example_counts: Tensor, example_weight_sums: Tensor, example_tokens: Tensor
    ) -> None:
        """labels: [B]; example_counts, example_weight_sums: [L, B, P]; example_tokens: [B]."""
        labelled = labels >= 0
        if not labelled.any():
            return
        self._grow_labels(int(labels.max()) + 1)
        one_hot = torch.zeros(len(labels), self.num_labels, dtype=torch.int64)
        one_hot[labelled] = nn.functional.one_hot(labels[labelled], self.num_labels)
        self.label_selection_counts += torch.einsum("lbp,bc->lcp", example_counts, one_hot)
        self.label_weight_sums += torch.einsum("lbp,bc->lcp", example_weight_sums, one_hot.double())
        self.label_token_counts += example_tokens.long() @ one_hot
        self.label_example_counts += one_hot.sum(dim=0)

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
        occurrences = torch.bincount(token_ids, minlength=len(self.token_occurrences))
        occurrences[: len(self.token_occurrences)] += self.token_occurrences
        self.token_occurrences = occurrences
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

    def result(self, layer_paths: list[str], tokenizer: Any | None = None) -> RoutingStats:
        """The statistics so far; ``tokenizer`` (``convert_ids_to_tokens``) spells the ranked tokens."""
        by_weight, by_specificity = self._token_rankings()
        listed = np.union1d(by_weight.token_ids(), by_specificity.token_ids()).tolist()
        token_strings = {}
        if tokenizer is not None and listed:
            token_strings = dict(zip(listed, tokenizer.convert_ids_to_tokens(listed)))
        example_weights = self.example_weights.numpy()
        ranked = example_weights > 0  # examples that never selected the parent are not listed
        return RoutingStats(
            layer_paths=list(layer_paths),
            num_parents=self.num_parents,
            top_k=self.top_k,
            num_examples=self.num_examples,
            num_tokens=self.num_tokens,
            selection_counts=self.selection_counts.numpy(),
            weight_sums=self.weight_sums.numpy(),
            label_selection_counts=self.label_selection_counts.numpy(),
            label_weight_sums=self.label_weight_sums.numpy(),
            label_token_counts=self.label_token_counts.numpy(),
            label_example_counts=self.label_example_counts.numpy(),
            tokens_by_weight=by_weight,
            tokens_by_specificity=by_specificity,
            min_occurrences=self.min_occurrences,
            token_occurrences={token_id: int(self.token_occurrences[token_id]) for token_id in listed},
            token_strings=token_strings,
            examples_by_weight=ExampleRanking(
                ids=np.where(ranked, self.example_ids.numpy(), -1), mean_weights=np.where(ranked, example_weights, 0.0)
            ),
        )

    def _token_rankings(self) -> tuple[TokenRanking, TokenRanking]:
        """The candidates ranked by total weight, and those seen ``min_occurrences``+ times by specificity."""
        groups = (self.token_keys >> _TOKEN_ID_BITS).numpy()  # layer * P + parent, ascending
        ids = (self.token_keys & ((1 << _TOKEN_ID_BITS) - 1)).numpy()
        weight_sums, counts = self.token_weight_sums.numpy(), self.token_counts.numpy()
        occurrences = self.token_occurrences.numpy()[ids]
        shape = (self.num_layers, self.num_parents, self.top_n)
        # np.lexsort sorts by its last key first; ties left go to the lower token id (the candidates' order).
        heaviest = np.lexsort((-weight_sums, groups))
        frequent = np.flatnonzero(occurrences >= self.min_occurrences)
        specificity = weight_sums[frequent] / occurrences[frequent]
        most_specific = frequent[np.lexsort((-weight_sums[frequent], -specificity, groups[frequent]))]
        return (
            _best_per_group(shape, groups, heaviest, ids, weight_sums, counts),
            _best_per_group(shape, groups, most_specific, ids, weight_sums, counts),
        )


def _is_per_example_classes(labels: Any, num_examples: int) -> bool:
    return isinstance(labels, Tensor) and labels.shape == (num_examples,) and not labels.is_floating_point()


def _best_per_group(
    shape: tuple[int, int, int],
    groups: np.ndarray,
    order: np.ndarray,
    ids: np.ndarray,
    weight_sums: np.ndarray,
    counts: np.ndarray,
) -> TokenRanking:
    """The first N candidates of each group (layer * P + parent) in ``order``, which sorts them by group first."""
    num_parents, n = shape[1], shape[2]
    sorted_groups = groups[order]
    rank = np.arange(len(order)) - np.searchsorted(sorted_groups, sorted_groups)
    best, rank = order[rank < n], rank[rank < n]
    layer, parent = np.divmod(groups[best], num_parents)
    ranked_ids = np.full(shape, -1, dtype=np.int64)
    ranked_weight_sums = np.zeros(shape, dtype=np.float64)
    ranked_counts = np.zeros(shape, dtype=np.int64)
    ranked_ids[layer, parent, rank] = ids[best]
    ranked_weight_sums[layer, parent, rank] = weight_sums[best]
    ranked_counts[layer, parent, rank] = counts[best]
    return TokenRanking(ranked_ids, ranked_weight_sums, ranked_counts)
