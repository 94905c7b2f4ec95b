"""Bit allocation: give each weight-bearing node the storage format its measured sensitivity deserves.

The pass is a short driver: ``units`` finds the weight-bearing nodes (a table tied to the LM head
is one joint unit) and their option grid per target, ``measure`` gives each option's relative
output error and each node's importance, ``solve`` turns the budget (``size_budget_bytes``,
``avg_bits``, ``latency_budget_ms`` / ``latency_budget_ratio``) into a multiple-choice knapsack,
``latency`` adds microbenchmarked latencies and checks the emitted model by measurement, and
``emit`` writes the choice through ONNX Runtime's own quantizers.  Mode ``fast`` (the default
recipe's, no budget) skips the knapsack: each node takes the target's fast format where the
microbenchmarks time it faster than float, and the accuracy back-off returns the nodes of largest
measured output error to float.  Weights someone already quantized are counted and left alone.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
from typing import Any

import onnx_ir as ir

from edgeprune.analysis import analyze
from edgeprune.errors import BadInputError
from edgeprune.model_io import file_size, model_bytes, save_model
from edgeprune.passes.base import EdgePass, EdgePassResult
from edgeprune.passes.bits import config as config_mod
from edgeprune.passes.bits import knapsack, latency, measure, solve, units as units_mod
from edgeprune.passes.bits.config import BitAllocationConfig
from edgeprune.passes.bits.sensitivity import KEEP
from edgeprune.validation import decode_cache

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
        if c.mode == "fast":  # keep float the nodes above half the worst output error the last run chose
            errors = [math.sqrt(r["importance"]) * r["rel_error"] for r in (last.records if last is not None else [])
                      if r["format"] != "float"]
            if not errors:
                return None
            return BitAllocationPass(dataclasses.replace(c, max_output_error=max(errors) / 2), self.context)
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
        elif not c.decode_bounded or (c.decode_budget_ratio or 0.0) >= 1.0:
            return None
        else:
            new = c
        if c.decode_budget_ms is not None:  # grown with any other budget: either may be the one that binds
            new = dataclasses.replace(new, decode_budget_ms=c.decode_budget_ms * grow)
        elif c.decode_budget_ratio is not None:
            new = dataclasses.replace(new, decode_budget_ratio=min(1.0, c.decode_budget_ratio * grow))
        if isinstance(last, BitsResult) and last.float_reached:
            return None
        return BitAllocationPass(new, self.context)

    def call(self, model: ir.Model) -> BitsResult:
        ctx = self.context
        config_mod.check(self.config, ctx)
        self.config = c = self.config.for_target(ctx.target if ctx is not None else None)
        if c.decode_bounded:
            decode_cache(model)  # refuses a model without a KV cache before anything is measured
        kinds, notes = units_mod.formats_for(ctx.target if ctx is not None else None, c)
        structures = analyze(model)
        units, skipped = units_mod.build(model, structures, c, kinds, notes)
        done = skipped["already_quantized"]
        headline = None
        if done["weights"]:
            headline = "bits: " + next(n for n in notes if n.startswith("already quantized")) if c.mode != "fast" else (
                f"bits: the model is already quantized ({done['weights']} of {done['of']} weights), so the default "
                f"leaves it as it is; pass --bits 8 or --bits auto --size-budget SIZE to quantize the other {len(units)}")
        if not units or (c.mode == "fast" and done["weights"]):
            if not units:
                notes.append("no weight-bearing node with a constant float weight was found: nothing to quantize")
            return BitsResult(model, modified=False, summary={"notes": notes, "headline": headline, **skipped})
        float_unit_bytes = sum(u.float_size for u in units)
        # A size budget bounds the written files: everything but the units' weights (graph, other
        # initializers, serialization) is measured by writing the model once.
        other_bytes = (written_bytes(model) if c.size_budget_bytes is not None and c.mode == "auto"
                       else model_bytes(model)) - float_unit_bytes
        measure.sizes(units)
        solve.check_floor(c, units, other_bytes)  # shapes alone: before any measuring
        summary: dict[str, Any] = {
            "mode": c.mode, "units": len(units), **skipped, "float_unit_bytes": float_unit_bytes,
            "other_bytes": other_bytes, "formats_offered": sorted({o.key for u in units for p in u.parts for o in p.options}),
            "per_layer_chart": {"y": "bits", "ylabel": "bits per weight"}, "headline": headline,
        }  # fmt: skip
        if c.mode == "fast":
            return self._fast(model, structures, units, summary, notes)
        stats = measure.measure(model, units, ctx)
        if c.importance == "residual":
            measure.residual_importance(model, structures, units, ctx, stats)
        elif c.importance == "measured":
            measure.measured_importance(model, units, ctx, stats)
        rows, shared, latency_info = solve.items(units), [], {}

        emitted: dict = {}

        def emit(p):
            """The plan emitted, or the last emission when the plan is the same (the decode calibration's fastest
            choice is often the one chosen: a SmolLM2 emit takes about a minute)."""
            key = frozenset(p.items())
            if key not in emitted:
                emitted.clear()
                emitted[key] = self._emit(model, units, p, stats)
            return emitted[key]

        if (c.latency_bounded or c.decode_bounded or c.speed_ties) and c.mode == "auto":
            plain = rows
            rows, shared, latency_info = latency.with_latency(model, units, plain, c, ctx)
            if c.latency_budget_ratio is not None and not c.latency_implicit and solve.latency_floor_missed(c, rows, latency_info):
                # Below the predicted floor: refused unless timings taken again agree.  Under a load spike the small
                # nodes' microbenchmarks slow down more than the float model (MiniLM: the fastest choice predicted at
                # 0.67x of float, 0.5x a few minutes later), so a reachable ratio looked out of reach.
                first = latency_info["float_ms"], solve.latency_floor(rows, latency_info)
                rows, shared, latency_info = latency.with_latency(model, units, plain, c, ctx, retime=True)
                notes.append(f"the latency budget looked out of reach ({c.latency_budget_ratio:g} x {first[0]:.1f} ms "
                             f"against a predicted {first[1]:.1f} ms at the fastest): every timing was taken again")
        if c.decode_bounded and c.mode == "auto":
            rows, shared = latency.calibrate_decode(model, units, rows, shared, latency_info, c, ctx, emit)
        bud = solve.budget(c, units, other_bytes, rows, latency_info)
        if bud.get("note"):
            notes.append(bud["note"])
        summary["latency"] = latency_info or None
        if bud.get("noop"):
            notes.append(bud["noop"])
            summary["notes"] = notes
            return BitsResult(model, modified=False, records=units_mod.records(units, solve.float_choice(units)),
                              summary=summary, float_reached=True)
        sol = solve.choose(c, units, rows, shared, bud, notes)
        if c.speed_ties:
            sol = solve.speed_ties(rows, shared, bud, sol, _slack(c, units), c.solver)
        if c.mode != "uniform":
            summary["tradeoff"] = solve.curve(rows, shared, bud, other_bytes, c.solver)
        plan = units_mod.plan(units, sol.choice)
        if all(o.kind == KEEP for o in plan.values()):
            notes.append("the solver kept every unit float: the budget allows the float model")
            summary["notes"] = notes
            return BitsResult(model, modified=False, records=units_mod.records(units, sol.choice), summary=summary,
                              float_reached=True)

        new, log = emit(plan)
        if bud.get("latency") is not None:
            sol, new, log, summary["latency_check"] = latency.meet(model, units, rows, shared, bud, latency_info, sol,
                                                                    new, log, notes, c, ctx, emit)
        if bud.get("decode") is not None:  # after prefill's, keeping its (tightened) budget in every re-solve
            before = sol.choice
            sol, new, log, summary["decode_check"] = latency.meet(model, units, rows, shared, bud, latency_info, sol,
                                                                   new, log, notes, c, ctx, emit, dim="decode")
            if bud.get("latency") is not None and sol.choice != before:  # another model now: its prefill measured again
                sol, new, log, summary["latency_check"] = latency.meet(model, units, rows, shared, bud, latency_info, sol,
                                                                        new, log, notes, c, ctx, emit)
        if c.size_budget_bytes is not None and c.mode == "auto":
            sol, new, log, summary["size_check"] = self._fit_file(model, units, rows, shared, bud, other_bytes, sol, new,
                                                                  log, notes, emit)
        if c.latency_implicit and bud.get("latency") is not None:
            sol, new, log, summary["implied_bound_check"], size_check = self._check_implied_bound(
                model, units, rows, shared, bud, other_bytes, sol, new, log, notes, emit)
            if size_check is not None:
                summary["size_check"] = size_check
        summary.update(solver=sol.method, objective=sol.error, unit_bytes=int(sol.size), solver_note=sol.note,
                       budget=bud.get("text"), floor=bud.get("floor_text"))
        if sol.latency:
            summary["predicted_latency_ms"] = sol.latency + latency_info.get("rest_ms", 0.0)
        if sol.decode:
            summary["predicted_decode_ms"] = sol.decode + latency_info["decode"]["rest_ms"]
        return self._finish(model, structures, units, sol.choice, new, log, stats, summary, notes)

    def _check_implied_bound(self, model, units, rows, shared, bud, other_bytes, sol, new, log, notes, emit):
        """Keep the speed bound a size budget implies (``no_slower``) only where accuracy allows it, by measurement.

        The solver's error model adds per-node errors; a mix of many dynamic int8 nodes (which the bound
        favours: on a CPU they are the formats faster than float at prefill) compounds beyond that sum
        (SmolLM2 at 104.8 MB: predicted objective 1 % above the unbounded mix's, held-back perplexity ratio
        1.128 against 1.034).  So the emitted model is run on the held-back rows; if it is under the default
        fidelity floor, the least-error choice of the same size is emitted and run too, and replaces it when
        that one holds the floor or, where both miss, misses it by less: accuracy the budget already costs is not
        spent on speed (SmolLM2 at onnxruntime-genai int4's size: held-back perplexity ratio 1.185 bounded, 1.112
        not; WikiText-2 23.79 bounded).  An explicit --latency-budget is never given up.
        Returns (solution, model, log, the check's record, the replacement's size check)."""
        from edgeprune.fidelity import below_default_floor

        measured = self.context.held_back_fidelity(as_written(model, new))
        if measured is None:  # outside a compile: no held-back reference
            return sol, new, log, None, None
        missed = below_default_floor(measured)
        record: dict[str, Any] = {"bounded": [fl.to_dict(f) for fl, f in missed] or "holds the default floor"}
        if not missed:
            return sol, new, log, record, None
        free = dict(bud, latency=None)
        alt = solve.within(rows, free, shared, self.config.solver)
        if not alt.feasible or alt.choice == sol.choice:
            record["unbounded"] = "the same choice" if alt.feasible else "no choice fits"
            return sol, new, log, record, None
        alt_new, alt_log = emit(units_mod.plan(units, alt.choice))
        size_check = None
        if self.config.size_budget_bytes is not None:
            alt, alt_new, alt_log, size_check = self._fit_file(model, units, rows, shared, free, other_bytes, alt, alt_new,
                                                      alt_log, [], emit)
        alt_missed = below_default_floor(self.context.held_back_fidelity(as_written(model, alt_new)))
        record["unbounded"] = [fl.to_dict(f) for fl, f in alt_missed] or "holds the default floor"
        if alt_missed and _shortfall(alt_missed) >= _shortfall(missed):
            notes.append(f"no slower than float (the size budget's implied bound) was kept: the least-error choice of "
                         f"the same size misses the default floor by as much ({_describe(alt_missed)} vs {_describe(missed)})")
            return sol, new, log, record, None
        held = f"misses the default floor by less ({_describe(alt_missed)})" if alt_missed else "holds the default floor"
        notes.append(f"no slower than float (the size budget's implied bound) gave way: with it the held-back "
                     f"{_describe(missed)}; the least-error choice of the same size {held}")
        record["replaced"] = True
        return alt, alt_new, alt_log, record, size_check

    def _fit_file(self, model, units, rows, shared, bud, other_bytes, sol, new, log, notes, emit):
        """Write the emitted model and re-solve with the unit budget cut by the overshoot while its files
        exceed ``size_budget_bytes`` (emitting adds nodes, scales' names, Reshape shapes: bytes no
        option size counts).  Returns (solution, model, log, the check's record: predicted vs written)."""
        c = self.config
        budget = c.size_budget_bytes
        unit_budget = bud["size"]
        attempts = []
        for _ in range(4):
            written = written_bytes(as_written(model, new))
            attempts.append({"unit_budget": int(unit_budget), "predicted_bytes": int(sol.size + other_bytes),
                             "written_bytes": written})
            if written <= budget:
                break
            unit_budget = min(unit_budget, sol.size) - (written - budget)
            tighter = dict(bud, size=unit_budget)
            fits = unit_budget >= knapsack.floor(rows)
            nxt = solve.within(rows, bud, shared, c.solver, size_budget=unit_budget) if fits else None
            if fits and not nxt.feasible and c.latency_implicit:  # an implied bound gives way: the least error that fits
                nxt = solve.within(rows, bud, shared, c.solver, size_budget=unit_budget, latency_budget=None)
                if nxt.feasible:
                    notes.append("the written size left no choice as fast as float: the least-error choice that fits "
                                 "is emitted")
            if fits and not nxt.feasible and (bud.get("latency") is not None or bud.get("decode") is not None):
                by = "decode" if bud.get("decode") is not None else "latency"  # the file bounds first: the fastest
                nxt = solve.fastest(rows, shared, unit_budget, c.solver, by=by)  # choice that fits (the report measures it)
                notes.append(f"the written size left no choice within the {by} budget: the fastest choice that fits "
                             "the size is emitted")
            if nxt is None or not nxt.feasible:
                break
            if c.speed_ties:
                nxt = solve.speed_ties(rows, shared, tighter, nxt, _slack(c, units), c.solver)
            sol = nxt
            new, log = emit(units_mod.plan(units, sol.choice))
        met = attempts[-1]["written_bytes"] <= budget
        last = attempts[-1]
        if not met:
            raise BadInputError(
                f"the size budget {budget / 1e3:.1f} kB cannot be met once written: the smallest choice writes "
                f"{last['written_bytes'] / 1e3:.1f} kB (graph and quantizer initializers included); raise --size-budget "
                f"to at least {last['written_bytes'] / 1e3 + 0.05:.1f} kB.")
        notes.append(f"size: predicted {last['predicted_bytes'] / 1e6:.3f} MB, written {last['written_bytes'] / 1e6:.3f} MB "
                     f"against the budget {budget / 1e6:.3f} MB" + (f" ({len(attempts)} emits)" if len(attempts) > 1 else ""))
        return sol, new, log, {"budget_bytes": budget, "met": met, "attempts": attempts}

    def _finish(self, model, structures, units, choice, new, log, stats, summary, notes) -> BitsResult:
        """Cross-checks into the records, the emitted graph into ``model``, the summary's totals."""
        ctx = self.context
        records = units_mod.records(units, choice)
        measure.output_checks(model, units, choice, records, ctx, self.config.output_checks, stats)
        measure.block_cosines(model, structures, records, ctx)
        size = sum(u.size(u.combos()[i]) for u, i in zip(units, choice))
        if "size_check" in summary:
            summary["written_bytes"] = summary["size_check"]["attempts"][-1]["written_bytes"]
            summary["predicted_bytes"] = summary["size_check"]["attempts"][-1]["predicted_bytes"]
        else:  # the solver's bytes plus everything else the float model writes, against the file written
            summary["predicted_bytes"] = int(size + written_bytes(model) - sum(u.float_size for u in units))
            summary["written_bytes"] = written_bytes(as_written(model, new))
        model.graph = new.graph
        model.ir_version = new.ir_version
        summary.update(emit=log, weight_bytes_after=model_bytes(model), avg_bits=8.0 * size / sum(u.params for u in units))
        summary["notes"] = notes
        logger.info("bits: %d units, %.2f avg bits, %.1f MB of weights", len(units), summary["avg_bits"], summary["weight_bytes_after"] / 1e6)
        return BitsResult(model, modified=True, records=records, summary=summary)

    def _fast(self, model, structures, units, summary, notes) -> BitsResult:
        """Fast mode: the target's fast format per weight, dynamic int8 only where it times faster, float
        where the estimated output error exceeds ``max_output_error``; the latency decision comes first,
        so a model where float is fastest everywhere is neither measured nor emitted."""
        c, ctx = self.config, self.context
        table = None
        if any(o.kind == "int8-dynamic" and p.op in ("MatMul", "Gemm") for u in units for p in u.parts for o in p.options):
            from edgeprune.passes.bits import microbench

            with measure.stage(ctx, "latency microbenchmarks per shape (float vs dynamic int8)"):
                table = microbench.unit_latencies(units, ctx.target, tokens=c.latency_tokens, threads=ctx.threads,
                                                  gathers=False)
        slow = solve.fast_wanted(units, table)
        measured = len(slow) < sum(len(u.parts) for u in units)
        stats = measure.measure(model, units, ctx) if measured else {}
        if measured and c.importance == "measured":  # ranks the nodes by what they do to the model's output
            measure.measured_importance(model, units, ctx, stats)
        choice, kept = solve.fast_choice(c, units, slow)
        summary["headline"] = _fast_headline(units, choice, kept, c)
        summary["kept_float"] = dict(sorted(kept.items()))
        if not measured or all(o.kind == KEEP for o in units_mod.plan(units, choice).values()):
            summary["notes"] = notes
            return BitsResult(model, modified=False, records=units_mod.records(units, choice) if measured else [],
                              summary=summary, float_reached=True)
        new, log = self._emit(model, units, units_mod.plan(units, choice), stats)
        return self._finish(model, structures, units, choice, new, log, stats, summary, notes)

    def _emit(self, model: ir.Model, units, plan, stats):
        from edgeprune.passes.bits.emit import emit

        with measure.stage(self.context, "emit through ORT's quantizers"):
            grams = {p.node: stats[p.input].gram for u in units for p in u.parts
                     if plan[p.node].kind == "gptq" or plan[p.node].rounding == "wmse"}
            rows = self.context.calibration.samples if any(o.kind == "qdq" for o in plan.values()) else None
            return emit(model, plan, accuracy_level=self.config.accuracy_level, grams=grams, calibration=rows)


def _describe(missed) -> str:
    """The outputs under their floors, as the notes name them."""
    return "; ".join(fl.describe(f) for fl, f in missed)


def _shortfall(missed) -> float:
    """How far the worst output is under its floor, as a fraction of the floor's limit (0 where every floor holds)."""
    return max((abs(fl.value(f) - fl.limit) / fl.limit for fl, f in missed), default=0.0)


def _slack(c: BitAllocationConfig, units) -> float:
    """The objective allowance ``speed_ties`` may spend on speed: ``speed_slack^2`` per unit of importance."""
    return c.speed_slack ** 2 * sum(p.importance for u in units for p in u.parts)


def as_written(model: ir.Model, new: ir.Model) -> ir.Model:
    """The model the pass hands on: ``new``'s graph and IR version in ``model``'s frame (``_finish`` keeps
    ``model``'s producer and metadata, where the quantizers wrote their own: ~55 bytes)."""
    return ir.Model(new.graph, ir_version=new.ir_version, producer_name=model.producer_name,
                    producer_version=model.producer_version, domain=model.domain, model_version=model.model_version,
                    doc_string=model.doc_string, functions=list(model.functions.values()),
                    metadata_props=dict(model.metadata_props))


def written_bytes(model: ir.Model) -> int:
    """Bytes of the files ``model_io.save_model`` writes for ``model`` (external data included)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="edgeprune_bits_size_") as tmp:
        path = pathlib.Path(tmp) / "model.onnx"
        save_model(model, path)
        return file_size(path)


_FAST_NAMES = {"int8-dynamic": "dynamic int8", "qdq": "static QDQ int8", "gather-nbits": "4-bit GatherBlockQuantized"}


def _fast_headline(units, choice, kept: dict[str, str], c: BitAllocationConfig) -> str:
    """One sentence for the summary: what the default did, what it kept float and why, how to ask for more."""
    counts: dict[str, int] = {}
    for u, i in zip(units, choice):
        for p, o in zip(u.parts, u.combos()[i]):
            if o.kind != KEEP:
                what = {"Conv": "Conv", "Gather": "embedding"}.get(p.op, "MatMul/Gemm")
                key = f"{_FAST_NAMES.get(o.kind, o.key)} on {{n}} {what}"
                counts[key] = counts.get(key, 0) + 1
    total = sum(len(u.parts) for u in units)
    slow = sum(1 for why in kept.values() if why == "slower")
    lossy = sum(1 for why in kept.values() if why == "lossy")
    other = len(kept) - slow - lossy
    reasons = [f"{slow} faster in float"] if slow else []
    if lossy:
        reasons.append(f"{lossy} above the output error bound {c.max_output_error:.3g}")
    if other:
        reasons.append(f"{other} without a fast format")
    if not counts:
        why = f"float is the fastest format for all {total} weights here" if slow == total else f"{', '.join(reasons)}"
        return f"bits: nothing quantized: {why}; for a smaller model, pass --bits auto --size-budget SIZE or --prune 0.2"
    done = "; ".join(k.format(n=n) for k, n in counts.items())
    if kept:
        done += f"; float kept for {len(kept)} ({', '.join(reasons)})"
    return f"bits: {done}; for more, add --prune 0.2 or --bits auto --size-budget SIZE"
