"""Plots of ``RoutingStats`` as image files (PNG unless the path says otherwise).

matplotlib is imported inside the functions, so importing spartan never loads it; figures are
built on ``matplotlib.figure.Figure`` (no pyplot: no global state, no GUI backend).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .._io import atomic_write
from .._validate import choice
from .stats import RoutingStats

__all__ = ["FIGURE_DPI", "FIGURE_SIZE", "USAGE_MEASURES", "plot_label_usage", "plot_load_balance", "plot_usage_heatmap"]

USAGE_MEASURES = ("selection_share", "weight_share")
FIGURE_SIZE = (8, 4.5)
FIGURE_DPI = 150


def plot_usage_heatmap(stats: RoutingStats, path: str | os.PathLike, measure: str = "selection_share") -> Path:
    """Heatmap of each layer's parent usage (layers x parents) as a PNG at ``path``.

    ``measure``: ``"selection_share"`` (share of the top-k selections) or ``"weight_share"`` (share of
    the routing weight, i.e. the load).
    """
    shares = {"selection_share": stats.selection_share, "weight_share": stats.weight_share}
    percent = 100 * shares[choice("measure", measure, USAGE_MEASURES)]  # [L, P]
    fig, ax = _new_figure()
    image = ax.imshow(percent, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
    what = "top-k selections" if measure == "selection_share" else "routing weight"
    fig.colorbar(image, ax=ax, label=f"% of the layer's {what}")
    if stats.num_layers * stats.num_parents <= 400:
        threshold = percent.max() / 2
        for (layer, parent), value in np.ndenumerate(percent):
            ax.text(
                parent,
                layer,
                f"{value:.1f}",
                ha="center",
                va="center",
                fontsize=6,
                color="black" if value > threshold else "white",
            )
    _integer_ticks(ax.set_xticks, stats.num_parents)
    _integer_ticks(ax.set_yticks, stats.num_layers)
    ax.set_xlabel("parent")
    ax.set_ylabel("layer")
    ax.set_title(
        f"Parent usage: % of {what} (top-{stats.top_k} of {stats.num_parents}, "
        f"uniform {100 / stats.num_parents:.3g}%, {stats.num_tokens:,} tokens)",
        fontsize=10,
    )
    return _save(fig, path)


def plot_label_usage(
    stats: RoutingStats, layer: int, path: str | os.PathLike, label_names: list[str] | None = None
) -> Path:
    """Grouped bars of one layer's parent loads for the tokens of each label's examples, as a PNG."""
    if not stats.has_labels:
        raise ValueError(
            "the stats hold no usage by label: the batches had no per-example integer labels; pass "
            "collect_routing(..., labels_key=...) the key of the class labels [batch]"
        )
    layer = stats.layer_index(layer)
    labels = [label for label in range(stats.num_labels) if stats.label_example_counts[label]]
    if label_names is not None and len(label_names) < stats.num_labels:
        raise ValueError(
            f"label_names has {len(label_names)} names but the stats have labels 0..{stats.num_labels - 1}"
        )
    names = label_names if label_names is not None else [f"label {label}" for label in range(stats.num_labels)]
    fig, ax = _new_figure()
    width = 0.8 / len(labels)
    parents = np.arange(stats.num_parents)
    for position, label in enumerate(labels):
        ax.bar(
            parents - 0.4 + (position + 0.5) * width,
            100 * stats.label_weight_share[layer, label],
            width,
            label=f"{names[label]} ({stats.label_example_counts[label]:,} examples)",
        )
    ax.axhline(100 / stats.num_parents, color="gray", linestyle="--", linewidth=1, label="uniform")
    _integer_ticks(ax.set_xticks, stats.num_parents)
    ax.set_xlabel("parent")
    ax.set_ylabel("% of the label's routing weight")
    ax.set_title(f"Parent usage by label, layer {layer} ({stats.layer_paths[layer]})", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_load_balance(stats: RoutingStats, path: str | os.PathLike) -> Path:
    """Per layer, the parents' loads sorted from largest to smallest, against the uniform load, as a PNG."""
    from matplotlib import colormaps

    fig, ax = _new_figure()
    ranks = np.arange(1, stats.num_parents + 1)
    colors = colormaps["viridis"](np.linspace(0, 0.9, stats.num_layers))
    for layer in range(stats.num_layers):
        ax.plot(
            ranks,
            100 * np.sort(stats.weight_share[layer])[::-1],
            marker="o",
            markersize=3,
            color=colors[layer],
            label=f"layer {layer}: H / log P = {stats.normalized_entropy[layer]:.3f}",
        )
    ax.axhline(100 / stats.num_parents, color="black", linestyle="--", linewidth=1, label="uniform")
    _integer_ticks(ax.set_xticks, stats.num_parents, start=1)
    ax.set_xlabel("parent rank (largest load first)")
    ax.set_ylabel("% of the layer's routing weight")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Load balance of the {stats.num_parents} parents per layer (top-{stats.top_k})", fontsize=10)
    ax.legend(fontsize=7, ncol=2 if stats.num_layers > 8 else 1)
    return _save(fig, path)


def _new_figure():
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=FIGURE_SIZE, dpi=FIGURE_DPI, layout="constrained")
    return fig, fig.add_subplot()


def _integer_ticks(set_ticks, count: int, start: int = 0) -> None:
    """Tick every integer up to 32 of them; let matplotlib choose beyond."""
    if count <= 32:
        set_ticks(range(start, start + count))


def _save(fig, path: str | os.PathLike) -> Path:
    """Write the figure atomically, in the format of the path's suffix (PNG without one)."""
    path = Path(path)
    image_format = path.suffix.lstrip(".").lower() or "png"
    return atomic_write(path, lambda temporary: fig.savefig(temporary, format=image_format))
