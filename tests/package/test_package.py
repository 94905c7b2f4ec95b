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
from edgeprune.errors import BadInputError
from edgeprune.runtime.package import ort_format
from edgeprune.runtime.session import make_session

from tiny_models import write_mlp, write_mlp_calib


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


def test_with_preprocessing_refuses_a_model_neither_text_nor_image(mlp, tmp_path, capsys):
    model, _ = mlp
    code, _, err = _run(capsys, "package", model, "-o", tmp_path / "b", "--with-preprocessing")
    assert code == 2
    assert err.strip() == ("error: --with-preprocessing handles text encoders (inputs input_ids, attention_mask, token_type_ids) and image "
                           "classifiers (one float [N, 3, H, W] input); this model takes x: package it without --with-preprocessing.")
    assert not (tmp_path / "b").exists()


def _long_sentence(words: int) -> str:
    return " ".join(["the cat sat on the mat ."] * (words // 7 + 1))


def _expected_embedding(tokenizer: pathlib.Path, emb: np.ndarray, sentence: str, max_tokens: int) -> np.ndarray:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_tokens)
    ids = tok.encode(sentence).ids
    assert len(ids) == min(max_tokens, len(ids)) and ids[-1] == 3  # [SEP] kept by truncation
    return emb[ids].mean(axis=0)


def _extensions_session(path: pathlib.Path):
    import onnxruntime_extensions

    return make_session(path, "cpu", custom_op_libraries=(onnxruntime_extensions.get_library_path(),))


def test_with_preprocessing_truncates_text_to_the_pipelines_128_tokens(tmp_path, capsys):
    pytest.importorskip("onnxruntime_extensions")
    model, tokenizer, emb = _tiny_text_encoder(tmp_path)
    code, out, err = _run(capsys, "package", model, "-o", tmp_path / "b", "--with-preprocessing", "--tokenizer", tokenizer, "--runs", "2", "--json")
    assert code == 0, err
    manifest = json.loads(out)
    assert manifest["verification"]["preprocessing"]["max_tokens"] == 128
    assert manifest["verification"]["preprocessing"]["padded_to"] is None
    session = _extensions_session(tmp_path / "b" / "model_with_preprocessing.ort")
    long = _long_sentence(300)
    (got,) = session.run(None, {"text": np.array([long])})
    np.testing.assert_allclose(got[0], _expected_embedding(tokenizer, emb, long, 128), rtol=1e-6, atol=1e-6)
    # the untruncated mean differs: the check above can fail
    assert not np.allclose(got[0], _expected_embedding(tokenizer, emb, long, 10_000), rtol=1e-6, atol=1e-6)


def test_with_preprocessing_pads_to_a_fixed_sequence_length(tmp_path, capsys):
    pytest.importorskip("onnxruntime_extensions")
    model, tokenizer, emb = _tiny_text_encoder(tmp_path)
    code, out, err = _run(capsys, "package", model, "-o", tmp_path / "b", "--target", "android-arm64", "--fix-shapes", "B=1,T=16",
                          "--with-preprocessing", "--tokenizer", tokenizer, "--runs", "2", "--json")
    assert code == 0, err
    manifest = json.loads(out)
    assert manifest["models"][0]["inputs"] == [{"name": "input_ids", "dtype": "tensor(int64)", "shape": [1, 16]},
                                               {"name": "attention_mask", "dtype": "tensor(int64)", "shape": [1, 16]}]
    pre = manifest["verification"]["preprocessing"]
    assert (pre["max_tokens"], pre["padded_to"]) == (16, 16)
    session = make_session(tmp_path / "b" / "model_with_preprocessing.ort", "cpu", config={"session.enable_saved_runtime_optimizations": "1"},
                           custom_op_libraries=(__import__("onnxruntime_extensions").get_library_path(),))
    for sentence in ("the cat sat.", _long_sentence(40)):
        (got,) = session.run(None, {"text": np.array([sentence])})
        np.testing.assert_allclose(got[0], _expected_embedding(tokenizer, emb, sentence, 16), rtol=1e-6, atol=1e-6)
    assert _run(capsys, "package", "--verify", tmp_path / "b")[0] == 0


def test_with_preprocessing_refuses_a_fixed_batch_above_one(tmp_path, capsys):
    pytest.importorskip("onnxruntime_extensions")
    model, tokenizer, _ = _tiny_text_encoder(tmp_path)
    code, _, err = _run(capsys, "package", model, "-o", tmp_path / "b", "--fix-shapes", "B=2,T=16", "--with-preprocessing", "--tokenizer", tokenizer)
    assert code == 2
    assert err.strip() == ("error: --with-preprocessing feeds one sentence at a time, but the model's batch is fixed at 2: "
                           "fix the batch to 1 (--fix-shapes <batch dim>=1) or package without --with-preprocessing.")
    assert not (tmp_path / "b").exists()


# ---- image classifiers


def _shared_images(count: int) -> list[pathlib.Path]:
    from edgeprune.models.tasks import load_imagenet

    try:
        files, _ = load_imagenet()
    except Exception as exc:  # noqa: BLE001 - the shared data is optional on a fresh checkout
        pytest.skip(f"shared ImageNet sample not available ({exc})")
    return files[:count]


def _tiny_classifier(tmp_path: pathlib.Path, labels: bool = True) -> tuple[pathlib.Path, np.ndarray, np.ndarray]:
    """A [N, 3, 224, 224] -> [N, 10] classifier: 56x56 average pools (48 features), then Gemm."""
    proto = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]> cls (float[N, 3, 224, 224] pixel_values) => (float[N, 10] logits) {'
        " pooled = AveragePool <kernel_shape = [56, 56], strides = [56, 56]> (pixel_values)"
        " flat = Flatten <axis = 1> (pooled)"
        " logits = Gemm (flat, w, b) }"
    )
    rng = np.random.default_rng(7)
    w, b = rng.standard_normal((48, 10)).astype(np.float32), rng.standard_normal(10).astype(np.float32)
    proto.graph.initializer.extend([onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(b, "b")])
    folder = tmp_path / "cls"
    folder.mkdir()
    onnx.save(proto, folder / "model.onnx")
    if labels:
        (folder / "labels.txt").write_text("".join(f"kind {c}\n" for c in "abcdefghij"), encoding="utf-8")
    return folder / "model.onnx", w, b


def _numpy_classifier(pixels: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    pooled = pixels.reshape(len(pixels), 3, 4, 56, 4, 56).mean(axis=(3, 5)).reshape(len(pixels), 48)
    return pooled @ w + b


def test_image_front_equals_the_pillow_pipeline_bit_for_bit(tmp_path):
    """After decoding, resize + crop + normalize equal models.tasks.imagenet_pixels exactly (shared images and odd sizes)."""
    from edgeprune.models.tasks import imagenet_pixels
    from edgeprune.runtime.package import image_preprocessing
    from PIL import Image

    front = image_preprocessing.preprocess_model(224)
    onnx.checker.check_model(front, full_check=True)
    session = make_session(front, "cpu")
    rng = np.random.default_rng(0)
    cases = []
    for path in _shared_images(6):
        with Image.open(path) as img:
            cases.append((np.asarray(img.convert("RGB")), path))
    for i, (h, w) in enumerate([(100, 150), (224, 224), (256, 301), (37, 500), (900, 1300)]):  # up, equal, one side equal, thin, down
        path = tmp_path / f"r{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        cases.append((np.asarray(Image.open(path).convert("RGB")), path))
    for rgb, path in cases:
        (got,) = session.run(None, {"rgb": rgb})
        np.testing.assert_array_equal(got, imagenet_pixels([path]), err_msg=str(path))
    # ORT's own antialiased Resize is not Pillow's: the explicit filter is needed (this is why the check above can fail)
    resize = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 18]> r (uint8[H, W, 3] x, int64[2] s) => (uint8[A, B, 3] y) '
        '{ y = Resize <mode = "linear", antialias = 1, axes = [0, 1]> (x, , , s) }'
    )
    rgb = cases[5][0] if len(cases) > 5 else cases[0][0]
    (ort_resized,) = make_session(resize, "cpu").run(None, {"x": rgb, "s": np.array([600, 866], np.int64)})
    pil = np.asarray(Image.fromarray(rgb).resize((866, 600), Image.BILINEAR))
    assert not np.array_equal(ort_resized, pil)


def test_with_preprocessing_image_classifier_bytes_in_top_k_out(tmp_path, capsys):
    pytest.importorskip("onnxruntime_extensions")
    import onnxruntime_extensions
    from edgeprune.models.tasks import imagenet_pixels

    model, w, b = _tiny_classifier(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    for f in _shared_images(4):
        (images / f.name).write_bytes(f.read_bytes())
    with Image.open(f) as img:  # gray and RGBA PNGs: DecodeImage gives 1 and 4 channels, the graph makes RGB as Pillow does
        img.convert("L").save(images / "zz_gray.png")
        img.convert("RGBA").resize((300, 200)).save(images / "zz_rgba.png")
    files = sorted(images.iterdir())
    code, out, err = _run(capsys, "package", model, "-o", tmp_path / "b", "--with-preprocessing", "--calib", images, "--runs", "2", "--json")
    assert code == 0, err
    manifest = json.loads(out)
    pre = manifest["models"][1]
    assert pre["file"] == "model_with_preprocessing.ort" and pre["custom_op_libraries"] == ["onnxruntime-extensions"]
    assert pre["inputs"] == [{"name": "image", "dtype": "tensor(uint8)", "shape": ["num_bytes"]}]
    assert pre["outputs"] == [{"name": "class_index", "dtype": "tensor(int64)", "shape": [1, 5]},
                              {"name": "probability", "dtype": "tensor(float)", "shape": [1, 5]},
                              {"name": "label", "dtype": "tensor(string)", "shape": [1, 5]}]
    assert manifest["custom_op_libraries"] == [{"name": "onnxruntime-extensions", "version": onnxruntime_extensions.__version__,
                                                "domains": ["com.microsoft.extensions"]}]
    assert manifest["operators"]["com.microsoft.extensions"] == ["DecodeImage"]
    check = manifest["verification"]["preprocessing"]
    assert (check["kind"], check["images"], check["top1_agreement_same_pixels"]) == ("image", [f.name for f in files], 1.0)
    assert (check["top1_agreement_pillow_decode"], check["decoder_changes_top1"]) == (1.0, [])
    # the bundle, fed the file bytes, gives the numpy pipeline's top-1 (and top-k order) on every image
    session = _extensions_session(tmp_path / "b" / "model_with_preprocessing.ort")
    logits = _numpy_classifier(imagenet_pixels(files), w, b)
    for f, row in zip(files, logits):
        index, prob, label = session.run(None, {"image": np.fromfile(f, dtype=np.uint8)})
        assert index[0, 0] == row.argmax()
        assert label[0].tolist() == [f"kind {'abcdefghij'[i]}" for i in index[0]]
        assert np.all(np.diff(prob[0]) <= 0)
    assert _run(capsys, "package", "--verify", tmp_path / "b")[0] == 0
    readme = (tmp_path / "b" / "README.md").read_text()
    assert "Register before creating the session: onnxruntime-extensions " in readme and " for com.microsoft.extensions." in readme
    assert ("Ort::Value image = Ort::Value::CreateTensor<uint8_t>(memory, image_data.data(), image_data.size(), "
            "image_shape.data(), image_shape.size());") in readme


def _one_pixel_classifier(path: pathlib.Path, c: int, i: int, j: int, threshold: float) -> pathlib.Path:
    """Two classes: 0 when pixel_values[:, c, i, j] > threshold, else 1."""
    proto = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]> one (float[N, 3, 224, 224] x) => (float[N, 2] logits) {'
        " p = Slice (x, starts, ends, axes)  v = Reshape (p, shape)  d = Sub (v, t)  n = Neg (d)  logits = Concat <axis = 1> (d, n) }"
    )
    proto.graph.initializer.extend([
        onnx.numpy_helper.from_array(np.array([c, i, j], np.int64), "starts"),
        onnx.numpy_helper.from_array(np.array([c + 1, i + 1, j + 1], np.int64), "ends"),
        onnx.numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes"),
        onnx.numpy_helper.from_array(np.array([-1, 1], np.int64), "shape"),
        onnx.numpy_helper.from_array(np.array(threshold, np.float32), "t"),
    ])
    onnx.save(proto, path)
    return path


def _swab(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, np.ndarray, np.ndarray]:
    """The shared JPEG the two decoders disagree most on, alone in a --calib folder, with both decodes (RGB)."""
    from PIL import Image

    from edgeprune.runtime.package import image_preprocessing

    (path,) = [f for f in _shared_images(100) if f.name == "n04367480_swab.JPEG"]  # decoders differ by up to 62 levels on it
    images = tmp_path / "images"
    images.mkdir()
    (images / path.name).write_bytes(path.read_bytes())
    (rgb_ext,) = _extensions_session_from(image_preprocessing.decode_model()).run(None, {"image": np.fromfile(path, dtype=np.uint8)})
    with Image.open(path) as img:
        rgb_pil = np.asarray(img.convert("RGB"))
    return path, images, rgb_pil, rgb_ext


def _split_pixel(a: np.ndarray, b: np.ndarray) -> tuple[tuple[int, int, int], float]:
    """The [1, 3, S, S] position where a and b differ most, and the threshold half-way between them."""
    c, i, j = np.unravel_index(np.abs(a - b)[0].argmax(), a.shape[1:])
    assert a[0, c, i, j] != b[0, c, i, j]
    return (int(c), int(i), int(j)), (float(a[0, c, i, j]) + float(b[0, c, i, j])) / 2


def test_image_check_reports_a_top1_only_the_decoder_changes(tmp_path, capsys):
    """A model deciding on one pixel where Pillow's and the extensions' JPEG decoders differ: packaged, the flip reported."""
    pytest.importorskip("onnxruntime_extensions")
    from edgeprune.runtime.package import image_preprocessing

    path, images, rgb_pil, rgb_ext = _swab(tmp_path)
    front = make_session(image_preprocessing.preprocess_model(224), "cpu")
    pil, ext = (front.run(None, {"rgb": np.ascontiguousarray(x)})[0] for x in (rgb_pil, rgb_ext))
    (c, i, j), threshold = _split_pixel(pil, ext)
    model = _one_pixel_classifier(tmp_path / "one.onnx", c, i, j, threshold)
    code, out, err = _run(capsys, "package", model, "-o", tmp_path / "b", "--with-preprocessing", "--calib", images, "--runs", "2", "--json")
    assert code == 0, err
    check = json.loads(out)["verification"]["preprocessing"]
    assert (check["top1_agreement_same_pixels"], check["top1_agreement_pillow_decode"], check["decoder_changes_top1"]) == (1.0, 0.0, [path.name])


def test_image_check_refuses_preprocessing_that_is_not_the_pipelines(tmp_path, capsys, monkeypatch):
    """The gate: with coarser resize coefficients (12 bits, not Pillow's 22) in the graph, the same decoded pixels give another top-1."""
    pytest.importorskip("onnxruntime_extensions")
    from edgeprune.runtime.package import image_preprocessing

    path, images, _, rgb_ext = _swab(tmp_path)
    right = make_session(image_preprocessing.preprocess_model(224), "cpu").run(None, {"rgb": rgb_ext})[0]
    monkeypatch.setattr(image_preprocessing, "_PRECISION_BITS", 12)
    wrong = make_session(image_preprocessing.preprocess_model(224), "cpu").run(None, {"rgb": rgb_ext})[0]
    (c, i, j), threshold = _split_pixel(right, wrong)
    model = _one_pixel_classifier(tmp_path / "one.onnx", c, i, j, threshold)
    want, have = (0, 1) if right[0, c, i, j] > threshold else (1, 0)
    code, _, err = _run(capsys, "package", model, "-o", tmp_path / "b", "--with-preprocessing", "--calib", images, "--runs", "2", "--json")
    assert code == 3
    assert err.strip() == (f"error: the preprocessing model's top-1 class on {path.name} is {have}, and the Python pipeline's "
                           f"(models.tasks.imagenet_pixels) on the same decoded pixels is {want}: the bundle was refused; the in-graph "
                           "resize/crop/normalize does not reproduce the pipeline: report this with --debug output.")
    assert not (tmp_path / "b").exists()


def _extensions_session_from(proto: onnx.ModelProto):
    import onnxruntime_extensions

    return make_session(proto, "cpu", custom_op_libraries=(onnxruntime_extensions.get_library_path(),))


def test_image_preprocessing_refusals(tmp_path, capsys):
    pytest.importorskip("onnxruntime_extensions")
    model, _, _ = _tiny_classifier(tmp_path)
    (model.parent / "labels.txt").write_text("just one\n", encoding="utf-8")
    code, _, err = _run(capsys, "package", model, "-o", tmp_path / "b", "--with-preprocessing")
    assert code == 2
    assert err.strip() == (f"error: the labels file {model.parent / 'labels.txt'} has 1 lines but the model has 10 classes: "
                           "give one class name per line, in class-index order.")
    assert not (tmp_path / "b").exists()
    wide = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]> cls (float[1, 3, 224, 320] x) => (float[1, 3] y) '
        "{ p = GlobalAveragePool (x)  y = Flatten <axis = 1> (p) }"
    )
    path = tmp_path / "wide.onnx"
    onnx.save(wide, path)
    code, _, err = _run(capsys, "package", path, "-o", tmp_path / "b", "--with-preprocessing")
    assert code == 2
    assert err.strip() == ("error: --with-preprocessing feeds square centre crops (ImageNet evaluation), but input x is 224x320: "
                           "package it without --with-preprocessing.")
    assert not (tmp_path / "b").exists()


# ---- the session factory's parameters the bundle uses


def test_make_session_registers_libraries_and_config_entries(tmp_path):
    model = write_mlp(tmp_path, "m.onnx")
    session = make_session(model, "cpu", config={"session.enable_saved_runtime_optimizations": "1"})
    assert session.get_session_options().get_session_config_entry("session.enable_saved_runtime_optimizations") == "1"
    assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    missing = tmp_path / "libnothere.so"
    with pytest.raises(BadInputError) as info:
        make_session(model, "cpu", custom_op_libraries=(missing,))
    assert str(info.value).startswith(f"onnxruntime could not load the custom-op library {missing} (")
    assert str(info.value).endswith("): check the path and that the library was built for this platform and onnxruntime.")


# ---- real models (minutes; the shared data and the weights packages)


@pytest.fixture(scope="module")
def minilm_compiled(minilm_artifact, tmp_path_factory):
    """The MiniLM export compiled with uniform 8-bit weights (edgeprune compile --bits 8), its folder."""
    folder = tmp_path_factory.mktemp("minilm") / "c"
    assert main(["compile", str(minilm_artifact.model_path), "-o", str(folder), "--bits", "8", "--max-samples", "16", "--json"]) == 0
    return folder


@pytest.mark.realmodel
def test_compiled_minilm_bundle_matches_lists_its_ops_and_verifies(minilm_compiled, tmp_path, capsys):
    bundle = tmp_path / "b"
    code, out, err = _run(capsys, "package", minilm_compiled, "-o", bundle, "--runs", "3", "--json")
    assert code == 0, err
    manifest = json.loads(out)
    assert manifest["compile"]["passes"][-1]["name"] == "bits"
    # the .ort gives the .onnx's outputs on the stored rows, computed here
    data = np.load(bundle / "verify.npz")
    rows = [{k.split("/")[1]: data[k] for k in data.files if k.startswith(f"in{i}/")} for i in range(manifest["models"][0]["verify_rows"])]
    onnx_session = make_session(minilm_compiled / "model.onnx", "cpu")
    ort_session = make_session(bundle / "model.ort", "cpu")
    for row in rows:
        want = onnx_session.run(None, row)
        got = ort_session.run(None, row)
        for w, g in zip(want, got):
            np.testing.assert_array_equal(g, w)
    # the reduced config lists exactly the operators of the graph ORT runs (fixed style: fully optimized)
    expected = _optimized_ops(minilm_compiled / "model.onnx", ort.GraphOptimizationLevel.ORT_ENABLE_ALL, tmp_path)
    assert ort_format.read_config(bundle / "required_operators_and_types.config") == expected
    assert ort_format.ort_ops(bundle / "model.ort") == expected
    assert manifest["operators"] == expected
    assert _run(capsys, "package", "--verify", bundle)[0] == 0
    path = bundle / "model.ort"
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x10
    path.write_bytes(bytes(data))
    code, _, err = _run(capsys, "package", "--verify", bundle)
    assert code == 2
    assert err.strip() == (f"error: model.ort in {bundle} was changed after packaging (its sha256 differs from the "
                           "manifest): restore the original file or re-run edgeprune package.")


@pytest.mark.realmodel
def test_efficientnet_lite0_with_preprocessing_gives_the_pipelines_top1(efficientnet_lite0_artifact, tmp_path, capsys):
    pytest.importorskip("onnxruntime_extensions")
    from edgeprune.models.tasks import image_logits, imagenet_pixels

    files = _shared_images(100)[::10]  # 10 images, 10 classes apart
    images = tmp_path / "images"
    images.mkdir()
    for f in files:
        (images / f.name).write_bytes(f.read_bytes())
    bundle = tmp_path / "b"
    code, out, err = _run(capsys, "package", efficientnet_lite0_artifact.model_path, "-o", bundle, "--with-preprocessing",
                          "--calib", images, "--runs", "3", "--json")
    assert code == 0, err
    manifest = json.loads(out)
    check = manifest["verification"]["preprocessing"]
    assert (check["images"], check["top1_agreement_same_pixels"]) == ([f.name for f in files], 1.0)
    # computed here: the bundle on the file bytes vs the Python pipeline on the extensions' decoded pixels (equal on
    # every image) and on Pillow's (what the manifest reports)
    from PIL import Image

    from edgeprune.runtime.package import image_preprocessing

    session = _extensions_session(bundle / "model_with_preprocessing.ort")
    decoder = _extensions_session_from(image_preprocessing.decode_model())
    decoded = []
    for f in files:
        decoded.append(tmp_path / f"{f.stem}.png")
        Image.fromarray(decoder.run(None, {"image": np.fromfile(f, dtype=np.uint8)})[0]).save(decoded[-1])
    model = str(efficientnet_lite0_artifact.model_path)
    same_pixels = image_logits(model, imagenet_pixels(decoded), batch_size=1).argmax(axis=1)
    pillow = image_logits(model, imagenet_pixels(files), batch_size=1).argmax(axis=1)
    got = np.array([session.run(None, {"image": np.fromfile(f, dtype=np.uint8)})[0][0, 0] for f in files])
    assert got.tolist() == same_pixels.tolist()
    assert check["top1_agreement_pillow_decode"] == float(np.mean(got == pillow))
    assert check["decoder_changes_top1"] == [f.name for f, a, b in zip(files, pillow, got) if a != b]
    assert _run(capsys, "package", "--verify", bundle)[0] == 0


def test_snippets_feed_an_image_bundle_the_file_bytes():
    from edgeprune.runtime.package import snippets

    model = {"file": "model_with_preprocessing.ort", "custom_op_libraries": ["onnxruntime-extensions"],
             "inputs": [{"name": "image", "dtype": "tensor(uint8)", "shape": ["num_bytes"]}],
             "outputs": [{"name": "class_index", "dtype": "tensor(int64)", "shape": [1, 5]}]}
    manifest = {"name": "cls", "edgeprune_version": "0", "onnxruntime": {"built_with": "1.32.0"}, "optimization": "runtime",
                "files": [], "required_operators": "required_operators_and_types.config", "models": [model],
                "custom_op_libraries": [{"name": "onnxruntime-extensions", "version": "0.15.2", "domains": ["com.microsoft.extensions"]}]}
    lines = {}
    for language, ep in (("kotlin", "NnapiExecutionProvider"), ("swift", "CoreMLExecutionProvider"), ("cpp", "CPUExecutionProvider")):
        text = snippets.readme({**manifest, "target": {"name": "t", "ep": ep, "language": language}})
        lines[language] = text.splitlines()
    assert 'val imageBytes = context.assets.open("photo.jpg").readBytes()  // JPEG or PNG file bytes' in lines["kotlin"]
    assert "val image = OnnxTensor.createTensor(env, ByteBuffer.wrap(imageBytes), longArrayOf(imageBytes.size.toLong()), OnnxJavaType.UINT8)" in lines["kotlin"]
    assert 'session.run(mapOf("image" to image)).use { result ->' in lines["kotlin"]
    assert ('let imageData = NSMutableData(contentsOf: Bundle.main.url(forResource: "photo", withExtension: "jpg")!)!  '
            "// JPEG or PNG file bytes") in lines["swift"]
    assert "let image = try ORTValue(tensorData: imageData, elementType: .uInt8, shape: [NSNumber(value: imageData.length)])" in lines["swift"]
    assert "std::vector<int64_t> image_shape{static_cast<int64_t>(image_data.size())};" in lines["cpp"]
    assert lines["cpp"][lines["cpp"].index("```cpp") + 1:][:4] == ["#include <onnxruntime_cxx_api.h>", "#include <fstream>", "#include <iterator>", "#include <vector>"]
