"""validate, profile and inspect through the CLI on tiny models."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgeprune.cli import main

from tiny_models import mlp_proto, write_mlp, write_mlp_calib


def _run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def pair(tmp_path):
    ref = write_mlp(tmp_path, "ref.onnx")
    proto = mlp_proto()
    w2 = onnx.numpy_helper.to_array(proto.graph.initializer[2])
    proto.graph.initializer[2].CopyFrom(onnx.numpy_helper.from_array(w2 * 1.5 + 0.3, "w2"))
    cand = tmp_path / "cand.onnx"
    onnx.save(proto, cand)
    return ref, cand, write_mlp_calib(tmp_path)


def test_validate_reports_fidelity_latency_and_size(pair, capsys):
    ref, cand, data = pair
    code, out, err = _run(capsys, "validate", ref, cand, "--data", data, "--runs", "5", "--json")
    assert code == 0, err
    result = json.loads(out)
    (fid,) = result["fidelity"]
    assert fid["name"] == "logits" and fid["samples"] == 16
    x = np.load(data)["x"]
    ref_out, cand_out = (ort.InferenceSession(str(m), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0].astype(np.float64)
                         for m in (ref, cand))
    cosine = (ref_out * cand_out).sum(1) / (np.linalg.norm(ref_out, axis=1) * np.linalg.norm(cand_out, axis=1))
    assert fid["cosine_mean"] == pytest.approx(cosine.mean(), rel=1e-5)
    assert fid["cosine_min"] == pytest.approx(cosine.min(), rel=1e-5)
    assert fid["max_abs_error"] == pytest.approx(np.abs(ref_out - cand_out).max(), rel=1e-5)
    assert fid["top1_agreement"] == np.mean(ref_out.argmax(1) == cand_out.argmax(1))
    assert result["latency"]["measured"] and result["latency"]["p50_ratio"] > 0
    assert result["latency"]["reference"]["runs"] == 5
    assert result["size"]["ratio"] == pytest.approx(1.0, abs=0.01)


def test_validate_same_model_is_perfect(pair, capsys):
    ref, _, data = pair
    code, out, _ = _run(capsys, "validate", ref, ref, "--data", data, "--runs", "3", "--json")
    assert code == 0
    fid = json.loads(out)["fidelity"][0]
    assert fid["cosine_min"] == pytest.approx(1.0) and fid["max_abs_error"] == 0 and fid["top1_agreement"] == 1.0


def test_validate_human_table_and_synthetic_data(pair, capsys):
    ref, cand, _ = pair
    code, out, _ = _run(capsys, "validate", ref, cand, "--runs", "3")
    assert code == 0 and "cosine" in out and "latency p50" in out and "synthetic" in out.lower()


def test_validate_refuses_models_with_different_inputs(tmp_path, pair, capsys):
    ref, _, _ = pair
    other = onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 17]> g (float[N, 4] z) => (float[N, 4] logits) { logits = Relu(z) }')
    path = tmp_path / "other.onnx"
    onnx.save(other, path)
    code, _, err = _run(capsys, "validate", ref, path, "--runs", "3")
    assert code == 2
    assert err.splitlines()[-1] == ("error: the candidate's inputs/outputs differ from the reference's (inputs ['z'] vs ['x'], "
                                    "outputs ['logits'] vs ['logits']): compare two versions of the same model.")


def test_profile_and_compare(pair, capsys):
    ref, cand, _ = pair
    code, out, err = _run(capsys, "profile", ref, "--runs", "5", "--json")
    assert code == 0, err
    prof = json.loads(out)["model"]
    # ORT reports the kernels it really ran, after its own fusions (MatMul+Add+Relu -> FusedGemm...).
    assert prof["by_op_type"] and all(r["op_type"] for r in prof["by_op_type"])
    assert sum(r["share"] for r in prof["by_op_type"]) == pytest.approx(1.0, abs=1e-6)
    code, out, _ = _run(capsys, "profile", ref, "--compare", cand, "--runs", "5", "--top", "3")
    assert code == 0 and "where the time moved" in out and "slowest 3 nodes" in out


def test_profile_unavailable_target_exits_2(pair, capsys):
    ref, _, _ = pair
    code, _, err = _run(capsys, "profile", ref, "--target", "cuda")
    assert (code, err) == (2, "error: target cuda needs CUDAExecutionProvider, which this onnxruntime build lacks: not measured here.\n")


def test_inspect_lists_interface_and_weights(pair, capsys):
    ref, _, _ = pair
    code, out, _ = _run(capsys, "inspect", ref, "--json")
    assert code == 0
    info = json.loads(out)
    assert info["inputs"][0]["name"] == "x" and info["outputs"][0]["name"] == "logits"
    assert info["params"] == 4 * 8 + 8 + 8 * 3
    assert info["weights_by_op_type"]["MatMul"]["params"] == 4 * 8 + 8 * 3
    assert info["opsets"][""] == 17
    code, out, _ = _run(capsys, "inspect", ref)
    assert code == 0 and "weights by consuming op type" in out


def test_inspect_lists_prunable_transformer_groups(tmp_path, capsys):
    from prune_models import bert_proto, shared_ffn_proto

    path = tmp_path / "bert.onnx"
    onnx.save(bert_proto(heads=4, ffn=64), path)
    code, out, err = _run(capsys, "inspect", path, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert [(g["kind"], g["units"]) for g in info["prune_groups"]] == [("ffn", 64), ("heads", 4)]
    assert info["prune_skipped"] == []
    assert "prunable: 1 FFN group (64 neurons each), 1 head group (4 heads each); 0 skipped" in info["summary"]
    code, out, _ = _run(capsys, "inspect", path)
    assert code == 0 and "prunable groups" in out and "64 neurons each" in out and "4 heads each" in out
    shared = tmp_path / "shared.onnx"
    onnx.save(shared_ffn_proto(), shared)
    code, out, err = _run(capsys, "inspect", shared, "--json")
    info = json.loads(out)
    assert code == 0 and info["prune_groups"] == [] and len(info["prune_skipped"]) == 2
    assert "prunable: nothing; 2 skipped" in info["summary"] and "WARNING" not in err
    assert all("shared by several nodes" in s["reason"] for s in info["prune_skipped"])
    code, out, _ = _run(capsys, "inspect", shared)
    assert code == 0 and "prunable groups" in out and "shared" in out


def test_inspect_bad_file(tmp_path, capsys):
    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"\x00\x01garbage" * 10)
    code, _, err = _run(capsys, "inspect", bad)
    assert (code, err) == (2, f"error: {bad} is not a readable ONNX model (DecodeError): the file is not ONNX or is truncated; "
                              "re-export it or copy it again.\n")
