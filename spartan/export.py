"""Deploy a wrapped model on ONNX Runtime: one backbone graph for every task, tasks as files.

``export_onnx`` writes a folder::

    manifest.json            inputs, tasks (label count, problem type), memory shape, graphs, versions
    backbone.onnx            the frozen backbone and the per-row memory, norm and head arithmetic
    backbone.int8.onnx       with quantize="int8": the backbone's weights in 8 bits (``quantize_int8``)
    tasks/<name>/            one memory checkpoint per task (spartan.save_memory's format)

The tasks' tensors (memories, trained norms, head) are *inputs* of the graph, not part of it, in
the layout ``spartan.multitask.graph_tensors`` gives them (the temperature divided into the child
keys): each ``[1, ...]`` when every row of a call belongs to one task (it broadcasts over the
batch: nothing is gathered or copied), or ``[B, ...]``, row b's task's, for a mixed batch. So the
backbone is stored and loaded once, a task is added by dropping its checkpoint into the folder
(``OnnxRuntimeModel.add_task``), and one call can serve a batch whose rows belong to different
tasks. Dynamic int8 quantizes the backbone's weights (the graph's initializers); the memory
tables and heads arrive as inputs and stay fp32.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import _validate as check
from ._io import atomic_write_text, existing_folder, replace_folder
from ._version import __version__
from .checkpoint import read_checkpoint, save_memory
from .config import SpartanConfig
from .inject import get_hidden_size, get_layer_paths, get_model_type, get_task_labels, is_wrapped, memory_names
from .multitask import (
    TEMPERATURE,
    MemoryShape,
    RowTasks,
    graph_shapes,
    graph_tensors,
    memory_shape,
    output_layers,
    task_tensors,
)

MANIFEST_NAME = "manifest.json"
GRAPH_NAMES = {"fp32": "backbone.onnx", "int8": "backbone.int8.onnx"}
TASKS_FOLDER = "tasks"
MANIFEST_VERSION = 2  # 2: task tensors in graph_tensors' layout, one row per batch row or one for all; no task_ids
DEFAULT_OPSET = 18
MIN_ONNXRUNTIME = (1, 21)  # LayerNormalization broadcasting its scale and bias per row
QUANTIZED_OPS = ("MatMul", "Gemm", "Gather")

__all__ = ["OnnxRuntimeModel", "export_onnx", "quantize_int8"]


def export_onnx(
    model: nn.Module,
    output_dir: str | os.PathLike,
    *,
    quantize: str | None = None,
    max_labels: int | None = None,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export a wrapped model and every task on it to a deployable folder (see the module docstring).

    Args:
        model: a model wrapped by ``spartan.wrap_model``; all its tasks must share one memory
            shape (parents, children, top-k) and use the dense read.
        output_dir: the folder to write (replaced whole if it exists).
        quantize: ``None`` (fp32 only) or ``"int8"`` (also a dynamically quantized backbone).
        max_labels: the most labels any task of this graph may have (tasks added later
            included); default: the largest label count of the model's tasks, at least 8.
        opset: the ONNX opset.

    Returns:
        ``output_dir``.
    """
    if not is_wrapped(model):
        raise ValueError("export_onnx needs a model wrapped by spartan.wrap_model (with its tasks)")
    if quantize is not None:
        check.choice("quantize (or None)", quantize, ("int8",))
    _refuse_foreign_folder(Path(output_dir))
    names = memory_names(model)
    shape = _shared_shape(model, names)
    labels = {name: get_task_labels(model, name) for name in names}
    counts = [label.num_labels or 1 for label in labels.values()]
    max_labels = check.positive_int("max_labels", max_labels) if max_labels is not None else max(8, *counts)
    if max(counts) > max_labels:
        raise ValueError(f"a task has {max(counts)} labels but max_labels is {max_labels}: raise max_labels")
    uses_token_types = _uses_token_types(model)
    padded = output_layers(model)
    shapes = graph_shapes(task_tensors(model), padded, max_labels)
    was_training = model.training
    model.eval()
    try:
        def write(folder: Path) -> None:
            _export_graph(model, shape, shapes, padded, uses_token_types, folder / GRAPH_NAMES["fp32"], opset)
            if quantize == "int8":
                quantize_int8(folder / GRAPH_NAMES["fp32"], folder / GRAPH_NAMES["int8"])
            for name in names:
                save_memory(model, folder / TASKS_FOLDER / name, name)
            manifest = {
                "manifest_version": MANIFEST_VERSION,
                "spartan_version": __version__,
                "opset": opset,
                "graphs": {kind: file for kind, file in GRAPH_NAMES.items() if (folder / file).is_file()},
                "default_graph": "int8" if quantize == "int8" else "fp32",
                "inputs": ["input_ids", "attention_mask", *(["token_type_ids"] if uses_token_types else [])],
                "task_tensors": list(shapes),
                "padded_tensors": sorted(padded),
                "max_labels": max_labels,
                "memory_shape": vars(shape),
                "backbone": {
                    "model_type": get_model_type(model),
                    "hidden_size": get_hidden_size(model),
                    "layers": get_layer_paths(model),
                    "vocab_size": getattr(model.config, "vocab_size", None),
                    "max_sequence_length": _max_sequence_length(model),
                },
                "tasks": {name: labels[name].to_dict() for name in names},
            }
            atomic_write_text(folder / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")

        return replace_folder(Path(output_dir), write)
    finally:
        model.train(was_training)


class OnnxRuntimeModel:
    """Every task of a folder written by ``export_onnx``, served by one ONNX Runtime session.

    Args:
        output_dir: the exported folder.
        providers: ONNX Runtime execution providers (default: CPU).
        graph: ``"fp32"`` or ``"int8"`` (default: the manifest's, int8 when it was quantized).
        threads: intra-op threads (default: ONNX Runtime's choice); sets ``intra_op_num_threads`` and one
            inter-op thread on the session options.
        session_options: an ``onnxruntime.SessionOptions`` to start from (graph optimisation level,
            thread spinning, profiling, ...); ``threads`` is applied on top of it, on that object (ONNX
            Runtime options cannot be copied).

    Examples::

        >>> runtime = OnnxRuntimeModel("deploy/minilm")
        >>> runtime.tasks
        ['sst2', 'mrpc']
        >>> logits = runtime("sst2", input_ids=ids, attention_mask=mask)            # [B, 2]
        >>> mixed = runtime(["sst2", "mrpc"], input_ids=ids2, attention_mask=mask2)  # one task per row
        >>> runtime.add_task("rte", "runs/rte-spartan/best")                        # no re-export
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        providers: Sequence[str] | None = None,
        graph: str | None = None,
        threads: int | None = None,
        session_options=None,
    ) -> None:
        import onnxruntime

        if _version(onnxruntime.__version__) < MIN_ONNXRUNTIME:
            raise RuntimeError(
                f"onnxruntime {onnxruntime.__version__} cannot run these graphs (their norms take each row's weights, "
                f"broadcast since {'.'.join(map(str, MIN_ONNXRUNTIME))}): pip install -U onnxruntime"
            )
        self.folder = Path(output_dir)
        manifest_file = self.folder / MANIFEST_NAME
        if not manifest_file.is_file():
            raise FileNotFoundError(f"{manifest_file} does not exist: {self.folder} is not a folder written by export_onnx")
        try:
            self.manifest = json.loads(manifest_file.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{manifest_file} is corrupt ({error}): export the model again") from None
        if self.manifest.get("manifest_version") != MANIFEST_VERSION:
            raise ValueError(
                f"{manifest_file} has manifest_version {self.manifest.get('manifest_version')!r}; this spartan reads "
                f"{MANIFEST_VERSION}: export again with this version or upgrade spartan"
            )
        graph = graph or self.manifest["default_graph"]
        if graph not in self.manifest["graphs"]:
            raise ValueError(f"graph {graph!r} is not in {self.folder}; it has {sorted(self.manifest['graphs'])}")
        self.graph = graph
        if session_options is not None and not isinstance(session_options, onnxruntime.SessionOptions):
            raise TypeError(
                f"session_options must be an onnxruntime.SessionOptions, got {type(session_options).__name__}"
            )
        options = session_options if session_options is not None else onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = check.positive_int("threads", threads)
            options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(
            str(self.folder / self.manifest["graphs"][graph]), options, providers=list(providers or ["CPUExecutionProvider"])
        )
        self._shapes = {i.name: i.shape for i in self.session.get_inputs()}
        self._tasks: dict[str, dict[str, np.ndarray]] = {}
        self._labels: dict[str, int] = {}
        for name in self.manifest["tasks"]:
            self._load_task(name, self.folder / TASKS_FOLDER / name)

    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    def num_labels(self, task: str) -> int:
        return self._labels[self._known(task)]

    def task_inputs(self, task: str) -> dict[str, np.ndarray]:
        """The graph inputs that carry ``task``'s tensors, ``[1, ...]`` each, as a call for that task feeds
        them (for driving ``self.session`` directly, e.g. through an I/O binding), as views marked
        read-only. The session's ``logits`` then have the graph's ``max_labels`` columns: keep the first
        ``num_labels(task)``."""
        views = {}
        for name, array in self._tasks[self._known(task)].items():
            views[name] = array.view()
            views[name].flags.writeable = False
        return views

    def __call__(
        self,
        task: str | Sequence[str],
        input_ids: Any,
        attention_mask: Any = None,
        token_type_ids: Any = None,
    ) -> np.ndarray:
        """Logits ``[B, L]`` (numpy float32) of ``task``'s head, or with one task name per row, of
        each row's own task: then L is the largest label count among the rows' tasks and the
        columns past a row's own count are NaN."""
        input_ids = self._check_tokens(_token_array("input_ids", input_ids))
        batch = len(input_ids)
        attention_mask = np.ones_like(input_ids) if attention_mask is None else _token_array("attention_mask", attention_mask)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {attention_mask.shape}; it must match input_ids' {input_ids.shape}")
        rows = [task] * batch if isinstance(task, str) else list(task)
        if len(rows) != batch:
            raise ValueError(f"{len(rows)} task names for {batch} rows: give one task, or one task name per row")
        unique = list(dict.fromkeys(self._known(name) for name in rows))
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in self.manifest["inputs"]:
            types = np.zeros_like(input_ids) if token_type_ids is None else _token_array("token_type_ids", token_type_ids)
            if types.shape != input_ids.shape:
                raise ValueError(f"token_type_ids has shape {types.shape}; it must match input_ids' {input_ids.shape}")
            feeds["token_type_ids"] = types
        elif token_type_ids is not None:
            raise ValueError("this graph takes no token_type_ids (its backbone has none): leave them out")
        if len(unique) == 1:  # every row reads the task's [1, ...] tensors, broadcast by the graph
            feeds.update(self._tasks[unique[0]])
            (logits,) = self.session.run(["logits"], feeds)
            return logits[:, : self._labels[unique[0]]]
        for tensor in self.manifest["task_tensors"]:  # [B, ...]: row b's task's
            feeds[tensor] = np.concatenate([self._tasks[name][tensor] for name in rows])
        (logits,) = self.session.run(["logits"], feeds)
        counts = np.array([self._labels[name] for name in rows])
        logits = logits[:, : counts.max()].astype(np.float32, copy=True)
        logits[np.arange(logits.shape[1])[None, :] >= counts[:, None]] = np.nan
        return logits

    def add_task(self, name: str, memory_checkpoint_dir: str | os.PathLike) -> None:
        """Add a task saved by ``spartan.save_memory`` (trained after the export) to the live session
        and to the folder, without re-exporting or reloading the backbone."""
        name = check.identifier("task name", name)
        if name in self._tasks:
            raise ValueError(f"{self.folder} already has a task named {name!r}: choose another name")
        self._load_task(name, memory_checkpoint_dir)
        source = existing_folder(memory_checkpoint_dir) or Path(memory_checkpoint_dir)
        replace_folder(self.folder / TASKS_FOLDER / name, lambda staging: _copy_files(source, staging))
        self.manifest["tasks"][name] = dict(self._task_info[name])
        atomic_write_text(self.folder / MANIFEST_NAME, json.dumps(self.manifest, indent=2) + "\n")

    def _check_tokens(self, input_ids: np.ndarray) -> np.ndarray:
        """One clear error for what ONNX Runtime would refuse with a page of its own: an empty
        batch, ids outside the vocabulary, sequences longer than the backbone's positions."""
        backbone = self.manifest["backbone"]
        if input_ids.size == 0:
            raise ValueError(f"input_ids has shape {input_ids.shape}: give at least one row of at least one token")
        vocab, longest = backbone.get("vocab_size"), backbone.get("max_sequence_length")
        if input_ids.min() < 0 or (vocab is not None and input_ids.max() >= vocab):
            raise ValueError(
                f"input_ids holds ids from {input_ids.min()} to {input_ids.max()}; this backbone's vocabulary has "
                f"{vocab} ids: tokenize with the backbone's own tokenizer"
            )
        if longest is not None and input_ids.shape[1] > longest:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} tokens per row; this backbone takes at most {longest}: truncate"
            )
        return input_ids

    def _known(self, task: str) -> str:
        if task not in self._tasks:
            raise ValueError(f"no task named {task!r} in {self.folder}; it has {self.tasks}")
        return task

    def _load_task(self, name: str, folder: str | os.PathLike) -> None:
        description, tensors = read_checkpoint(folder)
        manifest = self.manifest
        backbone = description["backbone"]
        if (backbone["hidden_size"], backbone["layers"]) != (manifest["backbone"]["hidden_size"], manifest["backbone"]["layers"]):
            raise ValueError(
                f"the task at {folder} was trained on another backbone (hidden size {backbone['hidden_size']}, layers "
                f"{(backbone['layers'] or [])[:2]}...) than {self.folder} serves (hidden size "
                f"{manifest['backbone']['hidden_size']}): train it on this backbone"
            )
        config = SpartanConfig.from_dict(description["config"])
        shape = MemoryShape(config.num_parents, config.children_per_parent, config.top_k)
        if vars(shape) != manifest["memory_shape"]:
            raise ValueError(
                f"the task at {folder} has memories of shape {vars(shape)}, but this graph reads {manifest['memory_shape']}: "
                "train it with the exported tasks' memory shape, or export again"
            )
        expected = set(manifest["task_tensors"])
        if set(tensors) != expected:
            missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise ValueError(
                f"the task at {folder} does not fit this graph: missing {missing[:3]}, unexpected {unexpected[:3]} "
                "(its head or trained norms differ from the exported tasks')"
            )
        labels = description["task"]["num_labels"] or 1
        if labels > manifest["max_labels"]:
            raise ValueError(
                f"the task at {folder} has {labels} labels; this graph takes at most {manifest['max_labels']}: "
                "export again with a larger max_labels"
            )
        tensors = {key: value.float() for key, value in tensors.items()}
        tensors[TEMPERATURE] = torch.tensor(config.temperature)
        shapes = {key: self._shapes[key][1:] for key in manifest["task_tensors"]}
        try:
            graph = graph_tensors(tensors, shapes, set(manifest["padded_tensors"]), config.num_parents)
        except ValueError as error:
            raise ValueError(f"the task at {folder} does not fit this graph: {error}") from None
        self._tasks[name] = {key: np.ascontiguousarray(value.numpy()) for key, value in graph.items()}
        self._labels[name] = labels
        self._task_info = getattr(self, "_task_info", {})
        self._task_info[name] = description["task"]


# -- internals -------------------------------------------------------------------------------


class _Graph(nn.Module):
    """The exported computation: token inputs and the task tensors (``graph_tensors``' layout, one row
    per batch row or one for all) -> logits."""

    def __init__(self, model: nn.Module, rows: RowTasks, tensor_names: list[str], uses_token_types: bool) -> None:
        super().__init__()
        self.model = model
        self.rows = rows
        self.tensor_names = tensor_names
        self.uses_token_types = uses_token_types

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None,
                tensors: tuple[Tensor, ...]) -> Tensor:
        self.rows.tensors = dict(zip(self.tensor_names, tensors))
        self.rows.task_ids = None  # the tensors come per row
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.uses_token_types:
            inputs["token_type_ids"] = token_type_ids
        return self.model(**inputs).logits


def _export_graph(
    model: nn.Module,
    shape: MemoryShape,
    shapes: dict[str, list[int]],
    padded: set[str],
    uses_token_types: bool,
    path: Path,
    opset: int,
) -> None:
    rows = RowTasks(model, shape)
    tensor_names = list(shapes)
    graph = _Graph(model, rows, tensor_names, uses_token_types)
    names = memory_names(model)
    examples = [graph_tensors(task_tensors(model, names[i % len(names)]), shapes, padded, shape.num_parents)
                for i in range(2)]
    batch, length = 3, 8  # neither 0 nor 1, so no dimension is specialised
    generator = torch.Generator().manual_seed(0)
    vocab = getattr(model.config, "vocab_size", 100)
    input_ids = torch.randint(3, max(4, vocab), (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    token_types = torch.zeros(batch, length, dtype=torch.long) if uses_token_types else None
    tensors = tuple(torch.cat([examples[0][name], examples[1][name], examples[0][name]]) for name in tensor_names)
    b = torch.export.Dim("batch")
    s = torch.export.Dim("sequence", max=_max_sequence_length(model) or 4096)
    dynamic = (
        {0: b, 1: s},
        {0: b, 1: s},
        {0: b, 1: s} if uses_token_types else None,
        tuple({0: b} for _ in tensor_names),  # traced with one row per batch row; fed [1, ...] too
    )
    input_names = ["input_ids", "attention_mask", *(["token_type_ids"] if uses_token_types else []), *tensor_names]
    with rows.active(), torch.no_grad():
        try:
            program = torch.export.export(
                graph, (input_ids, attention_mask, token_types, tensors), dynamic_shapes=dynamic, strict=False
            )
        except Exception as error:  # torch.export's messages run to pages: keep the first line, say what to do
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise RuntimeError(f"torch.export could not trace {type(model).__name__}: {first}") from error
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx_program = torch.onnx.export(
        program, f=None, input_names=input_names, output_names=["logits"], opset_version=opset, dynamo=True
    )
    _batch_from_tokens(onnx_program, set(tensor_names))
    _scale_norms_per_row(onnx_program, set(tensor_names))
    onnx_program.save(str(path), external_data=_needs_external_data(onnx_program))


def _batch_from_tokens(onnx_program: Any, task_inputs: set[str]) -> None:
    """Make the graph read its batch size from ``input_ids``, never from a task tensor. Traced with
    one task row per batch row, the two sizes are one symbol to the exporter, which may read it from
    either; but the task tensors are also fed ``[1, ...]`` (one task for every row). The per-row
    code reads no task tensor's shape, so every such read is the batch size's."""
    graph = onnx_program.model.graph
    tokens = next(value for value in graph.inputs if value.name == "input_ids")
    for node in graph:
        source = node.inputs[0] if node.inputs else None
        if source is None or source.name not in task_inputs or node.op_type not in ("Shape", "Size"):
            continue
        start, end = (node.attributes.get(key) for key in ("start", "end"))
        if node.op_type == "Size" or start is None or start.value != 0 or end is None or end.value != 1:
            raise RuntimeError(f"the exported graph reads {source.name}'s shape beyond its rows: please report it")
        node.replace_input_with(0, tokens)


def _scale_norms_per_row(onnx_program: Any, task_inputs: set[str]) -> None:
    """Rewrite each per-row layer norm, exported as ``LayerNormalization(x) * weight + bias`` with the
    weight and bias task inputs ``[rows, 1, H]``, as one ``LayerNormalization(x, weight, bias)``
    (ONNX Runtime >= 1.21 broadcasts its scale and bias per row). Besides two fewer passes over the
    activations, ONNX Runtime then leaves the norm unfused: its CPU SkipLayerNormalization, which it
    would otherwise fuse the residual and bias additions into, is slower than the additions and the
    plain norm. A norm in any other pattern is left as it is."""
    from onnx_ir.convenience import replace_all_uses_with

    graph = onnx_program.model.graph

    def task_input(value: Any) -> bool:
        return value is not None and value.is_graph_input() and value.name in task_inputs

    def only_use(value: Any, op_type: str) -> tuple[Any, Any] | None:
        """The one node using ``value``, when it is an ``op_type`` whose other operand is a task input."""
        uses = list(value.uses())
        if len(uses) != 1 or uses[0][0].op_type != op_type or uses[0][0].domain not in ("", "ai.onnx"):
            return None
        node, index = uses[0]
        if len(node.inputs) != 2 or not task_input(node.inputs[1 - index]) or node.outputs[0].is_graph_output():
            return None
        return node, node.inputs[1 - index]

    def ones(value: Any) -> bool:
        constant = None if value is None else value.const_value
        return constant is not None and bool(np.all(constant.numpy() == 1))

    for norm in [node for node in graph if node.op_type == "LayerNormalization" and node.domain in ("", "ai.onnx")]:
        if len(norm.inputs) < 2 or not ones(norm.inputs[1]) or (len(norm.inputs) > 2 and norm.inputs[2] is not None):
            continue  # a scale or bias of its own
        if any(out.uses() for out in norm.outputs[1:]):
            continue  # its mean and deviation are used
        scaled = only_use(norm.outputs[0], "Mul")
        shifted = scaled and only_use(scaled[0].outputs[0], "Add")
        if not shifted:
            continue
        (mul, weight), (add, bias) = scaled, shifted
        norm.resize_inputs(3)
        norm.replace_input_with(1, weight)
        norm.replace_input_with(2, bias)
        replace_all_uses_with(add.outputs[0], norm.outputs[0])
        graph.remove([mul, add], safe=True)


def _needs_external_data(onnx_program: Any) -> bool:
    """Protocol buffers stop at 2 GiB: larger graphs keep their weights beside the graph file."""
    total = sum(int(np.prod(t.shape)) * t.dtype.itemsize for t in onnx_program.model.graph.initializers.values())
    return total > 1 << 30


def quantize_int8(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Write ``target``, the ONNX graph ``source`` with its weights dynamically quantized to 8 bits, as
    ``export_onnx(quantize="int8")`` does: the ``QUANTIZED_OPS`` weights (matrix products, the embedding
    tables) as asymmetric uint8 with one scale per tensor, activations quantized at run time.
    Why these settings: benchmarks/results/deploy_int8_variants.md. Returns ``target``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QUInt8, op_types_to_quantize=list(QUANTIZED_OPS))
    return Path(target)


def _refuse_foreign_folder(folder: Path) -> None:
    """export_onnx replaces its folder whole: never one that holds something else."""
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not (folder / MANIFEST_NAME).is_file())):
        raise ValueError(
            f"{folder} exists and is not a folder written by export_onnx: export into a new or empty folder"
        )


def _shared_shape(model: nn.Module, names: list[str]) -> MemoryShape:
    shapes = {name: memory_shape(model, name) for name in names}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"the tasks' memories differ in shape ({shapes}): one graph serves one memory shape")
    return shapes[names[0]]


def _max_sequence_length(model: nn.Module) -> int | None:
    config = model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def _uses_token_types(model: nn.Module) -> bool:
    parameters = inspect.signature(model.forward).parameters
    return "token_type_ids" in parameters and (getattr(model.config, "type_vocab_size", 0) or 0) > 1


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


def _token_array(name: str, value: Any) -> np.ndarray:
    array = value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a [batch, sequence] array, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _copy_files(source: Path, target: Path) -> None:
    for file in source.iterdir():
        if file.is_file():
            shutil.copy2(file, target / file.name)



