"""Inject memories after the layers of a frozen model: discovery, hooks, freezing, task switching.

Every task on a wrapped model owns its memories (one per wrapped layer) and its *task modules*:
the head and, with ``train_layer_norms``, the wrapped layers' normalisation layers. The active
task's modules sit at their places in the model; every other task's are registered under
``model.spartan_task_modules``, so ``.to()``, ``state_dict()`` and ``parameters()`` see them.
Tasks may have different label counts and problem types: each builds its own head.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from dataclasses import dataclass, field
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from . import _validate as check
from .config import SpartanConfig
from .memory import SparseHierarchicalMemory, load_balancing_loss

MEMORIES_ATTRIBUTE = "spartan_memories"  # nn.ModuleDict on the model: task name -> one memory per layer
PARKED_ATTRIBUTE = "spartan_task_modules"  # nn.ModuleDict: inactive task name -> its task modules
STATE_ATTRIBUTE = "_spartan_state"
DEFAULT_NAME = "default"
# Direct children of a task model that form its task head (trained and saved with the memories).
HEAD_NAMES = ("pre_classifier", "pooler", "classifier", "classification_head", "score", "qa_outputs")
# Task models that must have a head among HEAD_NAMES (their other children are the backbone).
HEADED_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "ForMultipleChoice")
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")
# A layer list counts as a stack of Transformer layers beside the largest one when it holds at least
# this share of the largest one's parameters (an encoder-decoder's encoder and decoder both do).
STACK_SHARE = 0.1


@dataclass(frozen=True)
class TaskLabels:
    """What a task's head predicts: ``num_labels`` outputs (1 for regression) and the problem type
    (``"regression"``, ``"single_label_classification"``, ``"multi_label_classification"`` or None)."""

    num_labels: int | None = None
    problem_type: str | None = None
    id2label: dict[int, str] | None = None

    def __post_init__(self) -> None:
        if self.num_labels is not None:
            object.__setattr__(self, "num_labels", check.positive_int("num_labels", self.num_labels))
        if self.problem_type is not None:
            check.choice("problem_type", self.problem_type, PROBLEM_TYPES)
        if self.id2label is not None:
            labels = {check.integer("id2label key", k, minimum=0): str(v) for k, v in dict(self.id2label).items()}
            object.__setattr__(self, "id2label", labels)

    def to_dict(self) -> dict[str, Any]:
        labels = None if self.id2label is None else {str(k): v for k, v in self.id2label.items()}
        return {"num_labels": self.num_labels, "problem_type": self.problem_type, "id2label": labels}


@dataclass
class _WrapState:
    """What wrap_model changed on a model."""

    configs: dict[str, SpartanConfig]
    labels: dict[str, TaskLabels]
    active: str
    layer_paths: list[str]
    module_paths: list[str]  # every module trained and saved per task: the head, and norms with train_layer_norms
    original_modules: dict[str, nn.Module]  # as the model had them before wrapping
    original_labels: TaskLabels  # what the model predicted before wrapping
    requires_grad: dict[str, bool]  # every backbone parameter's flag before wrapping
    mask_position: int | None  # where attention_mask sits among the model's positional arguments
    hook_handles: list[Any] = field(default_factory=list)
    attention_mask: Tensor | None = None  # of the model's current forward call
    read_override: Callable[[int, Tensor], Tensor] | None = None  # see override_memory_reads


def is_wrapped(model: nn.Module) -> bool:
    return hasattr(model, STATE_ATTRIBUTE)


def wrap_model(
    model: nn.Module,
    config: SpartanConfig | None = None,
    *,
    name: str = DEFAULT_NAME,
    num_labels: int | None = None,
    problem_type: str | None = None,
    id2label: dict[int, str] | None = None,
    **overrides: Any,
) -> nn.Module:
    """Add a memory after every Transformer layer of ``model``, freeze the backbone, keep the head trainable.

    Each layer's output hidden states ``h`` become ``h + memory(h)``. Every stack of layers is
    wrapped (an encoder-decoder's encoder and decoder both). In training mode, the load-balancing
    loss (weighted by ``config.aux_loss_weight``) is added to the model output's ``loss``, so any
    training loop, the ``transformers`` Trainer included, optimises it.

    A model whose layers are applied several times (ALBERT shares one layer across all its
    applications) gets one memory per layer *module*, shared by all of that module's applications;
    a warning says so.

    Args:
        model: a Hugging Face model (or any module with a list of layers and ``config.hidden_size``).
        config: the memories' settings; ``SpartanConfig()`` (the paper's) by default.
        name: the task name of this memory (letters, digits, ``_`` and ``-``).
        num_labels, problem_type, id2label: give this task a head of its own size (its last linear
            layer built anew) instead of the model's; by default the task keeps the model's head.
        **overrides: SpartanConfig fields to change, e.g. ``top_k=4``.

    Returns:
        The same model object, wrapped.
    """
    if is_wrapped(model):
        raise ValueError(
            "model is already wrapped by spartan: add another task with spartan.add_memory or "
            "spartan.load_memory, or call spartan.unwrap_model first"
        )
    name = check.identifier("task name", name)
    config = (config or SpartanConfig()).replace(**overrides)
    layer_paths = find_layers(model, config.layers)
    module_paths = _find_head(model, config.modules_to_save)
    if config.train_layer_norms:
        module_paths += _find_norms(model, layer_paths)
    hidden_size = get_hidden_size(model)
    original_labels = _labels_of(model) if module_paths else TaskLabels()
    requested = _requested_labels(model, module_paths, original_labels, num_labels, problem_type, id2label)
    state = _WrapState(
        configs={name: config},
        labels={name: original_labels},
        original_labels=original_labels,
        active=name,
        layer_paths=layer_paths,
        module_paths=module_paths,
        original_modules={path: copy.deepcopy(model.get_submodule(path)) for path in module_paths},
        requires_grad={param_name: p.requires_grad for param_name, p in model.named_parameters()},
        mask_position=_argument_position(model, "attention_mask"),
    )
    _warn_if_shared_layers(model, layer_paths)
    model.add_module(MEMORIES_ATTRIBUTE, nn.ModuleDict({name: _build_memories(model, state, hidden_size, config)}))
    model.add_module(PARKED_ATTRIBUTE, nn.ModuleDict())
    setattr(model, STATE_ATTRIBUTE, state)
    memories = getattr(model, MEMORIES_ATTRIBUTE)
    for index, path in enumerate(layer_paths):
        hook = _make_layer_hook(memories, state, index)
        state.hook_handles.append(model.get_submodule(path).register_forward_hook(hook))
    state.hook_handles.append(model.register_forward_pre_hook(_make_mask_hook(state), with_kwargs=True))
    state.hook_handles.append(model.register_forward_hook(_add_auxiliary_loss, with_kwargs=True))
    if requested != state.original_labels:
        try:
            _relabel_active_task(model, state, requested)
        except BaseException:
            unwrap_model(model)
            raise
    _set_trainable(model)
    return model


def _requested_labels(
    model: nn.Module,
    module_paths: list[str],
    original: TaskLabels,
    num_labels: int | None,
    problem_type: str | None,
    id2label: dict | None,
) -> TaskLabels:
    """The labels a new task asks for: the given ones, the rest as the model had them (a new label
    count drops the original problem type unless one is given). Checked before anything changes."""
    if id2label is not None and not isinstance(id2label, dict):
        raise ValueError(f"id2label must be a dict {{label id: name}}, got {id2label!r}")
    labels = TaskLabels(
        num_labels if num_labels is not None else original.num_labels,
        problem_type if (problem_type is not None or num_labels is not None) else original.problem_type,
        id2label,
    )
    if num_labels is not None and not module_paths:
        raise ValueError(f"{type(model).__name__} has no task head to give {labels.num_labels} labels")
    return labels


def _relabel_active_task(model: nn.Module, state: _WrapState, labels: TaskLabels) -> None:
    original = state.labels[state.active]
    if labels.num_labels != original.num_labels:
        modules = _fresh_task_modules(model, state, labels, original)
        for path in state.module_paths:
            _set_submodule(model, path, modules[_key(path)])
    state.labels = {state.active: labels}
    state.original_labels = original
    _apply_labels(model, labels)


def add_memory(
    model: nn.Module,
    name: str,
    config: SpartanConfig | None = None,
    *,
    num_labels: int | None = None,
    problem_type: str | None = None,
    id2label: dict[int, str] | None = None,
    **overrides: Any,
) -> nn.Module:
    """Add another task's memories and task modules (fresh copies of the original head and norms).

    ``num_labels`` (and ``problem_type``, ``id2label``) give the new task a head of its own size:
    its last linear layer is built anew with that many outputs. By default the task predicts what
    the model did before it was wrapped. The new task is not activated: call
    ``set_active_memory(model, name)``.
    """
    state = _state(model)
    name = check.identifier("task name", name)
    if name in state.configs:
        raise ValueError(f"model already has a memory named {name!r}; choose another name")
    config = (config or SpartanConfig()).replace(**overrides)
    first = next(iter(state.configs.values()))
    if (
        config.layers not in (None, first.layers)
        or config.modules_to_save not in (None, first.modules_to_save)
        or config.train_layer_norms != first.train_layer_norms
    ):
        raise ValueError(
            "all memories on one model share its layers and per-task modules: leave layers and "
            "modules_to_save unset (or equal to the first memory's) and give train_layer_norms the "
            f"first memory's value ({first.train_layer_norms}) when adding a memory"
        )
    config = config.replace(layers=first.layers, modules_to_save=first.modules_to_save)
    original_labels = state.original_labels
    labels = _requested_labels(model, state.module_paths, original_labels, num_labels, problem_type, id2label)
    modules = _fresh_task_modules(model, state, labels, original_labels)
    getattr(model, MEMORIES_ATTRIBUTE)[name] = _build_memories(model, state, get_hidden_size(model), config)
    getattr(model, PARKED_ATTRIBUTE)[name] = modules
    state.configs[name] = config
    state.labels[name] = labels
    _set_trainable(model)
    return model


def set_active_memory(model: nn.Module, name: str) -> None:
    """Make task ``name``'s memories, task modules and label count the ones the model uses (and trains)."""
    state = _state(model)
    name = _resolve_name(state, name)
    if name == state.active:
        return
    parked = getattr(model, PARKED_ATTRIBUTE)
    current = nn.ModuleDict({_key(path): model.get_submodule(path) for path in state.module_paths})
    incoming = parked[name]
    del parked[name]
    for path in state.module_paths:
        _set_submodule(model, path, incoming[_key(path)])
    parked[state.active] = current
    state.active = name
    _apply_labels(model, state.labels[name])
    _set_trainable(model)


def remove_memory(model: nn.Module, name: str) -> None:
    """Delete an inactive task's memories and task modules."""
    state = _state(model)
    _resolve_name(state, name)
    if name == state.active:
        raise ValueError(f"{name!r} is the active memory: activate another with set_active_memory first")
    del getattr(model, MEMORIES_ATTRIBUTE)[name]
    del getattr(model, PARKED_ATTRIBUTE)[name]
    del state.configs[name]
    del state.labels[name]


def active_memory_name(model: nn.Module) -> str:
    return _state(model).active


def memory_names(model: nn.Module) -> list[str]:
    return list(_state(model).configs)


def get_config(model: nn.Module, name: str | None = None) -> SpartanConfig:
    state = _state(model)
    return state.configs[_resolve_name(state, name)]


def get_task_labels(model: nn.Module, name: str | None = None) -> TaskLabels:
    """The label count, problem type and label names of task ``name`` (the active task by default)."""
    state = _state(model)
    return state.labels[_resolve_name(state, name)]


def get_memories(model: nn.Module, name: str | None = None) -> nn.ModuleList:
    """The memories of task ``name`` (the active task by default), one per wrapped layer."""
    return getattr(model, MEMORIES_ATTRIBUTE)[_resolve_name(_state(model), name)]


def get_layer_paths(model: nn.Module) -> list[str]:
    """Module paths of the wrapped layers, in order."""
    return list(_state(model).layer_paths)


def get_task_module_paths(model: nn.Module) -> list[str]:
    """Module paths of the modules every task owns a copy of: the head, then the trained norms."""
    return list(_state(model).module_paths)


def get_task_modules(model: nn.Module, name: str | None = None) -> dict[str, nn.Module]:
    """Task ``name``'s own modules (the active task's by default), by their path in the model."""
    state = _state(model)
    name = _resolve_name(state, name)
    if name == state.active:
        return {path: model.get_submodule(path) for path in state.module_paths}
    parked = getattr(model, PARKED_ATTRIBUTE)[name]
    return {path: parked[_key(path)] for path in state.module_paths}


def find_head(model: nn.Module) -> list[str]:
    """Module paths of the model's task head: its direct children named like a head
    (``classifier``, ``pre_classifier``, ``pooler``, ``score``, ``qa_outputs``), besides the backbone."""
    return _find_head(model, None)


def find_layer_norms(model: nn.Module, layers: list[str] | None = None) -> list[str]:
    """Module paths of the normalisation layers inside the model's Transformer layers: the ones that
    ``SpartanConfig(train_layer_norms=True)`` trains. ``layers`` as in ``SpartanConfig.layers``."""
    return _find_norms(model, find_layers(model, layers))


def find_layers(model: nn.Module, layers: list[str] | str | None = None) -> list[str]:
    """Module paths of the layers to wrap: those of the given layer lists (``SpartanConfig.layers``),
    or of every stack of identical blocks the model has (``bert.encoder.layer``; ``encoder.block`` and
    ``decoder.block`` of T5; ``model.layers``; ...)."""
    how_to_fix = "pass the layer list's module path, e.g. SpartanConfig(layers='bert.encoder.layer')"
    paths = check.string_list("layers", layers)
    if paths is None:
        paths = _find_stacks(model)
        if not paths:
            raise ValueError(f"found no list of Transformer layers in {type(model).__name__}: {how_to_fix}")
    layer_paths = []
    for path in paths:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"{type(model).__name__} has no module {path!r}: {how_to_fix}") from None
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            layer_paths += [f"{path}.{index}" for index in range(len(module))]
        else:
            layer_paths.append(path)
    if not layer_paths:
        raise ValueError(f"the module list(s) {paths} hold no layers: {how_to_fix}")
    return layer_paths


def get_hidden_size(model: nn.Module) -> int:
    """The hidden size of ``model`` (``config.hidden_size``, or ``d_model`` / ``n_embd``)."""
    config = getattr(model, "config", None)
    for attribute in ("hidden_size", "d_model", "n_embd"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise ValueError(f"cannot tell the hidden size of {type(model).__name__}: it needs config.hidden_size")


@contextmanager
def override_memory_reads(model: nn.Module, read: Callable[[int, Tensor], Tensor]) -> Iterator[None]:
    """Within the block, wrapped layer ``i``'s output ``h`` becomes ``read(i, h)`` instead of
    ``h + memory(h)`` (how per-row task reads plug in; see ``spartan.multitask``)."""
    state = _state(model)
    if state.read_override is not None:
        raise RuntimeError("memory reads are already overridden on this model")
    state.read_override = read
    try:
        yield
    finally:
        state.read_override = None


@contextmanager
def replaced_modules(model: nn.Module, replacements: dict[str, nn.Module]) -> Iterator[None]:
    """Within the block, the module at each path is ``replacements[path]``; the originals return after."""
    originals = {path: model.get_submodule(path) for path in replacements}
    try:
        for path, module in replacements.items():
            _set_submodule(model, path, module)
        yield
    finally:
        for path, module in originals.items():
            _set_submodule(model, path, module)


def get_model_type(model: nn.Module) -> str:
    """The backbone's kind as checkpoints record it: ``config.model_type`` or the class name."""
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def get_attention_mask(model: nn.Module) -> Tensor | None:
    """The attention mask of the wrapped model's latest forward call (None when it had none)."""
    return _state(model).attention_mask


def unwrap_model(model: nn.Module) -> nn.Module:
    """Remove all memories and hooks, restore the original head (on the device and in the dtype
    the model has now) and the requires_grad flags."""
    state = _state(model)
    for handle in state.hook_handles:
        handle.remove()
    _apply_labels(model, state.original_labels)
    for path, original in state.original_modules.items():
        reference = next(model.get_submodule(path).parameters(), None)
        if reference is not None:
            original = original.to(device=reference.device, dtype=reference.dtype)
        _set_submodule(model, path, original)
    delattr(model, MEMORIES_ATTRIBUTE)
    delattr(model, PARKED_ATTRIBUTE)
    delattr(model, STATE_ATTRIBUTE)
    for param_name, param in model.named_parameters():
        param.requires_grad_(state.requires_grad.get(param_name, True))
    return model


def task_state_dict(model: nn.Module, name: str | None = None) -> dict[str, Tensor]:
    """Everything one task owns: ``memories.<layer>.<param>`` and ``modules.<module path>.<param>``."""
    name = _resolve_name(_state(model), name)
    tensors = {f"memories.{key}": value for key, value in get_memories(model, name).state_dict().items()}
    for path, module in get_task_modules(model, name).items():
        tensors.update({f"modules.{path}.{key}": value for key, value in module.state_dict().items()})
    return tensors


def auxiliary_loss(model: nn.Module) -> Tensor:
    """The active task's load-balancing loss from the latest forward: the per-layer loss averaged
    over layers, times ``aux_loss_weight``. Padding tokens (attention mask 0) are left out."""
    state = _state(model)
    memories = get_memories(model)
    mask = state.attention_mask
    losses = []
    for memory in memories:
        routing = memory.last_routing
        if routing is None:
            raise RuntimeError("auxiliary_loss needs a forward pass of the wrapped model first")
        layer_mask = mask if mask is not None and mask.shape == routing.indices.shape[:-1] else None
        losses.append(load_balancing_loss(routing, memory.num_parents, layer_mask))
    return state.configs[state.active].aux_loss_weight * torch.stack(losses).mean()


def trainable_parameters(model: nn.Module) -> dict[str, float]:
    """Trainable and total parameters of the model as it runs now (inactive tasks left out),
    their ratio, and the bytes of the weights a saved task checkpoint holds. The package's one
    parameter count."""
    inactive: set[int] = set()
    if is_wrapped(model):
        state = _state(model)
        for name, memories in getattr(model, MEMORIES_ATTRIBUTE).items():
            if name != state.active:
                inactive.update(id(p) for p in memories.parameters())
        inactive.update(id(p) for p in getattr(model, PARKED_ATTRIBUTE).parameters())
    params = [p for p in model.parameters() if id(p) not in inactive]
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    if is_wrapped(model):
        checkpoint_bytes = sum(t.numel() * t.element_size() for t in task_state_dict(model).values())
    else:
        checkpoint_bytes = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    return {
        "trainable_params": trainable,
        "total_params": total,
        "trainable_ratio": trainable / max(total, 1),
        "checkpoint_bytes": checkpoint_bytes,
    }


def print_trainable_parameters(model: nn.Module) -> None:
    """One line of counts (as peft prints them); for a wrapped model, a second line naming the
    layers that carry memories and the task."""
    stats = trainable_parameters(model)
    print(
        f"trainable params: {stats['trainable_params']:,} || all params: {stats['total_params']:,} || "
        f"trainable%: {100 * stats['trainable_ratio']:.4f} || checkpoint: {format_bytes(stats['checkpoint_bytes'])}"
    )
    if is_wrapped(model):
        state = _state(model)
        print(
            f"task {state.active!r} of {sorted(state.configs)}: memories after {len(state.layer_paths)} layers "
            f"({_summarise_paths(state.layer_paths)})"
        )


def format_bytes(num_bytes: float) -> str:
    """``1536`` -> ``"1.5 KiB"`` (binary units, as the parameter report prints them)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{int(num_bytes)} B"
        num_bytes /= 1024
    raise AssertionError("unreachable")


# -- internals -------------------------------------------------------------------------------


def _state(model: nn.Module) -> _WrapState:
    if not is_wrapped(model):
        raise ValueError("model is not wrapped by spartan: call spartan.wrap_model(model) first")
    return getattr(model, STATE_ATTRIBUTE)


def _resolve_name(state: _WrapState, name: str | None) -> str:
    if name is None:
        return state.active
    if name not in state.configs:
        raise ValueError(f"no memory named {name!r}; this model has {sorted(state.configs)}")
    return name


def _key(path: str) -> str:
    """A module path as a ModuleDict key (no dots)."""
    return path.replace(".", "-")


def _find_stacks(model: nn.Module) -> list[str]:
    """Every outermost list of identical blocks holding at least STACK_SHARE of the largest one's parameters."""
    candidates: list[tuple[str, int]] = []
    for path, module in model.named_modules():
        if not (isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1):
            continue
        if any(path.startswith(f"{outer}.") for outer, _ in candidates):
            continue  # inside a block of a list already found
        candidates.append((path, sum(p.numel() for p in module.parameters())))
    if not candidates:
        return []
    largest = max(size for _, size in candidates)
    return [path for path, size in candidates if size > 0 and size >= STACK_SHARE * largest]


def _warn_if_shared_layers(model: nn.Module, layer_paths: list[str]) -> None:
    applications = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if isinstance(applications, int) and getattr(model.config, "model_type", "") == "albert":
        if applications > len(layer_paths):
            warnings.warn(
                f"{type(model).__name__} applies its {len(layer_paths)} shared layer module(s) {applications} times: "
                "each memory is shared by every application of its layer",
                stacklevel=3,
            )


def _find_head(model: nn.Module, paths: list[str] | None) -> list[str]:
    if paths is not None:
        for path in paths:
            try:
                model.get_submodule(path)
            except AttributeError:
                raise ValueError(
                    f"modules_to_save names {path!r}, which {type(model).__name__} does not have"
                ) from None
        return list(paths)
    base = getattr(model, "base_model", model)
    if base is model:  # a bare backbone (BertModel, ...) has no task head
        return []
    heads = [
        name
        for name, child in model.named_children()
        if name in HEAD_NAMES and child is not base and any(True for _ in child.parameters())
    ]
    if not heads and type(model).__name__.endswith(HEADED_SUFFIXES):
        children = [name for name, child in model.named_children() if child is not base]
        raise ValueError(
            f"found no task head in {type(model).__name__} (its children besides the backbone: {children}): "
            "name it with SpartanConfig(modules_to_save=[...])"
        )
    return heads


def _find_norms(model: nn.Module, layer_paths: list[str]) -> list[str]:
    """Module paths of the normalisation layers (LayerNorm, RMSNorm) inside the wrapped layers."""
    return [
        f"{layer}.{name}"
        for layer in layer_paths
        for name, module in model.get_submodule(layer).named_modules()
        if name
        and (
            isinstance(module, (nn.LayerNorm, nn.RMSNorm))
            or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))
        )
    ]


def _labels_of(model: nn.Module) -> TaskLabels:
    config = getattr(model, "config", None)
    num_labels = getattr(config, "num_labels", None)
    id2label = getattr(config, "id2label", None)
    return TaskLabels(
        num_labels if isinstance(num_labels, int) and num_labels > 0 else None,
        getattr(config, "problem_type", None),
        dict(id2label) if isinstance(id2label, dict) and id2label else None,
    )


def _apply_labels(model: nn.Module, labels: TaskLabels) -> None:
    """Make the model's loss and config follow the active task's label count and problem type."""
    config = getattr(model, "config", None)
    if labels.num_labels is None or config is None:
        return
    config.id2label = labels.id2label or {i: f"LABEL_{i}" for i in range(labels.num_labels)}
    config.label2id = {label: index for index, label in config.id2label.items()}
    config.problem_type = labels.problem_type
    if hasattr(model, "num_labels"):
        model.num_labels = labels.num_labels


def _fresh_task_modules(
    model: nn.Module, state: _WrapState, labels: TaskLabels, original: TaskLabels
) -> nn.ModuleDict:
    """Copies of the original task modules, on the model's device and dtype; the head's last linear
    layer with ``original.num_labels`` outputs is built anew when ``labels`` asks for another count."""
    modules = nn.ModuleDict()
    resize = labels.num_labels is not None and labels.num_labels != original.num_labels
    norms = set(_find_norms(model, state.layer_paths))
    resized = False
    for path, module in state.original_modules.items():
        fresh = copy.deepcopy(module)
        current = next(model.get_submodule(path).parameters(), None)
        if current is not None:
            fresh = fresh.to(device=current.device, dtype=current.dtype)
        if resize and path not in norms:
            replaced = _with_outputs(model, fresh, original.num_labels, labels.num_labels)
            resized, fresh = resized or replaced is not None, replaced or fresh
        modules[_key(path)] = fresh
    if resize and not resized:
        raise ValueError(
            f"cannot give {type(model).__name__}'s head {labels.num_labels} outputs: no linear layer of its head "
            f"has the model's {original.num_labels} outputs"
        )
    return modules


def _with_outputs(model: nn.Module, head: nn.Module, old: int | None, new: int) -> nn.Module | None:
    """``head`` with its last linear layer of ``old`` outputs replaced by a fresh one of ``new``
    outputs (None when it has no such layer)."""
    linears = [(name, m) for name, m in head.named_modules() if isinstance(m, nn.Linear) and m.out_features == old]
    if not linears:
        return None
    name, linear = linears[-1]
    replacement = nn.Linear(
        linear.in_features, new, bias=linear.bias is not None, device=linear.weight.device, dtype=linear.weight.dtype
    )
    std = getattr(getattr(model, "config", None), "initializer_range", 0.02)
    nn.init.normal_(replacement.weight, std=std if isinstance(std, float) else 0.02)
    if replacement.bias is not None:
        nn.init.zeros_(replacement.bias)
    if not name:  # the head is the linear layer itself
        return replacement
    _set_submodule(head, name, replacement)
    return head


def _build_memories(model: nn.Module, state: _WrapState, hidden_size: int, config: SpartanConfig) -> nn.ModuleList:
    memories = []
    for path in state.layer_paths:
        reference = next(model.get_submodule(path).parameters(), None)
        memories.append(
            SparseHierarchicalMemory(
                hidden_size,
                config.num_parents,
                config.children_per_parent,
                config.top_k,
                temperature=config.temperature,
                value_init=config.value_init,
                implementation=config.implementation,
                parent_keys=config.parent_keys,
                sparse_gradients=config.sparse_gradients,
                device=None if reference is None else reference.device,
                dtype=None if reference is None else reference.dtype,
            )
        )
    return nn.ModuleList(memories)


def _set_trainable(model: nn.Module) -> None:
    """Freeze everything but the active task's memories and task modules."""
    state = _state(model)
    model.requires_grad_(False)
    getattr(model, MEMORIES_ATTRIBUTE)[state.active].requires_grad_(True)
    for path in state.module_paths:
        model.get_submodule(path).requires_grad_(True)


def _make_layer_hook(memories: nn.ModuleDict, state: _WrapState, index: int):
    def read(hidden: Tensor) -> Tensor:
        if state.read_override is not None:
            return state.read_override(index, hidden)
        return memories[state.active][index](hidden, residual=hidden)

    def add_memory_read(module: nn.Module, args: tuple, output: Any) -> Any:
        if isinstance(output, Tensor):
            return read(output)
        if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
            return (read(output[0]), *output[1:])
        raise TypeError(f"spartan cannot read the hidden states from a {type(output).__name__} layer output")

    return add_memory_read


def _make_mask_hook(state: _WrapState):
    def capture_attention_mask(module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and state.mask_position is not None and len(args) > state.mask_position:
            mask = args[state.mask_position]
        state.attention_mask = mask if isinstance(mask, Tensor) else None

    return capture_attention_mask


def _auxiliary_share(model: nn.Module, kwargs: dict) -> Tensor | float:
    """The factor that keeps the load-balancing loss's weight relative to the task loss the same in
    every loop. The ``transformers`` Trainer with loss kwargs passes ``num_items_in_batch`` and sums
    the micro-batches' losses instead of averaging them; token-level losses (causal LM, token
    classification) then divide their sum by ``num_items_in_batch``, so this forward's part of the
    load-balancing loss is its share of those items. Sequence-level losses (one label per row)
    stay per-micro-batch means, summed like the load-balancing loss itself: the factor is 1."""
    total, labels = kwargs.get("num_items_in_batch"), kwargs.get("labels")
    if total is None or not isinstance(labels, Tensor) or labels.dim() < 2:
        return 1.0
    shifted = type(model).__name__.endswith("ForCausalLM")  # counted shifted, as the Trainer counts them
    counted = labels[..., 1:] if shifted else labels
    return counted.ne(-100).sum() / total


def _add_auxiliary_loss(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    state = _state(module)
    if not module.training or state.configs[state.active].aux_loss_weight == 0:
        return None
    if isinstance(output, tuple):  # return_dict=False: the loss comes first when labels were given
        if kwargs.get("labels") is None or not output:
            return None
        return (output[0] + _auxiliary_share(module, kwargs) * auxiliary_loss(module), *output[1:])
    loss = getattr(output, "loss", None)
    if loss is None:
        return None
    output.loss = loss + _auxiliary_share(module, kwargs) * auxiliary_loss(module)  # a ModelOutput keeps its dict view
    return output


def _argument_position(model: nn.Module, argument: str) -> int | None:
    names = [
        p.name
        for p in inspect.signature(model.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return names.index(argument) if argument in names else None


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child_name = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child_name, module)


def _summarise_paths(paths: list[str]) -> str:
    """``a.0, a.1, a.2, b.0`` -> ``a.0-2, b.0``."""
    groups: dict[str, list[str]] = {}
    for path in paths:
        stem, _, index = path.rpartition(".")
        groups.setdefault(stem if index.isdigit() else path, []).append(index if index.isdigit() else "")
    parts = []
    for stem, indices in groups.items():
        if indices == [""]:
            parts.append(stem)
        elif len(indices) == 1:
            parts.append(f"{stem}.{indices[0]}")
        else:
            parts.append(f"{stem}.{indices[0]}-{indices[-1]}")
    return ", ".join(parts)
