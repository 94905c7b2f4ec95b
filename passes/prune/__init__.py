"""Structured pruning: score FFN neurons, attention heads and conv channel groups, remove the weakest.

``prune_pass`` drives it; ``groups`` and ``dependency`` find what is coupled, ``scoring`` holds the
importance metrics, ``allocation`` spreads the budget across groups, ``edits`` slices the graph.
"""

from edgeprune.passes.prune.prune_pass import PruneConfig, StructuredPruningPass

__all__ = ["PruneConfig", "StructuredPruningPass"]
