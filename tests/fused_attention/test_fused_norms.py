"""fuse_norms: residual Add + RMSNorm -> com.microsoft.SkipSimplifiedLayerNormalization, the same function;
norms without a residual, over another axis, or after a bias Add stay as they were."""

from __future__ import annotations

import numpy as np
import onnx.parser
import onnx_ir as ir
import onnxruntime as ort
import pytest

from edgeprune import kv_cache
from edgeprune.passes.fused_attention import FusedAttentionPass, FusedNormsPass


def _block(axes: str = "-1", skip: str = "b") -> ir.Model:
    """h = a + skip; y = w * (h / sqrt(mean(h^2) + eps)); z = h + y (the next residual reads h)."""
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3, 8] a, float[2, 3, 8] b) => (float[2, 3, 8] y, float[2, 3, 8] z) {{
        h = Add(a, {skip})
        two = Constant <value = float {{2.0}}> ()
        p = Pow(h, two)
        m = ReduceMean <axes = [{axes}], keepdims = 1> (p)
        eps = Constant <value = float {{1e-5}}> ()
        e = Add(m, eps)
        s = Sqrt(e)
        one = Constant <value = float {{1.0}}> ()
        r = Div(one, s)
        n = Mul(h, r)
        y = Mul(w, n)
        z = Add(h, y)
    }}
    """
    model = ir.from_proto(onnx.parser.parse_model(text))
    rng = np.random.default_rng(0)
    w = ir.Value(name="w", const_value=ir.tensor((1 + 0.1 * rng.standard_normal(8)).astype(np.float32), name="w"))
    model.graph.register_initializer(w)
    bias = ir.Value(name="c", const_value=ir.tensor(rng.standard_normal(8).astype(np.float32), name="c"))
    model.graph.register_initializer(bias)
    for node in model.graph:
        for i, v in enumerate(node.inputs):
            if v is not None and v.name in ("w", "c") and v.producer() is None and v is not model.graph.initializers[v.name]:
                node.replace_input_with(i, model.graph.initializers[v.name])
    return model


def _run(model: ir.Model, feeds):
    return ort.InferenceSession(ir.to_proto(model).SerializeToString()).run(None, feeds)


def test_residual_rms_norm_becomes_one_op_and_computes_the_same():
    rng = np.random.default_rng(1)
    feeds = {"a": rng.standard_normal((2, 3, 8)).astype(np.float32), "b": rng.standard_normal((2, 3, 8)).astype(np.float32)}
    ref = _run(_block(), feeds)
    result = FusedNormsPass()(_block())
    assert result.modified and result.summary == {"fused": 1}
    assert [n.op_type for n in result.model.graph if n.op_type not in ("Constant",)] == ["SkipSimplifiedLayerNormalization", "Add"]
    proto = ir.to_proto(result.model)
    onnx.checker.check_model(proto)
    # The mean and inverse std nothing reads are absent, as in onnxruntime-genai's graphs (ORT writes any output present).
    assert [len(o) > 0 for o in next(n for n in proto.graph.node if n.op_type.startswith("Skip")).output] == [True, False, False, True]
    got = _run(result.model, feeds)
    for r, g in zip(ref, got):  # the norm and the residual sum the next layer reads
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("axes, skip, reason", [("1", "b", "over another axis"), ("-1", "c", "a bias Add, not a residual")])
def test_other_forms_stay(axes, skip, reason):
    result = FusedNormsPass()(_block(axes=axes, skip=skip))
    assert not result.modified and result.summary == {"fused": 0}, reason
    assert "Pow" in [n.op_type for n in result.model.graph]


@pytest.fixture(scope="module")
def cleaned_llama(tmp_path_factory):
    """A 2-layer LLaMA with past after cleanup (compile's first pass: no-op Casts folded away)."""
    from tiny_models import tiny_llama_with_past

    from edgeprune.passes.cleanup import CleanupPass

    raw = tiny_llama_with_past(tmp_path_factory.mktemp("norms_llama"), heads=2, kv_heads=1)
    path = raw.parent / "clean.onnx"
    ir.save(CleanupPass()(ir.load(raw)).model, path)
    return path


@pytest.mark.parametrize("attention", [False, True])
def test_llama_norms_fused_with_and_without_fused_attention(cleaned_llama, attention, tmp_path):
    from edgeprune.runtime.generation import measure_generation

    model = ir.load(cleaned_llama)
    if attention:
        model = FusedAttentionPass()(model).model
    result = FusedNormsPass()(model)
    # 2 layers: the attention and MLP residuals of each feed a norm (the last one the final norm); the first
    # layer's input norm reads the embedding, no residual, and is left to ORT
    assert result.summary == {"fused": 4}
    assert [n.op_type for n in result.model.graph].count("Pow") == 1
    ir.save(result.model, tmp_path / "fused.onnx")
    assert kv_cache.model_cache(ir.load(tmp_path / "fused.onnx")) == kv_cache.model_cache(ir.load(cleaned_llama))
    a, b = ort.InferenceSession(str(cleaned_llama)), ort.InferenceSession(str(tmp_path / "fused.onnx"))
    ids = np.random.default_rng(0).integers(0, 96, (2, 9))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.tile(np.arange(9), (2, 1)),
             **kv_cache.empty_cache(kv_cache.session_cache(a), 2)}  # fmt: skip
    for r, g in zip(a.run(None, feeds), b.run(None, feeds)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    prompt = np.random.default_rng(3).integers(0, 96, 20).tolist()
    runs = measure_generation({"in": str(cleaned_llama), "fused": str(tmp_path / "fused.onnx")}, prompt, new_tokens=12, rounds=1, warmup=0)
    assert len(set(runs["in"].tokens)) > 1 and runs["fused"].tokens == runs["in"].tokens
