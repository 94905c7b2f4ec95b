"""Multiple-choice knapsack: MILP equals brute force, greedy is feasible, both are reproducible."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from edgeprune.passes.bits.knapsack import Item, SharedCost, decode_total, floor, solve, totals


def _instance(seed: int, units: int = 5, options: int = 3):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(units):
        sizes = np.sort(rng.uniform(1, 10, options))
        errs = np.sort(rng.uniform(0, 5, options))[::-1]  # bigger -> more exact
        lats = rng.uniform(0.5, 3, options)
        out.append([Item(float(e), float(s), float(t)) for e, s, t in zip(errs, sizes, lats)])
    return out


def _brute(units, size=None, lat=None, shared=()):
    best = None
    for choice in itertools.product(*[range(len(u)) for u in units]):
        e, s, t = totals(units, list(choice), list(shared))
        if (size is None or s <= size + 1e-9) and (lat is None or t <= lat + 1e-9):
            if best is None or e < best[0] - 1e-12:
                best = (e, list(choice))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_milp_matches_brute_force_on_size(seed):
    units = _instance(seed)
    budget = 0.5 * (floor(units) + sum(max(i.size for i in u) for u in units))
    sol = solve(units, size_budget=budget, method="milp")
    e, _ = _brute(units, size=budget)
    assert sol.feasible and sol.size <= budget + 1e-6
    assert sol.error == pytest.approx(e, abs=1e-7)


@pytest.mark.parametrize("seed", range(8))
def test_milp_with_latency_and_shared_costs_matches_brute_force(seed):
    units = _instance(seed + 10)
    shared = [SharedCost(((0, 1), (1, 1), (2, 1)), latency=2.0), SharedCost(((3, 2),), latency=1.5, size=0.5)]
    lat = 0.6 * sum(max(i.latency for i in u) for u in units) + 1.0
    size = 0.7 * sum(max(i.size for i in u) for u in units)
    sol = solve(units, size_budget=size, latency_budget=lat, shared=shared, method="milp")
    best = _brute(units, size=size, lat=lat, shared=shared)
    if best is None:
        assert not sol.feasible
        return
    e, _ = best
    assert sol.error == pytest.approx(e, abs=1e-7)
    _, s, t = totals(units, sol.choice, shared)
    assert s <= size + 1e-6 and t <= lat + 1e-6


@pytest.mark.parametrize("seed", range(6))
def test_greedy_is_feasible_and_close(seed):
    units = _instance(seed, units=8, options=4)
    budget = 0.45 * sum(max(i.size for i in u) for u in units)
    g = solve(units, size_budget=budget, method="greedy")
    m = solve(units, size_budget=budget, method="milp")
    assert g.feasible and g.size <= budget + 1e-9
    assert m.error <= g.error + 1e-9
    # greedy on the convex hull is never worse than the all-smallest start
    assert g.error <= totals(units, [min(range(len(u)), key=lambda o, u=u: u[o].size) for u in units])[0] + 1e-9


def test_infeasible_budget_is_reported():
    units = _instance(0)
    for method in ("milp", "greedy"):
        sol = solve(units, size_budget=floor(units) * 0.5, method=method)
        assert not sol.feasible


def test_reproducible():
    units = _instance(42, units=30, options=5)
    budget = 0.5 * sum(max(i.size for i in u) for u in units)
    a = solve(units, size_budget=budget)
    b = solve(units, size_budget=budget)
    assert a.choice == b.choice and a.error == b.error


def test_unbounded_picks_least_error():
    units = _instance(3)
    sol = solve(units)
    assert sol.error == pytest.approx(sum(min(i.error for i in u) for u in units))


@pytest.mark.parametrize("seed", range(6))
def test_milp_with_a_decode_budget_matches_brute_force_and_greedy_keeps_it(seed):
    """A third resource (one decode step's ms) bounds the choice like size and prefill latency do, shared costs once."""
    rng = np.random.default_rng(seed + 30)
    units = [[Item(it.error, it.size, it.latency, float(rng.uniform(0.1, 2))) for it in u] for u in _instance(seed + 30)]
    shared = [SharedCost(((0, 1), (2, 1)), latency=1.0, decode=0.7)]
    size = 0.7 * sum(max(i.size for i in u) for u in units)
    dec = 0.5 * sum(max(i.decode for i in u) for u in units)
    best = None
    for choice in itertools.product(*[range(len(u)) for u in units]):
        e, s, _ = totals(units, list(choice), shared)
        if s <= size + 1e-9 and decode_total(units, list(choice), shared) <= dec + 1e-9 and (best is None or e < best[0] - 1e-12):
            best = (e, list(choice))
    sol = solve(units, size_budget=size, decode_budget=dec, shared=shared, method="milp")
    if best is None:
        assert not sol.feasible
        return
    assert sol.feasible and sol.error == pytest.approx(best[0], abs=1e-7)
    assert sol.decode == pytest.approx(decode_total(units, sol.choice, shared)) and sol.decode <= dec + 1e-6
    g = solve(units, size_budget=size, decode_budget=dec, shared=shared, method="greedy")
    if g.feasible:  # shared costs are spread over members there: its own total may be below the true one
        assert g.size <= size + 1e-9 and decode_total(units, g.choice) <= dec + 1e-9
