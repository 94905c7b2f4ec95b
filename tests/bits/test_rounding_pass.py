"""The searched grids inside the bit-allocation pass: offered only when ``mse_rounding`` asks, measured on
the same Gram path as the other options, emitted as simulated (tied lookups included)."""

from __future__ import annotations

import numpy as np
import pytest

from edgeprune.errors import BadInputError
from edgeprune.model_io import model_bytes
from edgeprune.passes.bits.bits_pass import BitAllocationConfig, BitAllocationPass

from test_bit_allocation import _by_layer, _ctx, _run, _tied
from tiny_models import D, T, two_layer_matmul as _two_layer


def test_off_unless_asked():
    model = _two_layer()
    result = BitAllocationPass(BitAllocationConfig(avg_bits=7.3, bit_options=(4, 8), block_size=32, dynamic_int8=False,
                                                   output_checks=0), _ctx(model))(model)
    assert not any(k.endswith("mse") for r in result.records for k in r["options"])


def test_config_refuses_unknown_roundings():
    assert BitAllocationConfig(mode="uniform", bits=4, mse_rounding="mse").mse_rounding == ("mse",)
    assert BitAllocationConfig(mode="uniform", bits=4, mse_rounding=["wmse", "mse", "mse"]).mse_rounding == ("wmse", "mse")
    with pytest.raises(BadInputError, match="mse_rounding"):
        BitAllocationConfig(mode="uniform", bits=4, mse_rounding=("hqq",))


def test_uniform_4bit_takes_the_searched_grid_for_head_and_tied_lookup():
    feeds = {"ids": np.random.default_rng(2).integers(0, 96, (1, T))}
    outs, errs = {}, {}
    for rounding in (False, ("mse",)):
        model = _tied()
        before = _run(model, feeds)
        cfg = BitAllocationConfig(mode="uniform", bits=4, block_size=32, mse_rounding=rounding)
        result = BitAllocationPass(cfg, _ctx(model))(model)
        suffix = "-mse" if rounding else ""
        assert [r["format"] for r in result.records] == [f"tied4-b32-asym{suffix}", f"nbits4-b32-asym{suffix}"]
        assert sorted(n.op_type for n in model.graph) == ["Cast", "GatherBlockQuantized", "MatMulNBits", "Reshape", "Tanh"]
        assert model_bytes(model) == result.summary["unit_bytes"] + result.summary["other_bytes"]
        outs[rounding], errs[rounding] = _run(model, feeds), result.records[1]["rel_error"]
        assert np.linalg.norm(outs[rounding] - before) / np.linalg.norm(before) < 0.15
    assert errs[("mse",)] < errs[False]  # the head's measured output error
    assert not np.array_equal(outs[("mse",)], outs[False])


def test_auto_measures_both_searched_grids_beside_round_to_nearest():
    model = _two_layer()
    cfg = BitAllocationConfig(avg_bits=5.2, bit_options=(4,), block_size=32, dynamic_int8=False, output_checks=0,
                              accuracy_levels=(0,), no_slower=False,
                              mse_rounding=("mse",))
    result = BitAllocationPass(cfg, _ctx(model))(model)
    for r in result.records:
        opts = r["options"]
        assert opts["nbits4-b32-asym-mse"]["bytes"] == opts["nbits4-b32-asym"]["bytes"]
        assert 0 < opts["nbits4-b32-asym-mse"]["rel_error"] < opts["nbits4-b32-asym"]["rel_error"]
        assert r["format"] == "nbits4-b32-asym-mse"  # same bytes, less error
    x = {"x": np.random.default_rng(1).standard_normal((1, T, D)).astype(np.float32)}
    assert np.isfinite(_run(model, x)).all()


def test_auto_with_wmse_emits_its_grid():
    model = _two_layer()
    cfg = BitAllocationConfig(avg_bits=5.2, bit_options=(4,), block_size=32, dynamic_int8=False, output_checks=0,
                              accuracy_levels=(0,), no_slower=False,
                              mse_rounding=("wmse",))
    result = BitAllocationPass(cfg, _ctx(model))(model)
    assert [r["format"] for r in result.records] == ["nbits4-b32-asym-wmse"] * 2  # less error, same bytes
    assert {n.op_type for n in model.graph} == {"Cast", "MatMulNBits", "Relu"}
