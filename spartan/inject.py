"""Inject memories after the layers of a frozen model: discovery, hooks, freezing, task switching."""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .config import SpartanConfig
from .memory import SparseHierarchicalMemory, load_balancing_loss

MEMORIES_ATTRIBUTE = "spartan_memories"  # nn.ModuleDict on the model: task name -> one memory per layer
STATE_ATTRIBUTE = "_spartan_state"
DEFAULT_NAME = "default"
# Direct children of a task model that form its task head (trained and saved with the memories).
HEAD_NAMES = ("pre_classifier", "pooler", "classifier", "score", "qa_outputs")


@dataclass
class _WrapState:
    """What wrap_model changed on a model, and the task heads that are not installed right now."""

    configs: dict[str, SpartanConfig]
    active: str
    layer_paths: list[str]
    head_paths: list[str]  # every module trained and saved per task: the head, and norms with train_layer_norms
    original_heads: dict[str, nn.Module]  # as the model had them before wrapping
    parked_heads: dict[str, dict[str, nn.Module]]  # heads of the inactive tasks
    requires_grad: dict[str, bool]  # every backbone parameter's flag before wrapping
    mask_position: int | None  # where attention_mask sits among the model's positional arguments
    hook_handles: list[Any] = field(default_factory=list)
    attention_mask: Tensor | None = None  # of the model's current forward call


def is_wrapped(model: nn.Module) -> bool:
    return hasattr(model, STATE_ATTRIBUTE)


def wrap_model(
    model: nn.Module, config: SpartanConfig | None = None, *, name: str = DEFAULT_NAME, **overrides: Any
) -> nn.Module:
    """Add a memory after every Transformer layer of ``model``, freeze the backbone, keep the head trainable.

    Each layer's output hidden states ``h`` become ``h + memory(h)``. In training mode, the
    load-balancing loss (weighted by ``config.aux_loss_weight``) is added to the model output's
    ``loss``, so any training loop, the ``transformers`` Trainer included, optimises it.

    Args:
        model: a Hugging Face model (or any module with a list of layers and ``config.hidden_size``).
        config: the memories' settings; ``SpartanConfig()`` (the paper's) by default.
        name: the task name of this memory (see ``add_memory`` and ``set_active_memory``).
        **overrides: SpartanConfig fields to change, e.g. ``top_k=4``.

    Returns:
        The same model object, wrapped.
    """
    if is_wrapped(model):
        raise ValueError(
            "model is already wrapped by spartan: add another task with spartan.add_memory or "
            "spartan.load_memory, or call spartan.unwrap_model first"
        )
    config = (config or SpartanConfig()).replace(**overrides)
    layer_paths = _find_layers(model, config.layers)
    head_paths = _find_head(model, config.modules_to_save)
    if config.train_layer_norms:
        head_paths += _find_norms(model, layer_paths)
    state = _WrapState(
        configs={name: config},
        active=name,
        layer_paths=layer_paths,
        head_paths=head_paths,
        original_heads={path: copy.deepcopy(model.get_submodule(path)) for path in head_paths},
        parked_heads={},
        requires_grad={param_name: p.requires_grad for param_name, p in model.named_parameters()},
        mask_position=_argument_position(model, "attention_mask"),
    )
    hidden_size = _hidden_size(model)
    model.add_module(MEMORIES_ATTRIBUTE, nn.ModuleDict({name: _build_memories(model, state, hidden_size, config)}))
    setattr(model, STATE_ATTRIBUTE, state)
    memories = getattr(model, MEMORIES_ATTRIBUTE)
    for index, path in enumerate(layer_paths):
        hook = _make_layer_hook(memories, state, index)
        state.hook_handles.append(model.get_submodule(path).register_forward_hook(hook))
    state.hook_handles.append(model.register_forward_pre_hook(_make_mask_hook(state), with_kwargs=True))
    state.hook_handles.append(model.register_forward_hook(_add_auxiliary_loss, with_kwargs=True))
    _set_trainable(model)
    return model


def add_memory(model: nn.Module, name: str, config: SpartanConfig | None = None, **overrides: Any) -> nn.Module:
    """Add another task's memories (and a fresh copy of the original head) to a wrapped model.

    The new task is not activated: call ``set_active_memory(model, name)``.
    """
    state = _state(model)
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
    getattr(model, MEMORIES_ATTRIBUTE)[name] = _build_memories(model, state, _hidden_size(model), config)
    state.configs[name] = config
    state.parked_heads[name] = {path: copy.deepcopy(head) for path, head in state.original_heads.items()}
    _set_trainable(model)
    return model


def set_active_memory(model: nn.Module, name: str) -> None:
    """Make task ``name``'s memories and head the ones the model uses (and trains)."""
    state = _state(model)
    if name not in state.configs:
        raise ValueError(f"no memory named {name!r}; this model has {sorted(state.configs)}")
    if name == state.active:
        return
    state.parked_heads[state.active] = {path: model.get_submodule(path) for path in state.head_paths}
    device = next(getattr(model, MEMORIES_ATTRIBUTE)[name].parameters()).device
    for path, head in state.parked_heads.pop(name).items():
        _set_submodule(model, path, head.to(device))
    state.active = name
    _set_trainable(model)


def remove_memory(model: nn.Module, name: str) -> None:
    """Delete an inactive task's memories and head."""
    state = _state(model)
    _resolve_name(state, name)
    if name == state.active:
        raise ValueError(f"{name!r} is the active memory: activate another with set_active_memory first")
    del getattr(model, MEMORIES_ATTRIBUTE)[name]
    del state.configs[name]
    del state.parked_heads[name]


def active_memory_name(model: nn.Module) -> str:
    return _state(model).active


def memory_names(model: nn.Module) -> list[str]:
    return list(_state(model).configs)


def get_config(model: nn.Module, name: str | None = None) -> SpartanConfig:
    state = _state(model)
    return state.configs[_resolve_name(state, name)]


def get_memories(model: nn.Module, name: str | None = None) -> nn.ModuleList:
    """The memories of task ``name`` (the active task by default), one per wrapped layer."""
    return getattr(model, MEMORIES_ATTRIBUTE)[_resolve_name(_state(model), name)]


def get_layer_paths(model: nn.Module) -> list[str]:
    """Module paths of the wrapped layers, in order."""
    return list(_state(model).layer_paths)


def find_head(model: nn.Module) -> list[str]:
    """Module paths of the model's task head: its direct children named like a head
    (``classifier``, ``pre_classifier``, ``pooler``, ``score``, ``qa_outputs``), besides the backbone."""
    return _find_head(model, None)


def find_layer_norms(model: nn.Module, layers: list[str] | None = None) -> list[str]:
    """Module paths of the normalisation layers inside the model's Transformer layers: the ones that
    ``SpartanConfig(train_layer_norms=True)`` trains. ``layers`` as in ``SpartanConfig.layers``."""
    return _find_norms(model, _find_layers(model, layers))


def get_attention_mask(model: nn.Module) -> Tensor | None:
    """The attention mask of the wrapped model's latest forward call (None when it had none)."""
    return _state(model).attention_mask


def unwrap_model(model: nn.Module) -> nn.Module:
    """Remove all memories and hooks, restore the original head and requires_grad flags."""
    state = _state(model)
    for handle in state.hook_handles:
        handle.remove()
    for path, head in state.original_heads.items():
        _set_submodule(model, path, head)
    delattr(model, MEMORIES_ATTRIBUTE)
    delattr(model, STATE_ATTRIBUTE)
    for param_name, param in model.named_parameters():
        param.requires_grad_(state.requires_grad.get(param_name, True))
    return model


def task_state_dict(model: nn.Module, name: str | None = None) -> dict[str, Tensor]:
    """Everything one task owns: ``memories.<layer>.<param>`` and ``head.<module path>.<param>``."""
    state = _state(model)
    name = _resolve_name(state, name)
    tensors = {f"memories.{key}": value for key, value in get_memories(model, name).state_dict().items()}
    for path, head in _heads(model, state, name).items():
        tensors.update({f"head.{path}.{key}": value for key, value in head.state_dict().items()})
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
    their ratio, and the bytes of the weights a saved task checkpoint holds."""
    inactive: set[int] = set()
    if is_wrapped(model):
        state = _state(model)
        for name, memories in getattr(model, MEMORIES_ATTRIBUTE).items():
            if name != state.active:
                inactive.update(id(p) for p in memories.parameters())
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
    stats = trainable_parameters(model)
    print(
        f"trainable params: {stats['trainable_params']:,} || all params: {stats['total_params']:,} || "
        f"trainable%: {100 * stats['trainable_ratio']:.4f} || checkpoint: {_format_bytes(stats['checkpoint_bytes'])}"
    )


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


def _heads(model: nn.Module, state: _WrapState, name: str) -> dict[str, nn.Module]:
    if name == state.active:
        return {path: model.get_submodule(path) for path in state.head_paths}
    return state.parked_heads[name]


def _find_layers(model: nn.Module, paths: list[str] | None) -> list[str]:
    """Module paths of the layers to wrap: the given layer lists, or the model's largest list of
    identical blocks (``bert.encoder.layer``, ``transformer.h``, ``model.layers``, ...)."""
    how_to_fix = "pass the layer list's module path, e.g. SpartanConfig(layers='bert.encoder.layer')"
    if paths is None:
        best, best_size = None, 0
        for path, module in model.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
                size = sum(p.numel() for p in module.parameters())
                if size > best_size:
                    best, best_size = path, size
        if best is None:
            raise ValueError(f"found no list of Transformer layers in {type(model).__name__}: {how_to_fix}")
        paths = [best]
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
    return [
        name
        for name, child in model.named_children()
        if name in HEAD_NAMES and child is not base and any(True for _ in child.parameters())
    ]


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


def _hidden_size(model: nn.Module) -> int:
    hidden_size = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(hidden_size, int):
        raise ValueError(f"cannot tell the hidden size of {type(model).__name__}: it needs config.hidden_size")
    return hidden_size


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
                device=None if reference is None else reference.device,
                dtype=None if reference is None else reference.dtype,
            )
        )
    return nn.ModuleList(memories)


def _set_trainable(model: nn.Module) -> None:
    """Freeze everything but the active task's memories and head."""
    state = _state(model)
    model.requires_grad_(False)
    getattr(model, MEMORIES_ATTRIBUTE)[state.active].requires_grad_(True)
    for path in state.head_paths:
        model.get_submodule(path).requires_grad_(True)


def _make_layer_hook(memories: nn.ModuleDict, state: _WrapState, index: int):
    def add_memory_read(module: nn.Module, args: tuple, output: Any) -> Any:
        memory = memories[state.active][index]
        if isinstance(output, Tensor):
            return memory(output, residual=output)
        if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
            hidden = output[0]
            return (memory(hidden, residual=hidden), *output[1:])
        raise TypeError(f"spartan cannot read the hidden states from a {type(output).__name__} layer output")

    return add_memory_read


def _make_mask_hook(state: _WrapState):
    def capture_attention_mask(module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and state.mask_position is not None and len(args) > state.mask_position:
            mask = args[state.mask_position]
        state.attention_mask = mask if isinstance(mask, Tensor) else None

    return capture_attention_mask


def _add_auxiliary_loss(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    state = _state(module)
    if not module.training or state.configs[state.active].aux_loss_weight == 0:
        return None
    if isinstance(output, tuple):  # return_dict=False: the loss comes first when labels were given
        if kwargs.get("labels") is None or not output:
            return None
        return (output[0] + auxiliary_loss(module), *output[1:])
    loss = getattr(output, "loss", None)
    if loss is None:
        return None
    output.loss = loss + auxiliary_loss(module)  # a ModelOutput keeps its dict view in step
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


def _format_bytes(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1024 or unit == "GB":
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{int(num_bytes)} B"
        num_bytes /= 1024
    raise AssertionError("unreachable")
