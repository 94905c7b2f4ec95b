"""edgeprune package on tiny models: ORT format equal to the .onnx, exact operator lists, --verify, refusals."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgeprune import model_io
from edgeprune.cli import main
from edgeprune.runtime.package import ort_format

from tiny_models import mlp_proto, write_mlp, write_mlp_calib


def _run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _optimized_ops(model: pathlib.Path, level, tmp: pathlib.Path) -> dict[str, list[str]]:
    """Op types of the model as ORT optimizes it, read from an ONNX file ORT writes (not from the .ort)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.optimized_model_filepath = str(tmp / "optimized.onnx")
    so.add_session_config_entry("session.qdqisint8allowed", "0")
    ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    proto = onnx.load(str(tmp / "optimized.onnx"))
    ops: dict[str, set[str]] = {}
    for node in proto.graph.node:
        ops.setdefault(node.domain or "ai.onnx", set()).add(node.op_type)
    return {d: sorted(v) for d, v in sorted(ops.items())}


@pytest.fixture
def mlp(tmp_path):
    return write_mlp(tmp_path / "in", "model.onnx"), write_mlp_calib(tmp_path)


def test_bundle_ort_equals_onnx_and_config_lists_exactly_its_ops(mlp, tmp_path, capsys):
    model, calib = mlp
    before = model_io.sha256(model)
    code, out, err = _run(capsys, "package", model, "-o", tmp_path / "b", "--calib", calib, "--runs", "3", "--json")
    assert code == 0, err
    manifest = json.loads(out)
    bundle = tmp_path / "b"
    assert sorted(p.name for p in bundle.iterdir()) == ["README.md", "manifest.json", "model.ort", "required_operators_and_types.config", "verify.npz"]
    assert model_io.sha256(model) == before and sorted(p.name for p in model.parent.iterdir()) == ["model.onnx"]
    # the .ort gives the .onnx's outputs on fresh inputs
    x = np.random.default_rng(5).standard_normal((7, 4)).astype(np.float32)
    want = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(bundle / "model.ort"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)
    # fixed style: the config holds exactly the ops of the fully optimized graph, fused ones included
    expected = _optimized_ops(model, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, tmp_path)
    assert expected == {"com.microsoft": ["FusedGemm", "FusedMatMul"]}
    assert ort_format.read_config(bundle / "required_operators_and_types.config") == expected
    assert manifest["operators"] == expected
    assert ort_format.ort_ops(bundle / "model.ort") == expected
    # manifest: every file hashed, I/O as ORT reports it
    assert {f["path"]: f["sha256"] for f in manifest["files"]} == {
        name: model_io.sha256(bundle / name) for name in ("model.ort", "required_operators_and_types.config", "verify.npz")
    }
    assert manifest["models"][0]["inputs"] == [{"name": "x", "dtype": "tensor(float)", "shape": ["N", 4]}]
    assert manifest["models"][0]["outputs"] == [{"name": "logits", "dtype": "tensor(float)", "shape": ["N", 3]}]
    assert manifest["verification"]["ort_vs_onnx"][0]["max_abs_error"] == 0.0
    assert manifest["onnxruntime"]["built_with"] == ort.__version__


def test_runtime_style_config_lists_the_basic_graph_ops(mlp, tmp_path, capsys):
    model, calib = mlp
    code, out, err = _run(capsys, "package", model, "-o", tmp_path / "b", "--optimization", "runtime", "--calib", calib, "--runs", "2", "--json")
    assert code == 0, err
    manifest = json.loads(out)
    expected = _optimized_ops(model, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, tmp_path)
    assert expected == {"ai.onnx": ["Gemm", "MatMul", "Mul", "Relu"]}
    assert manifest["operators"] == expected
    assert 'session.enable_saved_runtime_optimizations' in (tmp_path / "b" / "README.md").read_text()


def test_verify_passes_then_names_the_changed_file(mlp, tmp_path, capsys):
    model, calib = mlp
    bundle = tmp_path / "b"
    assert _run(capsys, "package", model, "-o", bundle, "--calib", calib, "--runs", "2")[0] == 0
    code, out, err = _run(capsys, "package", "--verify", bundle, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["files_checked"] == ["model.ort", "required_operators_and_types.config", "verify.npz"]
    assert result["models"]["model.ort"][0]["max_abs_error"] == 0.0
    for name in ("model.ort", "required_operators_and_types.config"):
        path = bundle / name
        original = path.read_bytes()
        data = bytearray(original)
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        code, out, err = _run(capsys, "package", "--verify", bundle)
        assert code == 2
        assert err.strip() == (f"error: {name} in {bundle} was changed after packaging (its sha256 differs from the "
                               "manifest): restore the original file or re-run edgeprune package.")
        path.write_bytes(original)
    assert _run(capsys, "package", "--verify", bundle)[0] == 0


def test_verify_reruns_the_model_against_stored_outputs(mlp, tmp_path, capsys):
    """A consistent but wrong bundle (outputs edited, manifest re-hashed) fails the re-run, not the hash check."""
    model, calib = mlp
    bundle = tmp_path / "b"
    assert _run(capsys, "package", model, "-o", bundle, "--calib", calib, "--runs", "2")[0] == 0
    data = dict(np.load(bundle / "verify.npz"))
    data["out0/logits"] = -data["out0/logits"]
    np.savez(bundle / "verify.npz", **data)
    manifest = json.loads((bundle / "manifest.json").read_text())
    for entry in manifest["files"]:
        if entry["path"] == "verify.npz":
            entry.update(bytes=(bundle / "verify.npz").stat().st_size, sha256=model_io.sha256(bundle / "verify.npz"))
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    code, out, err = _run(capsys, "package", "--verify", bundle)
    assert code == 3
    assert err.strip().startswith(f"error: model.ort in {bundle} does not reproduce the .onnx (output logits: cosine -1.000000 < 0.9999)")


def test_static_shape_target_names_the_dynamic_dim_and_the_flag(mlp, tmp_path, capsys):
    model, calib = mlp
    code, out, err = _run(capsys, "package", model, "-o", tmp_path / "b", "--target", "android-arm64")
    assert code == 2
    assert err.strip() == ("error: NNAPI needs static shapes, but these input dimensions are dynamic: x[0] (N): "
                           "pass --fix-shapes N=<size> with the sizes the app will feed.")
    assert not (tmp_path / "b").exists()
    code, out, err = _run(capsys, "package", model, "-o", tmp_path / "b", "--target", "android-arm64", "--fix-shapes", "N=1",
                          "--calib", calib, "--runs", "2", "--json")
    assert code == 0, err
    manifest = json.loads(out)
    assert manifest["models"][0]["inputs"][0]["shape"] == [1, 4]
    assert manifest["fixed_shapes"] == {"N": 1}
    assert manifest["optimization"] == "runtime" and manifest["target"]["ep"] == "NnapiExecutionProvider"
    readme = (tmp_path / "b" / "README.md").read_text()
    assert "options.addNnapi()" in readme and 'longArrayOf(1, 4)' in readme and '"x" to x' in readme
    assert manifest["mobile_usability"]["nnapi"]["nodes_unsupported_for_dynamic_shape"] == 0
    code, out, err = _run(capsys, "package", model, "-o", tmp_path / "c", "--target", "android-arm64", "--fix-shapes", "batch=1")
    assert code == 2
    assert err.strip() == ("error: --fix-shapes names dimension 'batch', which no model input has (dynamic dimensions: N): "
                           "use one of those names, or INPUT=AxBxC for a whole input.")


def test_refusals_are_one_sentence_and_leave_nothing(mlp, tmp_path, capsys):
    model, _ = mlp
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01not a model at all" * 10)
    code, _, err = _run(capsys, "package", junk, "-o", tmp_path / "b")
    assert code == 2
    assert err.strip() == f"error: {junk} is not a readable ONNX model (DecodeError): the file is not ONNX or is truncated; re-export it or copy it again."
    code, _, err = _run(capsys, "package", tmp_path / "in" / "..", "-o", tmp_path / "b")
    assert code == 2 and err.strip() == f"error: {tmp_path / 'in' / '..'} is a folder without model.onnx: pass an edgeprune compile output folder or an .onnx file."
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    code, _, err = _run(capsys, "package", model, "-o", tmp_path / "taken")
    assert code == 2 and err.strip() == f"error: the output folder {tmp_path / 'taken'} is not empty: choose an empty folder or pass --force."
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
    assert not (tmp_path / "b").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_custom_op_without_a_library_is_refused(tmp_path, capsys):
    proto = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17, "my.ops" : 1]> g (float[N, 4] x) => (float[N, 4] y) { t = Relu(x)  y = my.ops.Swizzle(t) }'
    )
    path = tmp_path / "custom.onnx"
    onnx.save(proto, path)
    code, _, err = _run(capsys, "package", path, "-o", tmp_path / "b")
    assert code == 2
    assert err.strip() == ("error: the model uses my.ops::Swizzle, a custom op no library edgeprune knows implements, so neither "
                           "ORT format nor the app can run it: pass --custom-op-library PATH to the library that does, or replace the op.")
    assert not (tmp_path / "b").exists()


def test_compile_package_writes_the_bundle_beside_the_report(mlp, tmp_path, capsys):
    model, calib = mlp
    code, out, err = _run(capsys, "compile", model, "-o", tmp_path / "c", "--calib", calib, "--package", "linux-arm64")
    assert code == 0, err
    bundle = tmp_path / "c" / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["target"]["name"] == "linux-arm64" and manifest["compile"]["passes"][0]["name"] == "cleanup"
    assert manifest["source"]["sha256"] == model_io.sha256(tmp_path / "c" / "model.onnx")
    assert _run(capsys, "package", "--verify", bundle)[0] == 0


def _tiny_text_encoder(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, np.ndarray]:
    """A WordPiece tokenizer folder (saved by transformers) and an encoder whose token output is an embedding lookup."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "cat", "sat", "on", "the", "mat", "dog", "ran", "##s", ".", "[MASK]"]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    folder = tmp_path / "tok"
    BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                      mask_token="[MASK]", do_lower_case=True).save_pretrained(folder)
    emb = np.random.default_rng(3).standard_normal((len(words), 8)).astype(np.float32)
    proto = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]> enc (int64[B, T] input_ids, int64[B, T] attention_mask) => (float[B, T, 8] token_embeddings) '
        "{ token_embeddings = Gather(emb, input_ids) }"
    )
    proto.graph.initializer.append(onnx.numpy_helper.from_array(emb, "emb"))
    model = tmp_path / "enc" / "model.onnx"
    model.parent.mkdir()
    onnx.save(proto, model)
    return model, folder, emb


def test_with_preprocessing_takes_a_string_and_returns_the_pooled_embedding(tmp_path, capsys):
    pytest.importorskip("onnxruntime_extensions")
    import onnxruntime_extensions

    model, tokenizer, emb = _tiny_text_encoder(tmp_path)
    sentences = tmp_path / "s.txt"
    sentences.write_text("the cat sat on the mat.\na dog ran\ncats sat\nthe dog sat on a cat\n")
    code, out, err = _run(capsys, "package", model, "-o", tmp_path / "b", "--with-preprocessing", "--tokenizer", tokenizer / "tokenizer.json",
                          "--calib", sentences, "--runs", "2", "--json")
    assert code == 0, err
    manifest = json.loads(out)
    pre = manifest["models"][1]
    assert pre["file"] == "model_with_preprocessing.ort" and pre["custom_op_libraries"] == ["onnxruntime-extensions"]
    assert pre["inputs"] == [{"name": "text", "dtype": "tensor(string)", "shape": [1]}]
    assert pre["outputs"] == [{"name": "embedding", "dtype": "tensor(float)", "shape": [1, 8]}]
    assert manifest["verification"]["preprocessing"]["cosine_min"] >= 0.999
    assert manifest["custom_op_libraries"] == [{"name": "onnxruntime-extensions", "version": onnxruntime_extensions.__version__, "domains": ["ai.onnx.contrib"]}]
    # one config for both models: the tokenizer op is in it
    assert manifest["operators"]["ai.onnx.contrib"] == ["BertTokenizer"]
    so = ort.SessionOptions()
    so.register_custom_ops_library(onnxruntime_extensions.get_library_path())
    session = ort.InferenceSession(str(tmp_path / "b" / "model_with_preprocessing.ort"), so, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"text": np.array(["The cats sat."])})
    ids = [2, 8, 5, 12, 6, 13, 3]  # [CLS] the cat ##s sat . [SEP]
    np.testing.assert_allclose(got[0], emb[ids].mean(axis=0), rtol=1e-6, atol=1e-6)
    assert _run(capsys, "package", "--verify", tmp_path / "b")[0] == 0


def test_with_preprocessing_refuses_a_non_text_model(mlp, tmp_path, capsys):
    model, _ = mlp
    code, _, err = _run(capsys, "package", model, "-o", tmp_path / "b", "--with-preprocessing")
    assert code == 2
    assert err.strip() == ("error: --with-preprocessing handles text encoders (inputs input_ids, attention_mask, token_type_ids) for now; "
                           "this model takes x: package it without --with-preprocessing.")
    assert not (tmp_path / "b").exists()
