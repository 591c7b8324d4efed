"""spartan: sparse hierarchical memories for parameter-efficient fine-tuning of frozen Transformers."""

from . import analysis
from .analysis import RoutingStats, collect_routing
from .checkpoint import load_memory, load_task_weights, read_checkpoint, save_memory
from .config import SpartanConfig
from .export import OnnxRuntimeModel, export_onnx
from .inject import (
    TaskLabels,
    active_memory_name,
    add_memory,
    auxiliary_loss,
    find_head,
    find_layer_norms,
    find_layers,
    format_bytes,
    get_config,
    get_hidden_size,
    get_layer_paths,
    get_memories,
    get_model_type,
    get_task_labels,
    get_task_module_paths,
    get_task_modules,
    is_wrapped,
    memory_names,
    print_trainable_parameters,
    remove_memory,
    set_active_memory,
    task_state_dict,
    trainable_parameters,
    unwrap_model,
    wrap_model,
)
from .memory import Routing, SparseHierarchicalMemory, load_balancing_loss
from .multitask import forward_tasks
from .training import TrainingConfig, TrainResult, padding_collator, train

from ._version import __version__

__all__ = [
    "OnnxRuntimeModel",
    "Routing",
    "RoutingStats",
    "SparseHierarchicalMemory",
    "SpartanConfig",
    "TaskLabels",
    "TrainResult",
    "TrainingConfig",
    "active_memory_name",
    "add_memory",
    "auxiliary_loss",
    "collect_routing",
    "export_onnx",
    "find_head",
    "find_layer_norms",
    "find_layers",
    "format_bytes",
    "forward_tasks",
    "get_config",
    "get_hidden_size",
    "get_layer_paths",
    "get_memories",
    "get_model_type",
    "get_task_labels",
    "get_task_module_paths",
    "get_task_modules",
    "is_wrapped",
    "load_balancing_loss",
    "load_memory",
    "load_task_weights",
    "memory_names",
    "padding_collator",
    "print_trainable_parameters",
    "read_checkpoint",
    "remove_memory",
    "save_memory",
    "set_active_memory",
    "task_state_dict",
    "train",
    "trainable_parameters",
    "unwrap_model",
    "wrap_model",
]
