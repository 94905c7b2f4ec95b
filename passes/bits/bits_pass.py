"""Bit allocation: give each weight-bearing node the storage format its measured sensitivity deserves.

The pass is a short driver: ``units`` finds the weight-bearing nodes (a table tied to the LM head
is one joint unit) and their option grid per target, ``measure`` gives each option's relative
output error and each node's importance, ``solve`` turns the budget (``size_budget_bytes``,
``avg_bits``, ``latency_budget_ms`` / ``latency_budget_ratio``) into a multiple-choice knapsack,
``latency`` adds microbenchmarked latencies and checks the emitted model by measurement, and
``emit`` writes the choice through ONNX Runtime's own quantizers.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import onnx_ir as ir

from edgeprune.analysis import analyze
from edgeprune.model_io import model_bytes
from edgeprune.passes.base import EdgePass, EdgePassResult
from edgeprune.passes.bits import config as config_mod
from edgeprune.passes.bits import latency, measure, solve, units as units_mod
from edgeprune.passes.bits.config import BitAllocationConfig
from edgeprune.passes.bits.sensitivity import KEEP

logger = logging.getLogger(__name__)

__all__ = ["BitAllocationConfig", "BitAllocationPass"]


@dataclasses.dataclass
class BitsResult(EdgePassResult):
    """The pass's result, plus whether the budget allowed the float model (no back-off can do better)."""

    float_reached: bool = False


class BitAllocationPass(EdgePass):
    """Choose a storage format per weight-bearing node under a size/latency budget; emit with ORT's tools."""

    name = "bits"
    Config = BitAllocationConfig

    def relaxed(self, last: EdgePassResult | None = None) -> BitAllocationPass | None:
        """The next budget up; None once the last run already kept every weight in float."""
        c = self.config
        if c.mode == "uniform":
            nxt = {2: 4, 4: 8}.get(c.bits or 0)
            return None if nxt is None else BitAllocationPass(dataclasses.replace(c, bits=nxt), self.context)
        grow = 1.0 + c.relax_step
        if c.size_budget_bytes is not None:
            new = dataclasses.replace(c, size_budget_bytes=int(c.size_budget_bytes * grow))
        elif c.avg_bits is not None:
            if c.avg_bits >= 32:
                return None
            new = dataclasses.replace(c, avg_bits=min(32.0, c.avg_bits * grow))
        elif c.latency_budget_ms is not None:
            new = dataclasses.replace(c, latency_budget_ms=c.latency_budget_ms * grow)
        elif c.latency_budget_ratio is not None:
            if c.latency_budget_ratio >= 1.0:
                return None
            new = dataclasses.replace(c, latency_budget_ratio=min(1.0, c.latency_budget_ratio * grow))
        else:
            return None
        if isinstance(last, BitsResult) and last.float_reached:
            return None
        return BitAllocationPass(new, self.context)

    def call(self, model: ir.Model) -> BitsResult:
        c, ctx = self.config, self.context
        config_mod.check(c, ctx)
        kinds, notes = units_mod.formats_for(ctx.target if ctx is not None else None, c)
        structures = analyze(model)
        units, skipped = units_mod.build(model, structures, c, kinds, notes)
        if not units:
            notes.append("no weight-bearing node with a constant float weight was found: nothing to quantize")
            return BitsResult(model, modified=False, summary={"notes": notes, **skipped})
        stats = measure.measure(model, units, ctx)
        if c.importance == "residual":
            measure.residual_importance(model, structures, units, ctx, stats)
        elif c.importance == "measured":
            measure.measured_importance(model, units, ctx, stats)
        float_unit_bytes = sum(u.float_size for u in units)
        other_bytes = model_bytes(model) - float_unit_bytes
        rows, shared, latency_info = solve.items(units), [], {}
        if c.latency_bounded and c.mode == "auto":
            rows, shared, latency_info = latency.with_latency(model, units, rows, c, ctx)
        bud = solve.budget(c, units, other_bytes, rows, latency_info)
        summary: dict[str, Any] = {
            "mode": c.mode, "units": len(units), **skipped, "float_unit_bytes": float_unit_bytes,
            "other_bytes": other_bytes, "formats_offered": sorted({o.key for u in units for p in u.parts for o in p.options}),
            "per_layer_chart": {"y": "bits", "ylabel": "bits per weight"}, "latency": latency_info or None,
        }  # fmt: skip
        if bud.get("noop"):
            notes.append(bud["noop"])
            summary["notes"] = notes
            return BitsResult(model, modified=False, records=units_mod.records(units, solve.float_choice(units)),
                              summary=summary, float_reached=True)
        sol = solve.choose(c, units, rows, shared, bud, notes)
        if c.mode != "uniform":
            summary["tradeoff"] = solve.curve(rows, shared, bud, other_bytes, c.solver)
        plan = units_mod.plan(units, sol.choice)
        if all(o.kind == KEEP for o in plan.values()):
            notes.append("the solver kept every unit float: the budget allows the float model")
            summary["notes"] = notes
            return BitsResult(model, modified=False, records=units_mod.records(units, sol.choice), summary=summary,
                              float_reached=True)

        def emit(p):
            return self._emit(model, units, p, stats)

        new, log = emit(plan)
        if bud.get("latency") is not None:
            sol, new, log, summary["latency_check"] = latency.meet(model, units, rows, shared, bud, latency_info, sol,
                                                                    new, log, notes, c, ctx, emit)
        summary.update(solver=sol.method, objective=sol.error, unit_bytes=int(sol.size), solver_note=sol.note,
                       budget=bud.get("text"), floor=bud.get("floor_text"))
        if sol.latency:
            summary["predicted_latency_ms"] = sol.latency + latency_info.get("rest_ms", 0.0)
        records = units_mod.records(units, sol.choice)
        measure.output_checks(model, units, sol.choice, records, ctx, c.output_checks, stats)
        measure.block_cosines(model, structures, records, ctx)
        model.graph = new.graph
        model.ir_version = new.ir_version
        summary.update(emit=log, weight_bytes_after=model_bytes(model),
                       avg_bits=8.0 * sol.size / sum(u.params for u in units))
        summary["notes"] = notes
        logger.info("bits: %d units, %.2f avg bits, %.1f MB of weights", len(units), summary["avg_bits"], summary["weight_bytes_after"] / 1e6)
        return BitsResult(model, modified=True, records=records, summary=summary)

    def _emit(self, model: ir.Model, units, plan, stats):
        from edgeprune.passes.bits.emit import emit

        with measure.stage(self.context, "emit through ORT's quantizers"):
            grams = {p.node: stats[p.input].gram for u in units for p in u.parts if plan[p.node].kind == "gptq"}
            rows = self.context.calibration.samples if any(o.kind == "qdq" for o in plan.values()) else None
            return emit(model, plan, accuracy_level=self.config.accuracy_level, grams=grams, calibration=rows)
