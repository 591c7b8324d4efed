"""Per-row tasks: one forward pass in which every row of the batch is read by its own task's
memories, norms and head. Mixed-task batches in eager PyTorch, and the graph ``export_onnx``
writes (where the tasks' tensors are graph inputs).

A task's tensors are named as in ``spartan.task_state_dict`` (``memories.<layer>.keys``,
``modules.<path>.<param>``) plus ``temperature``. Stacked for T tasks, each gets a leading
``[T]`` dimension; the head's output layer is padded with zero rows to the largest label count,
so the logits come back ``[B, max_labels]`` and the columns past a row's own label count are
not that task's (``forward_tasks`` sets them to NaN).

The exported graph reads them in another layout (``graph_tensors``), one row per batch row or
one row for the whole batch, so that it gathers nothing, divides by no temperature and reshapes
no task tensor: each of those would be an operator per layer on every call.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .inject import (
    get_config,
    get_layer_paths,
    get_task_labels,
    get_task_modules,
    find_layer_norms,
    memory_names,
    override_memory_reads,
    replaced_modules,
    task_state_dict,
)
from .memory import dense_read, product_parent_logits

TEMPERATURE = "temperature"

__all__ = [
    "MemoryShape",
    "RowTasks",
    "forward_tasks",
    "graph_shapes",
    "graph_tensors",
    "memory_shape",
    "output_layers",
    "stack_tasks",
    "task_tensors",
]


@dataclass(frozen=True)
class MemoryShape:
    """The structure every task in one per-row pass must share."""

    num_parents: int
    children_per_parent: int
    top_k: int


def memory_shape(model: nn.Module, name: str | None = None) -> MemoryShape:
    config = get_config(model, name)
    return MemoryShape(config.num_parents, config.children_per_parent, config.top_k)


def task_tensors(model: nn.Module, name: str | None = None) -> dict[str, Tensor]:
    """Task ``name``'s tensors (the active task's by default): its state dict and its temperature."""
    tensors = {key: value.detach() for key, value in task_state_dict(model, name).items()}
    first = next(iter(tensors.values()))
    tensors[TEMPERATURE] = torch.tensor(get_config(model, name).temperature, dtype=first.dtype)
    return tensors


def output_layers(model: nn.Module) -> set[str]:
    """Names (``modules.<path>.weight`` / ``.bias``) of the head's output layers: the tensors whose
    first dimension is the task's label count, padded when tasks are stacked."""
    norms = set(find_layer_norms(model, get_layer_paths(model)))
    labels = get_task_labels(model).num_labels
    names = set()
    for path, module in get_task_modules(model).items():
        if path in norms:
            continue
        linears = [(sub, m) for sub, m in module.named_modules() if isinstance(m, nn.Linear)]
        if linears and labels is not None and linears[-1][1].out_features == labels:
            sub = f".{linears[-1][0]}" if linears[-1][0] else ""
            names.update(f"modules.{path}{sub}.{param}" for param in ("weight", "bias"))
    return names


def stack_tasks(tasks: Sequence[dict[str, Tensor]], padded: set[str], max_labels: int | None = None) -> dict[str, Tensor]:
    """Stack per-task tensors along a new first dimension ``[T, ...]``; the ``padded`` ones (the
    output layers) get zero rows up to ``max_labels`` (default: the largest label count)."""
    names = list(tasks[0])
    for index, tensors in enumerate(tasks[1:], start=1):
        if list(tensors) != names:
            raise ValueError(f"task {index} has other tensors than task 0: their heads or layers differ")
    stacked = {}
    for name in names:
        values = [tensors[name] for tensors in tasks]
        if name in padded:
            rows = max_labels or max(len(v) for v in values)
            if any(len(v) > rows for v in values):
                raise ValueError(f"a task has {max(len(v) for v in values)} labels, more than the {rows} this graph has")
            values = [torch.cat([v, v.new_zeros(rows - len(v), *v.shape[1:])]) for v in values]
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) > 1:
            raise ValueError(f"{name} has shapes {sorted(shapes)} across the tasks: one graph needs one memory shape")
        stacked[name] = torch.stack(values)
    return stacked


def graph_shapes(tensors: dict[str, Tensor], padded: set[str], max_labels: int) -> dict[str, list[int]]:
    """The shape of each of one task's tensors per row of the exported graph (its inputs are
    ``[rows, *shape]``): the temperature is left out (``graph_tensors`` divides it into the child
    keys), vectors ``[n]`` (norm weights and biases, linear biases) become ``[1, n]`` so that they
    broadcast against ``[B, S, n]`` hidden states as they are, the ``padded`` output layers get
    ``max_labels`` rows, everything else keeps its shape."""
    shapes = {}
    for name, value in tensors.items():
        if name == TEMPERATURE:
            continue
        shape = list(value.shape)
        if name in padded:
            shape[0] = max_labels
        shapes[name] = [1, *shape] if len(shape) == 1 else shape
    return shapes


def graph_tensors(
    tensors: dict[str, Tensor], shapes: dict[str, Sequence[int]], padded: set[str], num_parents: int
) -> dict[str, Tensor]:
    """One task's tensors (``task_tensors``' names and shapes, temperature included) as the exported
    graph reads them: ``[1, *shapes[name]]`` each (one row, which broadcasts over the batch), the
    child keys divided by the temperature (the parent keys and product sub-keys are not), the
    ``padded`` output layers zero-padded to ``shapes``' label count, vectors reshaped as
    ``graph_shapes`` says. A tensor that does not fit its shape raises a ValueError naming it."""
    temperature = tensors[TEMPERATURE]
    out = {}
    for name, shape in shapes.items():
        value = tensors[name]
        if name.startswith("memories.") and name.endswith(".keys"):
            product = name[: -len("keys")] + "sub_keys" in tensors  # product keys: ``keys`` holds children only
            first_child = 0 if product else num_parents
            value = torch.cat([value[:first_child], value[first_child:] / temperature.to(value.dtype)])
        vector = value.dim() == 1 and len(shape) == 2 and shape[0] == 1  # [n] laid out as [1, n]
        own = list(shape[1:]) if vector else list(shape)
        if name in padded and value.dim() > 0 and len(value) < own[0]:
            value = torch.cat([value, value.new_zeros(own[0] - len(value), *value.shape[1:])])
        if list(value.shape) != own:
            raise ValueError(f"{name} has shape {list(value.shape)}; this graph takes {own}")
        out[name] = value.reshape(1, *shape)
    return out


class RowTasks:
    """Installs per-row reading on a wrapped model: while active (``with rows.active():``), each
    wrapped layer, norm and head reads the tensors of its row's task from ``rows.tensors``, in one
    of two layouts:

    - stacked (``forward_tasks``): ``task_tensors``' tensors, each ``[T, ...]``, picked per row by
      ``rows.task_ids`` (``[B]``, each row's index into the stack);
    - per row (the exported graph; ``rows.task_ids = None``): ``graph_tensors``' layout, each
      ``[B, ...]`` (row b's task's) or ``[1, ...]`` (one task for every row), read as they are.

    Set both before each forward pass."""

    def __init__(self, model: nn.Module, shape: MemoryShape) -> None:
        self.model = model
        self.shape = shape
        self.tensors: dict[str, Tensor] = {}
        self.task_ids: Tensor | None = None
        norms = set(find_layer_norms(model, get_layer_paths(model)))
        self.replacements: dict[str, nn.Module] = {}
        for path, module in get_task_modules(model).items():
            prefix = f"modules.{path}"
            self.replacements[path] = (
                _RowNorm(self, module, prefix) if path in norms else _row_head(self, module, prefix)
            )

    def row(self, name: str) -> Tensor:
        """Tensor ``name`` of each row's task: ``[B, ...]``, or ``[1, ...]`` shared by every row."""
        tensor = self.tensors[name]
        return tensor if self.task_ids is None else tensor[self.task_ids]

    def read(self, index: int, hidden: Tensor) -> Tensor:
        prefix = f"memories.{index}."
        if TEMPERATURE in self.tensors:
            temperature = self.row(TEMPERATURE).view(-1, *([1] * hidden.dim()))  # [B, 1, ..., 1]
        else:
            temperature = 1.0  # graph_tensors divided the child keys by it (and the exporter drops a division by 1)
        sub_keys = self.tensors.get(prefix + "sub_keys")
        parent_logits = None if sub_keys is None else product_parent_logits(hidden, self.row(prefix + "sub_keys").to(hidden.dtype))
        out, _, _ = dense_read(
            hidden,
            self.row(prefix + "keys").to(hidden.dtype),
            self.row(prefix + "values").to(hidden.dtype),
            self.shape.num_parents,
            self.shape.children_per_parent,
            self.shape.top_k,
            temperature,
            residual=hidden,
            parent_logits=parent_logits,
        )
        return out

    @contextmanager
    def active(self) -> Iterator[None]:
        with ExitStack() as stack:
            stack.enter_context(override_memory_reads(self.model, self.read))
            stack.enter_context(replaced_modules(self.model, self.replacements))
            yield


def forward_tasks(model: nn.Module, tasks: Sequence[str], **inputs: Tensor):
    """Run a mixed-task batch: row ``b`` is read by task ``tasks[b]``'s memories, norms and head.

    The model must be in eval mode (train one task at a time). Every task must share the memory
    shape (parents, children, top-k). Returns the model's output with ``logits`` ``[B, L]``, L the
    largest label count among the rows' tasks; the columns past a row's own label count are NaN.
    """
    if model.training:
        raise ValueError("mixed-task batches are for inference: call model.eval() (train one task at a time)")
    if "labels" in inputs:
        raise ValueError("forward_tasks computes no loss (each row has its own head): leave labels out")
    names = list(tasks)
    unknown = sorted(set(names) - set(memory_names(model)))
    if unknown:
        raise ValueError(f"no memory named {unknown}; this model has {sorted(memory_names(model))}")
    first = next(iter(inputs.values()))
    if len(names) != len(first):
        raise ValueError(f"tasks names {len(names)} rows but the batch has {len(first)}: give one task per row")
    unique = list(dict.fromkeys(names))
    shapes = {name: memory_shape(model, name) for name in unique}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"the tasks' memories differ in shape ({shapes}): a mixed batch needs one memory shape")
    rows = RowTasks(model, shapes[unique[0]])
    rows.tensors = stack_tasks([task_tensors(model, name) for name in unique], output_layers(model))
    rows.task_ids = torch.tensor([unique.index(name) for name in names], device=first.device)
    with rows.active():
        outputs = model(**inputs)
    labels = torch.tensor(
        [get_task_labels(model, name).num_labels or outputs.logits.shape[-1] for name in names], device=first.device
    )
    columns = torch.arange(outputs.logits.shape[-1], device=first.device)
    outputs.logits = outputs.logits.masked_fill(columns >= labels.unsqueeze(1), float("nan"))
    return outputs


class _RowNorm(nn.Module):
    """A LayerNorm or RMSNorm whose weight (and bias) come from each row's task."""

    def __init__(self, rows: RowTasks, template: nn.Module, prefix: str) -> None:
        super().__init__()
        self.rows, self.prefix = rows, prefix
        self.kind = _norm_kind(template)
        eps = next((getattr(template, a) for a in ("eps", "variance_epsilon") if hasattr(template, a)), None)
        parameter = next(template.parameters())
        self.eps = float(torch.finfo(parameter.dtype).eps if eps is None else eps)  # nn.RMSNorm's default
        self.has_bias = getattr(template, "bias", None) is not None
        self._check_against(template)

    def forward(self, hidden: Tensor) -> Tensor:
        weight = _per_row(self.rows.row(f"{self.prefix}.weight"), hidden.dim())  # [B, 1, ..., H]
        out = self._normalize(hidden) * weight.to(hidden.dtype)
        if self.has_bias:
            out = out + _per_row(self.rows.row(f"{self.prefix}.bias"), hidden.dim()).to(hidden.dtype)
        return out

    def _normalize(self, hidden: Tensor) -> Tensor:
        if self.kind == "layer_norm":
            return F.layer_norm(hidden, hidden.shape[-1:], None, None, self.eps)
        return F.rms_norm(hidden.float(), hidden.shape[-1:], None, self.eps).to(hidden.dtype)

    def _check_against(self, template: nn.Module) -> None:
        """Refuse a norm this class would compute differently from the model's own."""
        parameter = next(template.parameters())
        probe = torch.randn(2, 3, parameter.shape[-1], dtype=parameter.dtype, device=parameter.device)
        saved = self.rows.tensors, self.rows.task_ids
        self.rows.tensors = {f"{self.prefix}.{k}": v.detach()[None] for k, v in template.named_parameters()}
        self.rows.task_ids = torch.zeros(2, dtype=torch.long, device=parameter.device)
        try:
            with torch.no_grad():
                same = torch.allclose(self(probe), template(probe), atol=1e-5, rtol=1e-4)
        finally:
            self.rows.tensors, self.rows.task_ids = saved
        if not same:
            raise ValueError(f"cannot read {type(template).__name__} per row: its arithmetic is not a plain norm")


def _per_row(vector: Tensor, dims: int) -> Tensor:
    """A per-row vector ``[B, H]`` or ``[B, 1, H]`` as ``[B, 1, ..., H]`` of ``dims`` dimensions, to
    broadcast against ``[B, ..., H]``. Never reads the vector's shape: in the exported graph its
    first dimension may be 1 (one task for every row) while the batch's is not."""
    while vector.dim() < dims:
        vector = vector.unsqueeze(1)
    while vector.dim() > dims:
        vector = vector.squeeze(1)
    return vector


def _norm_kind(module: nn.Module) -> str:
    name = type(module).__name__
    if isinstance(module, nn.LayerNorm) or name.endswith("LayerNorm"):
        return "layer_norm"
    if isinstance(module, nn.RMSNorm) or name.endswith("RMSNorm"):
        return "rms_norm"
    raise ValueError(f"cannot read {name} per row: only LayerNorm and RMSNorm task modules are supported")


class _RowLinear(nn.Module):
    """A linear layer whose weight ``[O, I]`` and bias come from each row's task."""

    def __init__(self, rows: RowTasks, template: nn.Linear, prefix: str) -> None:
        super().__init__()
        self.rows, self.prefix, self.has_bias = rows, prefix, template.bias is not None

    def forward(self, x: Tensor) -> Tensor:
        weight = self.rows.row(f"{self.prefix}.weight").to(x.dtype)  # [B, O, I]
        flat = x.unsqueeze(1) if x.dim() == 2 else x.flatten(1, -2)  # [B, K, I]
        out = flat @ weight.transpose(1, 2)  # [B, K, O]
        if self.has_bias:
            out = out + _per_row(self.rows.row(f"{self.prefix}.bias"), 3).to(x.dtype)
        return out.squeeze(1) if x.dim() == 2 else out.unflatten(1, x.shape[1:-1])


def _row_head(rows: RowTasks, head: nn.Module, prefix: str) -> nn.Module:
    """A copy of ``head`` whose linear layers read each row's task's weights. Heads made of linear
    layers and parameter-free modules (activations, dropout, pooling) are supported."""
    if isinstance(head, nn.Linear):
        return _RowLinear(rows, head, prefix)
    others = [
        name for name, m in head.named_modules()
        if not isinstance(m, nn.Linear) and any(True for _ in m.parameters(recurse=False))
    ]
    if others:
        raise ValueError(
            f"cannot read the head {prefix[len('modules.'):]} per row: {others[0]} holds parameters but is not "
            "a linear layer"
        )
    row_head = copy.deepcopy(head)
    for name, module in list(row_head.named_modules()):
        if isinstance(module, nn.Linear):
            parent_path, _, child = name.rpartition(".")
            parent = row_head.get_submodule(parent_path) if parent_path else row_head
            setattr(parent, child, _RowLinear(rows, module, f"{prefix}.{name}"))
    return row_head.requires_grad_(False)
