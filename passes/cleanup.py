"""Graph cleanup: constant folding, dead-code removal and identity elimination.

Uses onnxscript's optimizer (constant folding + shape inference + unused-node removal) and
onnx-ir's common passes; nothing is hand-written. Every later pass expects a cleaned graph:
folded shape subgraphs expose the Reshape constants that head pruning rewrites.
"""

from __future__ import annotations

import collections
import dataclasses
import logging

import onnx_ir as ir
import onnxscript.optimizer
from onnx_ir.passes.common import (
    DeduplicateInitializersPass,
    IdentityEliminationPass,
    RemoveUnusedNodesPass,
)

from edgeprune.passes.base import EdgePass, EdgePassResult

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class CleanupConfig:
    fold_constants: bool = True
    """Fold constant subgraphs (shape computations in particular)."""
    iterations: int = 2
    """Optimizer sweeps; two reach a fixed point on the exports we have seen."""


def _op_counts(model: ir.Model) -> dict[str, int]:
    return dict(collections.Counter(node.op_type for node in model.graph))


class CleanupPass(EdgePass):
    """Fold constants and remove dead nodes, identities and duplicate weights."""

    name = "cleanup"
    Config = CleanupConfig

    def call(self, model: ir.Model) -> EdgePassResult:
        before = _op_counts(model)
        if self.config.fold_constants:
            onnxscript.optimizer.optimize_ir(model, num_iterations=self.config.iterations)
        for step in (IdentityEliminationPass(), DeduplicateInitializersPass(), RemoveUnusedNodesPass()):
            step(model)
        after = _op_counts(model)
        modified = before != after
        removed = {op: before.get(op, 0) - after.get(op, 0) for op in before if before.get(op, 0) != after.get(op, 0)}
        summary = {"nodes_before": sum(before.values()), "nodes_after": sum(after.values()), "removed_by_op": removed}
        logger.info("cleanup: %d -> %d nodes", summary["nodes_before"], summary["nodes_after"])
        return EdgePassResult(model, modified=modified, summary=summary)
