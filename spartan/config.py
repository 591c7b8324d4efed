"""SpartanConfig: the settings of one task's memories, validated and stored as JSON."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from . import _validate as check
from ._io import atomic_write_text
from .memory import IMPLEMENTATIONS, PARENT_KEYS, VALUE_INITS, memory_parameter_count, validate_memory_shape

ConfigT = TypeVar("ConfigT", bound="JsonConfig")


class JsonConfig:
    """Copy, dict and JSON round trips for a validating config dataclass; unknown field names are refused."""

    def replace(self: ConfigT, **overrides: Any) -> ConfigT:
        """A copy with some fields changed (validated); unknown names raise a ValueError."""
        self._check_field_names(overrides)
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[ConfigT], values: Any) -> ConfigT:
        if not isinstance(values, dict):
            raise ValueError(f"a {cls.__name__} is a JSON object of its fields, got {type(values).__name__} {values!r}")
        cls._check_field_names(values)
        return cls(**values)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls: type[ConfigT], path: str | os.PathLike) -> ConfigT:
        try:
            values = json.loads(Path(path).read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error})") from None
        return cls.from_dict(values)

    @classmethod
    def _check_field_names(cls, values: dict[str, Any]) -> None:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; valid fields: {sorted(known)}")


@dataclass
class SpartanConfig(JsonConfig):
    """How the memories injected after each layer are shaped and trained.

    The defaults are the SPARTAN paper's setting (16 parents x 3 children, top-8 parents,
    child-softmax temperature 1.6), with the wrapped layers' normalisation layers trained too, as
    the original code did. What other settings gave on GLUE: benchmarks/results/glue_tuning.md.

    Args:
        num_parents: parent cells P per layer; each token keeps the ``top_k`` best of them.
        children_per_parent: child cells C under each parent.
        top_k: parents kept per token (``1 <= top_k <= num_parents``).
        temperature: divides the child logits before their softmax (at least 1e-6).
        value_init: ``"zeros"`` (a fresh model equals the base model) or ``"normal"``
            (the paper's random initialisation).
        implementation: ``"dense"`` (exportable), ``"sparse"`` (reads only the selected children:
            large memories) or ``"auto"`` (dense up to ``spartan.memory.DENSE_MAX_SLOTS`` slots,
            sparse beyond).
        parent_keys: ``"flat"`` (P keys scored by brute force) or ``"product"`` (P = n * n parents
            scored through two tables of n half-size sub-keys: for memories with many parents).
        sparse_gradients: with product keys and the sparse read, the child keys and values get
            sparse gradients of the rows read (for ``torch.optim.SparseAdam``).
        aux_loss_weight: weight of the load-balancing loss added to the model's loss in training.
        layers: module path(s) of the layer list(s) to wrap, e.g. ``"bert.encoder.layer"``;
            ``None`` finds them automatically (every stack of an encoder-decoder model).
        modules_to_save: module paths trained and saved besides the memories (the task head);
            ``None`` detects the head (``classifier``, ``score``, ...).
        train_layer_norms: also train (and save with each task) the normalisation layers inside
            the wrapped layers (LayerNorm, RMSNorm), as the original SPARTAN code did; ``False``
            trains and stores the memories and the head alone.

    Numbers may be given as strings (YAML reads ``3e-3`` as one) or NumPy scalars.
    """

    num_parents: int = 16
    children_per_parent: int = 3
    top_k: int = 8
    temperature: float = 1.6
    value_init: str = "zeros"
    implementation: str = "auto"
    aux_loss_weight: float = 0.01
    parent_keys: str = "flat"
    sparse_gradients: bool = False
    layers: list[str] | None = None
    modules_to_save: list[str] | None = None
    train_layer_norms: bool = True

    def __post_init__(self) -> None:
        self.num_parents, self.children_per_parent, self.top_k, self.temperature = validate_memory_shape(
            self.num_parents, self.children_per_parent, self.top_k, self.temperature, self.parent_keys
        )
        self.sparse_gradients = check.boolean("sparse_gradients", self.sparse_gradients)
        self.value_init = check.choice("value_init", self.value_init, VALUE_INITS)
        self.implementation = check.choice("implementation", self.implementation, IMPLEMENTATIONS)
        self.aux_loss_weight = check.number("aux_loss_weight", self.aux_loss_weight, minimum=0)
        self.layers = check.string_list("layers", self.layers)
        self.modules_to_save = check.string_list("modules_to_save", self.modules_to_save)
        self.train_layer_norms = check.boolean("train_layer_norms", self.train_layer_norms)

    def memory_parameters(self, hidden_size: int) -> int:
        """Parameters of one memory of this shape at hidden size ``hidden_size`` (one wrapped layer)."""
        return memory_parameter_count(
            check.positive_int("hidden_size", hidden_size), self.num_parents, self.children_per_parent, self.parent_keys
        )
