"""Model inputs from other exporters: -1/0/unnamed dims, shapes the graph fixes, and synthetic token ids.

Issue 10, defects 2, 3 and 6. Each graph is built here with the feature of the third-party model
it stands for: a Paddle export's batch written as -1, PaddleOCR rec's fixed height behind a
dynamic input, and a BERT-like embedding with (or without) a tokenizer beside the model.
"""

from __future__ import annotations

import json
import logging
import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeprune.calibration import input_specs, load_calibration
from edgeprune.cli import main
from edgeprune.errors import CalibrationDataError
from edgeprune.validation import find_tokenizer, latency_feed

SENTENCES = pathlib.Path(__file__).resolve().parents[2] / "edgeprune" / "data" / "calibration_sentences.txt"


def _save(tmp_path: pathlib.Path, graph: onnx.GraphProto, name: str = "m.onnx", opset: int = 17) -> pathlib.Path:
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    folder = tmp_path / "in"
    folder.mkdir(exist_ok=True)
    path = folder / name
    onnx.save(proto, path)
    return path


def _run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _paddle_cnn(tmp_path, batch=-1) -> pathlib.Path:
    """x[-1, 3, ?, ?] -> Conv 1x1 (3 -> 4) -> GlobalAveragePool -> Flatten -> Gemm -> logits[-1, 5]: a Paddle export's batch."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("GlobalAveragePool", ["r"], ["p"]),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("Gemm", ["f", "g", "gb"], ["logits"]),
        ],
        "paddle_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, None, None])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 5])],
        [
            numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "w"),
            numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
            numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "g"),
            numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "gb"),
        ],
    )
    return _save(tmp_path, graph)


# ---- defect 2: -1, 0 and unnamed dims are dynamic


def test_minus_one_zero_and_unnamed_dims_are_dynamic_in_input_specs(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, 0, None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 3, 0, None])],
    )
    model = ir.load(_save(tmp_path, graph))
    assert [s.shape for s in input_specs(model)] == [(None, 3, None, None)]


def test_minus_one_batch_gets_synthetic_data_and_takes_a_correct_npz(tmp_path):
    path = _paddle_cnn(tmp_path)
    model = ir.load(path)
    synthetic = load_calibration(None, model, max_samples=2, image_size=16)
    assert [s["x"].shape for s in synthetic.samples] == [(1, 3, 16, 16), (1, 3, 16, 16)]
    npz = tmp_path / "in" / "calib.npz"
    np.savez(npz, x=np.random.default_rng(1).standard_normal((5, 3, 8, 8)).astype(np.float32))
    calib = load_calibration(npz, model)
    assert len(calib) == 5 and calib.max_batch is None
    assert calib.samples[0]["x"].shape == (1, 3, 8, 8)


def test_minus_one_dims_read_as_unknown_in_refusals(tmp_path):
    model = ir.load(_paddle_cnn(tmp_path))
    npz = tmp_path / "in" / "bad.npz"
    np.savez(npz, x=np.zeros((2, 4, 8, 8), np.float32))
    with pytest.raises(CalibrationDataError) as info:
        load_calibration(npz, model)
    assert str(info.value) == (
        f"{npz} (2 of 2 samples), sample 0: calibration input 'x' has size 4 on axis 1 but the model expects 3 "
        "[?, 3, ?, ?]: resize or re-export the data to match."
    )


def test_latency_feed_tiles_tokens_on_a_minus_one_sequence_axis(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input_ids"], ["out"])],
        "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [-1, -1])],
        [helper.make_tensor_value_info("out", TensorProto.INT64, [-1, -1])],
    )
    model = ir.load(_save(tmp_path, graph))
    feed = latency_feed({"input_ids": np.array([[5, 6, 7]], np.int64)}, model, seq_len=8)
    np.testing.assert_array_equal(feed["input_ids"], [[5, 6, 7, 5, 6, 7, 5, 6]])


@pytest.mark.parametrize("with_npz", [False, True], ids=["synthetic", "npz"])
def test_compile_a_minus_one_batch_model(tmp_path, capsys, with_npz):
    path = _paddle_cnn(tmp_path)
    before = path.read_bytes()
    extra = []
    if with_npz:
        npz = tmp_path / "in" / "calib.npz"
        np.savez(npz, x=np.random.default_rng(1).standard_normal((6, 3, 8, 8)).astype(np.float32))
        extra = ["--calib", npz]
    code, out, err = _run(capsys, "compile", path, "-o", tmp_path / "out", "--max-samples", 4, "--json", *extra)
    assert code == 0, err
    report = json.loads(out)
    assert report["latency"]["input_shapes"] == {"x": [1, 3, 8, 8] if with_npz else [1, 3, 224, 224]}
    assert report["calibration"]["synthetic"] is not with_npz
    assert path.read_bytes() == before


def test_a_literal_zero_dim_that_onnxruntime_enforces_is_refused_in_one_sentence(tmp_path):
    """0 reads as dynamic in the specs, but ORT 1.32 holds a declared 0 literally: no synthetic shape can run."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, 8, 0])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 3, 8, 0])],
    )
    with pytest.raises(CalibrationDataError) as info:
        load_calibration(None, ir.load(_save(tmp_path, graph)), max_samples=2)
    assert str(info.value) == (
        "input 'x' declares size 0 on axis 3, which onnxruntime enforces literally, so no non-empty input runs: "
        "re-export the model with that axis dynamic (a name or -1)."
    )


# ---- defect 3: synthetic shapes the graph's own constants suggest


def _fixed_height(tmp_path, height: int = 40, constant_node: bool = False) -> pathlib.Path:
    """x[-1, 1, ?, ?] -> Transpose(H<->W) -> MatMul W[height, 5]: any width, height fixed by the weight (PaddleOCR rec).

    With ``constant_node`` the weight is a Constant node, as Paddle exports write it.
    """
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((height, 5)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["t", "w"], ["y"]),
    ]
    if constant_node:
        nodes.insert(0, helper.make_node("Constant", [], ["w"], value=w))
    graph = helper.make_graph(
        nodes,
        "fixed_height",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 1, None, None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 1, None, 5])],
        [] if constant_node else [w],
    )
    return _save(tmp_path, graph)


@pytest.mark.parametrize("constant_node", [False, True], ids=["initializer", "constant-node"])
def test_synthetic_shape_follows_the_graphs_constants(tmp_path, constant_node):
    model = ir.load(_fixed_height(tmp_path, constant_node=constant_node))
    calib = load_calibration(None, model, max_samples=2, image_size=32)
    assert [s["x"].shape for s in calib.samples] == [(1, 1, 40, 32), (1, 1, 40, 32)]


def test_compile_a_fixed_height_model_without_calib(tmp_path, capsys):
    path = _fixed_height(tmp_path)
    code, out, err = _run(capsys, "compile", path, "-o", tmp_path / "out", "--max-samples", 4, "--json")
    assert code == 0, err
    assert json.loads(out)["latency"]["input_shapes"] == {"x": [1, 1, 40, 224]}


def test_no_synthetic_shape_fits_exits_2_with_one_sentence(tmp_path, capsys):
    """The only fitting height (5) comes from an Add's broadcast constant, not a shape-setting op."""
    bias = np.zeros((1, 3, 5, 1), np.float32)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "bias"], ["y"])],
        "no_fit",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, None, None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 3, None, None])],
        [numpy_helper.from_array(bias, "bias")],
    )
    path = _save(tmp_path, graph)
    before = path.read_bytes()
    out = tmp_path / "out"
    code, stdout, stderr = _run(capsys, "compile", path, "-o", out)
    assert code == 2, (stdout, stderr)
    assert stderr.splitlines()[-1] == (
        "error: the model rejects synthetic inputs of every shape tried from its own constants and common sizes "
        "(first x [1, 3, 224, 224]): pass --calib with inputs of shape x [?, 3, ?, ?] that the model accepts."
    )
    assert "Traceback" not in stderr and not out.exists() and path.read_bytes() == before


# ---- defect 6: synthetic token ids


def _bert_like(tmp_path, vocab: int) -> pathlib.Path:
    """input_ids/attention_mask[batch, seq] -> Gather(table[vocab, 8]) -> masked mean -> MatMul -> y[batch, 4]."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "input_ids"], ["e"]),
            helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["m", "axes"], ["mu"]),
            helper.make_node("Mul", ["e", "mu"], ["em"]),
            helper.make_node("ReduceSum", ["em", "one"], ["s"], keepdims=0),
            helper.make_node("MatMul", ["s", "w"], ["y"]),
        ],
        "bert_like",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [
            numpy_helper.from_array(rng.standard_normal((vocab, 8)).astype(np.float32), "table"),
            numpy_helper.from_array(np.array([-1], np.int64), "axes"),
            numpy_helper.from_array(np.array([1], np.int64), "one"),
            numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w"),
        ],
    )
    return _save(tmp_path, graph)


def _word_tokenizer(path: pathlib.Path) -> list[str]:
    """A word-level tokenizer.json over the bundled sentences' words ([PAD] 0, [UNK] 1); returns the vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for line in SENTENCES.read_text().splitlines() for w in line.replace(".", " . ").replace(",", " , ").split()})
    vocab = ["[PAD]", "[UNK]", *words]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return vocab


def test_synthetic_text_uses_the_bundled_sentences_through_the_tokenizer_beside_the_model(tmp_path, caplog):
    from tokenizers import Tokenizer

    (tmp_path / "in").mkdir()
    vocab = _word_tokenizer(tmp_path / "in" / "tokenizer.json")
    path = _bert_like(tmp_path, len(vocab))
    tokenizer = find_tokenizer(path, None)
    assert tokenizer == tmp_path / "in" / "tokenizer.json"
    with caplog.at_level(logging.WARNING, logger="edgeprune.calibration"):
        calib = load_calibration(None, ir.load(path), tokenizer=tokenizer, max_samples=3)
    sentences = [s for s in SENTENCES.read_text(encoding="utf-8").splitlines() if s.strip()]
    tok = Tokenizer.from_file(str(tokenizer))
    expected = [tok.encode(s).ids for s in sentences]
    got = [s["input_ids"][0].tolist() for s in calib.samples]
    assert len(got) == 3 and all(ids in expected for ids in got)
    assert all((s["attention_mask"] == 1).all() for s in calib.samples)
    assert calib.synthetic
    assert calib.source == f"bundled sentences {SENTENCES} (3 of {len(sentences)} texts, tokenizer tokenizer.json, max 128 tokens)"
    assert caplog.messages == [
        f"NO CALIBRATION DATA: calibrating on 3 of the {len(sentences)} bundled English sentences through "
        f"{tokenizer}; fidelity on them says little about your inputs. Pass --calib with real data."
    ]


@pytest.mark.parametrize("vocab", [100, 50000])
def test_synthetic_ids_span_the_embedding_table(tmp_path, vocab):
    calib = load_calibration(None, ir.load(_bert_like(tmp_path, vocab)), max_samples=4, seq_len=64)
    ids = np.concatenate([s["input_ids"] for s in calib.samples])
    assert ids.shape == (4, 64) and ids.min() >= 0 and ids.max() < vocab
    # Across the table, not bunched at its start (BERT's ids below 1000 are padding and unused tokens).
    assert (ids >= vocab // 2).mean() > 0.4


def test_compile_marks_synthetic_data_in_the_summary_and_the_html(tmp_path, capsys):
    path = _bert_like(tmp_path, 100)
    code, out, err = _run(capsys, "compile", path, "-o", tmp_path / "out", "--max-samples", 4)
    assert code == 0, err
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in out.splitlines() if "calibration data" in line]
    assert rows == [["calibration data", "synthetic data", "", ""]]
    html = (tmp_path / "out" / "report.html").read_text()
    table = html[: html.index("<h2>report.json</h2>")]
    assert "<tr><td>calibration data</td><td>synthetic data</td><td></td><td></td></tr>" in table
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["calibration"]["synthetic"] is True
