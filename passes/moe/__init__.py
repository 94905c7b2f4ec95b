"""MoE expert pruning: router statistics, expert scores (TCESS, EASY-EP, frequency) or a loss search, global allocation, physical removal.

``moe_pass`` drives it (one task, the union of several tasks, or a replayed choice); ``scores`` streams the router
statistics and holds the metrics, ``search`` chooses by calibration loss (``loss``), ``remove`` takes experts out of each graph form (loop, dense, fused).  The
retrieval bundle built on the pass's per-task choices lives in ``edgeprune.runtime.moe``.  The pass is imported on first use, so ``scores.METRICS``
(the CLI's ``--moe-metric`` choices) loads without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgeprune.passes.moe.moe_pass import MoEConfig, MoEExpertPruningPass

__all__ = ["MoEConfig", "MoEExpertPruningPass"]


def __getattr__(name: str):
    if name in __all__:
        from edgeprune.passes.moe import moe_pass

        return getattr(moe_pass, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
