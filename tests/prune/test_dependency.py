"""Channel dependency groups on tiny conv nets: what is coupled, what is sliced, and why a group stops."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import pytest

from conv_models import (chain_proto, gap_head_proto, gather_proto, inception_proto, residual_proto, separable_proto,
                         slice_proto, split_proto, unknown_op_proto)  # fmt: skip
from edgeprune.passes.prune.dependency import HANDLERS, channel_groups, summary


def _groups(proto, **kw):
    return channel_groups(ir.from_proto(proto), **kw)


def _by_producer(groups, weight):
    return next(g for g in groups if any(m.tensor == weight and m.role == "producer" for m in g.members))


def _roles(group):
    return {(m.tensor, m.role, m.axis) for m in group.members if m.role != "activation"}


def test_conv_bn_relu_conv_chain_is_one_group_with_its_parameters():
    groups = _groups(chain_proto())
    assert len(groups) == 2  # the chain's 16 channels; the last conv's output is a graph output
    g = _by_producer(groups, "w1")
    assert g.prunable and g.channels == 16 and g.reason == ""
    assert _roles(g) >= {("w1", "producer", 0), ("b1", "producer", 0), ("w2", "consumer", 1)}
    assert {("bn_s", "param", 0), ("bn_v", "param", 0), ("scale", "param", 0)} <= _roles(g)
    last = _by_producer(groups, "w2")
    assert not last.prunable and last.reason == "tensor y is a graph output"


def test_depthwise_moves_in_lockstep_with_the_expand_conv():
    g = _by_producer(_groups(separable_proto()), "w1")
    assert g.prunable
    assert len(g.lockstep) == 1 and len(g.consumers) == 1
    assert ("w2", "lockstep", 0) in _roles(g) and ("b2", "lockstep", 0) in _roles(g)
    assert ("w3", "consumer", 1) in _roles(g)
    # the Clip bounds are scalars: nothing to slice
    assert not any(m.role == "param" for m in g.members)


def test_residual_add_merges_branches_and_is_excluded_by_default():
    groups = _groups(residual_proto())
    res = _by_producer(groups, "ws")
    assert res is _by_producer(groups, "wp")  # stem and project are one group
    assert res.residual and not res.prunable
    assert res.reason == "residual: Add:a couple 2 convs on one residual stream, whose width is kept by default"
    assert res.consumers == ["Conv:h", "Conv:y"]  # expand reads the stem, head reads the sum
    inner = _by_producer(groups, "we")
    assert inner.prunable and not inner.residual
    allowed = _by_producer(_groups(residual_proto(), allow_residual=True), "ws")
    assert allowed.prunable and allowed.residual


def test_unknown_op_stops_the_group_and_names_the_op():
    g = _by_producer(_groups(unknown_op_proto()), "w1")
    assert not g.prunable
    assert g.reason == "LRN node LRN:l reads the channels and has no pruning rule"


@pytest.mark.parametrize("reshape", [False, True])
def test_global_pool_then_gemm_maps_channels_to_gemm_rows(reshape):
    g = _by_producer(_groups(gap_head_proto(reshape=reshape)), "w1")
    assert g.prunable, g.reason
    # Gemm with transB: weight [out, in], so the channel axis of the weight is 1
    assert ("wf", "consumer", 1) in _roles(g)
    assert any(m.role == "shape" for m in g.members) == reshape


def test_rule_table_and_summary():
    assert {"Conv", "BatchNormalization", "Relu", "Clip", "Add", "Mul", "Gemm", "MatMul", "Flatten"} <= set(HANDLERS)
    lines = summary(_groups(separable_proto()))
    assert lines[-1].startswith("1 of 2 channel groups prunable (16 channels)")
    d = _groups(separable_proto())[0].to_dict()
    assert d["members"][0] == {"node": "Conv:e", "io": "input", "index": 1, "axis": 0, "role": "producer", "tensor": "w1",
                               "offset": 0, "length": 16, "start": 0, "width": 16}  # fmt: skip


def _pieces(group, tensor, role):
    return sorted((m.offset, m.length, m.start, m.width) for m in group.members if m.tensor == tensor and m.role == role)


def test_concat_maps_each_branch_to_its_offset_of_the_output():
    groups = _groups(inception_proto(c1=16, c2=8))
    a, b = _by_producer(groups, "wa"), _by_producer(groups, "wb")
    assert a is not b and a.prunable and b.prunable, (a.reason, b.reason)
    # the consumer, the BN after the Concat and the depthwise conv hold branch a at 0 and branch b at 16
    for tensor, role in (("wy", "consumer"), ("bn_s", "param"), ("wd", "lockstep")):
        assert _pieces(a, tensor, role) == [(0, 16, 0, 24)]
        assert _pieces(b, tensor, role) == [(16, 8, 0, 24)]
    assert _pieces(a, "wa", "producer") == [(0, 16, 0, 16)]


def test_split_hands_each_output_its_part_of_the_group():
    for explicit in (True, False):
        g = _by_producer(_groups(split_proto(c=8, explicit=explicit)), "w1")
        assert g.prunable and g.channels == 16, g.reason
        assert _pieces(g, "w2", "consumer") == [(0, 8, 0, 8)]  # output 0: group channels 0..7
        assert _pieces(g, "w3", "consumer") == [(0, 8, 8, 8)]  # output 1: group channels 8..15
        assert sorted(m.index for m in g.members if m.role == "split") == [0, 1]


def test_slice_keeps_the_part_of_the_group_inside_its_bounds():
    g = _by_producer(_groups(slice_proto(c=16, begin=4, end=12)), "w1")
    assert g.prunable, g.reason
    assert _pieces(g, "w2", "consumer") == [(0, 8, 4, 8)]  # group channels 4..11 at positions 0..7
    assert _pieces(g, "w3", "consumer") == [(0, 16, 0, 16)]
    assert [m.axis for m in g.members if m.role == "slice"] == [0]  # entry 0 of starts/ends moves


def test_split_with_computed_sizes_and_gather_stop_with_reasons():
    g = _by_producer(_groups(gather_proto()), "w1")
    assert not g.prunable and g.reason == "Gather node Gather:p selects channels by index (channel permutations are not supported yet)"
    proto = split_proto(c=8)
    proto.graph.input.append(onnx.helper.make_tensor_value_info("sizes_in", onnx.TensorProto.INT64, [2]))
    next(n for n in proto.graph.node if n.op_type == "Split").input[1] = "sizes_in"
    g = _by_producer(_groups(proto), "w1")
    assert not g.prunable and g.reason == "Split node Split:s0 has computed sizes or sizes that do not add up to 16 channels"
