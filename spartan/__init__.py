"""spartan: sparse hierarchical memories for parameter-efficient fine-tuning of frozen Transformers."""

from . import analysis
from .analysis import RoutingStats, collect_routing
from .checkpoint import load_memory, read_checkpoint, save_memory
from .config import SpartanConfig
from .inject import (
    active_memory_name,
    add_memory,
    auxiliary_loss,
    find_head,
    find_layer_norms,
    get_config,
    get_layer_paths,
    get_memories,
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
from .training import TrainingConfig, TrainResult, padding_collator, train

__version__ = "0.1.0"

__all__ = [
    "Routing",
    "RoutingStats",
    "SparseHierarchicalMemory",
    "SpartanConfig",
    "TrainResult",
    "TrainingConfig",
    "active_memory_name",
    "add_memory",
    "auxiliary_loss",
    "collect_routing",
    "find_head",
    "find_layer_norms",
    "get_config",
    "get_layer_paths",
    "get_memories",
    "is_wrapped",
    "load_balancing_loss",
    "load_memory",
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
