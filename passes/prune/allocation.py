"""Spread a pruning budget (parameters to remove) over groups of prunable units.

A group is one layer's units of one kind (an FFN's neurons, an attention block's heads; a
conv's channels later) with a score per unit and the parameters each unit carries.  The budget
is ``ratio`` x the parameters of all groups; units of different kinds are compared by what
they carry, so removing a head counts its q/k/v/o weights, a neuron its up/gate/down weights.

- ``global`` (FLAP AL-AM): scores standardized per group ((s - mean) / std; for multi-channel
  units such as heads, channel scores are standardized and averaged per unit), then one global
  ranking; the lowest standardized units go first until the budget is met.
- ``floor`` (GlobalMP): raw score per carried parameter ranked globally, but no group keeps
  fewer than ``ceil(min_keep_fraction x units)``.
- ``uniform``: every group loses the same share of its units.

Every group keeps at least one unit (``round_to`` units for groups that round), and a group
with ``round_to > 1`` keeps a multiple of ``round_to`` units (or all of them) afterwards, so
the result is "ratio after rounding".
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from edgeprune.errors import BadInputError

METHODS = ("global", "floor", "uniform")


@dataclasses.dataclass
class GroupScores:
    """Scores of one group's units and what one unit costs in parameters."""

    name: str
    kind: str
    scores: np.ndarray
    unit_params: int
    round_to: int = 1
    channel_scores: np.ndarray | None = None
    """Per-channel scores (units x channels per unit, in unit order); ``global`` then ranks a unit by
    the mean of its standardized channel scores, as FLAP does for heads, so a head is not pushed to
    the extremes by summing many channels."""
    unit_costs: np.ndarray | None = None
    """Parameters of each unit where they differ (a conv group split into branches of different
    consumers); ``unit_params`` is then their mean.  Budgets charge a removed unit its own cost."""

    @property
    def units(self) -> int:
        return int(len(self.scores))


def standardize(scores: np.ndarray) -> np.ndarray:
    """(s - mean) / std; all-equal scores become zeros."""
    s = np.asarray(scores, dtype=np.float64)
    std = s.std()
    return np.zeros_like(s) if std == 0 or not np.isfinite(std) else (s - s.mean()) / std


def round_width(keep: int, units: int, round_to: int) -> int:
    """``keep`` rounded to the nearest multiple of ``round_to`` in [round_to, units]; ``units`` stays itself."""
    if round_to <= 1 or keep >= units:
        return min(max(keep, 1), units)
    rounded = int(round(keep / round_to)) * round_to
    rounded = max(rounded, round_to)
    return units if rounded >= units else rounded


def _min_keep(group: GroupScores, floor_fraction: float) -> int:
    low = max(1, group.round_to if group.round_to > 1 else 1)
    low = max(low, math.ceil(floor_fraction * group.units))
    return min(low, group.units)


def allocate(
    groups: Sequence[GroupScores],
    ratio: float,
    method: str = "global",
    *,
    min_keep_fraction: float = 0.1,
) -> list[np.ndarray]:
    """Indices of the units each group keeps (sorted), removing ~``ratio`` of all groups' parameters."""
    if not 0 <= ratio < 1:
        raise BadInputError(f"pruning ratio must be in [0, 1), got {ratio}.")
    if method not in METHODS:
        raise BadInputError(f"unknown allocation {method!r}: choose one of {', '.join(METHODS)}.")
    if ratio == 0 or not groups:
        return [np.arange(g.units) for g in groups]
    if method == "uniform":
        counts = [g.units - int(round(ratio * g.units)) for g in groups]
        counts = [max(c, _min_keep(g, 0.0)) for c, g in zip(counts, groups)]
    else:
        counts = _global_counts(groups, ratio, method, min_keep_fraction if method == "floor" else 0.0)
    counts = [round_width(c, g.units, g.round_to) for c, g in zip(counts, groups)]
    return [np.sort(np.argsort(-np.asarray(g.scores, dtype=np.float64), kind="stable")[:c]) for c, g in zip(counts, groups)]


def _global_key(g: GroupScores) -> np.ndarray:
    if g.channel_scores is None:
        return standardize(g.scores)
    z = standardize(np.asarray(g.channel_scores, dtype=np.float64).reshape(-1))
    return z.reshape(g.units, -1).mean(axis=1)


def _global_counts(groups: Sequence[GroupScores], ratio: float, method: str, floor_fraction: float) -> list[int]:
    """Remove units in ascending key order until the parameter budget is spent."""
    costs = [np.full(g.units, g.unit_params, dtype=np.float64) if g.unit_costs is None else np.asarray(g.unit_costs, dtype=np.float64) for g in groups]
    budget = ratio * sum(float(c.sum()) for c in costs)
    keys, owner = [], []
    # the n-th unit a group gives up is its n-th lowest score (``allocate`` keeps the top scores)
    removal_order = [np.argsort(np.asarray(g.scores, dtype=np.float64), kind="stable") for g in groups]
    for i, g in enumerate(groups):
        s = np.asarray(g.scores, dtype=np.float64)
        keys.append(_global_key(g) if method == "global" else s / np.maximum(costs[i], 1))
        owner.append(np.full(g.units, i))
    order = np.argsort(np.concatenate(keys), kind="stable")
    owners = np.concatenate(owner)[order]
    keep = [g.units for g in groups]
    lows = [_min_keep(g, floor_fraction) for g in groups]
    removed = 0.0
    for gi in owners:
        if removed >= budget:
            break
        if keep[gi] <= lows[gi]:
            continue
        removed += costs[gi][removal_order[gi][groups[gi].units - keep[gi]]]
        keep[gi] -= 1
    return keep
