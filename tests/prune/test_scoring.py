"""Importance metrics checked by hand on small arrays."""

import numpy as np
import pytest

from edgeprune.passes.prune import scoring


def test_magnitude_l1_and_l2_sum_over_every_matrix_of_the_unit():
    producer = np.array([[1.0, -2.0], [0.0, 3.0], [4.0, 0.0]])  # 3 channels x fan 2
    consumer = np.array([[2.0], [-1.0], [0.0]])
    assert scoring.magnitude([producer, consumer], p=1).tolist() == [5.0, 4.0, 4.0]
    l2 = scoring.magnitude([producer, consumer], p=2)
    np.testing.assert_allclose(l2, np.sqrt([1 + 4 + 4, 9 + 1, 16]))


def test_magnitude_reduces_channels_onto_heads():
    w = np.arange(8.0).reshape(4, 2)  # 4 channels = 2 heads of 2
    np.testing.assert_allclose(scoring.magnitude([w], unit_size=2, p=1), [0 + 1 + 2 + 3, 4 + 5 + 6 + 7])
    np.testing.assert_allclose(scoring.magnitude([w], unit_size=2, p=2), np.sqrt([0 + 1 + 4 + 9, 16 + 25 + 36 + 49]))


def test_wanda_sp_weights_each_weight_by_the_norm_of_what_it_multiplies():
    cons = np.array([[1.0, -1.0], [2.0, 0.0]])  # 2 channels x 2 outputs
    cons_norm = np.array([3.0, 0.5])
    prod = np.array([[1.0, 2.0, 0.0], [0.0, -1.0, 1.0]])  # 2 channels x 3 inputs
    in_norm = np.array([1.0, 10.0, 100.0])
    got = scoring.wanda_sp((cons, cons_norm), [(prod, in_norm)])
    expected = [2 * 3.0 + (1 * 1 + 2 * 10), 2 * 0.5 + (10 + 100)]
    np.testing.assert_allclose(got, expected)


def test_flap_is_variance_times_squared_row_norm_summed_per_head():
    w = np.array([[1.0, 1.0], [2.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
    var = np.array([2.0, 1.0, 0.5, 4.0])
    np.testing.assert_allclose(scoring.flap(w, var), [4.0, 4.0, 4.5, 4.0])
    np.testing.assert_allclose(scoring.flap(w, var, unit_size=2), [8.0, 8.5])


def test_shape_mistakes_are_refused():
    with pytest.raises(ValueError):
        scoring.reduce_units(np.ones(5), 2)
    with pytest.raises(ValueError):
        scoring.flap(np.ones((3, 2)), np.ones(2))
    with pytest.raises(ValueError):
        scoring.magnitude([np.ones((3, 2)), np.ones((4, 2))])
