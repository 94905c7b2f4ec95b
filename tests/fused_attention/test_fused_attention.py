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
    # head size 8: ORT's rotary takes multiples of 16, so the rotary embedding stays outside GQA here
    assert result.modified and result.summary == {"fused": 2, "unfused": 0, "with_cache": 2, "rotary_inside": 0}
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
    assert result.summary == {"fused": 2, "unfused": 0, "with_cache": 0, "rotary_inside": 0}
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
    assert result.summary == {"fused": 2, "unfused": 0, "with_cache": 2, "rotary_inside": 0}
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
    assert result.summary == {"fused": 2, "unfused": 0, "with_cache": 0, "rotary_inside": 0}
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
    assert [p["name"] for p in report["recipe"]["passes"]] == ["cleanup", "fuse_attention", "fuse_norms"]
    assert report["passes"][1]["summary"] == {"fused": 2, "unfused": 0, "with_cache": 2, "rotary_inside": 0}
    assert report["generation"]["same_tokens"] == 64
    assert report["verification"]["outputs"][0]["perplexity_ratio"] == pytest.approx(1.0, abs=1e-5)


def test_fuse_attention_runs_before_bits_and_still_fuses(with_past, tmp_path):
    import json

    from edgeprune.cli import main

    assert main(["compile", str(with_past), "-o", str(tmp_path / "out"), "--fuse-attention", "--bits", "8", "--max-samples", "8", "--json"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [p["name"] for p in report["recipe"]["passes"]] == ["cleanup", "fuse_attention", "smooth", "bits", "fuse_norms"]  # smooth: cpu default
    assert report["passes"][1]["summary"] == {"fused": 2, "unfused": 0, "with_cache": 2, "rotary_inside": 0}


def test_after_quantization_the_reason_says_why(with_past, tmp_path):
    from edgeprune.cli import main

    assert main(["compile", str(with_past), "-o", str(tmp_path / "q"), "--bits", "8", "--max-samples", "8", "--json"]) == 0
    result = FusedAttentionPass()(ir.load(tmp_path / "q" / "model.onnx"))
    assert {r["reason"] for r in result.records} == {
        "no attention block with head counts found here (quantized projections are not read as linears): left unfused"}


# ----------------------------------------------------------------------------- rotary inside GQA


@pytest.fixture(scope="module")
def rotary_raw(tmp_path_factory):
    """Head size 16 (2 query heads, 1 KV head of hidden 32): ORT's rotary kernel takes it, so rotary moves into GQA."""
    from tiny_models import tiny_llama_with_past

    return tiny_llama_with_past(tmp_path_factory.mktemp("rotary_past"), heads=2, kv_heads=1)


@pytest.fixture(scope="module")
def rotary_with_past(rotary_raw):
    """The same after cleanup, as compile hands it to the pass (shapes inferred, constants folded)."""
    from edgeprune.passes.cleanup import CleanupPass

    path = rotary_raw.parent / "clean.onnx"
    ir.save(CleanupPass()(ir.load(rotary_raw)).model, path)
    return path


def _run(session, ids, mask, positions=None, past=None):
    feeds = _feeds(session, ids, mask)
    if positions is not None:
        feeds["position_ids"] = positions
    feeds.update(past or {})
    return session.run(None, feeds)


def _as_past(session, outputs):
    names = [o.name for o in session.get_outputs()][1:]
    return {n.replace("present", "past_key_values"): v for n, v in zip(names, outputs[1:])}


def test_rotary_moves_into_gqa_and_the_head_split_goes(rotary_with_past, tmp_path):
    result = _fuse(rotary_with_past, tmp_path / "fused.onnx")
    assert result.summary == {"fused": 2, "unfused": 0, "with_cache": 2, "rotary_inside": 2}
    fused = ir.load(tmp_path / "fused.onnx")
    gqas = [n for n in fused.graph if n.op_type == "GroupQueryAttention"]
    assert [n.attributes.get_int("do_rotary", 0) for n in gqas] == [1, 1]
    assert all(n.inputs[9] is not None and n.inputs[9].name == "position_ids" for n in gqas)
    # Q/K/V come straight from their projections and the output goes straight into o_proj: no head split/merge left
    assert all(n.inputs[i].producer().op_type == "MatMul" for n in gqas for i in range(3))
    assert all({u.node.op_type for u in n.outputs[0].uses()} == {"MatMul"} for n in gqas)
    # rotate_half and the per-layer cos/sin broadcast are gone; the one Cos/Sin left builds the caches from constants
    ops = [n.op_type for n in fused.graph]
    assert "Neg" not in ops and ops.count("Cos") == ops.count("Sin") == 1
    assert kv_cache.model_cache(fused) == kv_cache.model_cache(ir.load(rotary_with_past))
    # the caches are computed when the session loads, not stored: the file does not grow by [8192, 8] tables
    assert max(v.const_value.size for v in fused.graph.initializers.values()) == max(
        v.const_value.size for v in ir.load(rotary_with_past).graph.initializers.values())


@pytest.mark.parametrize("form", ["clean", "raw"])
def test_rotary_inside_prefill_equals_the_input(rotary_with_past, rotary_raw, form, tmp_path):
    """Also on the raw export, whose values carry no shapes: the head split stays there (a Reshape/Transpose), rotary goes in."""
    source = rotary_with_past if form == "clean" else rotary_raw
    assert _fuse(source, tmp_path / "fused.onnx").summary["rotary_inside"] == 2
    a, b = ort.InferenceSession(str(source)), ort.InferenceSession(str(tmp_path / "fused.onnx"))
    ids, mask = _right_padded_batch()
    ref, got = _run(a, ids, mask), _run(b, ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[0][real], ref[0][real], rtol=1e-5, atol=1e-5)
    for r, g in zip(ref[1:], got[1:]):  # the caches hold the rotated keys, as the input's do
        np.testing.assert_allclose(g[0], r[0], rtol=1e-5, atol=1e-5)


def test_rotary_inside_reads_position_ids_and_decodes_from_the_cache(rotary_with_past, tmp_path):
    """Positions that do not start at 0 (GQA takes the model's position_ids, not its own count), then a cached step."""
    _fuse(rotary_with_past, tmp_path / "fused.onnx")
    a, b = ort.InferenceSession(str(rotary_with_past)), ort.InferenceSession(str(tmp_path / "fused.onnx"))
    ids = np.random.default_rng(1).integers(0, 96, (1, 7))
    positions = np.arange(5, 12)[None]
    ref, got = _run(a, ids, np.ones_like(ids), positions), _run(b, ids, np.ones_like(ids), positions)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, atol=1e-5)
    step, mask, position = np.array([[3]]), np.ones((1, 8), np.int64), np.array([[12]])
    ref2 = _run(a, step, mask, position, _as_past(a, ref))
    got2 = _run(b, step, mask, position, _as_past(b, got))
    for r, g in zip(ref2, got2):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    prompt = np.random.default_rng(3).integers(0, 96, 20).tolist()
    runs = measure_generation({"in": str(rotary_with_past), "fused": str(tmp_path / "fused.onnx")}, prompt, new_tokens=12, rounds=1, warmup=0)
    assert len(set(runs["in"].tokens)) > 1
    assert runs["fused"].tokens == runs["in"].tokens


def test_rotary_off_keeps_the_embedding_outside_and_is_equal(rotary_with_past, tmp_path):
    from edgeprune.passes.fused_attention import FusedAttentionConfig

    result = FusedAttentionPass(FusedAttentionConfig(rotary=False))(ir.load(rotary_with_past))
    assert "rotary_inside" not in result.summary and result.summary["fused"] == 2
    ir.save(result.model, tmp_path / "fused.onnx")
    fused = ir.load(tmp_path / "fused.onnx")
    assert [n.attributes.get_int("do_rotary", 0) for n in fused.graph if n.op_type == "GroupQueryAttention"] == [0, 0]
    assert [n.op_type for n in fused.graph].count("Neg") == 4  # rotate_half of q and k, two layers
    a, b = ort.InferenceSession(str(rotary_with_past)), ort.InferenceSession(str(tmp_path / "fused.onnx"))
    ids, mask = _right_padded_batch()
    real = mask.astype(bool)
    np.testing.assert_allclose(_run(b, ids, mask)[0][real], _run(a, ids, mask)[0][real], rtol=1e-5, atol=1e-5)


def test_positions_past_the_cache_are_refused_by_ort(rotary_with_past, tmp_path):
    """``max_positions`` bounds the fused model's context: ORT refuses a longer one (it never reads past the tables)."""
    from edgeprune.passes.fused_attention import FusedAttentionConfig

    ir.save(FusedAttentionPass(FusedAttentionConfig(max_positions=16))(ir.load(rotary_with_past)).model, tmp_path / "fused.onnx")
    a, b = ort.InferenceSession(str(rotary_with_past)), ort.InferenceSession(str(tmp_path / "fused.onnx"))
    ids = np.arange(16)[None] % 96
    np.testing.assert_allclose(_run(b, ids, np.ones_like(ids))[0], _run(a, ids, np.ones_like(ids))[0], rtol=1e-5, atol=1e-5)
    ids = np.arange(17)[None] % 96
    with pytest.raises(Exception, match="cos_cache dimension 0"):
        _run(b, ids, np.ones_like(ids))


@pytest.mark.parametrize("bad", [0, -3, True, 2.5])
def test_max_positions_must_be_a_positive_count(bad):
    from edgeprune.errors import BadInputError
    from edgeprune.passes.fused_attention import FusedAttentionConfig

    with pytest.raises(BadInputError, match="max_positions"):
        FusedAttentionConfig(max_positions=bad)
