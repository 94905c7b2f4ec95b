"""Graph cleanup: constant folding, dead-code removal, identity elimination, duplicate weights.

One ``ir.passes.Sequential`` of existing passes, nothing hand-written: onnxscript's optimizer
(the passes ``onnxscript.optimizer.optimize_ir`` runs, in its order: inlining, constant folding
with shape inference, its rewrite rules, unused-node removal, constant lifting, initializer
deduplication, common-subexpression elimination) and then onnx-ir's identity elimination,
initializer deduplication and unused-node removal. ``modified`` is what those passes report.
The optimizer's pass list is spelt out (``optimize_ir`` discards the results); a test checks it
still gives exactly ``optimize_ir``'s model. Every later pass expects a cleaned graph: folded
shape subgraphs expose the Reshape constants that head pruning rewrites.
"""

from __future__ import annotations

import collections
import dataclasses
import logging

import onnx_ir as ir
from onnx_ir.passes import common
from onnxscript import rewriter
from onnxscript.optimizer import _constant_folding

from edgeprune.passes.base import EdgePass, EdgePassResult

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class CleanupConfig:
    fold_constants: bool = True
    """Fold constant subgraphs (shape computations in particular)."""
    iterations: int = 2
    """Optimizer sweeps; two reach a fixed point on the exports we have seen."""


def _optimizer_passes(iterations: int) -> list[ir.passes.PassBase]:
    """What ``onnxscript.optimizer.optimize_ir(model, num_iterations=iterations)`` runs, defaults kept."""
    return [
        common.InlinePass(),
        ir.passes.PassManager(
            [
                _constant_folding.FoldConstantsPass(
                    shape_inference=True,
                    input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                    output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
                ),
                rewriter.RewritePass(rewriter._DEFAULT_REWRITE_RULES),  # noqa: SLF001 - optimize_ir's own rules
                common.RemoveUnusedNodesPass(),
                common.RemoveUnusedFunctionsPass(),
                common.RemoveUnusedOpsetsPass(),
            ],
            steps=iterations,
            early_stop=True,
        ),
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    ]


def cleanup_sequence(config: CleanupConfig) -> ir.passes.Sequential:
    """The passes cleanup runs, as one in-place ``Sequential``."""
    optimizer = _optimizer_passes(config.iterations) if config.fold_constants else []
    return ir.passes.Sequential(
        *optimizer,
        common.IdentityEliminationPass(),
        common.DeduplicateInitializersPass(),
        common.RemoveUnusedNodesPass(),
    )


class CleanupPass(EdgePass):
    """Fold constants and remove dead nodes, identities and duplicate weights."""

    name = "cleanup"
    Config = CleanupConfig

    def call(self, model: ir.Model) -> EdgePassResult:
        before = collections.Counter(node.op_type for node in model.graph)
        result = cleanup_sequence(self.config)(model)
        after = collections.Counter(node.op_type for node in model.graph)
        removed = {op: before[op] - after[op] for op in before if before[op] != after[op]}
        summary = {"nodes_before": sum(before.values()), "nodes_after": sum(after.values()), "removed_by_op": removed}
        logger.info("cleanup: %d -> %d nodes (modified: %s)", summary["nodes_before"], summary["nodes_after"], result.modified)
        return EdgePassResult(model, modified=result.modified, summary=summary)
