"""smooth: activation scales moved into the weights exactly, where they can be absorbed, and nowhere else."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from edgeprune import kv_cache
from edgeprune.calibration import CalibrationSet
from edgeprune.context import CompileContext
from edgeprune.errors import BadInputError
from edgeprune.model_io import to_proto
from edgeprune.passes.cleanup import CleanupPass
from edgeprune.passes.smooth import SmoothConfig, SmoothPass
from edgeprune.passes.smooth.smooth_pass import smoothing_scales
from edgeprune.runtime.targets import get_target

C, N, T = 16, 12, 8


def _ctx(rows: list[dict]) -> CompileContext:
    calib = CalibrationSet(rows, "test rows", synthetic=True)
    return CompileContext(target=get_target("cpu"), calibration=calib, holdout=calib)


def _run(model: ir.Model | onnx.ModelProto, feeds: dict, outputs=None) -> list[np.ndarray]:
    proto = to_proto(model) if isinstance(model, ir.Model) else model
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(outputs, feeds)


def _norm_block(seed: int = 0, *, extra_reader: str | None = None, shared_gamma: bool = False) -> onnx.ModelProto:
    """x -> Mul(x, gamma) read by two MatMuls (q/k-like) -> Add; then Mul(silu(gate), up) -> down."""
    rng = np.random.default_rng(seed)
    w = lambda *s: numpy_helper.from_array((rng.standard_normal(s) * 0.2).astype(np.float32))  # noqa: E731
    inits = []
    for name, shape in (("gamma", (C,)), ("Wq", (C, N)), ("Wk", (C, N)), ("Wg", (N, C)), ("Wu", (N, C)), ("Wd", (C, N))):
        t = w(*shape)
        t.name = name
        inits.append(t)
    inits[0] = numpy_helper.from_array((1 + rng.random(C)).astype(np.float32), "gamma")
    nodes = [
        helper.make_node("Mul", ["x", "gamma"], ["h"], name="norm_mul"),
        helper.make_node("MatMul", ["h", "Wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["h", "Wk"], ["k"], name="k_proj"),
        helper.make_node("Add", ["q", "k"], ["qk"], name="add"),
        helper.make_node("MatMul", ["qk", "Wg"], ["g"], name="gate_proj"),
        helper.make_node("Sigmoid", ["g"], ["sg"], name="sig"),
        helper.make_node("Mul", ["g", "sg"], ["act"], name="silu"),
        helper.make_node("MatMul", ["qk", "Wu"], ["u"], name="up_proj"),
        helper.make_node("Mul", ["act", "u"], ["gated"], name="gate_mul"),
        helper.make_node("MatMul", ["gated", "Wd"], ["y"], name="down_proj"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", T, N])]
    if extra_reader:
        nodes.append(helper.make_node(extra_reader, ["h"], ["side"], name="side_reader"))
        outputs.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, ["b", T, C]))
    if shared_gamma:
        nodes.append(helper.make_node("Mul", ["x", "gamma"], ["h2"], name="other_mul"))
        outputs.append(helper.make_tensor_value_info("h2", TensorProto.FLOAT, ["b", T, C]))
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", T, C])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _rows(n: int = 6, seed: int = 1, outlier: float = 1.0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        x = rng.standard_normal((1, T, C)).astype(np.float32)
        x[..., 3] *= outlier
        rows.append({"x": x})
    return rows


def _weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {name: v.const_value.numpy().copy() for name, v in model.graph.initializers.items()}


def test_scales_are_the_smoothquant_formula_and_the_outputs_unchanged():
    proto = _norm_block()
    rows = _rows(outlier=30.0)
    model = ir.from_proto(proto)
    before = _weights(model)
    h, gated = zip(*(_acts(proto, r) for r in rows))
    result = SmoothPass(SmoothConfig(alpha=0.6), _ctx(rows))(model)
    after = _weights(result.model)

    s_norm = smoothing_scales(np.abs(np.concatenate(h)).reshape(-1, C).max(0), [before["Wq"], before["Wk"]], 0.6)
    np.testing.assert_allclose(s_norm, (np.abs(np.concatenate(h)).reshape(-1, C).max(0) ** 0.6
                                        / np.maximum(np.abs(before["Wq"]).max(1), np.abs(before["Wk"]).max(1)) ** 0.4),
                               rtol=1e-6)
    np.testing.assert_allclose(after["gamma"], before["gamma"] / s_norm, rtol=1e-6)
    np.testing.assert_allclose(after["Wq"], before["Wq"] * s_norm[:, None], rtol=1e-6)
    np.testing.assert_allclose(after["Wk"], before["Wk"] * s_norm[:, None], rtol=1e-6)
    s_down = smoothing_scales(np.abs(np.concatenate(gated)).reshape(-1, C).max(0), [before["Wd"]], 0.6)
    np.testing.assert_allclose(after["Wu"], before["Wu"] / s_down[None, :], rtol=1e-6)
    np.testing.assert_allclose(after["Wd"], before["Wd"] * s_down[:, None], rtol=1e-6)
    np.testing.assert_array_equal(after["Wg"], before["Wg"])  # qk is read by gate and up: not a group (Add produces it)
    assert result.summary["groups"] == 2 and result.summary["by_kind"] == {"gamma": 1, "gated": 1}
    assert [r["reason"] for r in result.records if "reason" in r] == ["produced by Add"]
    for r in rows:
        np.testing.assert_allclose(_run(result.model, r)[0], _run(proto, r)[0], rtol=1e-4, atol=1e-5)


def _acts(proto: onnx.ModelProto, feeds: dict) -> tuple[np.ndarray, np.ndarray]:
    extra = onnx.ModelProto()
    extra.CopyFrom(proto)
    for name in ("h", "gated"):
        extra.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return tuple(_run(extra, feeds, ["h", "gated"]))


def test_an_activation_another_op_reads_is_left_alone():
    proto = _norm_block(extra_reader="Relu")
    model = ir.from_proto(proto)
    before = _weights(model)
    result = SmoothPass(SmoothConfig(), _ctx(_rows()))(model)
    after = _weights(result.model)
    assert [r["reason"] for r in result.records if r.get("activation") == "h"] == ["also read by Relu side_reader"]
    for name in ("gamma", "Wq", "Wk"):
        np.testing.assert_array_equal(after[name], before[name])


def test_a_shared_norm_scale_is_copied_for_the_smoothed_reader():
    """cleanup merges equal norm weights (all ones in a fresh model): the other reader keeps the original."""
    proto = _norm_block(shared_gamma=True)
    rows = _rows(outlier=30.0)
    model = ir.from_proto(proto)
    before = _weights(model)
    result = SmoothPass(SmoothConfig(), _ctx(rows))(model)
    after = _weights(result.model)
    np.testing.assert_array_equal(after["gamma"], before["gamma"])
    assert sorted(set(after) - set(before)) == ["gamma_smoothed"]
    assert not np.allclose(after["gamma_smoothed"], before["gamma"])
    for r in rows:
        for got, want in zip(_run(result.model, r), _run(proto, r)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_smoothing_lowers_dynamic_int8_error_on_an_outlier_channel(tmp_path):
    proto = _norm_block()
    rows = _rows(outlier=50.0)
    smoothed = to_proto(SmoothPass(SmoothConfig(alpha=0.7), _ctx(rows))(ir.from_proto(proto)).model)

    def dyn8_error(p: onnx.ModelProto, tag: str) -> float:
        src, dst = tmp_path / f"{tag}.onnx", tmp_path / f"{tag}-q.onnx"
        onnx.save(p, src)
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True)
        q = onnx.load(dst)
        errs = [np.linalg.norm(_run(q, r)[0] - _run(proto, r)[0]) / np.linalg.norm(_run(proto, r)[0]) for r in _rows(seed=9, outlier=50.0)]
        return float(np.mean(errs))

    plain, smooth = dyn8_error(proto, "plain"), dyn8_error(smoothed, "smooth")
    assert smooth < 0.75 * plain, (plain, smooth)  # 0.66x here; gate/up (an Add's output) stay unsmoothed


def test_a_decoder_with_a_cache_keeps_its_outputs(tmp_path):
    from tiny_models import tiny_llama_with_past

    path = tiny_llama_with_past(tmp_path)
    model = CleanupPass()(ir.load(path)).model
    reference = to_proto(model).SerializeToString()
    ids = np.random.default_rng(0).integers(0, 96, (1, 12))

    def feeds(session):
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(12)[None],
                **kv_cache.empty_cache(kv_cache.session_cache(session), 1)}

    ref = ort.InferenceSession(reference, providers=["CPUExecutionProvider"])
    rows = [feeds(ref) | {"input_ids": np.random.default_rng(s).integers(0, 96, (1, 12))} for s in range(4)]
    result = SmoothPass(SmoothConfig(), _ctx(rows))(model)
    # two layers x (attention norm -> q/k/v, FFN norm -> gate/up, gated product -> down) + final norm -> untied head
    assert result.summary["groups"] == 7 and result.summary["matmuls"] == 2 * (3 + 2 + 1) + 1
    got = ort.InferenceSession(to_proto(result.model).SerializeToString(), providers=["CPUExecutionProvider"])
    want = ref.run(None, feeds(ref))
    for a, b in zip(got.run(None, feeds(got)), want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("alpha", [0, 1, 1.5, "x", True])
def test_alpha_outside_the_open_interval_is_refused(alpha):
    with pytest.raises(BadInputError) as err:
        SmoothConfig(alpha=alpha)
    assert str(err.value) == f"smooth alpha must be a number in (0, 1), not {alpha!r}: e.g. --smooth 0.7."
