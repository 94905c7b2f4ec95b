"""Multiple-choice knapsack: pick one option per unit, least total error under size/latency/decode budgets.

Exact: ``scipy.optimize.milp`` (HiGHS) on binaries x[u, o] with sum_o x[u, o] = 1 per unit,
minimise sum cost * x subject to sum size * x <= size budget and sum latency * x (+ shared
costs) <= latency budget (prefill), and the same for ``decode`` (one token on a KV cache).  A *shared cost* is paid once when any of its member options is picked
(e.g. one DynamicQuantizeLinear per distinct input of dynamic-int8 MatMuls): a binary y with
y >= x[member] for each member carries it.

Greedy fallback (huge models, or ``method="greedy"``): start from every unit's smallest option,
then repeatedly take the upgrade on a unit's lower convex hull with the best error drop per byte
(per ms in latency mode) that still fits every budget.  Shared costs are spread over their members there.
Both are deterministic: ties break on unit then option order.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np

logger = logging.getLogger(__name__)

#: Above this many option variables ``method="auto"`` uses the greedy solver.
MILP_MAX_VARIABLES = 200_000


@dataclasses.dataclass(frozen=True)
class Item:
    """One option of one unit: its error (objective), bytes, milliseconds at prefill and at one decode step."""

    error: float
    size: float
    latency: float = 0.0
    decode: float = 0.0


@dataclasses.dataclass(frozen=True)
class SharedCost:
    """A cost paid once when any member ``(unit, option)`` is chosen (``error`` adds to the objective)."""

    members: tuple[tuple[int, int], ...]
    size: float = 0.0
    latency: float = 0.0
    error: float = 0.0
    decode: float = 0.0


@dataclasses.dataclass
class Solution:
    choice: list[int]
    error: float
    size: float
    latency: float
    method: str
    feasible: bool
    note: str = ""
    decode: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def totals(units: list[list[Item]], choice: list[int], shared: list[SharedCost] = ()) -> tuple[float, float, float]:
    """(error, size, latency) of a choice, shared costs included once."""
    err = sum(units[u][o].error for u, o in enumerate(choice))
    size = sum(units[u][o].size for u, o in enumerate(choice))
    lat = sum(units[u][o].latency for u, o in enumerate(choice))
    for s in shared:
        if any(choice[u] == o for u, o in s.members):
            size += s.size
            lat += s.latency
            err += s.error
    return err, size, lat


def decode_total(units: list[list[Item]], choice: list[int], shared: list[SharedCost] = ()) -> float:
    """Milliseconds of one decode step of a choice (shared costs once)."""
    return sum(units[u][o].decode for u, o in enumerate(choice)) + sum(
        s.decode for s in shared if any(choice[u] == o for u, o in s.members))


def evaluate(units: list[list[Item]], choice: list[int], shared: list[SharedCost] = (), method: str = "",
             feasible: bool = True, note: str = "") -> Solution:
    """A choice as a :class:`Solution`, every total (error, size, latency, decode step) computed in one place."""
    return Solution(choice, *totals(units, choice, shared), method, feasible, note, decode_total(units, choice, shared))


def floor(units: list[list[Item]], *, by: str = "size") -> float:
    """The least total size (or latency) any choice can reach: each unit's cheapest option.

    Shared costs are left out (they are >= 0), so this is a lower bound, which is what a caller
    naming "the smallest possible model" needs.
    """
    return float(sum(min(getattr(it, by) for it in opts) for opts in units))


def solve(
    units: list[list[Item]],
    *,
    size_budget: float | None = None,
    latency_budget: float | None = None,
    shared: list[SharedCost] = (),
    method: str = "auto",
    time_limit: float = 120.0,
    decode_budget: float | None = None,
) -> Solution:
    """Choose one option per unit minimising total error within the budgets (None = unbounded)."""
    if not units or any(not opts for opts in units):
        raise ValueError("every unit needs at least one option")
    n_vars = sum(len(o) for o in units)
    if method == "auto":
        method = "milp" if n_vars <= MILP_MAX_VARIABLES else "greedy"
    if method == "milp":
        sol = _solve_milp(units, size_budget, latency_budget, list(shared), time_limit, decode_budget)
        if sol is not None:
            return sol
        logger.warning("milp found no solution; trying the greedy solver")
    return _solve_greedy(units, size_budget, latency_budget, list(shared), decode_budget)


def _solve_milp(units, size_budget, latency_budget, shared, time_limit, decode_budget=None) -> Solution | None:
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    offsets = np.cumsum([0] + [len(o) for o in units])
    n_x = int(offsets[-1])
    n = n_x + len(shared)
    flat = [it for opts in units for it in opts]
    cost = np.array([it.error for it in flat] + [s.error for s in shared])
    rows_lb, rows_ub = [], []
    budgets = (("size", size_budget), ("latency", latency_budget), ("decode", decode_budget))
    n_rows = len(units) + sum(b is not None for _, b in budgets) + sum(len(s.members) for s in shared)
    a = lil_matrix((n_rows, n))
    r = 0
    for u in range(len(units)):
        a[r, offsets[u] : offsets[u + 1]] = 1.0
        rows_lb.append(1.0), rows_ub.append(1.0)
        r += 1
    for attr, budget in budgets:
        if budget is None:
            continue
        for j, it in enumerate(flat):
            a[r, j] = getattr(it, attr)
        for k, s in enumerate(shared):
            a[r, n_x + k] = getattr(s, attr)
        rows_lb.append(-np.inf), rows_ub.append(float(budget))
        r += 1
    for k, s in enumerate(shared):  # y_k >= x[u, o]
        for u, o in s.members:
            a[r, offsets[u] + o] = 1.0
            a[r, n_x + k] = -1.0
            rows_lb.append(-np.inf), rows_ub.append(0.0)
            r += 1
    res = milp(
        cost,
        constraints=LinearConstraint(a.tocsr(), rows_lb, rows_ub),
        integrality=np.ones(n),
        bounds=Bounds(0, 1),
        options={"time_limit": time_limit, "mip_rel_gap": 1e-9, "disp": False},
    )
    if res.x is None:
        if res.status == 2:  # infeasible
            return Solution([], math.inf, math.inf, math.inf, "milp", False, note=res.message)
        return None
    x = np.round(res.x[:n_x]).astype(int)
    choice = [int(np.argmax(x[offsets[u] : offsets[u + 1]])) for u in range(len(units))]
    note = "" if res.status == 0 else f"HiGHS stopped early ({res.message}); best solution found is used"
    return evaluate(units, choice, shared, "milp", True, note)


def _hull(opts: list[Item], key) -> list[int]:
    """Indices on the lower convex hull of (resource, error), resource increasing, error decreasing."""
    order = sorted(range(len(opts)), key=lambda o: (key(opts[o]), opts[o].error, o))
    pts: list[int] = []
    for o in order:
        if pts and opts[o].error >= opts[pts[-1]].error:
            continue  # costs more and is no better
        while len(pts) >= 2:
            a, b = opts[pts[-2]], opts[pts[-1]]
            c = opts[o]
            # b is above the segment a-c: drop it
            if (b.error - a.error) * (key(c) - key(a)) >= (c.error - a.error) * (key(b) - key(a)):
                pts.pop()
            else:
                break
        pts.append(o)
    return pts


def _solve_greedy(units, size_budget, latency_budget, shared, decode_budget=None) -> Solution:
    # Spread shared costs over their members (an approximation the MILP does not need).
    extra = {k: [[0.0] * len(o) for o in units] for k in ("error", "size", "latency", "decode")}
    for s in shared:
        for u, o in s.members:
            for k, table in extra.items():
                table[u][o] += getattr(s, k) / len(s.members)
    adj = [[Item(*(getattr(it, k) + extra[k][u][o] for k in ("error", "size", "latency", "decode")))
            for o, it in enumerate(opts)] for u, opts in enumerate(units)]
    by_latency = latency_budget is not None and size_budget is None
    key = (lambda it: it.latency) if by_latency else (lambda it: it.size)
    hulls = [_hull(opts, key) for opts in adj]
    pos = [0] * len(units)
    choice = [h[0] for h in hulls]

    def used() -> tuple[float, float, float]:
        return tuple(sum(getattr(adj[u][o], k) for u, o in enumerate(choice)) for k in ("size", "latency", "decode"))

    size, lat, dec = used()
    feasible = ((size_budget is None or size <= size_budget + 1e-9) and (latency_budget is None or lat <= latency_budget + 1e-9)
                and (decode_budget is None or dec <= decode_budget + 1e-9))
    if not feasible:
        return evaluate(units, choice, shared, "greedy", False, "even the smallest option of every unit is over budget")
    while True:
        best, best_gain = None, 0.0
        for u, h in enumerate(hulls):
            if pos[u] + 1 >= len(h):
                continue
            cur, nxt = adj[u][h[pos[u]]], adj[u][h[pos[u] + 1]]
            d_size, d_lat = nxt.size - cur.size, nxt.latency - cur.latency
            if size_budget is not None and size + d_size > size_budget + 1e-9:
                continue
            if latency_budget is not None and lat + d_lat > latency_budget + 1e-9:
                continue
            if decode_budget is not None and dec + nxt.decode - cur.decode > decode_budget + 1e-9:
                continue
            d_res = max(key(nxt) - key(cur), 1e-12)
            gain = (cur.error - nxt.error) / d_res
            if gain > best_gain:
                best, best_gain = u, gain
        if best is None:
            break
        pos[best] += 1
        choice[best] = hulls[best][pos[best]]
        size, lat, dec = used()
    return evaluate(units, choice, shared, "greedy")
