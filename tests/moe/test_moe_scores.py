"""EASY-EP's output-aware score in the dense (gpt-oss) and quantized fused (com.microsoft.QMoE) forms, against numpy references."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from edgeprune.passes.moe.scores import collect_router_stats
from edgeprune.runtime.session import make_session, run_outputs
from moe_models import EXPERTS, qmoe_int4_model, qmoe_model, token_feed

from edgeprune.analysis import analyze
from edgeprune.calibration import CalibrationSet
from edgeprune.model_io import load_model
from edgeprune.stats import _with_outputs


def _softmax(z: np.ndarray) -> np.ndarray:
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _easy(x: np.ndarray, logits: np.ndarray, k: int, expert, *, topk_softmax: bool) -> np.ndarray:
    """mean over tokens of sum over the top-k experts of routing weight x ||expert(x)||, in float64."""
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    vals = np.take_along_axis(logits if topk_softmax else _softmax(logits), top, axis=1)
    w = _softmax(vals) if topk_softmax else vals / vals.sum(axis=1, keepdims=True)
    easy = np.zeros(logits.shape[1])
    for t in range(x.shape[0]):
        for j in range(k):
            e = int(top[t, j])
            easy[e] += w[t, j] * np.linalg.norm(expert(e, x[t : t + 1]))
    return easy / x.shape[0]


def _gpt_oss_expert(experts, limit: float, alpha: float):
    gate_up_w, gate_up_b = (getattr(experts, n).detach().double().numpy() for n in ("gate_up_proj", "gate_up_proj_bias"))
    down_w, down_b = (getattr(experts, n).detach().double().numpy() for n in ("down_proj", "down_proj_bias"))

    def run(e: int, x: np.ndarray) -> np.ndarray:
        h = x @ gate_up_w[e] + gate_up_b[e]
        gate, up = np.minimum(h[:, 0::2], limit), np.clip(h[:, 1::2], -limit, limit)
        glu = gate / (1.0 + np.exp(-alpha * gate))
        return ((up + 1.0) * glu) @ down_w[e] + down_b[e]

    return run


def test_dense_easy_score_matches_numpy_gpt_oss_experts(gpt_oss):
    model, path = gpt_oss
    onnx_model = load_model(path)
    layers = analyze(onnx_model).moe_layers
    assert [layer.form for layer in layers] == ["dense"] * len(model.model.layers)
    names = {v.name for v in onnx_model.graph.inputs}
    feeds = []
    for seed in (0, 1):
        feed = token_feed(np.random.default_rng(seed), 1, 9)
        feeds.append({k: v for k, v in feed.items() if k in names})
    stats = collect_router_stats(onnx_model, layers, CalibrationSet(feeds, "test"))
    router_inputs = [layer.router.input for layer in layers]  # the hidden states entering each MoE block, from ORT itself
    session = make_session(_with_outputs(onnx_model, router_inputs), "cpu")
    hidden = [np.concatenate(xs) for xs in zip(*[[h.reshape(-1, h.shape[-1]) for h in run_outputs(session, router_inputs, f)] for f in feeds])]
    for s, x, decoder in zip(stats, hidden, model.model.layers):
        router, experts = decoder.mlp.router, decoder.mlp.experts
        x = x.astype(np.float64)
        logits = x @ router.weight.detach().double().numpy().T + router.bias.detach().double().numpy()
        expected = _easy(x, logits, router.top_k, _gpt_oss_expert(experts, experts.limit, experts.alpha), topk_softmax=True)
        assert s.tokens == 18 and s.easy is not None
        np.testing.assert_allclose(s.easy, expected, rtol=1e-4, atol=1e-7)
        assert (s.easy > 0).sum() >= 2


def _dequantize(q: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """QMoE's int dequantization, (code - 2^(bits-1)) * scale, per row or per block along K; codes LSB-first."""
    if bits == 4:
        q = np.stack([q & 0x0F, q >> 4], axis=-1).reshape(*q.shape[:-1], -1)
    codes = q.astype(np.float64) - 2 ** (bits - 1)
    if scales.ndim == codes.ndim - 1:
        return codes * scales[..., None]
    block = codes.shape[-1] // scales.shape[-1]
    return codes * np.repeat(scales.astype(np.float64), block, axis=-1)


@pytest.mark.parametrize(("build", "bits"), [(qmoe_model, 8), (qmoe_int4_model, 4)])
def test_qmoe_easy_score_matches_numpy_dequantized_experts(mixtral, build, bits):
    block = mixtral.model.layers[0].block_sparse_moe
    proto = build(block)
    arrays = {t.name: __import__("onnx").numpy_helper.to_array(t) for t in proto.graph.initializer}
    fc1 = np.stack([_dequantize(arrays["fc1"][e], arrays["fc1_scales"][e], bits) for e in range(EXPERTS)])
    fc2 = np.stack([_dequantize(arrays["fc2"][e], arrays["fc2_scales"][e], bits) for e in range(EXPERTS)])

    def expert(e: int, x: np.ndarray) -> np.ndarray:
        h = x @ fc1[e].T
        g, lin = h[:, 0::2], h[:, 1::2]
        return (g / (1.0 + np.exp(-g)) * lin) @ fc2[e].T

    x = np.random.default_rng(11).standard_normal((20, 16)).astype(np.float32)
    model = ir.from_proto(proto)
    (layer,) = analyze(model).moe_layers
    assert layer.form == "fused"
    (s,) = collect_router_stats(model, [layer], CalibrationSet([{"x": x[:10]}, {"x": x[10:]}], "test"))
    logits = x.astype(np.float64) @ arrays["router.weight"].astype(np.float64)
    expected = _easy(x.astype(np.float64), logits, block.top_k, expert, topk_softmax=False)
    assert s.tokens == 20 and s.easy is not None
    np.testing.assert_allclose(s.easy, expected, rtol=1e-4, atol=1e-7)
