"""The moe pass: physical expert removal in the loop and fused forms, checked against torch with the same experts removed."""

from __future__ import annotations

import copy

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from moe_models import EXPERTS, LAYERS, fused_moe_model, prune_torch_gpt_oss, qmoe_model, prune_torch_block, prune_torch_experts, token_feed, torch_logits

from edgeprune.analysis import analyze
from edgeprune.calibration import CalibrationSet
from edgeprune.context import CompileContext
from edgeprune.errors import BadInputError, UnsupportedModelError
from edgeprune.model_io import load_model, to_proto
from edgeprune.passes.moe import MoEConfig, MoEExpertPruningPass
from edgeprune.passes.moe.moe_pass import allocate
from edgeprune.passes.moe.scores import collect_router_stats
from edgeprune.passes.registry import get_pass
from edgeprune.runtime.targets import get_target


def _context(samples) -> CompileContext:
    calib = CalibrationSet(samples, "test")
    return CompileContext(get_target("cpu"), calib, calib)


def _run(model, feed) -> np.ndarray:
    session = ort.InferenceSession(to_proto(model).SerializeToString() if isinstance(model, ir.Model) else model)
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feed.items() if k in names})[0]


def _router_weights(model) -> list[tuple[int, ...]]:
    return [tuple(model.graph.initializers[m.router.weight].shape) for m in analyze(model).moe_layers]


def _expert_matmuls(model) -> int:
    return sum(1 for n in model.graph if n.op_type == "MatMul" and "/experts." in (n.name or ""))


def test_registered():
    assert get_pass("moe") is MoEExpertPruningPass


def test_pruning_never_selected_experts_reproduces_outputs_on_the_calibration_data(mixtral, mixtral_loop_onnx):
    rng = np.random.default_rng(1)
    calib = [token_feed(rng, 1, 3)]  # 3 tokens x top-2: at most 6 of 8 experts per layer are ever selected
    model = load_model(mixtral_loop_onnx)
    stats = collect_router_stats(model, analyze(model).moe_layers, CalibrationSet(calib, "test"))
    used = [np.flatnonzero(s.frequency > 0) for s in stats]
    assert all(len(u) < EXPERTS for u in used)
    reference = _run(mixtral_loop_onnx, calib[0])
    result = MoEExpertPruningPass(MoEConfig(keep=sum(map(len, used)) / (EXPERTS * LAYERS), metric="frequency"), _context(calib))(model)
    assert result.modified
    assert [r["kept"] for r in result.records] == [u.tolist() for u in used]
    assert _router_weights(result.model) == [(16, len(u)) for u in used]  # router rows gone
    assert _expert_matmuls(result.model) == 3 * sum(map(len, used))  # expert MatMuls gone
    # Equal up to float32 rounding: the kept experts' weights exp(l_i) / sum_S exp(l_j) do not depend on the removed
    # logits, but the softmax over fewer experts rounds differently (measured: max 1.5e-6 on logits of size ~4).
    pruned = _run(result.model, calib[0])
    np.testing.assert_allclose(pruned, reference, rtol=2e-6, atol=2e-6)
    assert (pruned.argmax(-1) == reference.argmax(-1)).all()
    # and it is the torch model with those experts removed, on other data and another length
    torch_pruned = prune_torch_experts(mixtral, used)
    other = token_feed(rng, 2, 9)
    np.testing.assert_allclose(_run(result.model, other), torch_logits(torch_pruned, other), rtol=0, atol=1e-4)


@pytest.mark.parametrize(("arch", "metric"), [("mixtral", "easy"), ("olmoe", "tcess"), ("qwen2_moe", "frequency")])
def test_keep_half_matches_torch_with_the_same_experts_removed(moe_export, arch, metric):
    mixtral, path = moe_export(arch)  # OLMoE: no renormalisation; Qwen2-MoE: a shared expert that stays
    rng = np.random.default_rng(2)
    calib = [token_feed(rng, 2, 8) for _ in range(2)]
    result = MoEExpertPruningPass(MoEConfig(keep=0.5, metric=metric), _context(calib))(load_model(path))
    keeps = [r["kept"] for r in result.records]
    assert sum(map(len, keeps)) == EXPERTS * LAYERS // 2
    other = token_feed(rng, 2, 11)
    full = torch_logits(mixtral, other)
    pruned = torch_logits(prune_torch_experts(mixtral, keeps), other)
    assert np.abs(full - pruned).max() > 1e-3  # removing used experts changes the model: the check below can fail
    np.testing.assert_allclose(_run(result.model, other), pruned, rtol=0, atol=1e-4)


@pytest.mark.parametrize("keep", [0.5, 1])
def test_gpt_oss_dense_form_matches_torch_with_the_same_experts_removed(gpt_oss, keep):
    model, path = gpt_oss
    rng = np.random.default_rng(8)
    calib = [{k: v for k, v in token_feed(rng, 2, 8).items() if k != "position_ids"}]  # optimum's gpt-oss takes no position_ids
    result = MoEExpertPruningPass(MoEConfig(keep=keep, metric="tcess"), _context(calib))(load_model(path))
    keeps = [r["kept"] for r in result.records]
    assert [r["form"] for r in result.records] == ["dense"] * LAYERS
    assert sum(map(len, keeps)) == (EXPERTS * LAYERS // 2 if keep == 0.5 else LAYERS)
    stacked = [v for n, v in result.model.graph.initializers.items() if "gate_up_proj" in n]
    assert sorted(tuple(v.shape)[0] for v in stacked) == sorted(len(k) for k in keeps)  # the stacked weights lost their experts
    other = token_feed(rng, 2, 9)
    full = torch_logits(model, other)
    expected = torch_logits(prune_torch_gpt_oss(model, keeps), other)
    assert np.abs(full - expected).max() > 1e-3
    np.testing.assert_allclose(_run(result.model, other), expected, rtol=0, atol=1e-4)


def test_k_clamps_to_one_kept_expert(mixtral, mixtral_loop_onnx):
    rng = np.random.default_rng(3)
    calib = [token_feed(rng, 1, 6)]
    result = MoEExpertPruningPass(MoEConfig(keep=1), _context(calib))(load_model(mixtral_loop_onnx))
    assert [(r["units_after"], r["top_k_before"], r["top_k_after"]) for r in result.records] == [(1, 2, 1)] * LAYERS
    other = token_feed(rng, 1, 5)
    expected = torch_logits(prune_torch_experts(mixtral, [r["kept"] for r in result.records]), other)
    np.testing.assert_allclose(_run(result.model, other), expected, rtol=0, atol=1e-4)


def test_router_stats_match_torch_router_logits(mixtral, mixtral_loop_onnx):
    rng = np.random.default_rng(4)
    feeds = [token_feed(rng, 2, 5)]
    feeds[0]["attention_mask"][1, 3:] = 0  # padded positions are left out
    model = load_model(mixtral_loop_onnx)
    stats = collect_router_stats(model, analyze(model).moe_layers, CalibrationSet(feeds, "test"))
    with torch.no_grad():
        out = mixtral(input_ids=torch.from_numpy(feeds[0]["input_ids"]), attention_mask=torch.from_numpy(feeds[0]["attention_mask"]), output_router_logits=True)
    valid = feeds[0]["attention_mask"].reshape(-1).astype(bool)
    for s, logits in zip(stats, out.router_logits):
        p = torch.softmax(logits.double(), dim=-1).numpy()[valid]
        top = np.argsort(-p, axis=1)[:, :2]
        sel = np.zeros_like(p, dtype=bool)
        np.put_along_axis(sel, top, True, axis=1)
        assert s.tokens == 8
        np.testing.assert_allclose(s.frequency, sel.mean(axis=0), atol=1e-12)
        np.testing.assert_allclose(s.tcess, (p * sel).mean(axis=0), atol=1e-6)
        assert s.easy is not None and np.all(s.easy[~sel.any(axis=0)] == 0) and np.all(s.easy[sel.any(axis=0)] > 0)


def test_fused_moe_pruned_matches_torch_block(mixtral):
    block = mixtral.model.layers[0].block_sparse_moe
    proto = fused_moe_model(block)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((12, 16)).astype(np.float32)
    with torch.no_grad():
        full = block(torch.from_numpy(x)[None])[0][0].numpy()
    np.testing.assert_allclose(_run(proto.SerializeToString(), {"x": x}), full, rtol=0, atol=1e-5)  # the fused graph is the block
    calib = [{"x": rng.standard_normal((6, 16)).astype(np.float32)} for _ in range(2)]
    result = MoEExpertPruningPass(MoEConfig(keep=3, metric="easy"), _context(calib))(ir.from_proto(proto))
    (record,) = result.records
    assert (record["units_after"], record["form"], record["top_k_after"]) == (3, "fused", 2)
    assert tuple(result.model.graph.initializers["fc1"].shape) == (3, 64, 16)
    assert tuple(result.model.graph.initializers["router.weight"].shape) == (16, 3)
    with torch.no_grad():
        expected = prune_torch_block(block, record["kept"])(torch.from_numpy(x)[None])[0][0].numpy()
    assert np.abs(expected - full).max() > 1e-3
    np.testing.assert_allclose(_run(result.model, {"x": x}), expected, rtol=0, atol=1e-5)


def test_qmoe_int8_pruned_equals_qmoe_built_from_the_kept_experts(mixtral):
    block = mixtral.model.layers[1].block_sparse_moe
    rng = np.random.default_rng(7)
    x = rng.standard_normal((12, 16)).astype(np.float32)
    with torch.no_grad():
        full = block(torch.from_numpy(x)[None])[0][0].numpy()
    quantized = _run(qmoe_model(block).SerializeToString(), {"x": x})
    assert np.linalg.norm(quantized - full) / np.linalg.norm(full) < 0.02  # int8 weights: the QMoE graph is the block
    calib = [{"x": rng.standard_normal((6, 16)).astype(np.float32)}]
    result = MoEExpertPruningPass(MoEConfig(keep=0.25, metric="tcess", allocation="uniform"), _context(calib))(ir.from_proto(qmoe_model(block)))
    (record,) = result.records
    assert (record["form"], record["units_after"], record["top_k_after"]) == ("fused", 2, 2)
    assert {n: tuple(v.shape) for n, v in result.model.graph.initializers.items()} == {
        "router.weight": (16, 2), "fc1": (2, 64, 16), "fc1_scales": (2, 64), "fc2": (2, 16, 32), "fc2_scales": (2, 16)}  # fmt: skip
    expected = _run(qmoe_model(block, record["kept"]).SerializeToString(), {"x": x})
    np.testing.assert_array_equal(_run(result.model, {"x": x}), expected)


def test_fused_easy_score_matches_torch_experts(mixtral):
    block = mixtral.model.layers[1].block_sparse_moe
    model = ir.from_proto(fused_moe_model(block))
    x = np.random.default_rng(6).standard_normal((10, 16)).astype(np.float32)
    (stats,) = collect_router_stats(model, analyze(model).moe_layers, CalibrationSet([{"x": x}], "test"))
    block = copy.deepcopy(block).double()  # the session's model stays float32
    with torch.no_grad():
        xt = torch.from_numpy(x).double()
        p = torch.softmax(xt @ block.gate.weight.T, dim=-1)
        w, top = torch.topk(p, 2, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        easy = np.zeros(EXPERTS)
        for t in range(10):
            for j in range(2):
                e = int(top[t, j])
                out = block.experts[e](xt[t : t + 1])
                easy[e] += float(w[t, j]) * float(out.norm())
    np.testing.assert_allclose(stats.easy, easy / 10, rtol=1e-6)  # ORT's router logits are float32


def test_keep_all_is_a_no_op(mixtral_loop_onnx):
    model = load_model(mixtral_loop_onnx)
    before = to_proto(model).SerializeToString()
    result = MoEExpertPruningPass(MoEConfig(keep=1.0), None)(model)
    assert not result.modified and to_proto(result.model).SerializeToString() == before


def test_traced_export_is_refused_by_the_pass(mixtral_traced_onnx):
    with pytest.raises(UnsupportedModelError) as err:
        MoEExpertPruningPass(MoEConfig(keep=0.5), None)(load_model(mixtral_traced_onnx))
    assert str(err.value).startswith("MoE layer 0 routes to 8 experts but its graph picks expert slots with a computed index")


def test_no_calibration_data_and_no_moe_layers_are_refused(mixtral_loop_onnx):
    with pytest.raises(BadInputError) as err:
        MoEExpertPruningPass(MoEConfig(keep=0.5), None)(load_model(mixtral_loop_onnx))
    assert str(err.value) == "the moe pass scores experts by how the calibration data routes: pass calibration samples (--calib)."
    import onnx

    plain = ir.from_proto(onnx.parser.parse_model('<ir_version: 10, opset_import: ["" : 17]> g (float[N, 4] x) => (float[N, 4] y) { y = Relu(x) }'))
    with pytest.raises(UnsupportedModelError) as err:
        MoEExpertPruningPass(MoEConfig(keep=0.5), None)(plain)
    assert str(err.value) == "the moe pass found no MoE layer (router -> TopK, or com.microsoft.MoE) in the model: drop --moe-keep for this model."


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"keep": 1.5}, "moe keep as a fraction must be in (0, 1], got 1.5: e.g. keep = 0.5 keeps half the experts."),
        ({"keep": 0}, "moe keep as a count must be >= 1 expert per layer, got 0."),
        ({"keep": "half"}, "moe keep must be a number, got 'half': e.g. keep = 0.5 keeps half the experts, keep = 4 keeps 4 per layer."),
        ({"metric": "gini"}, "unknown moe metric 'gini': choose one of tcess, easy, frequency, loss."),
        ({"allocation": "floor"}, "unknown moe allocation 'floor': choose one of global, uniform."),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(BadInputError) as err:
        MoEExpertPruningPass.from_options(options)
    assert str(err.value) == f"bad options for pass 'moe': {message}." or str(err.value) == message


def test_global_allocation_takes_from_layers_whose_routing_is_concentrated():
    flat = np.full(4, 0.25)
    peaked = np.array([0.7, 0.2, 0.05, 0.05])
    assert [k.tolist() for k in allocate([flat, peaked], 0.5)] == [[0, 1, 2], [0]]
    assert [k.tolist() for k in allocate([flat, peaked], 0.5, "uniform")] == [[0, 1], [0, 1]]
    assert [k.tolist() for k in allocate([flat, peaked], 3)] == [[0, 1, 2], [0, 1, 2]]
    assert [k.tolist() for k in allocate([peaked[::-1].copy(), flat], 0.25, min_keep=2)] == [[2, 3], [0, 1]]


def test_replaying_a_choice_gives_the_same_model_without_calibration(mixtral_loop_onnx):
    rng = np.random.default_rng(4)
    calib = [token_feed(rng, 2, 8) for _ in range(2)]
    chosen = MoEExpertPruningPass(MoEConfig(keep=0.5), _context(calib))(load_model(mixtral_loop_onnx))
    kept = [r["kept"] for r in chosen.records]
    replayed = MoEExpertPruningPass(MoEConfig(experts=kept))(load_model(mixtral_loop_onnx))  # no context: nothing is measured
    assert [r["kept"] for r in replayed.records] == kept and replayed.summary["experts"] == "replayed"
    feed = token_feed(rng, 1, 5)
    np.testing.assert_array_equal(_run(replayed.model, feed), _run(chosen.model, feed))


@pytest.mark.parametrize(
    ("experts", "sentence"),
    [
        ([[0, 1]], "moe experts lists 1 layer(s), and the model has 2 MoE layers: give one list per layer."),
        ([[0, 1], [2, 8]], "moe experts names expert 8 in MoE layer 1, which has 8 experts (0-7)."),
    ],
)
def test_bad_replay_is_one_sentence(mixtral_loop_onnx, experts, sentence):
    with pytest.raises(BadInputError) as err:
        MoEExpertPruningPass(MoEConfig(experts=experts))(load_model(mixtral_loop_onnx))
    assert str(err.value) == sentence


@pytest.mark.parametrize(
    ("options", "sentence"),
    [
        ({"experts": [[0], []]}, "moe experts must list, per MoE layer, the expert indices to keep (at least one each), e.g. [[0, 3], [1, 2]]."),
        ({"tasks": {}}, "moe tasks must be a table of task name -> calibration file, got {}."),
        ({"tasks": {"a": "a.npz"}, "experts": [[0]]}, "moe takes either tasks (choose experts per task) or experts (replay a choice), not both."),
    ],
)
def test_bad_task_or_replay_options_are_one_sentence(options, sentence):
    with pytest.raises(BadInputError) as err:
        MoEConfig(**options)
    assert str(err.value) == sentence
