"""SparseHierarchicalMemory: a two-level memory read through the top-k parents' children.

Depends on torch only.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _validate as check

IMPLEMENTATIONS = ("auto", "dense", "sparse")
VALUE_INITS = ("zeros", "normal")
PARENT_KEYS = ("flat", "product")

# "auto" reads memories of up to this many child slots (P * C) densely, with flat or product keys.
# On CPU (benchmarks/results/memory_layer_auto.md) the dense read is the faster one at the paper's 48
# slots, level with the sparse read at 1,024 (forward+backward), and slower from 4,096 slots on, where
# its work and [tokens, P * C] activations grow with the slots while the sparse read's grow with
# top_k * C.
DENSE_MAX_SLOTS = 1024
MIN_TEMPERATURE = 1e-6  # the smallest child-softmax temperature (logits / temperature stay finite)
# The sparse read's backward writes dense table gradients (and, parent by parent, sparse ones) this many
# bytes at a time; token by token, sparse gradients are the [U, H] rows read, written in one pass.
GRADIENT_BLOCK_BYTES = 32 * 2**20
# The sparse read goes parent by parent (one grouped matrix product over each parent's tokens) from
# this many (token, parent) pairs per parent, on tables of at least this size; below, token by token.
GROUPED_MIN_PAIRS_PER_PARENT = 4
GROUPED_MIN_TABLE_BYTES = 64 * 2**20


class Routing(NamedTuple):
    """The parents each token selected in a forward pass."""

    indices: Tensor  # [..., top_k] parent ids, best first
    weights: Tensor  # [..., top_k] softmax over the selected parents' logits


def validate_memory_shape(
    num_parents: Any, children_per_parent: Any, top_k: Any, temperature: Any, parent_keys: Any = "flat"
) -> tuple[int, int, int, float]:
    """The memory's shape, normalised (NumPy and string numbers taken); a ValueError names the first
    invalid parameter and the fix."""
    num_parents = check.positive_int("num_parents", num_parents)
    children_per_parent = check.positive_int("children_per_parent", children_per_parent)
    top_k = check.positive_int("top_k", top_k)
    if top_k > num_parents:
        raise ValueError(f"top_k ({top_k}) cannot exceed num_parents ({num_parents}): lower top_k or add parents")
    if check.choice("parent_keys", parent_keys, PARENT_KEYS) == "product" and math.isqrt(num_parents) ** 2 != num_parents:
        raise ValueError(
            f"parent_keys='product' needs num_parents = n * n (n sub-keys per half), got {num_parents}: "
            f"try {math.isqrt(num_parents) ** 2} or {(math.isqrt(num_parents) + 1) ** 2}"
        )
    # below this, child logits divided by the temperature overflow to inf (and the softmax to NaN)
    temperature = check.number("temperature", temperature, minimum=MIN_TEMPERATURE)
    return num_parents, children_per_parent, top_k, temperature


def memory_parameter_count(
    hidden_size: int, num_parents: int, children_per_parent: int, parent_keys: str = "flat"
) -> int:
    """Parameters of one memory: the parent keys (``P`` of size H, or two tables of ``sqrt(P)``
    half-size sub-keys), ``P*C`` child keys and ``P*C`` child values of size H."""
    parents = num_parents * hidden_size if parent_keys == "flat" else math.isqrt(num_parents) * hidden_size
    return parents + 2 * num_parents * children_per_parent * hidden_size


class SparseHierarchicalMemory(nn.Module):
    """Two-level key-value memory (SPARTAN, Deshpande et al. 2022).

    For each token ``h``: parent logits ``h @ parent_keys.T``; keep the ``top_k`` parents and
    softmax their logits; for each kept parent, softmax ``h @ child_keys[p].T / temperature``
    over its children; return ``sum_p sum_c w_p * w_pc * child_values[p, c]``. Children of
    parents that were not selected take no part, in the forward or the backward pass: the
    children of parents that no token selected get exactly zero gradients, even from a
    non-finite upstream gradient. (The sparse read is exact per token; the dense read mixes all
    tokens in one matrix product, so a non-finite upstream gradient of one token can still reach,
    as NaN, the values of a parent that only other tokens selected.)

    Parent keys come in two kinds. ``"flat"``: P keys of size H, scored by brute force.
    ``"product"`` (product keys, Lample et al. 2019): P = n * n parents, parent ``(i, j)`` scored
    as ``h[:H/2] @ sub_keys[0, i] + h[H/2:] @ sub_keys[1, j]``; the exact top-k is found from the
    top-k of each half (the best k of the k x k sums), so selection costs about ``2n * H/2``
    multiply-adds per token instead of ``n^2 * H``.

    The parameters are stored in the layout the reads use, so no derived copy of them exists that
    a write could leave stale. ``keys``: with flat parents ``[P + C*P, H]``, the P parent keys and
    then the child keys child-major (row ``P + c*P + p`` is child ``c`` of parent ``p``); with
    product keys ``[C*P, H]``, the child keys alone (row ``c*P + p``), beside ``sub_keys``
    ``[2, n, H/2]``. ``values`` ``[C*P, H]`` holds the child values in the children's order.
    ``parent_keys`` ``[P, H]``, ``child_keys`` and ``child_values`` ``[P, C, H]`` are views
    (for product keys ``parent_keys`` is built from the sub-keys).

    Two implementations give the same results: ``"dense"`` scores all ``P + P*C`` keys with one
    matrix product and mixes the values with another (fastest for small memories; traceable and
    exportable with dynamic shapes); ``"sparse"`` reads each token's ``top_k * C`` selected
    children in place, token by token through products with sparse matrices or parent by parent
    through grouped matrix products (``sparse_read`` chooses per call), with its own
    backward pass into one gradient (or, with ``sparse_gradients``, sparse gradients of the rows
    read), so work and activation memory per token grow with ``top_k * C`` rather than ``P * C``
    (eager only: tracing or exporting it is refused).

    Args:
        hidden_size: H, the size of the hidden states read and returned.
        num_parents: P (a square n * n with product keys).
        children_per_parent: C.
        top_k: parents kept per token.
        temperature: divides the child logits (at least ``MIN_TEMPERATURE``, 1e-6).
        value_init: ``"zeros"`` (the read-out starts at exactly zero) or ``"normal"``.
        implementation: ``"dense"``, ``"sparse"`` or ``"auto"`` (dense up to ``DENSE_MAX_SLOTS`` slots).
        parent_keys: ``"flat"`` or ``"product"``.
        sparse_gradients: the sparse read gives ``keys`` and ``values`` sparse gradients holding
            only the rows read (step them with ``torch.optim.SparseAdam``); needs product keys
            and the sparse implementation.

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
        >>> large = SparseHierarchicalMemory(384, 256 * 256, 4, 8, parent_keys="product")
        >>> large(hidden).shape, large.implementation
        (torch.Size([2, 10, 384]), 'sparse')
    """

    # State-dict layout. 1: parent_keys [P, H], child_keys and child_values [P, C, H];
    # 2: keys and values as described above. Version-1 state dicts load (converted).
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
        parent_keys: str = "flat",
        sparse_gradients: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        hidden_size = check.positive_int("hidden_size", hidden_size)
        num_parents, children_per_parent, top_k, temperature = validate_memory_shape(
            num_parents, children_per_parent, top_k, temperature, parent_keys
        )
        self.value_init = check.choice("value_init", value_init, VALUE_INITS)
        implementation = check.choice("implementation", implementation, IMPLEMENTATIONS)
        self.parent_key_kind = parent_keys
        if parent_keys == "product" and hidden_size % 2:
            raise ValueError(f"parent_keys='product' splits the hidden state in halves: hidden_size must be even, got {hidden_size}")
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
        if parent_keys == "product":
            side = math.isqrt(num_parents)
            self.sub_keys = nn.Parameter(torch.empty(2, side, hidden_size // 2, **factory))
            self.keys = nn.Parameter(torch.empty(slots, hidden_size, **factory))
        else:
            self.sub_keys = None
            self.keys = nn.Parameter(torch.empty(num_parents + slots, hidden_size, **factory))
        self.values = nn.Parameter(torch.empty(slots, hidden_size, **factory))
        self.sparse_gradients = sparse_gradients
        self.last_routing: Routing | None = None
        self.reset_parameters()

    @property
    def sparse_gradients(self) -> bool:
        """Whether the sparse read gives ``keys`` and ``values`` sparse gradients. Both parameters
        carry it as their ``sparse_grad`` attribute, which ``spartan.train`` reads to step them lazily."""
        return bool(getattr(self.values, "sparse_grad", False))

    @sparse_gradients.setter
    def sparse_gradients(self, enabled: bool) -> None:
        enabled = check.boolean("sparse_gradients", enabled)
        if enabled and (self.parent_key_kind != "product" or self.implementation != "sparse"):
            raise ValueError(
                "sparse_gradients needs parent_keys='product' and the sparse read: implementation='sparse' "
                f"(or 'auto' above {DENSE_MAX_SLOTS} slots)"
            )
        for parameter in (self.keys, self.values):
            parameter.sparse_grad = enabled

    def reset_parameters(self) -> None:
        std = 1.0 / math.sqrt(self.hidden_size)  # logits of unit-scale hidden states start near unit scale
        nn.init.normal_(self.keys, std=std)
        if self.sub_keys is not None:
            nn.init.normal_(self.sub_keys, std=std)
        if self.value_init == "zeros":
            nn.init.zeros_(self.values)
        else:
            nn.init.normal_(self.values, std=std)

    # -- views of the parameters ---------------------------------------------------------------

    def split_keys(self, keys: Tensor) -> tuple[Tensor | None, Tensor]:
        """Views of a tensor shaped like ``keys`` (the parameter, its gradient, an optimizer state):
        the parent part ``[P, H]`` (None with product keys) and the child part ``[P, C, H]``."""
        P, C = self.num_parents, self.children_per_parent
        if self.sub_keys is not None:
            return None, keys.view(C, P, -1).transpose(0, 1)
        return keys[:P], keys[P:].view(C, P, -1).transpose(0, 1)

    def split_values(self, values: Tensor) -> Tensor:
        """A view ``[P, C, H]`` of a tensor shaped like ``values``."""
        return values.view(self.children_per_parent, self.num_parents, -1).transpose(0, 1)

    @property
    def parent_keys(self) -> Tensor:
        """``[P, H]``: a view of ``keys``, or with product keys every pair of sub-keys, concatenated."""
        if self.sub_keys is None:
            return self.split_keys(self.keys)[0]
        side = self.sub_keys.shape[1]
        first = self.sub_keys[0].repeat_interleave(side, dim=0)  # parent i * n + j: sub-key i of the first half
        second = self.sub_keys[1].repeat(side, 1)  # ... and sub-key j of the second
        return torch.cat([first, second], dim=-1)

    @property
    def child_keys(self) -> Tensor:
        """``[P, C, H]``, a view of ``keys``."""
        return self.split_keys(self.keys)[1]

    @property
    def child_values(self) -> Tensor:
        """``[P, C, H]``, a view of ``values``."""
        return self.split_values(self.values)

    @staticmethod
    def parameter_count(hidden_size: int, num_parents: int, children_per_parent: int, parent_keys: str = "flat") -> int:
        """The number of parameters of a memory of this shape."""
        return memory_parameter_count(hidden_size, num_parents, children_per_parent, parent_keys)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_parents={self.num_parents}, "
            f"children_per_parent={self.children_per_parent}, top_k={self.top_k}, "
            f"temperature={self.temperature}, implementation={self.implementation!r}, "
            f"parent_keys={self.parent_key_kind!r}"
        )

    # -- reading -------------------------------------------------------------------------------

    def parent_logits(self, hidden_states: Tensor) -> Tensor:
        """Every parent's logit for every token, by brute force: ``[..., H] -> [..., P]``."""
        self._check_input(hidden_states)
        if self.sub_keys is None:
            return hidden_states @ self.parent_keys.T
        return product_parent_logits(hidden_states, self.sub_keys)

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
                "the sparse memory path reads data-dependent rows and cannot be traced or exported: build the "
                "memory with implementation='dense' (SpartanConfig(implementation='dense'))"
            )

    def _read_dense(self, tokens: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        parent_logits = None if self.sub_keys is None else product_parent_logits(tokens, self.sub_keys)
        return dense_read(
            tokens, self.keys, self.values, self.num_parents, self.children_per_parent, self.top_k, self.temperature,
            residual, parent_logits=parent_logits,
        )

    @torch.compiler.disable  # data-dependent sparse patterns: run eagerly inside compiled graphs
    def _read_sparse(self, tokens: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        P = self.num_parents
        if self.sub_keys is None:
            top_indices, parent_weights = _select_parents(tokens @ self.parent_keys.T, self.top_k)  # [N, k]
            child_keys = self.keys[P:]
        else:
            top_indices, top_logits = product_top_k(tokens, self.sub_keys, self.top_k)
            parent_weights = _upcast(top_logits).softmax(dim=-1).to(top_logits.dtype)
            child_keys = self.keys
        read = sparse_read(
            tokens, top_indices, parent_weights, child_keys, self.values, P, self.children_per_parent,
            self.temperature, self.sparse_gradients,
        )
        out = read.to(tokens.dtype) if residual is None else residual + read.to(residual.dtype)
        return out, top_indices, parent_weights

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        _upgrade_state_dict_v1(state_dict, prefix)  # a version-1 layout (parent_keys, ...) is converted
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)


def product_parent_logits(tokens: Tensor, sub_keys: Tensor) -> Tensor:
    """Every product-key parent's logit, by brute force: ``[..., H]`` and sub-keys ``[2, n, H/2]``
    (or ``[B, 2, n, H/2]`` per row of ``[B, S, H]`` tokens) -> ``[..., n * n]`` (parent ``i * n + j``)."""
    first, second = _half_scores(tokens, sub_keys)  # [..., n] each
    return (first.unsqueeze(-1) + second.unsqueeze(-2)).flatten(-2)


def product_top_k(tokens: Tensor, sub_keys: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """The exact top-k product-key parents of each token and their logits, best first, from the
    top-k of each half: ``[N, H]``, ``[2, n, H/2]`` -> ids ``[N, k]``, logits ``[N, k]``."""
    side = sub_keys.shape[-2]
    first, second = _half_scores(tokens, sub_keys)  # [N, n]
    kept = min(top_k, side)
    first_top, first_ids = first.topk(kept, dim=-1)  # [N, k']
    second_top, second_ids = second.topk(kept, dim=-1)
    sums = (first_top.unsqueeze(-1) + second_top.unsqueeze(-2)).flatten(-2)  # [N, k' * k']
    logits, pairs = sums.topk(top_k, dim=-1)  # the best k of the k' x k' candidates hold the best k of all
    parents = first_ids.gather(-1, pairs // kept) * side + second_ids.gather(-1, pairs % kept)
    return parents, logits


def _half_scores(tokens: Tensor, sub_keys: Tensor) -> tuple[Tensor, Tensor]:
    half = tokens.shape[-1] // 2
    return tokens[..., :half] @ sub_keys[..., 0, :, :].transpose(-1, -2), tokens[..., half:] @ sub_keys[..., 1, :, :].transpose(-1, -2)


def sparse_read(
    tokens: Tensor,
    top_indices: Tensor,
    parent_weights: Tensor,
    child_keys: Tensor,
    values: Tensor,
    num_parents: int,
    children_per_parent: int,
    temperature: float,
    sparse_gradients: bool = False,
) -> Tensor:
    """The children read of the selected parents, with its own backward pass: no Python loop over
    parents or tokens, and no copies of the tables. Two exact ways, chosen per call:

    - **token by token** (few tokens per parent, or small tables): each token's ``k * C`` selected
      children form one row of a sparse CSR pattern ``[N, C * P]`` (child-major, parents ascending:
      sorted columns). The child logits are ``tokens @ child_keys.T`` sampled at that pattern, the
      read-out is the pattern's mixing weights times ``values`` (a weighted ``embedding_bag`` sum:
      each output row written once); the backward pass takes the same products, and the transposed
      pattern over the distinct rows read for the tables' gradients.
      Each row is read once per token that selected its parent.
    - **parent by parent** (at least ``GROUPED_MIN_PAIRS_PER_PARENT`` (token, parent) pairs per
      parent and tables of at least ``GROUPED_MIN_TABLE_BYTES``): the ``N * k`` pairs sorted by
      parent; each parent's ``[C, H]`` keys and values (strided views of the tables) multiply its
      pairs' tokens in one grouped matrix product (``torch.nn.functional.grouped_mm``; CPU,
      float32 / bfloat16 / float16, rows of a multiple of 16 bytes). Each row is read once per pass.

    Beyond the ``[N, H]`` inputs and outputs the read keeps ``N * k * C`` scalars (the parent by
    parent way also holds one ``[N*k, H]`` buffer at a time); dense gradients of the tables are
    written into them in blocks of at most ``GRADIENT_BLOCK_BYTES``, sparse ones are the ``[U, H]``
    rows read.

    Args:
        tokens: ``[N, H]``.
        top_indices, parent_weights: ``[N, k]``, each token's parents and their softmax weights.
        child_keys, values: ``[C*P, H]``, child-major (row ``c*P + p``).
        sparse_gradients: give ``child_keys`` and ``values`` sparse COO gradients of the rows read.

    Returns:
        ``[N, H]``: ``sum_k w_k * sum_c softmax_c(h . key_kc / T) * value_kc`` per token.
    """
    if len(tokens) == 0:
        return tokens.new_zeros(tokens.shape) + 0 * parent_weights.sum()
    arguments = (child_keys, values, num_parents, children_per_parent, temperature, sparse_gradients)
    if _groups_pay(top_indices, child_keys, values, num_parents):
        return _GroupedRead.apply(tokens, top_indices, parent_weights, *arguments)
    # each token's parents in ascending order, so that its entries, child-major, have ascending
    # columns (the CSR layout's invariant); the weights' gradient flows back through the gather
    top_indices, order = top_indices.sort(dim=-1)
    return _SparseRead.apply(tokens, top_indices, parent_weights.gather(-1, order), *arguments)


# The dtypes torch's sparse CSR products take on CPU; tables of other dtypes (on any device) are
# read through a float32 copy of the rows read, made again in the backward pass.
_CSR_DTYPES = (torch.float32, torch.float64)


class _SparseRead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, top_indices, parent_weights, child_keys, values, P, C, temperature, sparse):
        n, k = top_indices.shape
        # [n*C*k]: token by token, child-major, so ascending within each token (parents come sorted)
        rows = (P * torch.arange(C, device=top_indices.device).unsqueeze(-1) + top_indices.unsqueeze(1)).flatten()
        read = None
        if _compact(child_keys, values):  # a float32 table of the distinct rows read; columns index it
            read, columns = torch.unique(rows, return_inverse=True)
        else:
            columns = rows
        keys, vals = _tables(child_keys, values, read)
        pattern = _row_pointers(n, k * C, rows.device)
        h = tokens.to(keys.dtype)
        logits = _sampled_products(pattern, columns, h, keys).view(n, C, k)
        child_weights = (logits / temperature).softmax(dim=1)  # within each parent
        mix = child_weights * parent_weights.to(keys.dtype).unsqueeze(1)  # [n, C, k]
        out = _sparse_times(pattern, columns, mix, vals)
        ctx.save_for_backward(tokens, parent_weights, columns, read, child_keys, values, child_weights, mix)
        ctx.settings = (temperature, sparse)
        return out.to(values.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        tokens, parent_weights, columns, read, child_keys, values, child_weights, mix = ctx.saved_tensors
        temperature, sparse = ctx.settings
        needs_tokens, _, needs_weights, needs_keys, needs_values = ctx.needs_input_grad[:5]
        n, C, k = mix.shape
        keys, vals = _tables(child_keys, values, read)
        pattern = _row_pointers(n, k * C, columns.device)
        g = grad_out.to(keys.dtype)
        grad_mix = _sampled_products(pattern, columns, g, vals).view(n, C, k)  # g . value
        grad_weights = (child_weights * grad_mix).sum(1).to(parent_weights.dtype) if needs_weights else None
        grad_child = grad_mix * parent_weights.to(keys.dtype).unsqueeze(1)  # d out / d child weight
        grad_logits = child_weights * (grad_child - (child_weights * grad_child).sum(1, keepdim=True)) / temperature
        grad_tokens = _sparse_times(pattern, columns, grad_logits, keys).to(tokens.dtype) if needs_tokens else None
        if not (needs_keys or needs_values):
            return grad_tokens, None, grad_weights, None, None, None, None, None, None
        # the tables' gradients: the pattern over the distinct rows read, transposed: [U, n] @ [n, H]
        inverse = columns
        if read is None:
            read, inverse = torch.unique(columns, return_inverse=True)
        transposed = _Transposed(inverse, len(read), k * C)

        def table_gradient(entries: Tensor, right: Tensor, layout: dict) -> Tensor:
            if not sparse:  # the rows read, block by block, into the table-sized gradient
                return transposed.times(entries, right, into=torch.zeros(**layout), rows=read)
            grad_rows = transposed.times(entries, right).to(layout["dtype"])
            return torch.sparse_coo_tensor(
                read.unsqueeze(0), grad_rows, **layout, is_coalesced=True, check_invariants=False
            )

        grad_keys = table_gradient(grad_logits, tokens.to(keys.dtype), _layout(child_keys)) if needs_keys else None
        grad_values = table_gradient(mix, g, _layout(values)) if needs_values else None
        return grad_tokens, None, grad_weights, grad_keys, grad_values, None, None, None, None


def _compact(child_keys: Tensor, values: Tensor) -> bool:
    return not (child_keys.dtype in _CSR_DTYPES and values.dtype == child_keys.dtype)


def _tables(child_keys: Tensor, values: Tensor, read: Tensor | None) -> tuple[Tensor, Tensor]:
    """The tables the products read: the parameters themselves, or float32 copies of the rows ``read``."""
    if read is None:
        return child_keys, values
    return child_keys[read].float(), values[read].float()


def _layout(table: Tensor) -> dict:
    return {"size": table.shape, "dtype": table.dtype, "device": table.device}


def _row_pointers(rows: int, per_row: int, device: torch.device) -> Tensor:
    """CSR row pointers of a pattern with ``per_row`` entries in each of ``rows`` rows."""
    return torch.arange(0, rows * per_row + 1, per_row, device=device)


def _csr(row_pointers: Tensor, columns: Tensor, entries: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # torch flags its sparse CSR layout as beta, once per process
        warnings.simplefilter("ignore", UserWarning)  # (invariants checked under torch.sparse.check_sparse_tensor_invariants)
        return torch.sparse_csr_tensor(row_pointers, columns, entries, shape)


def _sampled_products(row_pointers: Tensor, columns: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """``(left @ right.T)`` at the pattern's entries only: ``[n, H]``, ``[M, H]`` -> ``[nnz]``."""
    pattern = _csr(row_pointers, columns, left.new_zeros(len(columns)), (len(left), len(right)))
    with torch.autocast(left.device.type, enabled=False):  # no low-precision sparse kernels on CPU
        return torch.sparse.sampled_addmm(pattern, left, right.T, beta=0.0).values()


def _sparse_times(row_pointers: Tensor, columns: Tensor, entries: Tensor, right: Tensor) -> Tensor:
    """The sparse matrix ``S`` ``[rows, M]`` of ``entries`` at the pattern times ``right`` ``[M, H]``:
    each output row the ``entries``-weighted sum of its columns' rows of ``right``, as one weighted
    ``embedding_bag`` (a single pass that writes each output row once; torch's CSR matrix product
    zero-fills its output and copies it over from a temporary: three passes). No autograd: for the
    forward and ``once_differentiable`` backward passes of the reads."""
    weights = entries.detach().flatten().to(right.dtype)  # detached: the kernel that keeps no bag bookkeeping
    with torch.autocast(right.device.type, enabled=False):
        return F.embedding_bag(columns, right.detach().contiguous(), row_pointers, mode="sum",
                               per_sample_weights=weights, include_last_offset=True)


class _Transposed:
    """The transpose ``S.T`` ``[U, n]`` of a pattern with ``per_row`` entries in each of its ``n`` rows
    at ``columns`` (``0 <= column < U``): ``times`` gives ``S.T @ right`` ``[U, H]`` in one pass, or
    writes it into the ``rows`` of a larger tensor in blocks of at most ``GRADIENT_BLOCK_BYTES``, so
    that no temporary of the result's size exists."""

    def __init__(self, columns: Tensor, width: int, per_row: int) -> None:
        self.order = columns.argsort(stable=True)  # entries row by row of S.T, tokens ascending in each
        self.tokens = self.order // per_row
        counts = torch.bincount(columns, minlength=width)
        self.pointers = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        self.width = width

    def times(self, entries: Tensor, right: Tensor, into: Tensor | None = None, rows: Tensor | None = None) -> Tensor:
        """``S.T @ right`` ``[U, H]``; with ``into`` and ``rows`` ``[U]``, its row ``u`` is written to
        ``into[rows[u]]`` instead (one block at a time) and ``into`` is returned."""
        entries = entries.flatten()[self.order]
        right = right.detach().contiguous()  # once, not per block (a gradient may come with stride 0)
        if into is None:
            return _sparse_times(self.pointers, self.tokens, entries, right)
        block = max(1, GRADIENT_BLOCK_BYTES // (right.shape[1] * right.element_size()))
        starts = list(range(0, self.width, block))
        bounds = self.pointers[starts + [self.width]].tolist()
        for i, start in enumerate(starts):
            stop, first, last = min(start + block, self.width), bounds[i], bounds[i + 1]
            part = _sparse_times(self.pointers[start:stop + 1] - first, self.tokens[first:last], entries[first:last],
                                 right)
            into.index_copy_(0, rows[start:stop], part.to(into.dtype))
        return into


class _GroupedRead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, top_indices, parent_weights, child_keys, values, P, C, temperature, sparse):
        n, H = tokens.shape
        pairs = _Pairs(top_indices, P)
        keys, vals = _per_parent(child_keys, P, C), _per_parent(values, P, C)  # [P, C, H] views
        with torch.autocast(tokens.device.type, enabled=False):  # products in the tables' dtype
            logits = pairs.per_group(tokens.to(keys.dtype)[pairs.tokens], keys.transpose(1, 2))  # [n*k, C]
            child_weights = (_upcast(logits) / temperature).softmax(dim=-1)  # within each pair's parent
            weights = _upcast(parent_weights).flatten()[pairs.order].unsqueeze(1)  # [n*k, 1]
            mix = (child_weights * weights).to(vals.dtype)
            out = vals.new_zeros(n, H).index_add_(0, pairs.tokens, pairs.per_group(mix, vals))
        ctx.save_for_backward(tokens, parent_weights, child_keys, values, child_weights, weights, mix)
        ctx.pairs, ctx.settings = pairs, (P, C, temperature, sparse)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        tokens, parent_weights, child_keys, values, child_weights, weights, mix = ctx.saved_tensors
        pairs, (P, C, temperature, sparse) = ctx.pairs, ctx.settings
        needs_tokens, _, needs_weights, needs_keys, needs_values = ctx.needs_input_grad[:5]
        keys, vals = _per_parent(child_keys, P, C), _per_parent(values, P, C)
        grad_tokens = grad_weights = grad_keys = grad_values = None
        with torch.autocast(tokens.device.type, enabled=False):
            g = grad_out.to(vals.dtype)[pairs.tokens]  # [n*k, H], each pair's upstream gradient
            grad_mix = _upcast(pairs.per_group(g, vals.transpose(1, 2)))  # [n*k, C]: g . value
            if needs_values:
                grad_values = pairs.table_gradient(mix, g, values, sparse)
            del g
            if needs_weights:
                grad_weights = torch.empty_like(grad_mix[:, 0])
                grad_weights[pairs.order] = (child_weights * grad_mix).sum(1)
                grad_weights = grad_weights.view_as(parent_weights).to(parent_weights.dtype)
            grad_child = grad_mix * weights  # d out / d child weight
            grad_logits = child_weights * (grad_child - (child_weights * grad_child).sum(1, keepdim=True))
            grad_logits = (grad_logits / temperature).to(keys.dtype)
            if needs_tokens:
                grad_tokens = torch.zeros_like(tokens, dtype=keys.dtype)
                grad_tokens = grad_tokens.index_add_(0, pairs.tokens, pairs.per_group(grad_logits, keys))
                grad_tokens = grad_tokens.to(tokens.dtype)
            if needs_keys:
                grad_keys = pairs.table_gradient(grad_logits, tokens.to(keys.dtype)[pairs.tokens], child_keys, sparse)
        return grad_tokens, None, grad_weights, grad_keys, grad_values, None, None, None, None


def _per_parent(table: Tensor, P: int, C: int) -> Tensor:
    """A child-major table ``[C*P, H]`` as each parent's children: a ``[P, C, H]`` view."""
    return table.view(C, P, table.shape[-1]).transpose(0, 1)


# The dtypes torch's grouped matrix product takes on CPU; its operands' strides must be multiples of 16 bytes.
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _groups_pay(top_indices: Tensor, child_keys: Tensor, values: Tensor, num_parents: int) -> bool:
    """Whether ``sparse_read`` goes parent by parent: the grouped kernel takes the tables, which are
    large, and the parents are shared by enough tokens. (Thresholds from a side-by-side check at
    32 x 128 tokens, H=768; benchmarks/README.md says what is still to be measured.)"""
    kernel = all(
        t.device.type == "cpu" and t.dtype in _KERNEL_DTYPES and t.dtype == child_keys.dtype
        and t.shape[-1] * t.element_size() % 16 == 0
        for t in (child_keys, values)
    )
    return (
        kernel
        and top_indices.numel() >= GROUPED_MIN_PAIRS_PER_PARENT * num_parents
        and child_keys.numel() * child_keys.element_size() >= GROUPED_MIN_TABLE_BYTES
    )


class _Pairs:
    """The ``N * k`` (token, parent) pairs of a read sorted by parent (stable: tokens ascending within
    each parent), and the grouped products over them, one group per parent."""

    def __init__(self, top_indices: Tensor, num_parents: int) -> None:
        parents = top_indices.flatten()
        self.order = parents.argsort(stable=True)  # pair ids (token * k + slot), parent by parent
        self.tokens = self.order // top_indices.shape[1]  # [n*k]: each sorted pair's token
        self.counts = torch.bincount(parents, minlength=num_parents)  # [P]: pairs per parent
        self.ends = self.counts.cumsum(0)  # [P]: where each parent's pairs end
        self.num_parents = num_parents

    def per_group(self, rows: Tensor, tables: Tensor) -> Tensor:
        """Each parent's rows times its table: ``[n*k, K]``, ``[P, K, M]`` -> ``[n*k, M]``."""
        return torch.nn.functional.grouped_mm(_aligned(rows), tables, offs=self.ends.to(torch.int32))

    def table_gradient(self, left: Tensor, right: Tensor, table: Tensor, sparse: bool) -> Tensor:
        """The gradient of a child-major table ``[C*P, H]`` whose child ``c`` of parent ``p`` received
        ``sum over p's pairs of left[pair, c] * right[pair]`` (``[n*k, C]``, ``[n*k, H]``): dense, or
        a sparse COO tensor of the rows read. Written in blocks of parents, each at most
        ``GRADIENT_BLOCK_BYTES`` of gradient."""
        C, H = left.shape[1], right.shape[1]
        used = self.counts.nonzero().flatten()  # the parents read, ascending
        every_parent = len(used) == self.num_parents
        counts = self.counts[used]
        block = max(1, GRADIENT_BLOCK_BYTES // (C * H * right.element_size()))
        if sparse:
            rows = right.new_empty(C, len(used), H)
        else:
            grad = torch.zeros_like(table, memory_format=torch.contiguous_format)
            target = grad.view(C, self.num_parents, H)
        left = _aligned(left)
        bounds = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).tolist()  # each used parent's first pair
        for start in range(0, len(used), block):
            first, last = bounds[start], bounds[min(start + block, len(used))]
            sums = self._group_sums(left[first:last], right[first:last], counts[start:start + block])  # [b, C, H]
            if sparse:
                rows[:, start:start + block] = sums.transpose(0, 1)
            elif every_parent:  # a range of parents: a strided copy
                target[:, start:start + block] = sums.transpose(0, 1)
            else:
                target.index_copy_(1, used[start:start + block], sums.transpose(0, 1).to(table.dtype))
        if not sparse:
            return grad
        indices = (self.num_parents * torch.arange(C, device=used.device).unsqueeze(1) + used).flatten()
        return torch.sparse_coo_tensor(
            indices.unsqueeze(0), rows.flatten(0, 1).to(table.dtype), table.shape, is_coalesced=True,
            check_invariants=False,
        )

    def _group_sums(self, left: Tensor, right: Tensor, counts: Tensor) -> Tensor:
        """``left[group].T @ right[group]`` for consecutive groups of ``counts`` rows: ``[b, K, M]``."""
        return torch.nn.functional.grouped_mm(left.T, right, offs=counts.cumsum(0).to(torch.int32))


def _aligned(matrix: Tensor) -> Tensor:
    """``matrix`` ``[R, K]`` (unit column stride), or a copy of it in a wider buffer, so that its row
    stride is a multiple of 16 bytes, as the grouped kernel needs."""
    per = 16 // matrix.element_size()
    if matrix.stride(0) % per == 0 and matrix.stride(1) == 1:
        return matrix
    buffer = matrix.new_empty(matrix.shape[0], -(-matrix.shape[1] // per) * per)
    buffer[:, : matrix.shape[1]] = matrix
    return buffer[:, : matrix.shape[1]]


def dense_read(
    tokens: Tensor,
    keys: Tensor,
    values: Tensor,
    num_parents: int,
    children_per_parent: int,
    top_k: int,
    temperature: float | Tensor,
    residual: Tensor | None = None,
    parent_logits: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The dense read of ``SparseHierarchicalMemory`` as a function of its tensors, for one memory
    or for a memory per row (mixed-task batches, exported graphs).

    Args:
        tokens: ``[N, H]`` (one memory) or ``[B, S, H]`` (with per-row tensors).
        keys: ``[P + C*P, H]`` or ``[B, P + C*P, H]``, laid out as ``SparseHierarchicalMemory.keys``
            (the child keys alone, ``[C*P, H]``, when ``parent_logits`` are given).
        values: ``[C*P, H]`` or ``[B, C*P, H]``.
        temperature: a number, or a tensor that broadcasts against ``[B, S, C, P]`` (e.g. ``[B, 1, 1, 1]``).
        residual: added to the read-out, shaped like ``tokens``; it keeps its dtype.
        parent_logits: ``[..., P]`` computed elsewhere (product keys); ``keys`` then hold only children.

    Returns:
        The read-out (plus ``residual``) shaped like ``tokens``, the top-k parent ids ``[..., k]``
        and their softmax weights ``[..., k]``.
    """
    P, C = num_parents, children_per_parent
    logits = tokens @ keys.transpose(-1, -2)  # [..., P + C*P]: parents and children in one matrix product
    if parent_logits is None:
        parent_logits, child_logits = logits.split([P, C * P], dim=-1)
    else:
        child_logits = logits
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
