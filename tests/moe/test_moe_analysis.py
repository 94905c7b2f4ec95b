"""MoE analysis on the tiny Mixtral's exports and a fused com.microsoft.MoE graph."""

from __future__ import annotations

import json

import onnx_ir as ir
import pytest
from moe_models import EXPERTS, LAYERS, TOP_K, fused_moe_model

from edgeprune.analysis import analyze
from edgeprune.model_io import load_model


def test_loop_form_layers_routers_and_experts(mixtral_loop_onnx):
    layers = analyze(load_model(mixtral_loop_onnx)).moe_layers
    assert [(m.layer, m.form, m.num_experts, m.top_k, m.normalize, m.scoring, m.problem) for m in layers] == [
        (i, "loop", EXPERTS, TOP_K, True, "softmax", None) for i in range(LAYERS)
    ]
    for m in layers:
        assert m.router.node == f"/model/layers.{m.layer}/block_sparse_moe/gate/MatMul"
        assert (m.router.in_features, m.router.out_features) == (16, EXPERTS)
        assert m.onehot == f"/model/layers.{m.layer}/block_sparse_moe/OneHot"
        assert [e.index for e in m.experts] == list(range(EXPERTS))
        for e in m.experts:
            scope = f"/model/layers.{m.layer}/block_sparse_moe/experts.{e.index}"
            assert e.linears == [f"{scope}/w1/MatMul", f"{scope}/w3/MatMul", f"{scope}/w2/MatMul"]
        assert len({e.accumulate for e in m.experts}) == EXPERTS
        assert m.shared_experts == [] and m.prunable
    assert json.loads(json.dumps([m.to_dict() for m in layers])) == [m.to_dict() for m in layers]


@pytest.mark.parametrize(("arch", "normalize", "shared"), [("olmoe", False, []), ("qwen2_moe", False, ["shared_expert"])])
def test_olmoe_and_qwen2_moe_loop_forms(moe_export, arch, normalize, shared):
    _, path = moe_export(arch)
    layers = analyze(load_model(path)).moe_layers
    assert [(m.form, m.num_experts, m.top_k, m.normalize, m.problem, len(m.experts)) for m in layers] == [
        ("loop", EXPERTS, TOP_K, normalize, None, EXPERTS)] * LAYERS  # fmt: skip
    for m in layers:
        scope = f"/model/layers.{m.layer}/mlp"
        assert [e.linears[0] for e in m.experts] == [f"{scope}/experts.{i}/gate_proj/MatMul" for i in range(EXPERTS)]
        assert [(f.gate or f.up).node for f in m.shared_experts] == [f"{scope}/{s}/gate_proj/MatMul" for s in shared]


def test_gpt_oss_dense_form(gpt_oss):
    _, path = gpt_oss
    layers = analyze(load_model(path)).moe_layers
    assert [(m.form, m.num_experts, m.top_k, m.normalize, m.scoring, m.prunable) for m in layers] == [
        ("dense", EXPERTS, TOP_K, True, "topk_softmax", True)] * LAYERS  # fmt: skip
    for m in layers:
        scope = f"/model/layers.{m.layer}/mlp"
        assert (m.router.weight, m.router.transposed, m.router.bias) == (
            f"model.layers.{m.layer}.mlp.router.weight", True, f"model.layers.{m.layer}.mlp.router.bias")  # fmt: skip
        # gate_up MatMul + bias Add, down MatMul + bias Add (layer 1's zero biases reach it through an Identity of layer 0's)
        assert m.stacked == [(f"{scope}/experts/MatMul", 1), (f"{scope}/experts/Add", 1), (f"{scope}/experts/MatMul_1", 1), (f"{scope}/experts/Add_2", 1)]


def test_traced_hit_only_export_is_refused_with_the_reason(mixtral_traced_onnx):
    layers = analyze(load_model(mixtral_traced_onnx)).moe_layers
    assert len(layers) == LAYERS
    for m in layers:
        assert not m.prunable and m.experts == []
        assert m.problem == (
            f"MoE layer {m.layer} routes to 8 experts but its graph picks expert slots with a computed index "
            f"(/model/layers.{m.layer}/block_sparse_moe/Gather_3) instead of a constant one: the exporter traced the model's "
            "loop over the experts the tracing input happened to hit (transformers' expert_hit loop), so the graph bakes that "
            "input's routing and silently drops or misplaces experts on other inputs; re-export it with a patched expert loop "
            "over all experts (edgeprune.models.moe_export.export_mixtral, or optimum's qwen3_moe patch)."
        )


def test_fused_moe_op(mixtral):
    model = ir.from_proto(fused_moe_model(mixtral.model.layers[0].block_sparse_moe))
    (m,) = analyze(model).moe_layers
    assert (m.form, m.num_experts, m.top_k, m.normalize, m.node, m.router.weight, m.prunable) == (
        "fused", EXPERTS, TOP_K, True, "moe", "router.weight", True)  # fmt: skip
    assert [e.index for e in m.experts] == list(range(EXPERTS))


def test_router_without_experts_is_reported_not_prunable():
    import numpy as np
    import onnx

    proto = onnx.parser.parse_model(
        """<ir_version: 10, opset_import: ["" : 17]>
        g (float[N, 8] x) => (float[N, 2] vals, int64[N, 2] idx) {
            r = MatMul(x, wr)
            p = Softmax<axis = -1>(r)
            kk = Constant<value = int64[1] {2}>()
            vals, idx = TopK(p, kk)
        }"""
    )
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((8, 4), np.float32), "wr"))
    (m,) = analyze(ir.from_proto(proto)).moe_layers
    assert (m.form, m.scoring, m.normalize, m.prunable, m.experts) == ("router", "softmax", False, False, [])
