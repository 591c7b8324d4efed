"""Sharded training (``TrainingConfig(sharding="fsdp")``) with PyTorch's FSDP2: the modules of a
model that hold trainable parameters swapped, for one run of ``train``, for copies sharded across
the processes; and the full tensors of sharded ones gathered back, and cut again, for checkpoints.

The unit of sharding is each module that holds trainable parameters itself: for a model wrapped
by spartan, each memory (its ``keys``, ``values`` and, with product keys, ``sub_keys``), each
linear layer of the head and each trained norm. ``fully_shard`` splits every tensor of a unit by
rows across the ``N`` processes (``ceil(rows / N)`` rows each, the last ones fewer), gathers the
unit whole just before its forward and again for its backward pass, frees it after each, and
reduce-scatters its gradients, so each process holds one slice of each table, of its gradient and
of its optimizer state. The rest of the model (the frozen backbone) is left as it is, whole on
every process. Nothing here knows what a memory is.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from ..inject import replaced_modules

__all__ = ["ShardedModules", "gather", "shard_like", "sharded_module_paths"]


def gather(tensors: Mapping[str, Any], keep: bool) -> dict[str, Any]:
    """``tensors`` with each DTensor replaced by its full tensor and every tensor on the CPU; other
    values as they are.

    Gathering is a collective: every process calls it with its own shards of the same tensors, in
    the same order. Only the processes with ``keep`` (the one that writes) get the values; the
    others get an empty dict, having held each full tensor only while it was gathered.
    """
    kept = {}
    for name, value in tensors.items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        if keep:
            kept[name] = value.detach().cpu() if isinstance(value, Tensor) else value
    return kept


def shard_like(tensor: Tensor, like: Tensor) -> Tensor:
    """``tensor``, a full tensor, cut as ``like`` is when ``like`` is a DTensor of the same shape (a
    DTensor holding this process's slice, cut locally: no communication); else ``tensor`` itself."""
    if not isinstance(like, DTensor) or tensor.shape != like.shape:
        return tensor
    return distribute_tensor(tensor.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def sharded_module_paths(model: nn.Module) -> list[str]:
    """Paths of the modules that ``sharding="fsdp"`` shards, in model order: each module that holds a
    trainable (``requires_grad``) parameter itself.

    Raises a ValueError, naming the module, when they cannot be sharded one by one: the model itself
    holds one, one such module lies inside another, a module sits at two paths, or two modules share
    a parameter.
    """
    paths_of: dict[int, list[str]] = {}  # module -> its paths
    holders: dict[int, set[str]] = {}  # trainable parameter -> the paths of the modules holding it
    for path, module in model.named_modules(remove_duplicate=False):
        trainable = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if trainable:
            paths_of.setdefault(id(module), []).append(path)
        for parameter in trainable:
            holders.setdefault(id(parameter), set()).add(path)
    paths = [module_paths[0] for module_paths in paths_of.values()]
    problem = None
    if "" in paths:
        problem = "the model itself holds trainable parameters (not in a submodule)"
    elif shared := next((p for p in paths_of.values() if len(p) > 1), None):
        problem = f"one module sits at {shared[0]!r} and {shared[1]!r}"
    elif tied := next((sorted(h) for h in holders.values() if len(h) > 1), None):
        problem = f"{tied[0]!r} and {tied[1]!r} share a parameter"
    elif nested := next(((a, b) for a in paths for b in paths if b.startswith(a + ".")), None):
        problem = f"{nested[1]!r}, which holds trainable parameters, lies inside {nested[0]!r}, which does too"
    if problem is not None:
        raise ValueError(
            f"sharding='fsdp' shards each module that holds trainable parameters on its own, but in "
            f"{type(model).__name__} {problem}: train with sharding='none'"
        )
    return paths


class ShardedModules:
    """The modules of ``model`` at ``sharded_module_paths``, each swapped for a copy sharded with
    FSDP2 across the ``num_processes`` processes (one unit per module) until ``restore``.

    The model's own modules wait aside with their parameters emptied (``[0]``-shaped, the same
    parameter objects) and come back holding the trained weights. Every process must make one,
    with the model on ``device``, after which its trainable parameters are the copies' DTensors.
    """

    def __init__(self, model: nn.Module, device: torch.device, num_processes: int) -> None:
        self.model = model
        self.device = device
        mesh = init_device_mesh(device.type, (num_processes,))
        self.own: dict[str, nn.Module] = {}
        self.sharded: dict[str, nn.Module] = {}
        for path in sharded_module_paths(model):
            module = model.get_submodule(path)
            # The copy starts out with the module's own parameters, not copies of them: fully_shard
            # then registers its shards in their place, and emptying the originals frees them.
            replica = copy.deepcopy(module, memo={id(p): p for p in module.parameters()})
            fully_shard(replica, mesh=mesh, reshard_after_forward=True)  # whole only while it runs
            self.own[path], self.sharded[path] = module, replica
            _empty(module)
        self._swap = ExitStack()
        self._swap.enter_context(replaced_modules(model, self.sharded))

    @contextmanager
    def full_weights(self, keep: bool) -> Iterator[None]:
        """Within the block, on the processes with ``keep``, the model holds its own modules filled
        with the current full weights, on the CPU (to save them); elsewhere it stays sharded.

        Every process must enter it: gathering the weights is a collective.
        """
        gathered = {path: gather(dict(replica.named_parameters()), keep) for path, replica in self.sharded.items()}
        if not keep:
            yield
            return
        for path, module in self.own.items():
            _fill(module, gathered[path], self.sharded[path], torch.device("cpu"))
        try:
            with replaced_modules(self.model, self.own):
                yield
        finally:
            for module in self.own.values():
                _empty(module)

    def restore(self) -> None:
        """Put the model's own modules back in place of the sharded copies, holding the full current
        weights on ``device``, on every process (a collective); the copies are dropped."""
        for path, module in self.own.items():
            replica = self.sharded[path]
            _fill(module, gather(dict(replica.named_parameters()), keep=True), replica, self.device)
        self._swap.close()
        self.sharded = {}


def _empty(module: nn.Module) -> None:
    """Free the parameters' storage, keeping the parameter objects (and their attributes)."""
    for parameter in module.parameters():
        parameter.data = parameter.data.new_empty(0)


def _fill(module: nn.Module, parameters: Mapping[str, Tensor], replica: nn.Module, device: torch.device) -> None:
    """Give ``module`` the full ``parameters`` and ``replica``'s buffers, on ``device``."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            parameter.data = parameters[name].to(device)
        buffers = dict(replica.named_buffers())
        for name, buffer in module.named_buffers():
            buffer.data = buffers[name].detach().to(device, copy=True)
