"""The optimizer ``train`` builds: AdamW, or, when some parameters receive sparse gradients,
``LazyAdamW``, which steps those the lazy way.

A parameter announces sparse gradients with the attribute ``sparse_grad = True`` (a spartan
memory built with ``sparse_gradients=True`` sets it on its child keys and values; set it on the
weight of an ``nn.Embedding(sparse=True)`` likewise).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

SPARSE_GRAD_ATTRIBUTE = "sparse_grad"

__all__ = ["SPARSE_GRAD_ATTRIBUTE", "LazyAdamW", "clip_grad_norm", "has_sparse_gradients", "make_optimizer"]


def has_sparse_gradients(parameter: Tensor) -> bool:
    return bool(getattr(parameter, SPARSE_GRAD_ATTRIBUTE, False))


def make_optimizer(groups: list[dict[str, Any]], learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` over ``groups``, or ``LazyAdamW`` when a parameter has sparse gradients."""
    parameters = [p for group in groups for p in group["params"]]
    kind = LazyAdamW if any(has_sparse_gradients(p) for p in parameters) else torch.optim.AdamW
    return kind(groups, lr=learning_rate, weight_decay=weight_decay)


class LazyAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments) for dense gradients; for a sparse
    gradient, the lazy variant that ``torch.optim.SparseAdam`` implements: only the rows present
    in the gradient have their moments, weight decay and values updated, so a step costs the rows
    read, not the table.

    Args: as ``torch.optim.AdamW`` (``lr``, ``betas``, ``eps``, ``weight_decay``).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                state = self.state[parameter]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
                state["step"] += 1
                step = state["step"].item()
                corrections = 1 - beta1**step, math.sqrt(1 - beta2**step)
                grad = parameter.grad
                if grad.is_sparse:
                    _lazy_update(parameter, grad, state, lr, beta1, beta2, eps, decay, corrections)
                else:
                    _dense_update(parameter, grad, state, lr, beta1, beta2, eps, decay, corrections)
        return loss


def _dense_update(parameter, grad, state, lr, beta1, beta2, eps, decay, corrections) -> None:
    parameter.mul_(1 - lr * decay)
    state["exp_avg"].lerp_(grad, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denominator = (state["exp_avg_sq"].sqrt() / corrections[1]).add_(eps)
    parameter.addcdiv_(state["exp_avg"], denominator, value=-lr / corrections[0])


def _lazy_update(parameter, grad, state, lr, beta1, beta2, eps, decay, corrections) -> None:
    grad = grad.coalesce()
    rows, values = grad.indices()[0], grad.values()
    exp_avg = state["exp_avg"][rows].lerp_(values, 1 - beta1)
    exp_avg_sq = state["exp_avg_sq"][rows].mul_(beta2).addcmul_(values, values, value=1 - beta2)
    state["exp_avg"][rows] = exp_avg
    state["exp_avg_sq"][rows] = exp_avg_sq
    denominator = (exp_avg_sq.sqrt() / corrections[1]).add_(eps)
    updated = parameter[rows] * (1 - lr * decay) - (lr / corrections[0]) * exp_avg / denominator
    parameter[rows] = updated


def clip_grad_norm(parameters: Mapping[str, Tensor] | Iterable[Tensor], max_norm: float) -> Tensor:
    """Scale the gradients, dense and sparse alike, so that their joint 2-norm is at most
    ``max_norm``; returns the norm before clipping."""
    tensors = parameters.values() if isinstance(parameters, Mapping) else parameters
    grads = [p.grad for p in tensors if p.grad is not None]
    if not grads:
        return torch.zeros(())
    squares = [
        (g.coalesce().values() if g.is_sparse else g).detach().float().square().sum() for g in grads
    ]
    total = torch.stack([s.to(squares[0].device) for s in squares]).sum().sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for grad in grads:
        if grad.is_sparse:
            grad.mul_(scale.to(grad.device))
        else:
            grad.mul_(scale.to(grad.device, grad.dtype))
    return total
