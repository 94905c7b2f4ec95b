"""The spine end to end on real exported models (MiniLM, SmolLM2): the issue's acceptance checks."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from edgeprune.cli import main

pytestmark = pytest.mark.realmodel


def _run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_example_minilm_compiles_and_verifies(minilm_artifact, model_cache, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EDGEPRUNE_CACHE", str(model_cache))
    out = tmp_path / "out"
    code, stdout, stderr = _run(capsys, "compile", "--example", "minilm", "-o", out, "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "report.html", "report.json", "report.md"]
    assert report["calibration"]["synthetic"] is False and report["calibration"]["samples"] == 64
    # the default recipe on cpu (cleanup + fast bits) writes a smaller model that keeps the default floor
    assert report["output"]["file_bytes"] < 0.5 * report["input"]["file_bytes"]
    floor = report["verification"]["floor"]
    assert floor["source"] == "default"
    assert [(f["output"], f["measure"], f["limit"], f["ok"]) for f in floor["outputs"]] == [
        ("token_embeddings", "cosine mean", 0.99, True), ("sentence_embedding", "cosine mean", 0.99, True)], floor
    assert report["verification"]["below_default_floor"] == []
    lat = report["latency"]
    assert lat["measured"] and lat["input_shapes"]["input_ids"] == [1, 128]
    assert lat["reference"]["peak_memory_mb"] is None or lat["reference"]["peak_memory_mb"] > 0
    assert any("6 attention blocks: 12 query heads, 12 KV heads, head dim 32" in s for s in report["structures_summary"])


def test_inspect_minilm(minilm_onnx, capsys):
    code, stdout, _ = _run(capsys, "inspect", minilm_onnx, "--json")
    assert code == 0
    info = json.loads(stdout)
    blocks = info["structures"]["attention_blocks"]
    assert len(blocks) == 6 and {(b["num_heads"], b["head_dim"]) for b in blocks} == {(12, 32)}
    ffn = info["structures"]["ffn_blocks"]
    assert len(ffn) == 6 and {f["hidden"] for f in ffn} == {1536}
    assert info["weights_by_op_type"]["MatMul"]["params"] == 6 * (4 * 384 * 384 + 2 * 384 * 1536)


def test_inspect_smollm2(smollm2_onnx, capsys):
    code, stdout, _ = _run(capsys, "inspect", smollm2_onnx)
    assert code == 0
    assert "30 attention blocks: 9 query heads, 3 KV heads, head dim 64, rotary" in stdout
    assert "30 FFN blocks: width 1536, gated" in stdout


def test_validate_ort_int8_against_fp32(minilm_artifact, tmp_path, capsys):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    int8 = tmp_path / "int8.onnx"
    quantize_dynamic(str(minilm_artifact.model_path), str(int8), per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gather"])
    sentences = tmp_path / "s.txt"
    sentences.write_text("A man is playing a guitar.\nThe weather is cold today.\nTwo dogs run in the park.\nShe reads a book.\n")
    code, stdout, stderr = _run(capsys, "validate", minilm_artifact.model_path, int8, "--data", sentences, "--runs", "5", "--threads", "2", "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    fid = {f["name"]: f for f in result["fidelity"]}
    # The benchmark harness measured mean cosine 0.993 for this variant on STS-B sentences.
    assert 0.97 < fid["sentence_embedding"]["cosine_mean"] < 0.9999
    assert result["size"]["ratio"] < 0.3
    assert result["latency"]["measured"] and result["latency"]["candidate"]["runs"] == 5


def test_profile_smollm2_shows_where_time_goes(smollm2_onnx, capsys):
    code, stdout, stderr = _run(capsys, "profile", smollm2_onnx, "--runs", "2", "--seq-len", "32", "--threads", "2", "--json")
    assert code == 0, stderr
    prof = json.loads(stdout)["model"]
    top = prof["by_op_type"][0]
    assert top["op_type"] in {"MatMul", "FusedMatMul"} and top["share"] > 0.3
    assert np.isclose(sum(r["share"] for r in prof["by_op_type"]), 1.0)


def _minilm_feeds(batch: int, seq: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch * 100 + seq)
    ids = rng.integers(1000, 20000, size=(batch, seq)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def test_minilm_prune_ratio_zero_is_exact_and_pruned_runs_at_any_shape(minilm_artifact, tmp_path):
    import onnxruntime as ort

    import edgeprune
    from edgeprune.recipe import recipe_from_flags

    sentences = pathlib.Path(edgeprune.__file__).parent / "data" / "calibration_sentences.txt"
    ref = ort.InferenceSession(str(minilm_artifact.model_path), providers=["CPUExecutionProvider"])
    for metric in ("magnitude", "wanda", "flap"):
        out = tmp_path / f"zero-{metric}"
        result = edgeprune.compile(minilm_artifact.model_path, out, calib=sentences, latency_runs=2, profile=False, max_samples=16,
                                   recipe=recipe_from_flags(prune={"ratio": 0.0, "metric": metric}))  # fmt: skip
        assert result.report["passes"][1]["modified"] is False
        got = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        feeds = _minilm_feeds(2, 9)
        for a, b in zip(ref.run(None, feeds), got.run(None, feeds)):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    out = tmp_path / "pruned"
    edgeprune.compile(minilm_artifact.model_path, out, calib=sentences, latency_runs=2, profile=False, max_samples=16,
                      recipe=recipe_from_flags(prune={"ratio": 0.3, "metric": "flap"}))  # fmt: skip
    pruned = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch, seq in [(1, 1), (1, 7), (3, 33), (2, 128)]:
        tokens, sentence = pruned.run(None, _minilm_feeds(batch, seq))
        assert tokens.shape == (batch, seq, 384) and sentence.shape == (batch, 384)
        assert np.isfinite(tokens).all()


def test_smollm2_with_cache_matches_the_cacheless_export_and_decodes_from_its_cache(smollm2_artifact, smollm2_kv_artifact):
    """The with-past export is the same function: a prefill's logits equal the no-cache model's, and greedy
    decoding that reuses the cache picks the tokens a full recomputation picks."""
    import onnxruntime as ort

    from edgeprune import kv_cache
    from edgeprune.models.tasks import wikitext_tokens
    from edgeprune.runtime.generation import measure_generation

    ids = np.asarray(wikitext_tokens(smollm2_kv_artifact.tokenizer_path)[:24], dtype=np.int64)
    plain = ort.InferenceSession(str(smollm2_artifact.model_path), providers=["CPUExecutionProvider"])
    cached = ort.InferenceSession(str(smollm2_kv_artifact.model_path), providers=["CPUExecutionProvider"])
    empty = kv_cache.empty_cache(kv_cache.session_cache(cached), 1)
    assert len(empty) == 60 and empty["past_key_values.29.value"].shape == (1, 3, 0, 64)

    def feed(tokens):
        n = len(tokens)
        return {"input_ids": np.asarray([tokens]), "attention_mask": np.ones((1, n), np.int64), "position_ids": np.arange(n)[None]}

    np.testing.assert_allclose(cached.run(["logits"], {**feed(ids), **empty})[0], plain.run(["logits"], feed(ids))[0], rtol=1e-4, atol=1e-4)
    greedy = measure_generation({"kv": str(smollm2_kv_artifact.model_path)}, ids, new_tokens=6, rounds=1, warmup=0, threads=2)["kv"]
    seq = list(ids)
    for _ in range(6):
        seq.append(int(plain.run(["logits"], feed(seq))[0][0, -1].argmax()))
    assert greedy.tokens == seq[len(ids):]
