"""fuse_attention: optimum's causal attention -> com.microsoft.GroupQueryAttention, the same function,
with and without a KV cache (cache interface unchanged, decoding from the cache unchanged)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from edgeprune import kv_cache
from edgeprune.passes.fused_attention import FusedAttentionPass
from edgeprune.runtime.generation import measure_generation

pytest.importorskip("optimum.exporters.onnx")


def _export(folder, task, heads=4, kv_heads=2):
    import warnings

    import torch
    from optimum.exporters.onnx import main_export
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=256, initializer_range=0.3)
    LlamaForCausalLM(config).eval().save_pretrained(folder / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main_export(str(folder / "hf"), output=str(folder / "onnx"), task=task, opset=17, do_validation=False)
    return folder / "onnx" / "model.onnx"


@pytest.fixture(scope="module")
def with_past(tmp_path_factory):
    from tiny_models import tiny_llama_with_past

    return tiny_llama_with_past(tmp_path_factory.mktemp("gqa_past"))


def _fuse(path, out):
    model = ir.load(path)
    result = FusedAttentionPass()(model)
    ir.save(result.model, out)
    return result


def _feeds(session, ids, mask):
    n = ids.shape[1]
    return {"input_ids": ids, "attention_mask": mask, "position_ids": np.tile(np.arange(n), (ids.shape[0], 1)),
            **kv_cache.empty_cache(kv_cache.session_cache(session), ids.shape[0])}  # fmt: skip


def _right_padded_batch():
    ids = np.random.default_rng(0).integers(0, 96, (3, 11))
    mask = np.ones((3, 11), np.int64)
    mask[1, 8:] = 0
    mask[2, 4:] = 0
    return ids, mask


def test_with_past_every_block_fused_and_the_cache_interface_kept(with_past, tmp_path):
    result = _fuse(with_past, tmp_path / "fused.onnx")
    assert result.modified and result.summary == {"fused": 2, "unfused": 0, "with_cache": 2}
    fused = ir.load(tmp_path / "fused.onnx")
    assert [n.op_type for n in fused.graph if n.op_type in ("Softmax", "GroupQueryAttention")] == ["GroupQueryAttention"] * 2
    assert kv_cache.model_cache(fused) == kv_cache.model_cache(ir.load(with_past))
    assert [v.name for v in fused.graph.outputs] == [v.name for v in ir.load(with_past).graph.outputs]


def test_with_past_prefill_equals_the_input_on_real_tokens(with_past, tmp_path):
    _fuse(with_past, tmp_path / "fused.onnx")
    a, b = ort.InferenceSession(str(with_past)), ort.InferenceSession(str(tmp_path / "fused.onnx"))
    ids, mask = _right_padded_batch()
    ref, got = a.run(None, _feeds(a, ids, mask)), b.run(None, _feeds(b, ids, mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[0][real], ref[0][real], rtol=1e-5, atol=1e-5)
    for r, g in zip(ref[1:], got[1:]):  # the caches hold the real tokens' keys/values
        np.testing.assert_allclose(g[0], r[0], rtol=1e-5, atol=1e-5)


def test_with_past_decoding_from_the_cache_is_unchanged(with_past, tmp_path):
    _fuse(with_past, tmp_path / "fused.onnx")
    prompt = np.random.default_rng(3).integers(0, 96, 20).tolist()
    results = measure_generation({"in": str(with_past), "fused": str(tmp_path / "fused.onnx")}, prompt, new_tokens=12, rounds=1, warmup=0)
    assert len(set(results["in"].tokens)) > 1
    assert results["fused"].tokens == results["in"].tokens


def test_without_cache(tmp_path):
    path = _export(tmp_path, "text-generation")
    result = _fuse(path, tmp_path / "fused.onnx")
    assert result.summary == {"fused": 2, "unfused": 0, "with_cache": 0}
    a, b = ort.InferenceSession(str(path)), ort.InferenceSession(str(tmp_path / "fused.onnx"))
    ids, mask = _right_padded_batch()
    real = mask.astype(bool)
    np.testing.assert_allclose(b.run(None, _feeds(b, ids, mask))[0][real], a.run(None, _feeds(a, ids, mask))[0][real], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def multi_head_with_past(tmp_path_factory):
    """transformers skips repeat_kv when every query head has its own KV head: the unrepeated form."""
    from tiny_models import tiny_llama_with_past

    return tiny_llama_with_past(tmp_path_factory.mktemp("mha_past"), heads=4, kv_heads=4)


def _gqa_heads(path) -> list[tuple[int, int]]:
    return [(n.attributes.get_int("num_heads"), n.attributes.get_int("kv_num_heads"))
            for n in ir.load(path).graph if n.op_type == "GroupQueryAttention"]  # fmt: skip


def test_multi_head_with_past_is_fused_and_decodes_the_same(multi_head_with_past, tmp_path):
    assert not any(n.op_type == "Expand" and "self_attn" in (n.name or "") for n in ir.load(multi_head_with_past).graph)
    result = _fuse(multi_head_with_past, tmp_path / "fused.onnx")
    assert result.summary == {"fused": 2, "unfused": 0, "with_cache": 2}
    assert _gqa_heads(tmp_path / "fused.onnx") == [(4, 4), (4, 4)]
    fused = ir.load(tmp_path / "fused.onnx")
    assert not [n for n in fused.graph if n.op_type == "Softmax"]
    assert [v.name for v in fused.graph.outputs] == [v.name for v in ir.load(multi_head_with_past).graph.outputs]
    a, b = ort.InferenceSession(str(multi_head_with_past)), ort.InferenceSession(str(tmp_path / "fused.onnx"))
    ids, mask = _right_padded_batch()
    ref, got = a.run(None, _feeds(a, ids, mask)), b.run(None, _feeds(b, ids, mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[0][real], ref[0][real], rtol=1e-5, atol=1e-5)
    for r, g in zip(ref[1:], got[1:]):
        np.testing.assert_allclose(g[0], r[0], rtol=1e-5, atol=1e-5)
    prompt = np.random.default_rng(3).integers(0, 96, 20).tolist()
    runs = measure_generation({"in": str(multi_head_with_past), "fused": str(tmp_path / "fused.onnx")}, prompt,
                              new_tokens=12, rounds=1, warmup=0)  # fmt: skip
    assert len(set(runs["in"].tokens)) > 1
    assert runs["fused"].tokens == runs["in"].tokens


def test_multi_head_without_cache_is_fused_and_equal(tmp_path):
    path = _export(tmp_path, "text-generation", heads=4, kv_heads=4)
    result = _fuse(path, tmp_path / "fused.onnx")
    assert result.summary == {"fused": 2, "unfused": 0, "with_cache": 0}
    assert _gqa_heads(tmp_path / "fused.onnx") == [(4, 4), (4, 4)]
    a, b = ort.InferenceSession(str(path)), ort.InferenceSession(str(tmp_path / "fused.onnx"))
    ids, mask = _right_padded_batch()
    real = mask.astype(bool)
    np.testing.assert_allclose(b.run(None, _feeds(b, ids, mask))[0][real], a.run(None, _feeds(a, ids, mask))[0][real], rtol=1e-5, atol=1e-5)


def test_grouped_query_blocks_are_not_read_as_unrepeated(with_past, monkeypatch):
    """GQA's repeated K/V also fit the unrepeated pattern: with only that rule, a GQA block must stay unfused."""
    from edgeprune.analysis import attention_patterns

    monkeypatch.setattr(attention_patterns, "PATTERNS", ())
    result = FusedAttentionPass()(ir.load(with_past))
    assert not result.modified and result.summary["fused"] == 0


def test_encoder_attention_stays_unfused_with_the_reason():
    import importlib.util
    import pathlib

    spec = importlib.util.spec_from_file_location("sa_models", pathlib.Path(__file__).parents[1] / "sparse_attention" / "models.py")
    sa_models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sa_models)
    model = ir.from_proto(sa_models.causal_gqa_proto(causal=False))
    result = FusedAttentionPass()(model)
    assert not result.modified
    assert result.records == [{"layer": 0, "softmax": result.records[0]["softmax"], "status": "unfused",
                               "reason": "the attention mask is not causal (encoder or cross-attention): left unfused"}]  # fmt: skip


def test_compile_fuse_attention_verifies_and_decodes_the_same(with_past, tmp_path):
    import json

    from edgeprune.cli import main

    assert main(["compile", str(with_past), "-o", str(tmp_path / "out"), "--fuse-attention", "--max-samples", "8", "--json"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [p["name"] for p in report["recipe"]["passes"]] == ["cleanup", "fuse_attention"]
    assert report["passes"][1]["summary"] == {"fused": 2, "unfused": 0, "with_cache": 2}
    assert report["generation"]["same_tokens"] == 64
    assert report["verification"]["outputs"][0]["perplexity_ratio"] == pytest.approx(1.0, abs=1e-5)


def test_fuse_attention_runs_before_bits_and_still_fuses(with_past, tmp_path):
    import json

    from edgeprune.cli import main

    assert main(["compile", str(with_past), "-o", str(tmp_path / "out"), "--fuse-attention", "--bits", "8", "--max-samples", "8", "--json"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [p["name"] for p in report["recipe"]["passes"]] == ["cleanup", "fuse_attention", "smooth", "bits"]  # smooth: cpu default
    assert report["passes"][1]["summary"] == {"fused": 2, "unfused": 0, "with_cache": 2}


def test_after_quantization_the_reason_says_why(with_past, tmp_path):
    from edgeprune.cli import main

    assert main(["compile", str(with_past), "-o", str(tmp_path / "q"), "--bits", "8", "--max-samples", "8", "--json"]) == 0
    result = FusedAttentionPass()(ir.load(tmp_path / "q" / "model.onnx"))
    assert {r["reason"] for r in result.records} == {
        "no attention block with head counts found here (quantized projections are not read as linears): left unfused"}
