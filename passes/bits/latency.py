"""Latency budgets: per-option latencies from the cached microbenchmarks (knapsack rows plus one
shared DynamicQuantizeLinear per input), then the emitted model measured against the float one and
re-solved tighter on a miss.  Prefill (``latency``: ``latency_tokens`` tokens) and, for a decode budget
on a KV-cache model, one decode step (``decode``: one token, microbenchmarked at one token and measured
after ``decode_context`` cached positions) are two dimensions of the same rows.  Everything that times
things lives here, apart from the measuring of errors, so size-budget runs never touch a clock."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from edgeprune.passes.bits import knapsack, solve
from edgeprune.passes.bits.config import BitAllocationConfig
from edgeprune.passes.bits.measure import stage
from edgeprune.passes.bits.units import Unit, plan

TOLERANCE = 0.03  # a measured ratio this far above the budget counts as met (timing noise)


def with_latency(model, units: list[Unit], rows, c: BitAllocationConfig, context, retime: bool = False):
    """(rows with each option's predicted ms, shared costs (a DynamicQuantizeLinear per input of dynamic-int8 nodes, the
    block sums per input and block of block-offset nodes), the latency facts).  ``retime``: every prefill shape and the
    float model timed again, whatever the cache holds."""
    from edgeprune.passes.bits import microbench
    from edgeprune.validation import decode_feed

    with stage(context, "latency microbenchmarks per shape and format"):
        table, float_ms, float_units_ms, how = microbench.fresh_latencies(model, context, units, tokens=c.latency_tokens,
                                                                          accuracy_level=c.accuracy_level, retime=retime)
    dtable = None
    if c.decode_bounded:
        feed = decode_feed(context.calibration.samples[0], model, c.decode_context)
        with stage(context, "latency microbenchmarks per shape and format at one token (decode)"):
            dtable, dfloat_ms, dfloat_units_ms, dhow = microbench.fresh_latencies(
                model, context, units, tokens=1, accuracy_level=c.accuracy_level, feed=feed)
    new_rows, groups = [], {}
    for ui, u in enumerate(units):
        row = []
        for oi, cb in enumerate(u.combos()):
            lat = sum(table[(p.node, o.key)] for p, o in zip(u.parts, cb))
            dec = sum(dtable[(p.node, o.key)] for p, o in zip(u.parts, cb)) if dtable is not None else 0.0
            row.append(knapsack.Item(rows[ui][oi].error, rows[ui][oi].size, lat, dec))
            for p, o in zip(u.parts, cb):
                if o.kind == "int8-dynamic" and p.op in ("MatMul", "Gemm"):
                    groups.setdefault(("dql", p.input), []).append((ui, oi))
                if o.offsets:  # block-offset nodes reading one input share its block sums
                    groups.setdefault((f"bsum{o.block}", p.input), []).append((ui, oi))
        new_rows.append(row)
    shared = [knapsack.SharedCost(tuple(m), latency=table[key], decode=dtable[key] if dtable is not None else 0.0)
              for key, m in groups.items()]
    info = {"float_ms": float_ms, "rest_ms": max(float_ms - float_units_ms, 0.0), "units_float_ms": float_units_ms,
            "tokens": c.latency_tokens, "microbenchmarks": how, "per_unit_ms": {f"{k[0]}|{k[1]}": v for k, v in table.items()}}
    if dtable is not None:
        info["decode"] = {"float_ms": dfloat_ms, "rest_ms": max(dfloat_ms - dfloat_units_ms, 0.0),
                          "units_float_ms": dfloat_units_ms, "context": c.decode_context, "microbenchmarks": dhow,
                          "per_unit_ms": {f"{k[0]}|{k[1]}": v for k, v in dtable.items()}}
    return new_rows, shared, info


def calibrate_decode(model, units: list[Unit], rows, shared, info: dict[str, Any], c: BitAllocationConfig, context,
                     emit: Callable) -> tuple:
    """Fit the one-token microbenchmarks to this model's decode step with two whole-model measurements.

    Nodes timed alone, even as cold copies, run a one-token step at a different speed than inside a model that
    streams every weight once (SmolLM2: the float units summed to a third of the float model's step, which left
    two thirds as "the rest" and put the fastest predicted step at 0.69x of float where 0.24x is measured).  So the
    fastest choice at decode (least error among the fastest) is emitted and its step timed side by side with the
    float model's: with U the units' microbenchmark sums and T the measured steps, decode ms = a x U + r through
    both points (a > 0, r >= 0), and the rows' decode costs are scaled by a.  The check after emitting still
    measures the chosen model itself.  Returns (rows, shared) with scaled decode costs; ``info["decode"]`` gets the fit.
    """
    from edgeprune.runtime.latency import measure_side_by_side, paired_ratio
    from edgeprune.validation import decode_feed

    facts = info["decode"]
    ref = solve.fastest(rows, shared, None, c.solver, by="decode")
    with stage(context, "calibrate the one-token microbenchmarks: the fastest decode choice measured against float"):
        candidate, _ = emit(plan(units, ref.choice))
        feed = decode_feed(context.calibration.samples[0], model, c.decode_context)
        lat = measure_side_by_side({"float": model, "candidate": candidate}, feed, context.target, warmup=5,
                                   runs=max(c.latency_runs, 40), threads=context.threads)
    float_ms = lat["float"].p50_ms
    fast_ms = paired_ratio(lat["candidate"], lat["float"]) * float_ms
    u_float, u_fast = facts["units_float_ms"], ref.decode
    scale = (float_ms - fast_ms) / (u_float - u_fast) if u_float > u_fast else 0.0
    rest = float_ms - scale * u_float
    fit = {"fastest_measured_ms": fast_ms, "float_measured_ms": float_ms, "units_float_ms": u_float, "units_fastest_ms": u_fast}
    if scale <= 0 or rest < 0:  # the two points do not fit a line with a positive slope and rest: keep the plain offsets
        scale, rest = 1.0, max(float_ms - u_float, 0.0)
        fit["note"] = "no positive fit through the two measurements: microbenchmarks used as timed"
    facts.update(float_ms=float_ms, rest_ms=rest, scale=scale, calibration=fit)
    rows = [[knapsack.Item(it.error, it.size, it.latency, it.decode * scale) for it in row] for row in rows]
    shared = [dataclasses.replace(s, decode=s.decode * scale) for s in shared]
    return rows, shared


def meet(model, units: list[Unit], rows, shared, bud: dict, info: dict[str, Any], sol, new, log, notes: list[str],
         c: BitAllocationConfig, context, emit: Callable, dim: str = "latency") -> tuple:
    """Measure the emitted model against the float one on the target; re-solve while it misses the budget
    (``dim``: ``latency``, prefill at ``latency_tokens``; ``decode``, one step after ``decode_context`` positions).

    Per-shape microbenchmarks miss what happens between nodes (fusions such as attention or
    DynamicQuantizeMatMul, which quantized neighbours enable or block; cache traffic), so the
    prediction can be off by tens of percent.  Each miss tightens the solver's budget by the
    measured overshoot and re-solves; after ``latency_checks`` measurements the last model is
    kept, with a note when it still misses.  ``emit(plan)`` gives (model, log) for a plan.  ``bud[dim]`` is left at
    the last (tightened) solver budget, so later re-solves keep it.

    Returns (solution, emitted model, emit log, the check's record).
    """
    from edgeprune.runtime.latency import measure_side_by_side, round_ratios
    from edgeprune.validation import decode_feed, latency_feed

    facts = info if dim == "latency" else info["decode"]
    float_ms = facts["float_ms"]
    ratio_budget, ms_budget = ((c.latency_budget_ratio, c.latency_budget_ms) if dim == "latency"
                               else (c.decode_budget_ratio, c.decode_budget_ms))
    target = ratio_budget if ratio_budget is not None else ms_budget / float_ms
    sample = context.calibration.samples[0]
    feed = latency_feed(sample, model, c.latency_tokens) if dim == "latency" else decode_feed(sample, model, c.decode_context)
    # p50 of a few runs is noisy on a shared machine: small models get more runs (about 2 s per model).
    runs = max(c.latency_runs, min(50, int(2000.0 / max(float_ms, 1e-3))))
    solver_budget = bud[dim]
    attempts, fastest = [], False
    pairs: list[float] = []
    times: dict[str, list[float]] = {"float": [], "candidate": []}

    def measure():
        """One side-by-side measurement of the current candidate, its rounds added to ``pairs`` and ``times``."""
        lat = measure_side_by_side({"float": model, "candidate": new}, feed, context.target, warmup=2, runs=runs,
                                   threads=context.threads)
        pairs.extend(round_ratios(lat["candidate"], lat["float"]))
        for k, v in lat.items():
            times[k] += v.times_ms
        return lat

    while True:
        pairs.clear()
        for t in times.values():
            t.clear()
        with stage(context, f"measure the emitted model's {'prefill' if dim == 'latency' else 'decode step'} side by side "
                            "with the float model"):
            lat = measure()
        if abs(float(np.median(pairs)) / (target * (1 + TOLERANCE)) - 1) <= TOLERANCE:
            # Too close to the accepting line to call on one measurement (MiniLM at ORT int8's budget was accepted
            # at 0.93x and at 0.99x of ORT int8 in two runs): as many rounds again, and the verdict from all of them.
            with stage(context, "measure again: the first measurement is within the timing tolerance of the line"):
                lat = measure()
        ratio = float(np.median(pairs))
        p50 = {k: float(np.median(t)) if t else lat[k].p50_ms for k, t in times.items()}  # over every round
        predicted = getattr(sol, dim) + facts["rest_ms"]
        attempts.append({"solver_budget_ms": solver_budget, "predicted_ms": predicted, "predicted_ratio": predicted / float_ms,
                         "measured_ratio": ratio, "rounds": len(pairs), "measured_ms": p50["candidate"],
                         "float_ms": p50["float"], "fastest_choice": fastest})
        if ratio <= target * (1 + TOLERANCE) or len(attempts) >= c.latency_checks or fastest:
            break
        # From the choice's own prediction where the speed tie-break left it inside the budget: tightening
        # the budget alone could re-solve to a slower choice.
        solver_budget = min(solver_budget, getattr(sol, dim)) - (ratio - target) * float_ms
        nxt = solve.within(rows, bud, shared, c.solver, **{f"{dim}_budget": solver_budget})
        if not nxt.feasible and c.latency_implicit and dim == "latency":  # a bound not asked for never trades accuracy
            break
        if not nxt.feasible:  # the microbenchmarks see nothing faster: take the fastest choice the size allows
            fastest = True
            nxt = solve.fastest(rows, shared, bud.get("size"), c.solver, by=dim, other=bud.get(solve.OTHER[dim]))
            if nxt.choice == sol.choice:
                break
            solver_budget = getattr(nxt, dim)
        sol = nxt
        new, log = emit(plan(units, sol.choice))
    bud[dim] = min(bud[dim], solver_budget)  # later re-solves (the other check, the file's size) keep what was learnt
    met = attempts[-1]["measured_ratio"] <= target * (1 + TOLERANCE)
    if not met:
        what = "latency" if dim == "latency" else "decode step"
        notes.append(f"measured {what} {attempts[-1]['measured_ratio']:.2f}x of the float model misses the budget "
                     f"{target:.2f}x after {len(attempts)} measurement(s): the offered formats are not faster here")
    return sol, new, log, {"target_ratio": target, "met": met, "attempts": attempts}
