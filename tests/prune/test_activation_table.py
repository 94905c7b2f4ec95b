"""FFNs whose activation analysis recognises are pruned, not skipped: one activation table serves both.

Regression for contrib FastGelu/QuickGelu FFNs, which analysis found but the prune pass skipped because
it kept its own list of acceptable activation ops.  The pruned model must equal the unpruned one with
the removed neurons masked (bias compensation off, so masking is exact).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import onnxruntime as ort
import pytest

from edgeprune.model_io import to_proto
from edgeprune.passes.prune import PruneConfig, StructuredPruningPass
from prune_models import D, context, inputs

HIDDEN = 64
_HEADER = '<ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>'
_DECOMPOSED_QUICK_GELU = """
        c = Constant <value = float {1.702}> ()
        m = Mul(h, c)
        s = Sigmoid(m)
        a = Mul(h, s)"""
_DECOMPOSED_TANH_GELU = """
        three = Constant <value = float {3.0}> ()
        coef = Constant <value = float {0.044715}> ()
        k = Constant <value = float {0.7978846}> ()
        one = Constant <value = float {1.0}> ()
        half = Constant <value = float {0.5}> ()
        p = Pow(h, three)
        pc = Mul(p, coef)
        i = Add(h, pc)
        ik = Mul(i, k)
        t = Tanh(ik)
        t1 = Add(t, one)
        ht = Mul(h, t1)
        a = Mul(ht, half)"""
# name -> (activation as ONNX text from h to a, the name analysis gives it)
ACTIVATIONS = {
    "FastGelu": ("a = com.microsoft.FastGelu(h, b_up)", "gelu_tanh"),
    "QuickGelu": ("a = com.microsoft.QuickGelu <alpha = 1.702> (h)", "quick_gelu"),
    "decomposed_quick_gelu": (_DECOMPOSED_QUICK_GELU, "quick_gelu"),
    "decomposed_tanh_gelu": (_DECOMPOSED_TANH_GELU, "gelu_tanh"),
}


def _ffn(activation: str, seed: int = 0) -> onnx.ModelProto:
    """x -> MatMul(w_up) [+ b_up] -> activation -> MatMul(w_down) + b_down; b_up is FastGelu's own bias input."""
    rng = np.random.default_rng(seed)
    up_bias = "" if "b_up" in activation else "\n        h = Add(h0, b_up)"
    up_out = "h0" if up_bias else "h"
    text = f"""{_HEADER}
    g (float[B, S, {D}] x) => (float[B, S, {D}] y) {{
        {up_out} = MatMul(x, w_up){up_bias}
        {activation}
        d = MatMul(a, w_down)
        y = Add(d, b_down)
    }}"""
    proto = onnx.parser.parse_model(text)
    weights = {
        "w_up": rng.standard_normal((D, HIDDEN)) / np.sqrt(D),
        "b_up": rng.standard_normal(HIDDEN) * 0.5,
        "w_down": rng.standard_normal((HIDDEN, D)) / np.sqrt(HIDDEN),
        "b_down": rng.standard_normal(D) * 0.1,
    }
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(a.astype(np.float32), n) for n, a in weights.items())
    onnx.checker.check_model(proto)
    return proto


def _initializers(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}


def _masked(proto: onnx.ModelProto, kept: list[int]) -> onnx.ModelProto:
    """``proto`` with every hidden neuron not in ``kept`` zeroed: up column, up bias, down row."""
    drop = np.setdiff1d(np.arange(HIDDEN), kept)
    masked = onnx.ModelProto()
    masked.CopyFrom(proto)
    for t in masked.graph.initializer:
        arr = onnx.numpy_helper.to_array(t).copy()
        if t.name in ("w_up", "b_up"):
            arr[..., drop] = 0
        elif t.name == "w_down":
            arr[drop, :] = 0
        else:
            continue
        t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
    return masked


def _run(proto: onnx.ModelProto, feeds) -> np.ndarray:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_ffn_is_pruned_and_equals_the_masked_original(name):
    activation, expected_name = ACTIVATIONS[name]
    proto = _ffn(activation)
    model = ir.from_proto(proto)
    config = PruneConfig(ratio=0.25, metric="magnitude", compensate=False, refit=False, units="ffn")
    result = StructuredPruningPass(config, context(proto))(model)

    assert result.modified
    (record,) = result.records
    assert "skipped" not in record
    pruned = to_proto(model)
    after = _initializers(pruned)
    up_before, up_after = _initializers(proto)["w_up"], after["w_up"]
    assert up_after.shape[0] == D and up_after.shape[1] < HIDDEN
    assert after["w_down"].shape == (up_after.shape[1], D)
    # which neurons survived: each kept up column is an unchanged column of the original
    kept = [int(np.flatnonzero((up_before == col[:, None]).all(axis=0))[0]) for col in up_after.T]
    assert kept == sorted(set(kept))
    np.testing.assert_array_equal(after["b_up"], _initializers(proto)["b_up"][kept])

    from edgeprune.analysis import analyze

    (block,) = analyze(ir.from_proto(proto)).ffn_blocks
    assert block.activation == expected_name
    for batch, seq in [(1, 1), (2, 5)]:
        feeds = inputs(batch, seq, seed=7)
        np.testing.assert_allclose(_run(pruned, feeds), _run(_masked(proto, kept), feeds), rtol=1e-5, atol=1e-6)
