"""From a budget to one option per unit: the budget in the solver's terms (and its floor), the
multiple-choice knapsack, the error/size curve around the answer, and the fastest fallback.
Separate from measuring so the same items can be re-solved (a latency miss) without re-measuring."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from edgeprune.errors import BadInputError
from edgeprune.passes.bits import knapsack
from edgeprune.passes.bits.config import BitAllocationConfig
from edgeprune.passes.bits.sensitivity import KEEP, Option
from edgeprune.passes.bits.units import Part, Unit

CURVE_POINTS = 12
# A latency budget this far below the microbenchmarks' floor is refused; closer ones get the fastest
# choice, measured (the microbenchmarks' floor has been 5-10 % pessimistic on MiniLM).
LATENCY_FLOOR_SLACK = 0.15


# Fast mode takes dynamic int8 for a MatMul only where the microbenchmarks time it this much faster
# than float (its DynamicQuantizeLinear included): a tie is noise, and float is exact.
FAST_MARGIN = 0.1


def _size(n: float, up: bool = False) -> str:
    """Bytes as kB (1 decimal) or MB (2 decimals); ``up`` rounds up, for "at least" figures."""
    unit, digits = (1e6, 2) if n >= 1e6 else (1e3, 1)
    v = n / unit
    if up:
        v = math.ceil(v * 10**digits - 1e-9) / 10**digits
    return f"{v:.{digits}f} {'MB' if unit == 1e6 else 'kB'}"


def check_floor(c: BitAllocationConfig, units: list[Unit], other_bytes: int) -> None:
    """Refuse a size budget below the smallest model the offered formats allow.

    Option sizes follow from shapes alone (``measure.sizes``), so this runs before any statistics
    are collected; the sentence names the budget, the floor and the flag that fixes it.
    """
    if c.mode != "auto" or not c.size_bounded:
        return
    min_unit = sum(min(u.size(cb) for cb in u.combos()) for u in units)
    params = sum(u.params for u in units)
    floor_bits = math.ceil(800.0 * min_unit / params - 1e-9) / 100.0
    floor = _size(min_unit + other_bytes, up=True)
    kind = "written (graph included)" if c.size_budget_bytes is not None else "of weights"
    where = (f"is below the smallest model the offered formats allow, {floor} {kind} "
             f"({floor_bits:.2f} bits per weight over the quantizable nodes)")
    if c.size_budget_bytes is not None and c.size_budget_bytes < min_unit + other_bytes:
        raise BadInputError(f"the size budget {_size(c.size_budget_bytes)} {where}: raise --size-budget to at least {floor}.")
    if c.avg_bits is not None and c.avg_bits * params / 8.0 < min_unit:
        raise BadInputError(f"the average of {c.avg_bits:g} bits per weight {where}: raise --avg-bits to at least {floor_bits:.2f}.")


def fast_wanted(units: list[Unit], table: dict | None) -> dict[str, str]:
    """Fast mode, before measuring: part -> why it stays float (``slower``), for the MatMul/Gemm parts
    whose dynamic int8 the microbenchmarks do not time faster than float.

    Parts reading one input share its DynamicQuantizeLinear, so they are decided together.
    """
    groups: dict[str, list[Part]] = {}
    for u in units:
        for p in u.parts:
            if any(o.kind == "int8-dynamic" for o in p.options) and p.op in ("MatMul", "Gemm"):
                groups.setdefault(p.input, []).append(p)
    slow = {}
    for inp, parts in groups.items():
        if table is None:
            continue
        float_ms = sum(table[(p.node, "float")] for p in parts)
        int8_ms = sum(table[(p.node, "int8-dyn")] for p in parts) + table[("dql", inp)]
        if not int8_ms < (1.0 - FAST_MARGIN) * float_ms:
            slow.update({p.node: "slower" for p in parts})
    return slow


def fast_choice(c: BitAllocationConfig, units: list[Unit], kept: dict[str, str]) -> tuple[list[int], dict[str, str]]:
    """Each part's lossy option (fast mode offers one), float where ``kept`` says or where its estimated
    output error exceeds ``max_output_error``; returns the choice and part -> why it stayed float."""
    kept = dict(kept)
    choice = []
    for u in units:
        combo = []
        for p in u.parts:
            lossy = [o for o in p.options if o.kind != KEEP]
            o = lossy[0] if lossy and p.node not in kept else Option(KEEP)
            bound = c.max_output_error
            if o.kind != KEEP and bound is not None and math.sqrt(p.importance) * p.errors.get(o.key, 0.0) > bound:
                kept[p.node], o = "lossy", Option(KEEP)
            if not lossy:
                kept.setdefault(p.node, "no format")
            combo.append(o)
        choice.append(u.combos().index(tuple(combo)))
    return choice, kept


#: The other time dimension of a knapsack row: prefill latency and one decode step.
OTHER = {"latency": "decode", "decode": "latency"}


def within(rows, bud: dict, shared, method: str, **override) -> knapsack.Solution:
    """The least-error choice within every budget ``bud`` holds (size, latency, decode); ``override`` replaces one,
    e.g. ``latency_budget=None`` or a tightened ``decode_budget``."""
    kw = {"size_budget": bud.get("size"), "latency_budget": bud.get("latency"), "decode_budget": bud.get("decode")}
    kw.update(override)
    return knapsack.solve(rows, shared=shared, method=method, **kw)


def items(units: list[Unit]) -> list[list[knapsack.Item]]:
    """The knapsack's rows: (error, bytes) of every option combination of every unit."""
    return [[knapsack.Item(u.error(cb), u.size(cb)) for cb in u.combos()] for u in units]


def latency_floor(rows, latency_info: dict) -> float:
    """Predicted prefill ms of the fastest choice: the units' least microbenchmarked latencies + the rest of the model."""
    return knapsack.floor(rows, by="latency") + latency_info["rest_ms"]


def _latency_ms(c: BitAllocationConfig, latency_info: dict) -> float:
    return c.latency_budget_ms if c.latency_budget_ms is not None else c.latency_budget_ratio * latency_info["float_ms"]


def latency_floor_missed(c: BitAllocationConfig, rows, latency_info: dict) -> bool:
    """Whether the latency budget lies below the predicted floor by more than the slack (``budget`` refuses it)."""
    return c.latency_bounded and _latency_ms(c, latency_info) < latency_floor(rows, latency_info) * (1 - LATENCY_FLOOR_SLACK)


def budget(c: BitAllocationConfig, units: list[Unit], other_bytes: int, rows, latency_info: dict) -> dict[str, Any]:
    """The budget the solver works to (bytes/ms for the units alone), its text, the floor, and ``noop``
    when every bound is at or above the float model (nothing to do).  Refuses budgets below the floor."""
    float_unit = sum(u.float_size for u in units)
    min_unit = knapsack.floor(rows)
    params = sum(u.params for u in units)
    floor_text = (f"the smallest model the offered formats allow is {(min_unit + other_bytes) / 1e6:.2f} MB of weights "
                  f"({8 * min_unit / params:.2f} bits per weight over the quantized nodes)")
    out: dict[str, Any] = {"floor_text": floor_text}
    if c.mode == "uniform":
        return out
    texts, noop = [], []
    if c.size_bounded:
        if c.size_budget_bytes is not None:
            unit_budget = c.size_budget_bytes - other_bytes  # >= the floor: check_floor ran first
            texts.append(f"{_size(c.size_budget_bytes)} of weights ({_size(max(unit_budget, 0))} for the quantizable nodes)")
        else:
            unit_budget = c.avg_bits * params / 8.0
            texts.append(f"{c.avg_bits:g} bits per weight over the quantizable nodes ({unit_budget / 1e6:.2f} MB)")
        out["size"] = unit_budget
        if unit_budget < min_unit:
            raise BadInputError(f"the size budget ({texts[-1]}) is below the floor: {floor_text}; raise the budget.")
        if unit_budget >= float_unit:
            noop.append(f"the size budget ({texts[-1]}) is at or above the float model's size")
    if c.latency_bounded:
        rest = latency_info["rest_ms"]
        lat_floor = latency_floor(rows, latency_info)
        ms = _latency_ms(c, latency_info)
        out["latency"] = ms - rest
        what = f"{ms:.1f} ms" if c.latency_budget_ratio is None else f"{c.latency_budget_ratio:g} x the float model's {latency_info['float_ms']:.1f} ms = {ms:.1f} ms"
        if c.latency_implicit:
            what += ", no slower than float (implied by the size budget: no_slower)"
        texts.append(f"latency {what} (model outside the units: {rest:.1f} ms)")
        if ms < lat_floor * (1 - LATENCY_FLOOR_SLACK) and c.latency_implicit:
            del out["latency"], texts[-1]
            out["note"] = (f"no choice is predicted as fast as the float model ({lat_floor:.1f} ms at the fastest vs "
                           f"{ms:.1f} ms): the size budget alone decides")
        elif latency_floor_missed(c, rows, latency_info):
            raise BadInputError(
                f"the latency budget {what} is below the fastest model the offered formats "
                f"allow (about {lat_floor:.1f} ms by the microbenchmarks): raise the budget."
            )
        if ms >= latency_info["float_ms"] and not c.latency_implicit:
            noop.append(f"the latency budget {what} is at or above the float model's "
                        f"{latency_info['float_ms']:.1f} ms")
    if c.decode_bounded:
        dec = latency_info["decode"]
        rest, float_ms = dec["rest_ms"], dec["float_ms"]
        ms = c.decode_budget_ms if c.decode_budget_ms is not None else c.decode_budget_ratio * float_ms
        what = (f"{ms:.2f} ms" if c.decode_budget_ratio is None
                else f"{c.decode_budget_ratio:g} x the float model's {float_ms:.2f} ms = {ms:.2f} ms")
        dec_floor = knapsack.floor(rows, by="decode") + rest
        if ms < dec_floor * (1 - LATENCY_FLOOR_SLACK):
            raise BadInputError(f"the decode budget {what} is below the fastest decode step the offered formats allow "
                                f"(about {dec_floor:.2f} ms by the microbenchmarks): raise the budget.")
        out["decode"] = ms - rest
        texts.append(f"decode step {what} after {dec['context']} cached tokens (model outside the units: {rest:.2f} ms)")
        if ms >= float_ms:
            noop.append(f"the decode budget {what} is at or above the float model's {float_ms:.2f} ms")
    out["text"] = "; ".join(texts)
    if len(noop) == c.size_bounded + (c.latency_bounded and not c.latency_implicit) + c.decode_bounded:
        out["noop"] = " and ".join(noop) + ": nothing to do"
    return out


def float_choice(units: list[Unit]) -> list[int]:
    """Each unit's all-float combination."""
    return [next(i for i, cb in enumerate(u.combos()) if all(o.kind == KEEP for o in cb)) for u in units]


def uniform_choice(c: BitAllocationConfig, u: Unit) -> int:
    """The combination of ``u`` that stores every part at ``c.bits`` in the first block size: of each kind, the first
    option in the part's order (``units``: block offsets, then searched grids, then ORT's own; a tied head's lookup
    shares its table, so the head's shareable options come first)."""
    bits = c.bits

    def want(p: Part) -> Option:
        if p.op == "Gather":
            pref = ["gather-tied"] + (["int8-gather"] if bits == 8 else ["gather-nbits"])
        elif p.op == "Conv":
            pref = ["int8-dynamic", "qdq"]
        else:
            pref = ["gptq", "nbits", "qdq"]
        for kind in pref:
            for o in p.options:
                if (o.kind == kind and (kind not in ("nbits", "gptq", "gather-tied", "qdq") or o.bits == bits)
                        and o.block in (0, c.blocks[0])):
                    return o
        return Option(KEEP)

    combos = u.combos()
    target = tuple(want(p) for p in u.parts)
    if target not in combos:  # a tied lookup shares only a round-to-nearest head: same grid, no GPTQ
        target = tuple(dataclasses.replace(o, kind="nbits") if o.kind == "gptq" else o for o in target)
    return combos.index(target)


def curve(rows, shared, bud: dict, other_bytes: int, method: str) -> list[dict]:
    """Error/size (or error/latency) points the solver sees between the floor and the float model."""
    by_lat = "latency" in bud
    key = (lambda it: it.latency) if by_lat else (lambda it: it.size)
    lo = knapsack.floor(rows, by="latency" if by_lat else "size")
    hi = sum(max(key(it) for it in opts) for opts in rows)
    points = []
    for b in np.linspace(lo, hi, CURVE_POINTS):
        kw = {"latency_budget": b} if by_lat else {"size_budget": b}
        s = knapsack.solve(rows, shared=shared, method=method, **kw)
        if s.feasible:
            pt = {"budget": float(b), "error": s.error, "size_bytes": int(s.size + other_bytes)}
            if by_lat:
                pt["latency_ms"] = s.latency
            points.append(pt)
    return points


def fastest(rows, shared, size_budget, method: str, by: str = "latency", other: float | None = None) -> knapsack.Solution:
    """The most accurate of the choices of least predicted latency (``by="decode"``: decode step) within the size
    budget, and within ``other`` (the other time dimension's budget) where some choice meets it.

    Two solves, lexicographic: the least latency first, then the least error at that latency
    (a tie-breaking term in one objective would sit below the solver's tolerance).
    """
    alt = OTHER[by]
    by_time = [[knapsack.Item(getattr(it, by), it.size, 0.0, getattr(it, alt)) for it in row] for row in rows]
    s = knapsack.solve(by_time, size_budget=size_budget, method=method, decode_budget=other)
    if not s.feasible and other is not None:  # nothing meets both: the size alone bounds the fastest
        s = knapsack.solve(by_time, size_budget=size_budget, method=method)
        other = None
    least = getattr(knapsack.evaluate(rows, s.choice, shared), by)
    best = knapsack.solve(rows, size_budget=size_budget, shared=shared, method=method,
                          **{f"{by}_budget": least * (1 + 1e-6) + 1e-9, f"{alt}_budget": other})
    choice = best.choice if best.feasible else s.choice
    return knapsack.evaluate(rows, choice, shared, f"{s.method} (fastest)", s.feasible)


def speed_ties(rows, shared, bud: dict, sol: knapsack.Solution, slack: float, method: str) -> knapsack.Solution:
    """The fastest choice (predicted latency) within the budgets whose objective is at most ``sol``'s plus
    ``slack`` (an absolute allowance, ``speed_slack^2 * sum(importance)``): the least-error solve breaks
    no ties, so between equal-size formats of (nearly) equal error -- MatMulNBits at accuracy level 0
    and 4 -- it would not prefer the faster.

    One more solve with the roles swapped: latency is the objective (a shared DynamicQuantizeLinear
    counts there once), error a budget beside the size and latency budgets' size part.  ``sol`` is
    kept when the swap finds nothing faster.
    """
    if not sol.feasible:
        return sol
    bound = sol.error + slack + 1e-12
    swapped = [[knapsack.Item(it.latency, it.size, it.error, it.decode) for it in row] for row in rows]
    sh = [knapsack.SharedCost(s.members, size=s.size, latency=0.0, error=s.latency, decode=s.decode) for s in shared]
    fast = knapsack.solve(swapped, size_budget=bud.get("size"), latency_budget=bound, shared=sh, method=method,
                          decode_budget=bud.get("decode"))
    if not fast.feasible:
        return sol
    out = knapsack.evaluate(rows, fast.choice, shared, f"{sol.method} + fastest within {slack:.3g} of its error", True,
                            sol.note)
    lat_budget = bud.get("latency")
    if out.latency >= sol.latency or (lat_budget is not None and out.latency > lat_budget + 1e-9):
        return sol
    return out


def choose(c: BitAllocationConfig, units: list[Unit], rows, shared, bud: dict, notes: list[str]) -> knapsack.Solution:
    """One option combination per unit: the uniform one, or the knapsack's within the budget.

    A latency budget just below the predicted floor gets the fastest choice (the measurement
    decides); a budget nothing meets is refused with the floor.
    """
    if c.mode == "uniform":
        choice = [uniform_choice(c, u) for u in units]
        return knapsack.evaluate(rows, choice, method="uniform")
    sol = within(rows, bud, shared, c.solver)
    if not sol.feasible and bud.get("latency") is not None and c.latency_implicit:  # the size budget alone decides
        within_what = "the size and decode budgets" if bud.get("decode") is not None else "the size budget"
        notes.append(f"nothing within {within_what} is predicted as fast as the float model at prefill: the least-error "
                     "choice is kept and its latency measured")
        del bud["latency"]
        sol = within(rows, bud, shared, c.solver)
    for dim in ("latency", "decode"):
        if sol.feasible or bud.get(dim) is None:
            continue
        quick = fastest(rows, shared, bud.get("size"), c.solver, by=dim, other=bud.get(OTHER[dim]))
        if quick.feasible:  # just below the predicted floor: let the measurement decide
            notes.append(f"the {dim} budget is just below what the microbenchmarks predict for the fastest "
                         "choice: that choice is emitted and measured")
            sol = quick
    if not sol.feasible:
        floor = bud["floor_text"]
        if bud.get("latency") is not None:  # shared DynamicQuantizeLinear costs can make it infeasible
            floor += (f"; the fastest model the offered formats allow needs {knapsack.floor(rows, by='latency'):.3f} ms "
                      f"in the quantizable nodes against {bud['latency']:.3f} ms left for them")
        if bud.get("decode") is not None:
            floor += (f"; the fastest decode step the offered formats allow needs {knapsack.floor(rows, by='decode'):.3f} ms "
                      f"in the quantizable nodes against {bud['decode']:.3f} ms left for them")
        raise BadInputError(f"the budget cannot be met: {floor}; raise the budget.")
    return sol
