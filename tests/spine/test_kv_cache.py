"""KV-cache decoders (optimum text-generation-with-past): calibration on prefills, the cache interface
kept by every pass, greedy generation with the cache reused, and compile's prefill/decode report."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from edgeprune import kv_cache
from edgeprune.calibration import load_calibration
from edgeprune.cli import main
from edgeprune.runtime.generation import measure_generation

pytest.importorskip("optimum.exporters.onnx")


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    from tiny_models import tiny_llama_with_past

    return tiny_llama_with_past(tmp_path_factory.mktemp("llama_gqa"))


@pytest.fixture(scope="module")
def mha(tmp_path_factory):
    from tiny_models import tiny_llama_with_past

    return tiny_llama_with_past(tmp_path_factory.mktemp("llama_mha"), heads=4, kv_heads=4)


def _recompute_greedy(path, prompt, new_tokens):
    """Greedy decoding without the cache: every step re-reads the whole sequence from an empty cache."""
    session = ort.InferenceSession(str(path))
    empty = kv_cache.empty_cache(kv_cache.session_cache(session), 1)
    ids = list(prompt)
    for _ in range(new_tokens):
        n = len(ids)
        feed = {"input_ids": np.array([ids]), "attention_mask": np.ones((1, n), np.int64), "position_ids": np.arange(n)[None], **empty}
        ids.append(int(session.run(["logits"], feed)[0][0, -1].argmax()))
    return ids[len(prompt):]


def test_cache_entries_name_every_layer(gqa):
    entries = kv_cache.model_cache(ir.load(gqa))
    assert [(e.layer, e.kind, e.past, e.present, e.heads, e.head_dim) for e in entries] == [
        (0, "key", "past_key_values.0.key", "present.0.key", 2, 8),
        (0, "value", "past_key_values.0.value", "present.0.value", 2, 8),
        (1, "key", "past_key_values.1.key", "present.1.key", 2, 8),
        (1, "value", "past_key_values.1.value", "present.1.value", 2, 8),
    ]


def test_synthetic_calibration_is_a_prefill_from_an_empty_cache(gqa):
    calib = load_calibration(None, ir.load(gqa), max_samples=4, seq_len=16)
    sample = calib.samples[0]
    assert {k: v.shape for k, v in sample.items() if k.startswith("past")} == {
        f"past_key_values.{i}.{kind}": (1, 2, 0, 8) for i in (0, 1) for kind in ("key", "value")
    }
    assert sample["attention_mask"].shape == sample["input_ids"].shape == (1, 16)
    batch = next(calib.batches(4))
    assert batch["past_key_values.0.key"].shape == (4, 2, 0, 8)


def test_npz_without_cache_arrays_gets_an_empty_cache(gqa, tmp_path):
    ids = np.random.default_rng(0).integers(0, 96, size=(3, 10))
    np.savez(tmp_path / "c.npz", input_ids=ids, attention_mask=np.ones_like(ids), position_ids=np.tile(np.arange(10), (3, 1)))
    calib = load_calibration(tmp_path / "c.npz", ir.load(gqa))
    assert [s["past_key_values.1.value"].shape for s in calib.samples] == [(1, 2, 0, 8)] * 3


def test_cached_greedy_generation_equals_recomputing_the_whole_sequence(gqa):
    prompt = np.random.default_rng(1).integers(0, 96, size=12).tolist()
    result = measure_generation({"m": str(gqa)}, prompt, new_tokens=10, rounds=1, warmup=0)["m"]
    expected = _recompute_greedy(gqa, prompt, 10)
    assert len(set(expected)) > 1  # the check means something only if the continuation varies
    assert result.tokens == expected
    assert (result.prompt_tokens, result.new_tokens) == (12, 10)


def test_generation_refuses_a_model_without_cache(tmp_path):
    from edgeprune.errors import BadInputError
    from tiny_models import write_mlp

    with pytest.raises(BadInputError) as info:
        measure_generation({"m": str(write_mlp(tmp_path))}, [1, 2, 3], new_tokens=4)
    assert str(info.value) == (
        "the model has no KV cache (inputs past_key_values.N.key/value with outputs present.N.key/value): decode speed "
        "needs a model exported with past key/values, e.g. optimum's text-generation-with-past."
    )


def _compile(model, out, *flags):
    assert main(["compile", str(model), "-o", str(out), "--json", *flags]) == 0
    return json.loads((out / "report.json").read_text())


def test_prune_on_gqa_removes_query_heads_only_and_keeps_the_cache(gqa, tmp_path):
    report = _compile(gqa, tmp_path / "out", "--prune", "0.5")
    heads = [r for r in report["passes"][1]["records"] if r["kind"] == "heads"]
    assert heads and all(r["units_after"] < r["units_before"] == 4 for r in heads)
    before, after = kv_cache.model_cache(ir.load(gqa)), kv_cache.model_cache(ir.load(tmp_path / "out" / "model.onnx"))
    assert after == before
    gen = report["generation"]
    assert gen["measured"] and gen["prompt_tokens"] == 128 and gen["new_tokens"] == 64
    # the pruned model decodes from its own cache exactly as it recomputes
    prompt = list(range(5, 17))
    cached = measure_generation({"m": str(tmp_path / "out" / "model.onnx")}, prompt, new_tokens=6, rounds=1, warmup=0)["m"].tokens
    assert cached == _recompute_greedy(tmp_path / "out" / "model.onnx", prompt, 6)


def test_prune_on_mha_with_cache_leaves_heads_with_the_reason(mha, tmp_path):
    report = _compile(mha, tmp_path / "out", "--prune", "0.5")
    skipped = [r["skipped"] for r in report["passes"][1]["records"] if r["kind"] == "heads"]
    assert skipped == [
        f"attention {i}: the model has a KV cache and removing heads here removes KV heads, which would change the cache "
        "tensors its generation loop feeds (only query heads of grouped-query attention can go)"
        for i in (0, 1)
    ]
    assert kv_cache.model_cache(ir.load(tmp_path / "out" / "model.onnx")) == kv_cache.model_cache(ir.load(mha))


def test_bits_report_has_cache_summary_and_generation_rows(gqa, tmp_path):
    from edgeprune.report import summary_rows

    report = _compile(gqa, tmp_path / "out", "--bits", "8")
    assert [o["name"] for o in report["verification"]["outputs"]] == ["logits"]  # the cache has no floor of its own
    cache = report["verification"]["kv_cache"]
    assert cache["outputs"] == 4 and cache["cosine_min"] <= cache["cosine_mean_worst"] <= 1
    labels = [row[0] for row in summary_rows(report)]
    assert "prefill (128 tokens, from an empty cache)" in labels and "decode tokens/s (64 greedy, cache reused)" in labels
    gen = report["generation"]
    assert gen["decode_speedup"] == pytest.approx(gen["candidate"]["decode_tokens_per_s"] / gen["reference"]["decode_tokens_per_s"])


def test_a_pass_that_changes_the_cache_is_refused():
    from edgeprune.errors import VerificationError

    entry = kv_cache.CacheEntry(0, "key", "past_key_values.0.key", "present.0.key", np.dtype(np.float32), 2, 8)
    changed = kv_cache.CacheEntry(0, "key", "past_key_values.0.key", "present.0.key", np.dtype(np.float32), 1, 8)
    with pytest.raises(VerificationError) as info:
        kv_cache.check_kept([entry], [changed])
    assert str(info.value) == "a pass changed the KV-cache interface at past_key_values.0.key; nothing was written. Please report this."


# ------------------------------------------------------------------ onnxruntime-genai's builder form


@pytest.fixture(scope="module")
def genai_style(tmp_path_factory):
    from tiny_models import genai_style_decoder

    return genai_style_decoder(tmp_path_factory.mktemp("genai_style"))


def test_genai_head_size_symbol_is_read_off_the_fused_attention(genai_style):
    model = ir.load(genai_style)
    assert kv_cache.fused_cache_shapes(model) == {"past_key_values.0.key": (2, 16), "past_key_values.0.value": (2, 16)}
    assert [(e.heads, e.head_dim) for e in kv_cache.session_cache(ort.InferenceSession(str(genai_style)))] == [(2, 16), (2, 16)]
    sample = load_calibration(None, model, max_samples=2, seq_len=8).samples[0]
    assert sample["past_key_values.0.value"].shape == (1, 2, 0, 16)


@pytest.mark.parametrize("bits", ["8", "4"])
def test_genai_form_compiles_with_the_checker_held_to_ort(genai_style, tmp_path, bits):
    report = _compile(genai_style, tmp_path / "out", "--bits", bits)
    assert report["verification"]["checker_note"] == (
        "the input already fails onnx.checker (No Op registered for SimplifiedLayerNormalization with domain_version of 17)"
    )
    assert report["generation"]["measured"] and report["generation"]["new_tokens"] == 64
    compiled = ir.load(tmp_path / "out" / "model.onnx")
    assert [(e.past, e.heads, e.head_dim) for e in kv_cache.model_cache(compiled)] == [
        ("past_key_values.0.key", 2, 16), ("past_key_values.0.value", 2, 16)]


def test_a_candidate_failing_the_checker_differently_is_still_refused(genai_style):
    from edgeprune.errors import VerificationError
    from edgeprune.verify import check_model

    model = ir.load(genai_style)
    model.graph.node(2).op_type = "NoSuchOp"  # the packed-QKV MatMul
    with pytest.raises(VerificationError) as info:
        check_model(model, "No Op registered for SimplifiedLayerNormalization with domain_version of 17")
    assert str(info.value).startswith("the compiled model fails onnx.checker (No Op registered for NoSuchOp")


def test_validate_reports_generation_side_by_side(gqa, tmp_path, capsys):
    _compile(gqa, tmp_path / "out", "--bits", "8")
    capsys.readouterr()
    assert main(["validate", str(gqa), str(tmp_path / "out" / "model.onnx"), "--runs", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [f["name"] for f in result["fidelity"]] == ["logits"]
    assert result["kv_cache"]["outputs"] == 4
    gen = result["generation"]
    assert (gen["prompt_tokens"], gen["new_tokens"]) == (128, 64) and 0 <= gen["same_tokens"] <= 64
    assert main(["validate", str(gqa), str(tmp_path / "out" / "model.onnx"), "--runs", "3"]) == 0
    text = capsys.readouterr().out
    assert "decode tokens/s (64 greedy) ref → cand" in text and "greedy tokens identical" in text
