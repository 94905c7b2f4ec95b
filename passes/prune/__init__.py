"""Structured pruning: score FFN neurons, attention heads and conv channel groups, remove the weakest.

``prune_pass`` drives it; ``groups`` and ``dependency`` find what is coupled, ``scoring`` holds the
importance metrics, ``allocation`` spreads the budget across groups, ``edits`` slices the graph,
``describe`` says what the pass would act on (``edgeprune inspect``).  The pass is imported on
first use, so ``scoring.METRICS`` (the CLI's ``--prune-metric`` choices) loads without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgeprune.passes.prune.prune_pass import PruneConfig, StructuredPruningPass

__all__ = ["PruneConfig", "StructuredPruningPass"]


def __getattr__(name: str):
    if name in __all__:
        from edgeprune.passes.prune import prune_pass

        return getattr(prune_pass, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
