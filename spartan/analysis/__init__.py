"""Which parent cells the tokens of a dataset select: usage, load balance, top tokens and examples, usage by label.

``collect_routing`` (``collect``) runs a wrapped model over batches and reads each memory's
``last_routing``; ``RoutingStats`` (``stats``) holds the counts as numpy arrays and the token and
example rankings, saves them as JSON and writes a text report; the ``plot_*`` functions (``plots``)
draw them, importing matplotlib only when they are called.
"""

from .collect import collect_routing
from .plots import plot_label_usage, plot_load_balance, plot_usage_heatmap
from .stats import ExampleRanking, ExampleStat, RoutingAccumulator, RoutingStats, TokenRanking, TokenStat

__all__ = [
    "ExampleRanking",
    "ExampleStat",
    "RoutingAccumulator",
    "RoutingStats",
    "TokenRanking",
    "TokenStat",
    "collect_routing",
    "plot_label_usage",
    "plot_load_balance",
    "plot_usage_heatmap",
]
