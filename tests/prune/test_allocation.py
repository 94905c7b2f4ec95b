"""Budget allocation on crafted scores: global vs floor vs uniform, rounding, limits."""

import numpy as np
import pytest

from edgeprune.passes.prune.allocation import GroupScores, allocate, round_width, standardize
from edgeprune.errors import BadInputError


def _groups():
    rng = np.random.default_rng(0)
    strong = GroupScores("0.ffn", "ffn", 10 + rng.random(20), unit_params=10)
    # a layer whose scores are low and skewed: a few strong units, most near zero
    weak = GroupScores("1.ffn", "ffn", np.r_[rng.random(17) * 0.01, [5.0, 6.0, 7.0]], unit_params=10)
    return [strong, weak]


def _removed_params(groups, keeps):
    return sum((g.units - len(k)) * g.unit_params for g, k in zip(groups, keeps))


def test_uniform_removes_the_same_share_everywhere():
    groups = _groups()
    keeps = allocate(groups, 0.5, "uniform")
    assert [len(k) for k in keeps] == [10, 10]
    # and keeps the best-scored units of each group
    assert set(keeps[1]) >= {17, 18, 19}


def test_global_takes_more_from_the_layer_with_skewed_low_scores():
    groups = _groups()
    keeps = allocate(groups, 0.5, "global")
    assert _removed_params(groups, keeps) == pytest.approx(0.5 * 400, abs=10)
    assert len(keeps[1]) < len(keeps[0])
    assert {17, 18, 19} <= set(keeps[1])


def test_floor_ranks_raw_scores_globally_but_keeps_the_floor():
    groups = _groups()
    floor = allocate(groups, 0.5, "floor", min_keep_fraction=0.25)
    assert len(floor[1]) == 5  # raw scores would empty layer 1 down to its floor, never below
    assert len(floor[0]) == 15
    unbounded = allocate(groups, 0.5, "floor", min_keep_fraction=0.0)
    assert len(unbounded[1]) < 5


def test_heads_and_neurons_are_compared_by_the_parameters_they_carry():
    heads = GroupScores("0.heads", "heads", np.array([0.0, 1.0, 2.0, 3.0]), unit_params=100)
    ffn = GroupScores("0.ffn", "ffn", np.linspace(0, 1, 40), unit_params=10)
    keeps = allocate([heads, ffn], 0.25, "global")
    # one ranking of standardized scores: the weakest head and the 10 weakest neurons go, 100 parameters each
    assert [k.tolist() for k in keeps] == [[1, 2, 3], list(range(10, 40))]
    assert _removed_params([heads, ffn], keeps) == 0.25 * 800


def test_round_to_keeps_multiples_and_every_group_keeps_a_unit():
    assert round_width(13, 64, 8) == 16
    assert round_width(11, 64, 8) == 8
    assert round_width(2, 64, 8) == 8
    assert round_width(63, 64, 8) == 64
    assert round_width(0, 4, 1) == 1
    g = GroupScores("0.ffn", "ffn", np.arange(64.0), unit_params=1, round_to=8)
    (keep,) = allocate([g], 0.3, "global")
    assert len(keep) % 8 == 0 and len(keep) == 48
    assert keep.tolist() == list(range(16, 64))
    tiny = GroupScores("0.heads", "heads", np.array([1.0, 2.0]), unit_params=5)
    assert len(allocate([tiny], 0.99, "global")[0]) == 1


def test_ratio_zero_keeps_everything_and_bad_inputs_are_refused():
    groups = _groups()
    assert [len(k) for k in allocate(groups, 0.0, "global")] == [20, 20]
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(BadInputError):
            allocate(groups, bad, "global")
    with pytest.raises(BadInputError):
        allocate(groups, 0.2, "best")


def test_standardize():
    np.testing.assert_allclose(standardize(np.array([1.0, 3.0])), [-1.0, 1.0])
    assert standardize(np.array([2.0, 2.0])).tolist() == [0.0, 0.0]
