"""Model I/O: constants become initializers, versions survive, big models use external data,
and the output folder is written atomically or not at all."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import edgeprune
from edgeprune import model_io
from edgeprune.errors import BadInputError

from tiny_models import mlp_proto, write_mlp, write_mlp_calib


def test_load_lifts_weight_constants_but_keeps_scalars(tmp_path):
    proto = mlp_proto()
    w = np.arange(20, dtype=np.float32).reshape(4, 5)  # above the 16-element lift threshold
    proto.graph.node.insert(0, onnx.helper.make_node("Constant", [], ["wc"], value=onnx.numpy_helper.from_array(w)))
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    model = model_io.load_model(path)
    assert "wc" in model.graph.initializers
    np.testing.assert_array_equal(model.graph.initializers["wc"].const_value.numpy(), w)
    assert sum(n.op_type == "Constant" for n in model.graph) == 2  # the two scalars stay


@pytest.mark.parametrize("opset, ir_version", [(11, 6), (13, 7), (21, 10)])
def test_round_trip_keeps_opset_and_ir_version(tmp_path, opset, ir_version):
    proto = mlp_proto(opset=opset)
    proto.ir_version = ir_version
    src = tmp_path / "m.onnx"
    onnx.save(proto, src)
    model = model_io.load_model(src)
    model_io.save_model(model, tmp_path / "out.onnx")
    back = onnx.load(tmp_path / "out.onnx")
    assert back.ir_version == ir_version
    assert {o.domain: o.version for o in back.opset_import}[""] == opset


def test_large_models_are_saved_with_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 10)
    model = model_io.load_model(write_mlp(tmp_path / "in"))
    written = model_io.save_model(model, tmp_path / "big.onnx")
    assert [p.name for p in written] == ["big.onnx", "big.onnx.data"]
    assert model_io.file_size(tmp_path / "big.onnx") == sum(p.stat().st_size for p in written)
    reloaded = model_io.load_model(tmp_path / "big.onnx")
    x = np.ones((2, 4), np.float32)
    sess = ort.InferenceSession(str(tmp_path / "big.onnx"), providers=["CPUExecutionProvider"])
    ref = ort.InferenceSession(str(tmp_path / "in" / "mlp.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], ref.run(None, {"x": x})[0])
    assert model_io.param_count(reloaded) == model_io.param_count(model)


def test_truncated_external_data_is_named(tmp_path):
    proto = mlp_proto()
    onnx.save(proto, tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    data = tmp_path / "m.data"
    data.write_bytes(data.read_bytes()[:10])
    with pytest.raises(BadInputError) as err:
        model_io.load_model(tmp_path / "m.onnx")
    assert str(err.value) == f"external data file {data} is shorter than the model expects: it is truncated; copy it again next to the model."


def test_atomic_output_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with model_io.atomic_output_dir(out) as stage:
            (stage / "model.onnx").write_text("partial")
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_dir_refuses_input_folder(tmp_path):
    model = write_mlp(tmp_path / "in")
    with pytest.raises(BadInputError) as err:
        with model_io.atomic_output_dir(tmp_path / "in", force=True, inputs=(model,)):
            pass
    assert str(err.value) == f"the output folder {(tmp_path / 'in').resolve()} would overwrite the input {model.resolve()}: choose another -o folder."
    assert model.exists()


def test_python_api_mirrors_cli(tmp_path):
    model = write_mlp(tmp_path / "in")
    calib = write_mlp_calib(tmp_path / "in")
    result = edgeprune.compile(model, tmp_path / "out", calib=calib, latency_runs=3, profile=False)
    assert (tmp_path / "out" / "model.onnx").exists()
    assert result.report["verification"]["drop"] < 1e-6
    checked = edgeprune.validate(model, tmp_path / "out" / "model.onnx", data=calib, runs=3)
    assert checked.fidelity[0].cosine_min == pytest.approx(1.0, abs=1e-6)
    assert edgeprune.inspect(model)["params"] == model_io.param_count(model_io.load_model(model))


def test_param_count_of_a_4bit_model_counts_logical_weights(tmp_path):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    proto = onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 17]> g (float[N, 64] x) => (float[N, 32] y) { y = MatMul(x, w) }')
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32), "w"))
    quant = MatMulNBitsQuantizer(proto, bits=4, block_size=32, is_symmetric=False)
    quant.process()
    path = tmp_path / "q4.onnx"
    quant.model.save_model_to_file(str(path), use_external_data_format=False)
    model = model_io.load_model(path)
    assert any(n.op_type == "MatMulNBits" for n in model.graph)
    assert model_io.param_count(model) == 64 * 32  # not 64*32/2 packed bytes, scales and zero points excluded
