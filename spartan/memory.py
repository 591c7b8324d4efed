"""SparseHierarchicalMemory: a two-level memory read through the top-k parents' children.

Depends on torch only.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

IMPLEMENTATIONS = ("auto", "dense", "sparse")
VALUE_INITS = ("zeros", "normal")

# "auto" reads memories of up to this many child slots (P * C) densely. Measured on 32 x 128 tokens at
# H=768 (benchmarks/results/memory_layer.md): dense is faster at 1,024 slots (229 vs 439 ms forward),
# sparse at 4,096 (439 vs 713 ms); the dense cost grows with P * C, the sparse one with P + k * C.
DENSE_MAX_SLOTS = 2048
# The sparse path reads this many tokens at a time, so its gathered activations stay near
# chunk_tokens * top_k * H values whatever the batch (about 24 MiB at top-k 8, H=768, fp32).
SPARSE_CHUNK_TOKENS = 1024


class Routing(NamedTuple):
    """The parents each token selected in a forward pass."""

    indices: Tensor  # [..., top_k] parent ids, best first
    weights: Tensor  # [..., top_k] softmax over the selected parents' logits


def validate_memory_shape(num_parents: int, children_per_parent: int, top_k: int, temperature: float) -> None:
    """Raise a ValueError naming the first invalid parameter of a memory's shape."""
    for name, value in (("num_parents", num_parents), ("children_per_parent", children_per_parent), ("top_k", top_k)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if top_k > num_parents:
        raise ValueError(f"top_k ({top_k}) cannot exceed num_parents ({num_parents}): lower top_k or add parents")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")


class SparseHierarchicalMemory(nn.Module):
    """Two-level key-value memory (SPARTAN, Deshpande et al. 2022).

    For each token ``h``: parent logits ``h @ parent_keys.T``; keep the ``top_k`` parents and
    softmax their logits; for each kept parent, softmax ``h @ child_keys[p].T / temperature``
    over its children; return ``sum_p sum_c w_p * w_pc * child_values[p, c]``. Children of
    parents that were not selected take no part, in the forward or the backward pass.

    Two implementations give the same results: ``"dense"`` scores all ``P + P*C`` keys with one
    matrix product and mixes the values with another (fastest for small memories);
    ``"sparse"`` groups the tokens by selected parent and reads only those parents' children,
    so work and activation memory per token grow with ``P + top_k * C`` rather than ``P * C``.

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
        - Output: ``[..., H]``, the memory's read-out, plus ``residual`` when given.

    After each forward, ``last_routing`` holds the selected parents and their weights.
    """

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
        if not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(f"hidden_size must be a positive integer, got {hidden_size!r}")
        validate_memory_shape(num_parents, children_per_parent, top_k, temperature)
        if value_init not in VALUE_INITS:
            raise ValueError(f"value_init must be one of {VALUE_INITS}, got {value_init!r}")
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
        if not isinstance(chunk_tokens, int) or chunk_tokens <= 0:
            raise ValueError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
        self.hidden_size = hidden_size
        self.num_parents = num_parents
        self.children_per_parent = children_per_parent
        self.top_k = top_k
        self.temperature = float(temperature)
        self.value_init = value_init
        if implementation == "auto":
            implementation = "dense" if num_parents * children_per_parent <= DENSE_MAX_SLOTS else "sparse"
        self.implementation = implementation
        self.chunk_tokens = chunk_tokens
        factory = {"device": device, "dtype": dtype}
        self.parent_keys = nn.Parameter(torch.empty(num_parents, hidden_size, **factory))
        self.child_keys = nn.Parameter(torch.empty(num_parents, children_per_parent, hidden_size, **factory))
        self.child_values = nn.Parameter(torch.empty(num_parents, children_per_parent, hidden_size, **factory))
        self.last_routing: Routing | None = None
        self._dense_cache: tuple | None = None  # (parameter versions, their tensors, the inference layout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = 1.0 / math.sqrt(self.hidden_size)  # logits of unit-scale hidden states start near unit scale
        nn.init.normal_(self.parent_keys, std=std)
        nn.init.normal_(self.child_keys, std=std)
        if self.value_init == "zeros":
            nn.init.zeros_(self.child_values)
        else:
            nn.init.normal_(self.child_values, std=std)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_parents={self.num_parents}, "
            f"children_per_parent={self.children_per_parent}, top_k={self.top_k}, "
            f"temperature={self.temperature}, implementation={self.implementation!r}"
        )

    def forward(self, hidden_states: Tensor, residual: Tensor | None = None) -> Tensor:
        """Read the memory; with ``residual`` (shaped like ``hidden_states``), return ``residual`` plus
        the read-out, the addition fused into the read-out's last operation."""
        if hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden_states has hidden size {hidden_states.shape[-1]} but the memory was built with "
                f"hidden_size={self.hidden_size}"
            )
        if residual is not None and residual.shape != hidden_states.shape:
            raise ValueError(
                f"residual has shape {tuple(residual.shape)}; it must match hidden_states' {tuple(hidden_states.shape)}"
            )
        tokens = hidden_states.reshape(-1, self.hidden_size)  # [N, H]
        base = None if residual is None else residual.reshape(-1, self.hidden_size)
        read = self._read_dense if self.implementation == "dense" else self._read_sparse
        out, top_indices, parent_weights = read(tokens, base)
        leading = hidden_states.shape[:-1]
        self.last_routing = Routing(top_indices.view(*leading, self.top_k), parent_weights.view(*leading, self.top_k))
        return out.view(hidden_states.shape)

    def _select_parents(self, parent_logits: Tensor) -> tuple[Tensor, Tensor]:
        top_logits, top_indices = parent_logits.topk(self.top_k, dim=-1)  # [N, k]
        return top_indices, _upcast(top_logits).softmax(dim=-1).to(parent_logits.dtype)

    def _read_dense(self, tokens: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        P, C = self.num_parents, self.children_per_parent
        keys, values = self._dense_layout()  # [H, P + C*P], [C*P, H]
        logits = tokens @ keys  # [N, P + C*P]: parents and children in one matrix product
        parent_logits, child_logits = logits.split([P, C * P], dim=-1)
        top_indices, parent_weights = self._select_parents(parent_logits)
        child_weights = _upcast(child_logits.view(-1, C, P)).softmax(dim=1)  # [N, C, P]
        selected = child_weights.new_zeros(len(tokens), P)
        selected.scatter_(1, top_indices, parent_weights.to(child_weights.dtype))  # [N, P]
        slot_weights = (selected.unsqueeze(1) * child_weights).view(-1, C * P)  # [N, C*P], zero outside the top-k
        slot_weights, values = slot_weights.to(tokens.dtype), values.to(tokens.dtype)
        out = slot_weights @ values if residual is None else torch.addmm(residual, slot_weights, values)
        return out, top_indices, parent_weights

    def _dense_layout(self) -> tuple[Tensor, Tensor]:
        """All keys as one matrix [H, P + C*P] (child logits pre-divided by the temperature) and the
        values [C*P, H]. Children are laid out child-major ([C, P]): the softmax over each parent's
        C children then runs over dim 1 with P contiguous, an order of magnitude faster than over a
        tiny last dim.

        Rebuilt on every call while gradients flow to the memory; otherwise (inference) built once
        and reused until a parameter changes (in place or replaced) or the temperature does.
        """
        params = (self.parent_keys, self.child_keys, self.child_values)
        if (torch.is_grad_enabled() and any(p.requires_grad for p in params)) or any(p.is_inference() for p in params):
            return self._build_dense_layout()
        version = (self.temperature, *((p.data_ptr(), p._version, p.device) for p in params))
        if self._dense_cache is None or self._dense_cache[0] != version:
            with torch.no_grad():
                # the sources keep the parameters' storage alive, so no new parameter can reuse its address
                self._dense_cache = (version, tuple(p.detach() for p in params), self._build_dense_layout())
        return self._dense_cache[2]

    def _build_dense_layout(self) -> tuple[Tensor, Tensor]:
        P, C, H = self.num_parents, self.children_per_parent, self.hidden_size
        child_keys = self.child_keys.transpose(0, 1).reshape(C * P, H) / self.temperature
        keys = torch.cat([self.parent_keys, child_keys]).T.contiguous()  # [H, P + C*P]
        return keys, self.child_values.transpose(0, 1).reshape(C * P, H).contiguous()

    @torch.compiler.disable  # a data-dependent loop over parents: run it eagerly inside compiled graphs
    def _read_sparse(self, tokens: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        parent_logits = tokens @ self.parent_keys.T  # [N, P]
        top_indices, parent_weights = self._select_parents(parent_logits)  # [N, k]
        # unbind, not indexing: its backward builds each gradient once, not one full-size tensor per parent
        keys, values = self.child_keys.unbind(0), self.child_values.unbind(0)  # P x [C, H]
        base = torch.zeros_like(tokens) if residual is None else residual
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
            (_upcast(rows @ keys[parent].T / self.temperature).softmax(dim=-1) * weights).to(rows.dtype)
            @ values[parent]
            for parent, (rows, weights) in enumerate(zip(grouped_tokens, grouped_weights))
            if len(rows)
        ])  # [n*k, H]: each (token, parent) pair's weighted read-out
        return base.index_add(0, pair_tokens, weighted.to(base.dtype))


def _upcast(tensor: Tensor) -> Tensor:
    """Half-precision logits go through softmax in fp32."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


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
