"""StatsCollector: streamed per-channel statistics must equal numpy on the same activations."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from edgeprune.calibration import CalibrationSet
from edgeprune.errors import BadInputError
from edgeprune.stats import StatsCollector


def _mlp(seed: int = 0) -> tuple[ir.Model, np.ndarray, np.ndarray]:
    """x[N,S,4] -> MatMul W1 -> h -> Relu -> r -> MatMul W2 -> y."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((4, 6)).astype(np.float32)
    w2 = rng.standard_normal((6, 3)).astype(np.float32)
    proto = onnx.parser.parse_model(
        """
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[N, S, 4] x) => (float[N, S, 3] y) {
            h = MatMul(x, w1)
            r = Relu(h)
            y = MatMul(r, w2)
        }
        """
    )
    proto.graph.initializer.extend(
        [onnx.numpy_helper.from_array(w1, "w1"), onnx.numpy_helper.from_array(w2, "w2")]
    )
    return ir.from_proto(proto), w1, w2


def _samples(shapes, seed=1):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, *s)).astype(np.float32) * 3 + 1} for s in shapes]


def _expect(rows: np.ndarray) -> dict:
    rows = rows.astype(np.float64)
    return {
        "count": rows.shape[0],
        "mean": rows.mean(0),
        "var": rows.var(0),
        "sq_norm": (rows**2).sum(0),
        "absmax": np.abs(rows).max(0),
        "gram": rows.T @ rows,
    }


def test_mlp_intermediate_matches_numpy_over_uneven_batches():
    model, w1, _ = _mlp()
    # 7 samples of seq 5 and 3 of seq 2: batches of 3 give sizes 3, 3, 1 and 3.
    samples = _samples([(5, 4)] * 7 + [(2, 4)] * 3)
    calib = CalibrationSet(samples, "test", False)
    collector = StatsCollector(model)
    collector.request("h", gram=True)
    collector.request("r")
    seen = []
    stats = collector.collect(calib, batch_size=3, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]

    x_rows = np.concatenate([s["x"].reshape(-1, 4) for s in samples])
    h = x_rows.astype(np.float32) @ w1
    for name, rows in (("h", h), ("r", np.maximum(h, 0))):
        want, got = _expect(rows), stats[name]
        assert got.count == want["count"] == 7 * 5 + 3 * 2
        assert got.axis == 2  # -1 normalized against rank 3
        for key in ("mean", "var", "sq_norm", "absmax"):
            assert getattr(got, key).dtype == np.float64
            np.testing.assert_allclose(getattr(got, key), want[key], rtol=1e-5, atol=1e-5, err_msg=f"{name}.{key}")
    np.testing.assert_allclose(stats["h"].gram, _expect(h)["gram"], rtol=1e-5, atol=1e-4)
    assert stats["r"].gram is None
    assert stats["h"].to_dict()["gram_shape"] == [6, 6]
    assert stats["r"].to_dict()["channels"] == 6


def test_graph_input_and_output_can_be_requested():
    model, w1, w2 = _mlp()
    samples = _samples([(3, 4)] * 4)
    collector = StatsCollector(model)
    collector.request("x")
    collector.request("y", axis=2)
    stats = collector.collect(CalibrationSet(samples, "test", False), batch_size=2)
    x = np.concatenate([s["x"].reshape(-1, 4) for s in samples])
    y = np.maximum(x @ w1, 0) @ w2
    np.testing.assert_allclose(stats["x"].mean, x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats["y"].var, y.astype(np.float64).var(0), rtol=1e-5)


def test_chunked_folding_equals_one_pass(monkeypatch):
    """Chan's merge over many small chunks must give the same numbers as one big block."""
    import edgeprune.stats as stats_mod

    model, w1, _ = _mlp()
    samples = _samples([(9, 4)] * 5, seed=3)
    calib = CalibrationSet(samples, "test", False)
    whole = StatsCollector(model)
    whole.request("h", gram=True)
    ref = whole.collect(calib, batch_size=5)["h"]
    monkeypatch.setattr(stats_mod, "_CHUNK_ELEMENTS", 12)  # 2 rows of 6 channels per chunk
    chunked = StatsCollector(model)
    chunked.request("h", gram=True)
    got = chunked.collect(calib, batch_size=5)["h"]
    for key in ("mean", "var", "sq_norm", "absmax", "gram"):
        np.testing.assert_allclose(getattr(got, key), getattr(ref, key), rtol=1e-10, atol=1e-10)


def _conv_model() -> ir.Model:
    rng = np.random.default_rng(2)
    w = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    proto = onnx.parser.parse_model(
        """
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[N, 3, H, W] img) => (float[N, 5, H, W] out) {
            c = Conv <pads = [1, 1, 1, 1]> (img, w)
            out = Relu(c)
        }
        """
    )
    proto.graph.initializer.append(onnx.numpy_helper.from_array(w, "w"))
    return ir.from_proto(proto)


def test_conv_channel_axis_1():
    model = _conv_model()
    rng = np.random.default_rng(4)
    samples = [{"img": rng.standard_normal((1, 3, 6, 7)).astype(np.float32)} for _ in range(5)]
    collector = StatsCollector(model)
    collector.request("c", axis=1, gram=True)
    collector.request("img", axis=1)
    stats = collector.collect(CalibrationSet(samples, "test", False), batch_size=2)
    # Reference activations from an independent ORT run of the graph output path.
    import onnxruntime as ort

    from edgeprune.model_io import to_proto

    proto = to_proto(model)
    proto.graph.output.append(onnx.helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    c = np.concatenate([sess.run(["c"], s)[0] for s in samples])  # [5, 5, 6, 7]
    rows = np.moveaxis(c, 1, -1).reshape(-1, 5)
    want = _expect(rows)
    got = stats["c"]
    assert got.count == 5 * 6 * 7 and got.axis == 1 and got.channels == 5
    for key in ("mean", "var", "sq_norm", "absmax", "gram"):
        np.testing.assert_allclose(getattr(got, key), want[key], rtol=1e-5, atol=1e-4, err_msg=key)
    img_rows = np.moveaxis(np.concatenate([s["img"] for s in samples]), 1, -1).reshape(-1, 3)
    np.testing.assert_allclose(stats["img"].mean, img_rows.mean(0), rtol=1e-6)


def _masked_model() -> tuple[ir.Model, np.ndarray]:
    """Embedding lookup: ids[B, L] -> Gather(table) -> e[B, L, 4] -> Mul by mask -> out."""
    table = np.arange(40, dtype=np.float32).reshape(10, 4) - 17.0
    proto = onnx.parser.parse_model(
        """
        <ir_version: 10, opset_import: ["" : 21]>
        g (int64[B, L] input_ids, int64[B, L] attention_mask) => (float[B, L, 4] out) {
            e = Gather <axis = 0> (table, input_ids)
            m = Cast <to = 1> (attention_mask)
            mu = Unsqueeze(m, axes)
            out = Mul(e, mu)
            tr = Transpose <perm = [0, 2, 1]> (e)
        }
        """
    )
    proto.graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(table, "table"),
            onnx.numpy_helper.from_array(np.array([-1], dtype=np.int64), "axes"),
        ]
    )
    return ir.from_proto(proto), table


def test_padded_tokens_are_excluded():
    model, table = _masked_model()
    lengths = [3, 5, 2, 5]
    rng = np.random.default_rng(5)
    samples = []
    for n in lengths:
        ids = rng.integers(1, 10, size=(1, n)).astype(np.int64)
        samples.append({"input_ids": ids, "attention_mask": np.ones((1, n), np.int64)})
    calib = CalibrationSet(samples, "test", False)
    batch_lengths = [b["input_ids"].shape[1] for b in calib.batches(4)]
    assert batch_lengths == [5]  # one padded batch: pad id 0 would add rows of table[0]
    collector = StatsCollector(model)
    collector.request("e")
    stats = collector.collect(calib, batch_size=4)["e"]
    real = np.concatenate([table[s["input_ids"][0]] for s in samples])
    assert stats.count == sum(lengths) == real.shape[0]
    np.testing.assert_allclose(stats.mean, real.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats.var, real.astype(np.float64).var(0), rtol=1e-6)
    np.testing.assert_allclose(stats.absmax, np.abs(real).max(0))


def test_fixed_axis_1_is_not_mistaken_for_tokens():
    """tr is [B, 4, L]; with L == 4 its leading dims look like the mask's [B, L] but axis 1 is fixed."""
    model, table = _masked_model()
    ids = [np.array([[1, 2, 3, 4]]), np.array([[5, 6]])]
    samples = [{"input_ids": i, "attention_mask": np.ones_like(i)} for i in ids]
    collector = StatsCollector(model)
    collector.request("tr", axis=2)
    stats = collector.collect(CalibrationSet(samples, "test", False), batch_size=2)["tr"]
    padded = np.stack([table[[1, 2, 3, 4]], table[[5, 6, 0, 0]]]).transpose(0, 2, 1)  # pad id 0
    assert stats.count == 2 * 4
    np.testing.assert_allclose(stats.mean, padded.reshape(-1, 4).mean(0), rtol=1e-6)


def test_unknown_tensor_is_a_clear_error():
    model, _, _ = _mlp()
    collector = StatsCollector(model)
    with pytest.raises(BadInputError, match="'nope' does not exist"):
        collector.request("nope")
    with pytest.raises(BadInputError, match="weight"):
        collector.request("w1")


def test_missing_value_type_is_inferred():
    """An intermediate without a declared type still becomes a typed graph output."""
    model, w1, _ = _mlp()
    for node in model.graph:
        for value in node.outputs:
            value.type = None
            value.shape = None
    samples = _samples([(2, 4)] * 2)
    collector = StatsCollector(model)
    collector.request("r")
    stats = collector.collect(CalibrationSet(samples, "test", False))
    x = np.concatenate([s["x"].reshape(-1, 4) for s in samples])
    np.testing.assert_allclose(stats["r"].mean, np.maximum(x @ w1, 0).mean(0), rtol=1e-5, atol=1e-6)
    # the user's model is not touched
    assert [v.name for v in model.graph.outputs] == ["y"]
