"""SparseHierarchicalMemory: a two-level memory read through the top-k parents' children.

Depends on torch only.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from . import _validate as check

IMPLEMENTATIONS = ("auto", "dense", "sparse")
VALUE_INITS = ("zeros", "normal")

# "auto" reads memories of up to this many child slots (P * C) densely; the dense cost grows with
# P * C, the sparse one with P + k * C (the crossover is measured in benchmarks/results/memory_layer.md).
DENSE_MAX_SLOTS = 2048
# The sparse path reads this many tokens at a time, so its gathered activations stay near
# chunk_tokens * top_k * H values whatever the batch.
SPARSE_CHUNK_TOKENS = 1024


class Routing(NamedTuple):
    """The parents each token selected in a forward pass."""

    indices: Tensor  # [..., top_k] parent ids, best first
    weights: Tensor  # [..., top_k] softmax over the selected parents' logits


def validate_memory_shape(
    num_parents: Any, children_per_parent: Any, top_k: Any, temperature: Any
) -> tuple[int, int, int, float]:
    """The memory's shape, normalised (NumPy and string numbers taken); a ValueError names the first
    invalid parameter and the fix."""
    num_parents = check.positive_int("num_parents", num_parents)
    children_per_parent = check.positive_int("children_per_parent", children_per_parent)
    top_k = check.positive_int("top_k", top_k)
    if top_k > num_parents:
        raise ValueError(f"top_k ({top_k}) cannot exceed num_parents ({num_parents}): lower top_k or add parents")
    return num_parents, children_per_parent, top_k, check.positive_number("temperature", temperature)


def memory_parameter_count(hidden_size: int, num_parents: int, children_per_parent: int) -> int:
    """Parameters of one memory: ``P`` parent keys, ``P*C`` child keys and ``P*C`` child values of size H."""
    return (num_parents + 2 * num_parents * children_per_parent) * hidden_size


class SparseHierarchicalMemory(nn.Module):
    """Two-level key-value memory (SPARTAN, Deshpande et al. 2022).

    For each token ``h``: parent logits ``h @ parent_keys.T``; keep the ``top_k`` parents and
    softmax their logits; for each kept parent, softmax ``h @ child_keys[p].T / temperature``
    over its children; return ``sum_p sum_c w_p * w_pc * child_values[p, c]``. Children of
    parents that were not selected take no part, in the forward or the backward pass (their
    gradients are exactly zero, even when the upstream gradient is not finite).

    The parameters are stored in the layout the dense read uses, so no derived copy of them
    exists that a write could leave stale: ``keys`` ``[P + C*P, H]`` holds the P parent keys,
    then the child keys child-major (row ``P + c*P + p`` is child ``c`` of parent ``p``);
    ``values`` ``[C*P, H]`` holds the child values in the same order. ``parent_keys``
    ``[P, H]``, ``child_keys`` and ``child_values`` ``[P, C, H]`` are views of them.

    Two implementations give the same results: ``"dense"`` scores all ``P + P*C`` keys with one
    matrix product and mixes the values with another (fastest for small memories; traceable and
    exportable with dynamic shapes); ``"sparse"`` groups the tokens by selected parent and reads
    only those parents' children, so work and activation memory per token grow with
    ``P + top_k * C`` rather than ``P * C`` (eager only: tracing or exporting it is refused).

    Args:
        hidden_size: H, the size of the hidden states read and returned.
        num_parents: P.
        children_per_parent: C.
        top_k: parents kept per token.
        temperature: divides the child logits.
        value_init: ``"zeros"`` (the read-out starts at exactly zero) or ``"normal"``.
        implementation: ``"dense"``, ``"sparse"`` or ``"auto"`` (dense up to ``DENSE_MAX_SLOTS`` slots).
        chunk_tokens: tokens the sparse path reads at a time; bounds its peak memory.

    Shape:
        - Input: ``hidden_states`` ``[..., H]``; optional ``residual`` of the same shape.
        - Output: ``[..., H]``, the memory's read-out, plus ``residual`` when given, in the
          residual's dtype (autocast lowers the read-out, never the residual stream).

    After each forward, ``last_routing`` holds the selected parents and their weights.

    Examples::

        >>> memory = SparseHierarchicalMemory(384, num_parents=16, children_per_parent=3, top_k=8)
        >>> hidden = torch.randn(2, 10, 384)
        >>> memory(hidden, residual=hidden).shape
        torch.Size([2, 10, 384])
        >>> memory.last_routing.indices.shape
        torch.Size([2, 10, 8])
    """

    # State-dict layout. 1: parent_keys [P, H], child_keys and child_values [P, C, H];
    # 2: keys [P + C*P, H] and values [C*P, H]. Version-1 state dicts load (converted).
    _version = 2

    def __init__(
        self,
        hidden_size: int,
        num_parents: int,
        children_per_parent: int,
        top_k: int,
        temperature: float = 1.0,
        value_init: str = "zeros",
        implementation: str = "auto",
        chunk_tokens: int = SPARSE_CHUNK_TOKENS,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        hidden_size = check.positive_int("hidden_size", hidden_size)
        num_parents, children_per_parent, top_k, temperature = validate_memory_shape(
            num_parents, children_per_parent, top_k, temperature
        )
        self.value_init = check.choice("value_init", value_init, VALUE_INITS)
        implementation = check.choice("implementation", implementation, IMPLEMENTATIONS)
        self.chunk_tokens = check.positive_int("chunk_tokens", chunk_tokens)
        self.hidden_size = hidden_size
        self.num_parents = num_parents
        self.children_per_parent = children_per_parent
        self.top_k = top_k
        self.temperature = temperature
        if implementation == "auto":
            implementation = "dense" if num_parents * children_per_parent <= DENSE_MAX_SLOTS else "sparse"
        self.implementation = implementation
        slots = num_parents * children_per_parent
        factory = {"device": device, "dtype": dtype}
        self.keys = nn.Parameter(torch.empty(num_parents + slots, hidden_size, **factory))
        self.values = nn.Parameter(torch.empty(slots, hidden_size, **factory))
        self.last_routing: Routing | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = 1.0 / math.sqrt(self.hidden_size)  # logits of unit-scale hidden states start near unit scale
        nn.init.normal_(self.keys, std=std)
        if self.value_init == "zeros":
            nn.init.zeros_(self.values)
        else:
            nn.init.normal_(self.values, std=std)

    # -- views of the parameters ---------------------------------------------------------------

    def split_keys(self, keys: Tensor) -> tuple[Tensor, Tensor]:
        """Views of a tensor shaped like ``keys`` (the parameter, its gradient, an optimizer state):
        the parent part ``[P, H]`` and the child part ``[P, C, H]``."""
        P, C = self.num_parents, self.children_per_parent
        return keys[:P], keys[P:].view(C, P, -1).transpose(0, 1)

    def split_values(self, values: Tensor) -> Tensor:
        """A view ``[P, C, H]`` of a tensor shaped like ``values``."""
        return values.view(self.children_per_parent, self.num_parents, -1).transpose(0, 1)

    @property
    def parent_keys(self) -> Tensor:
        """``[P, H]``, a view of ``keys``."""
        return self.split_keys(self.keys)[0]

    @property
    def child_keys(self) -> Tensor:
        """``[P, C, H]``, a view of ``keys``."""
        return self.split_keys(self.keys)[1]

    @property
    def child_values(self) -> Tensor:
        """``[P, C, H]``, a view of ``values``."""
        return self.split_values(self.values)

    @staticmethod
    def parameter_count(hidden_size: int, num_parents: int, children_per_parent: int) -> int:
        """The number of parameters of a memory of this shape."""
        return memory_parameter_count(hidden_size, num_parents, children_per_parent)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_parents={self.num_parents}, "
            f"children_per_parent={self.children_per_parent}, top_k={self.top_k}, "
            f"temperature={self.temperature}, implementation={self.implementation!r}"
        )

    # -- reading -------------------------------------------------------------------------------

    def parent_logits(self, hidden_states: Tensor) -> Tensor:
        """Every parent's logit for every token, by brute force: ``[..., H] -> [..., P]``."""
        self._check_input(hidden_states)
        return hidden_states @ self.parent_keys.T

    def forward(self, hidden_states: Tensor, residual: Tensor | None = None) -> Tensor:
        """Read the memory; with ``residual`` (shaped like ``hidden_states``), return ``residual`` plus
        the read-out, the addition fused into the read-out's last operation where the dtypes allow."""
        self._check_input(hidden_states)
        if residual is not None and residual.shape != hidden_states.shape:
            raise ValueError(
                f"residual has shape {tuple(residual.shape)}; it must match hidden_states' {tuple(hidden_states.shape)}"
            )
        tokens = hidden_states.reshape(-1, self.hidden_size)  # [N, H]
        base = None if residual is None else residual.reshape(-1, self.hidden_size)
        if self.implementation == "dense":
            out, top_indices, parent_weights = self._read_dense(tokens, base)
        else:
            self._refuse_tracing()
            out, top_indices, parent_weights = self._read_sparse(tokens, base)
        leading = hidden_states.shape[:-1]
        self.last_routing = Routing(top_indices.unflatten(0, leading), parent_weights.unflatten(0, leading))
        return out.view_as(hidden_states)

    def _check_input(self, hidden_states: Tensor) -> None:
        if hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden_states has hidden size {hidden_states.shape[-1]} but the memory was built with "
                f"hidden_size={self.hidden_size}"
            )

    def _refuse_tracing(self) -> None:
        if torch.jit.is_tracing() or torch.compiler.is_exporting():
            raise RuntimeError(
                "the sparse memory path groups tokens by parent with data-dependent sizes and cannot be traced "
                "or exported: build the memory with implementation='dense' (SpartanConfig(implementation='dense'))"
            )

    def _read_dense(self, tokens: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        return dense_read(
            tokens, self.keys, self.values, self.num_parents, self.children_per_parent, self.top_k, self.temperature,
            residual,
        )

    @torch.compiler.disable  # a data-dependent loop over parents: run it eagerly inside compiled graphs
    def _read_sparse(self, tokens: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        parent_logits = tokens @ self.parent_keys.T  # [N, P]
        top_indices, parent_weights = _select_parents(parent_logits, self.top_k)  # [N, k]
        # unbind, not indexing: its backward builds each gradient once, not one full-size tensor per parent
        keys, values = self.child_keys.unbind(0), self.child_values.unbind(0)  # P x [C, H]
        base = torch.zeros_like(tokens) if residual is None else residual
        if len(tokens) == 0:
            return base + 0 * tokens, top_indices, parent_weights
        chunks = zip(*(t.split(self.chunk_tokens) for t in (tokens, base, top_indices, parent_weights)))
        out = torch.cat([self._read_children(*chunk, keys, values) for chunk in chunks])
        return out, top_indices, parent_weights

    def _read_children(
        self,
        tokens: Tensor,
        base: Tensor,
        top_indices: Tensor,
        parent_weights: Tensor,
        keys: tuple[Tensor, ...],
        values: tuple[Tensor, ...],
    ) -> Tensor:
        """``base`` [n, H] plus the weighted child read-out of n tokens whose top-k parents are
        selected; ``keys`` and ``values`` hold each parent's children ([C, H] each)."""
        k = self.top_k
        # Group the n*k (token, parent) pairs by parent, then read each used parent's children with
        # two small matrix products: per token, work and memory grow with k*C, and every child key
        # and value is read once per chunk, not once per token that selected its parent.
        pair_parents = top_indices.flatten()
        order = pair_parents.argsort(stable=True)
        pair_tokens = order // k  # [n*k], grouped by parent
        group_sizes = torch.bincount(pair_parents, minlength=self.num_parents).tolist()
        grouped_tokens = tokens[pair_tokens].split(group_sizes)  # per parent: [n_p, H]
        grouped_weights = parent_weights.flatten()[order].unsqueeze(-1).split(group_sizes)  # per parent: [n_p, 1]
        weighted = torch.cat([
            (_upcast(rows @ keys[parent].T / self.temperature).softmax(dim=-1) * weights).to(values[parent].dtype)
            @ values[parent]
            for parent, (rows, weights) in enumerate(zip(grouped_tokens, grouped_weights))
            if len(rows)
        ])  # [n*k, H]: each (token, parent) pair's weighted read-out
        return base.index_add(0, pair_tokens, weighted.to(base.dtype))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        _upgrade_state_dict_v1(state_dict, prefix)  # a version-1 layout (parent_keys, ...) is converted
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)


def dense_read(
    tokens: Tensor,
    keys: Tensor,
    values: Tensor,
    num_parents: int,
    children_per_parent: int,
    top_k: int,
    temperature: float | Tensor,
    residual: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The dense read of ``SparseHierarchicalMemory`` as a function of its tensors, for one memory
    or for a memory per row (mixed-task batches, exported graphs).

    Args:
        tokens: ``[N, H]`` (one memory) or ``[B, S, H]`` (with per-row tensors).
        keys: ``[P + C*P, H]`` or ``[B, P + C*P, H]``, laid out as ``SparseHierarchicalMemory.keys``.
        values: ``[C*P, H]`` or ``[B, C*P, H]``.
        temperature: a number, or a tensor that broadcasts against ``[B, S, C, P]`` (e.g. ``[B, 1, 1, 1]``).
        residual: added to the read-out, shaped like ``tokens``; it keeps its dtype.

    Returns:
        The read-out (plus ``residual``) shaped like ``tokens``, the top-k parent ids ``[..., k]``
        and their softmax weights ``[..., k]``.
    """
    P, C = num_parents, children_per_parent
    logits = tokens @ keys.transpose(-1, -2)  # [..., P + C*P]: parents and children in one matrix product
    parent_logits, child_logits = logits.split([P, C * P], dim=-1)
    top_indices, parent_weights = _select_parents(parent_logits, top_k)  # [..., k]
    # Child-major [..., C, P]: the softmax over each parent's C children runs over dim -2 with P
    # contiguous, much faster than over a tiny last dim.
    child_weights = (_upcast(child_logits).unflatten(-1, (C, P)) / temperature).softmax(dim=-2)
    selected = torch.zeros_like(parent_logits, dtype=child_weights.dtype)  # no Python ints from shapes
    selected = selected.scatter(-1, top_indices, parent_weights.to(child_weights.dtype))  # [..., P]
    slot_weights = selected.unsqueeze(-2) * child_weights  # [..., C, P], zero outside the top-k
    if torch.is_grad_enabled() and (tokens.requires_grad or keys.requires_grad or values.requires_grad):
        # where, not the product alone: unselected slots, and the values of parents no token selected,
        # get exactly zero gradient even from a non-finite upstream one (0 * inf would be NaN)
        keep = (selected > 0).unsqueeze(-2)  # [..., 1, P]; a kept parent whose weight underflows to 0 reads nothing
        slot_weights = torch.where(keep, slot_weights, 0.0)
        if values.requires_grad and values.dim() == 2:
            used = keep.flatten(0, -2).any(dim=0).repeat(C)  # [C*P], child-major like the values' rows
            values = torch.where(used.unsqueeze(1), values, 0.0)
    slot_weights = slot_weights.flatten(-2)  # [..., C*P]
    if residual is not None and tokens.dim() == 2 and _same_dtypes(residual, slot_weights, values):
        out = torch.addmm(residual, slot_weights, values)
    else:
        read = slot_weights.to(values.dtype) @ values
        out = read.to(tokens.dtype) if residual is None else residual + read.to(residual.dtype)
    return out, top_indices, parent_weights


def upgrade_memory_state_dict(state_dict: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """A copy of ``state_dict`` with every version-1 memory (``<prefix>...parent_keys``,
    ``child_keys``, ``child_values``) converted to the current ``keys`` / ``values`` layout."""
    upgraded = dict(state_dict)
    suffix = "parent_keys"
    for key in [k for k in state_dict if k.startswith(prefix) and k.endswith(suffix)]:
        _upgrade_state_dict_v1(upgraded, key[: -len(suffix)])
    return upgraded


def _upgrade_state_dict_v1(state_dict: dict[str, Tensor], prefix: str) -> None:
    names = [f"{prefix}{name}" for name in ("parent_keys", "child_keys", "child_values")]
    if not all(name in state_dict for name in names):
        return
    parent_keys, child_keys, child_values = (state_dict.pop(name) for name in names)
    hidden = parent_keys.shape[-1]
    # [P, C, H] -> child-major rows [C*P, H]
    state_dict[f"{prefix}keys"] = torch.cat([parent_keys, child_keys.transpose(0, 1).reshape(-1, hidden)])
    state_dict[f"{prefix}values"] = child_values.transpose(0, 1).reshape(-1, hidden)


def _select_parents(parent_logits: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """The ``top_k`` best parents of each token and the softmax over their logits."""
    top_logits, top_indices = parent_logits.topk(top_k, dim=-1)
    return top_indices, _upcast(top_logits).softmax(dim=-1).to(parent_logits.dtype)


def _upcast(tensor: Tensor) -> Tensor:
    """Half-precision logits go through softmax in fp32."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def _same_dtypes(residual: Tensor, weights: Tensor, values: Tensor) -> bool:
    """Whether ``addmm`` keeps the residual's dtype: equal dtypes and no autocast that would lower it."""
    if torch.is_autocast_enabled(residual.device.type):
        return False
    return residual.dtype == weights.dtype == values.dtype


def load_balancing_loss(routing: Routing, num_parents: int, mask: Tensor | None = None) -> Tensor:
    """The paper's load-balancing loss for one memory: the mean over tokens of each parent's
    attention (zero where it was not selected), squared, summed and divided by ``num_parents``.

    ``mask`` (shaped like the routing's leading dims, 1 for real tokens) leaves padding out.
    The loss is lowest when every parent takes the same share of the tokens.
    """
    weights = routing.weights.float().reshape(-1, routing.weights.shape[-1])  # [N, k]
    indices = routing.indices.reshape(-1, routing.indices.shape[-1])
    if mask is not None:
        keep = mask.reshape(-1, 1).to(weights.dtype)
        weights = weights * keep
        num_tokens = keep.sum().clamp_min(1.0)
    else:
        num_tokens = torch.tensor(float(len(weights)), device=weights.device)
    usage = weights.new_zeros(num_parents).index_add(0, indices.flatten(), weights.flatten()) / num_tokens
    return usage.square().sum() / num_parents
