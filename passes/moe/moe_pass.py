"""The ``moe`` pass: score experts on the calibration data's routing, keep the best under a global budget, remove the rest.

``keep`` is a fraction of all experts (a float in (0, 1]) or a count per layer (an int).  With a
fraction and ``allocation = "global"`` the budget is spread across layers by one ranking of each
expert's share of its layer's total score (so layers whose routing is concentrated give up more),
after each layer keeps its ``min_keep`` best; ``"uniform"`` keeps the same count in every layer.
Removal is physical in every supported form (``remove``); layers the analysis could not take
apart are refused with the analysis's own sentence.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, ShapeInferencePass

from edgeprune.analysis import analyze
from edgeprune.analysis.moe import MoELayer
from edgeprune.errors import BadInputError, UnsupportedModelError
from edgeprune.model_io import param_count
from edgeprune.passes.base import EdgePass, EdgePassResult
from edgeprune.passes.moe import remove
from edgeprune.passes.moe.scores import METRICS, RouterStats, collect_router_stats, score

logger = logging.getLogger(__name__)

ALLOCATIONS = ("global", "uniform")
_REMOVE = {"loop": remove.remove_loop, "dense": remove.remove_dense, "fused": remove.remove_fused}


@dataclasses.dataclass
class MoEConfig:
    keep: float | int = 1.0
    """A float in (0, 1]: share of all experts kept; an int >= 1: experts kept per layer."""
    metric: str = "tcess"
    """tcess (PreMoe), easy (EASY-EP, gate weight x expert-output norm) or frequency."""
    allocation: str = "global"
    """global (one ranking of per-layer score shares) or uniform (same count per layer)."""
    min_keep: int = 1
    """Experts every layer keeps at least."""

    def __post_init__(self) -> None:
        keep = self.keep
        if isinstance(keep, bool) or not isinstance(keep, (int, float)):
            raise BadInputError(f"moe keep must be a number, got {keep!r}: e.g. keep = 0.5 keeps half the experts, keep = 4 keeps 4 per layer.")
        if isinstance(keep, float) and not 0 < keep <= 1:
            raise BadInputError(f"moe keep as a fraction must be in (0, 1], got {keep}: e.g. keep = 0.5 keeps half the experts.")
        if isinstance(keep, int) and keep < 1:
            raise BadInputError(f"moe keep as a count must be >= 1 expert per layer, got {keep}.")
        if not isinstance(self.metric, str) or self.metric not in METRICS:
            raise BadInputError(f"unknown moe metric {self.metric!r}: choose one of {', '.join(METRICS)}.")
        if not isinstance(self.allocation, str) or self.allocation not in ALLOCATIONS:
            raise BadInputError(f"unknown moe allocation {self.allocation!r}: choose one of {', '.join(ALLOCATIONS)}.")
        if isinstance(self.min_keep, bool) or not isinstance(self.min_keep, int) or self.min_keep < 1:
            raise BadInputError(f"moe min_keep must be an int >= 1, got {self.min_keep!r}.")


def allocate(scores: list[np.ndarray], keep: float | int, allocation: str = "global", min_keep: int = 1) -> list[np.ndarray]:
    """Sorted indices of the experts each layer keeps.  Pure: scores in, choices out; ties go to the lower index."""
    sizes = [len(s) for s in scores]
    order = [np.lexsort((np.arange(len(s)), -np.asarray(s, dtype=np.float64))) for s in scores]
    if isinstance(keep, int):
        counts = [min(keep, n) for n in sizes]
    elif allocation == "uniform":
        counts = [min(n, max(min_keep, int(round(keep * n)))) for n in sizes]
    else:
        budget = int(round(keep * sum(sizes)))
        counts = [min(min_keep, n) for n in sizes]
        shares = []
        for layer, s in enumerate(scores):
            s = np.asarray(s, dtype=np.float64)
            total = s.sum()
            share = s / total if total > 0 else np.full(len(s), 1.0 / len(s))
            shares += [(-share[i], layer, rank) for rank, i in enumerate(order[layer]) if rank >= counts[layer]]
        shares.sort()
        left = budget - sum(counts)
        for _, layer, _rank in shares:
            if left <= 0:
                break
            counts[layer] += 1  # shares fall with rank inside a layer, so each layer's picks stay a prefix of its order
            left -= 1
    return [np.sort(order[layer][: counts[layer]]) for layer in range(len(scores))]


class MoEExpertPruningPass(EdgePass):
    """Remove the experts the calibration data routes to least, in every MoE layer, with their router rows."""

    name = "moe"
    Config = MoEConfig

    @classmethod
    def describe(cls, model: ir.Model) -> dict[str, Any] | None:
        layers = analyze(model).moe_layers
        if not layers:
            return None
        lines = [
            f"MoE layer {m.layer}: {m.form} form, {m.num_experts} experts, top-{m.top_k}"
            + (", renormalised" if m.normalize else "") + (f"; not prunable: {m.problem}" if m.problem else "")
            for m in layers
        ]  # fmt: skip
        return {"summary": lines, "fields": {"moe_layers": [m.to_dict() for m in layers]}}

    def relaxed(self, last: EdgePassResult | None = None) -> MoEExpertPruningPass | None:
        keep = self.config.keep
        if isinstance(keep, int):
            return None
        looser = round(1 - (1 - keep) * 0.75, 4)
        if looser >= 0.99:
            return None
        return MoEExpertPruningPass(dataclasses.replace(self.config, keep=looser), self.context)

    def call(self, model: ir.Model) -> EdgePassResult:
        cfg = self.config
        layers = analyze(model).moe_layers
        if not layers:
            raise UnsupportedModelError("the moe pass found no MoE layer (router -> TopK, or com.microsoft.MoE) in the model: drop --moe-keep for this model.")
        for layer in layers:
            if layer.problem:
                raise UnsupportedModelError(layer.problem)
            if not layer.prunable:
                raise UnsupportedModelError(
                    f"MoE layer {layer.layer} ({layer.node}) has a router but its experts were not found in a form the moe pass "
                    "can remove (optimum's expert loop, gpt-oss's dense form, or com.microsoft.MoE/QMoE)."
                )
        if cfg.keep == 1.0 and not isinstance(cfg.keep, int):
            return EdgePassResult(model, modified=False, summary={"keep": 1.0, "note": "keep 1.0: no expert removed"})
        stats = self.router_stats(model, layers)
        scores = [score(s, cfg.metric) for s in stats]
        keeps = allocate(scores, cfg.keep, cfg.allocation, cfg.min_keep)
        before = param_count(model)
        records = []
        modified = False
        for layer, s, values, keep in zip(layers, stats, scores, keeps):
            k = layer.top_k
            if len(keep) < layer.num_experts:
                k = _REMOVE[layer.form](model.graph, layer, keep)
                modified = True
            records.append(_record(layer, s, values, keep, k))
        if modified:
            RemoveUnusedNodesPass()(model)
            _clear_intermediate_shapes(model)
            ShapeInferencePass(strict_mode=False)(model)
        after = param_count(model)
        summary = {
            "keep": cfg.keep, "metric": cfg.metric, "allocation": cfg.allocation,
            "experts_before": sum(m.num_experts for m in layers), "experts_after": int(sum(len(k) for k in keeps)),
            "params_before": before, "params_after": after, "calibration_tokens": stats[0].tokens if stats else 0,
            "per_layer_chart": {"y": "kept_fraction", "ylabel": "kept experts (fraction)"},
        }  # fmt: skip
        summary["headline"] = (
            f"moe: kept {summary['experts_after']} of {summary['experts_before']} experts ({cfg.metric}, {cfg.allocation}); per layer "
            + ", ".join(f"{r['units_after']}/{r['units_before']}" for r in records)
        )
        logger.info("moe: %d -> %d experts, %d -> %d params", summary["experts_before"], summary["experts_after"], before, after)
        return EdgePassResult(model, modified=modified, records=records, summary=summary)

    def router_stats(self, model: ir.Model, layers: list[MoELayer]) -> list[RouterStats]:
        if self.context is None:
            raise BadInputError("the moe pass scores experts by how the calibration data routes: pass calibration samples (--calib).")
        with self.context.progress.stage(f"router statistics for {len(layers)} MoE layers"):
            return collect_router_stats(model, layers, self.context.calibration, threads=self.context.threads)


def _record(layer: MoELayer, stats: RouterStats, values: np.ndarray, keep: np.ndarray, k: int | None) -> dict:
    return {
        "layer": f"moe.{layer.layer}", "index": layer.layer, "kind": "experts", "form": layer.form,
        "units_before": layer.num_experts, "units_after": int(len(keep)), "kept": [int(i) for i in keep],
        "kept_fraction": len(keep) / layer.num_experts, "top_k_before": layer.top_k, "top_k_after": k,
        "scores": [float(v) for v in values], "frequency": stats.frequency.tolist(), "tokens": stats.tokens,
    }  # fmt: skip


def _clear_intermediate_shapes(model: ir.Model) -> None:
    """Shapes recorded before the edit may carry the old expert count or k; shape inference fills them again."""
    outputs = {id(v) for v in model.graph.outputs}
    for node in model.graph:
        for value in node.outputs:
            if id(value) not in outputs:
                value.shape = None


