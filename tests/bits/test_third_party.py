"""Bit allocation on third-party graph features (issue 10): grouped/depthwise Conv, static QDQ Conv on
CPU, already-quantized models, budgets below the floor, and the default recipe's fast mode."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from edgeprune.calibration import CalibrationSet
from edgeprune.context import CompileContext, StatsRequest
from edgeprune.errors import BadInputError
from edgeprune.model_io import to_proto
from edgeprune.passes.bits import measure
from edgeprune.passes.bits.bits_pass import BitAllocationConfig, BitAllocationPass
from edgeprune.passes.bits.emit import emit
from edgeprune.passes.bits.sensitivity import KEEP, Option
from edgeprune.passes.bits.units import Part
from edgeprune.runtime.targets import get_target

from conv_models import chain_proto, image_context, separable_proto

D, T = 64, 16


def _run(model: ir.Model, feeds) -> np.ndarray:
    sess = ort.InferenceSession(to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --------------------------------------------------------------------------- defect 1: grouped / depthwise Conv


def _grouped_conv(groups: int, c: int = 16, seed: int = 0) -> tuple[ir.Model, np.ndarray]:
    rng = np.random.default_rng(seed)
    proto = onnx.parser.parse_model(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, {c}, 8, 8] x) => (float[N, {c}, 8, 8] y) {{
            y = Conv <group = {groups}, pads = [1, 1, 1, 1]> (x, W)
        }}
        """
    )
    w = rng.standard_normal((c, c // groups, 3, 3)).astype(np.float32)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(w, "W"))
    return ir.from_proto(proto), w


def _block_diagonal(w: np.ndarray, groups: int) -> np.ndarray:
    """The dense Conv weight that computes the same as grouped ``w``: zeros outside each group's block."""
    cout, cpg = w.shape[:2]
    dense = np.zeros((cout, cpg * groups, *w.shape[2:]), dtype=w.dtype)
    per = cout // groups
    for g in range(groups):
        dense[g * per:(g + 1) * per, g * cpg:(g + 1) * cpg] = w[g * per:(g + 1) * per]
    return dense


@pytest.mark.parametrize("groups", [16, 4], ids=["depthwise", "grouped"])
def test_grouped_conv_error_equals_its_dense_block_diagonal_form(groups):
    """Each filter of a grouped Conv reads only its group's channels: its error is that of the
    equivalent dense Conv (zeros outside the blocks), for every Conv option."""
    model, w = _grouped_conv(groups)
    ctx = image_context(to_proto(model))
    stats = ctx.stats(model, [StatsRequest("x", axis=1), StatsRequest("y", axis=1)])
    options = [Option(KEEP), Option("int8-dynamic", 8), Option("qdq", 8), Option("qdq", 16)]
    got = measure._errors(Part("conv", "Conv", w, "x", options, output="y"), stats, {})
    want = measure._errors(Part("conv", "Conv", _block_diagonal(w, groups), "x", options, output="y"), stats, {})
    assert got.keys() == want.keys() == {"float", "int8-dyn", "qdq-a8w8", "qdq-a16w8"}
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=0)
    assert got["float"] == 0 and all(got[k] > 0 for k in ("int8-dyn", "qdq-a8w8", "qdq-a16w8"))


@pytest.mark.parametrize("options", [{"mode": "uniform", "bits": 8}, {"avg_bits": 16}], ids=["bits8", "auto"])
def test_bits_on_a_depthwise_separable_block(options):
    """--bits 8 and --bits auto on expand -> depthwise -> project: every Conv quantized, outputs close."""
    proto = separable_proto()
    model, ctx = ir.from_proto(proto), image_context(proto)
    feed = ctx.holdout.samples[0]
    before = _run(model, feed)
    result = BitAllocationPass(BitAllocationConfig(**options), ctx)(model)
    assert result.modified
    depthwise = [r for r in result.records if r["shape"] == [16, 1, 3, 3]]
    assert len(depthwise) == 1 and depthwise[0]["rel_error"] >= 0
    if options.get("mode") == "uniform":
        assert {r["format"] for r in result.records} == {"qdq-a8w8"}
    assert _rel(_run(model, feed), before) < 0.05


# --------------------------------------------------------------------------- defect 5: static QDQ Conv on CPU


def test_cpu_conv_int8_is_static_qdq_never_conv_integer(tmp_path):
    """On the cpu target a Conv's int8 format is static QDQ (ORT fuses it into QLinearConv), not ConvInteger."""
    proto = chain_proto()
    model, ctx = ir.from_proto(proto), image_context(proto)
    result = BitAllocationPass(BitAllocationConfig(mode="uniform", bits=8), ctx)(model)
    ops = {n.op_type for n in model.graph}
    assert "ConvInteger" not in ops and {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert {r["format"] for r in result.records} == {"qdq-a8w8"}
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(to_proto(model).SerializeToString(), so, providers=["CPUExecutionProvider"])
    assert "QLinearConv" in {n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node}
    auto = BitAllocationPass(BitAllocationConfig(avg_bits=16), image_context(proto))(ir.from_proto(proto))
    assert auto.summary["formats_offered"] == ["float", "qdq-a8w8"]


def test_qdq_conv_folds_its_activation(tmp_path):
    """A ReLU6 (Clip) after a QDQ Conv goes to the quantizer too, which folds it into the Conv's output
    range: left float, each one costs ORT a DequantizeLinear -> Clip -> QuantizeLinear round trip."""
    proto = separable_proto()
    model, ctx = ir.from_proto(proto), image_context(proto)
    feed = ctx.holdout.samples[0]
    before = _run(model, feed)
    result = BitAllocationPass(BitAllocationConfig(mode="uniform", bits=8), ctx)(model)
    assert result.summary["emit"]["steps"][0] == {"tool": "quantize_static", "activation_bits": 8, "nodes": 3, "activations": 2}
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(to_proto(model).SerializeToString(), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]
    assert ops.count("QLinearConv") == 3 and "Clip" not in ops
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 1  # the model's input and output
    assert _rel(_run(model, feed), before) < 0.05


def test_cpu_matmul_formats_are_unchanged():
    """Transformer MatMuls keep their cpu formats: dynamic int8 and MatMulNBits, no static QDQ."""
    model, ctx = _mixed_float()
    result = BitAllocationPass(BitAllocationConfig(avg_bits=6, bit_options=(4, 8), block_size=32), ctx)(model)
    assert result.summary["formats_offered"] == ["float", "int8-dyn", "nbits4-b32-asym-acc4", "nbits8-b32-asym-acc4"]


# --------------------------------------------------------------------------- defect 7: already quantized, budget floor


def _mixed_float(seed: int = 0) -> tuple[ir.Model, CompileContext]:
    """x -> mm0 -> Relu -> mm1 -> Relu -> mm2 -> Relu -> mm3 -> y, four float [64, 64] weights."""
    rng = np.random.default_rng(seed)
    proto = onnx.parser.parse_model(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, {T}, {D}] x) => (float[N, {T}, {D}] y) {{
            h0 = MatMul(x, W0)
            r0 = Relu(h0)
            h1 = MatMul(r0, W1)
            r1 = Relu(h1)
            h2 = MatMul(r1, W2)
            r2 = Relu(h2)
            y = MatMul(r2, W3)
        }}
        """
    )
    for i, n in enumerate(proto.graph.node):
        n.name = f"mm{i // 2}" if n.op_type == "MatMul" else f"relu{i // 2}"
    proto.graph.initializer.extend(
        onnx.numpy_helper.from_array((rng.standard_normal((D, D)) / 8).astype(np.float32), f"W{i}") for i in range(4)
    )
    rows = [{"x": rng.standard_normal((1, T, D)).astype(np.float32)} for _ in range(8)]
    calib = CalibrationSet(rows, "random test rows", synthetic=True)
    return ir.from_proto(proto), CompileContext(target=get_target("cpu"), calibration=calib, holdout=calib)


def _already_quantized(float_left: bool = True) -> tuple[ir.Model, CompileContext]:
    """mm0 static QDQ (DequantizeLinear-fed weight), mm1 MatMulInteger, mm2 MatMulNBits, mm3 float (or MatMulNBits)."""
    model, ctx = _mixed_float()
    plan = {"mm0": Option("qdq", 8), "mm1": Option("int8-dynamic", 8), "mm2": Option("nbits", 4, 32, False)}
    if not float_left:
        plan["mm3"] = Option("nbits", 8, 32, False)
    quantized, _ = emit(model, plan, calibration=ctx.calibration.samples)
    return quantized, ctx


def _no_measuring(ctx, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("calibration statistics were collected")

    monkeypatch.setattr(ctx, "stats", refuse)


def test_already_quantized_weights_are_counted_exactly_and_left_alone():
    """3 of the 4 weights are quantized (QDQ, MatMulInteger, MatMulNBits): counted as weights, not as Q/DQ nodes."""
    model, ctx = _already_quantized()
    assert sum(n.op_type in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear") for n in model.graph) >= 3
    result = BitAllocationPass(BitAllocationConfig(mode="uniform", bits=8), ctx)(model)
    note = "already quantized: 3 of 4 weights (DequantizeLinear-fed MatMul, MatMulInteger, MatMulNBits): left as they are"
    assert note in result.summary["notes"]
    assert result.summary["already_quantized"] == {"weights": 3, "of": 4}
    assert [r["layer"] for r in result.records] == ["mm3"]  # only the float weight is quantized


def test_fully_quantized_model_is_not_measured_or_requantized(monkeypatch):
    model, ctx = _already_quantized(float_left=False)
    before = to_proto(model).SerializeToString()
    _no_measuring(ctx, monkeypatch)
    for config in (BitAllocationConfig(mode="uniform", bits=8), BitAllocationConfig(avg_bits=4), BitAllocationConfig(mode="fast")):
        result = BitAllocationPass(config, ctx)(model)
        assert not result.modified
        assert "already quantized: 4 of 4 weights (DequantizeLinear-fed MatMul, MatMulInteger, MatMulNBits): left as they are" in result.summary["notes"]
    assert to_proto(model).SerializeToString() == before


def test_fast_mode_leaves_a_partly_quantized_model_alone(monkeypatch):
    """The default recipe does not requantize what someone already quantized; it says how to ask."""
    model, ctx = _already_quantized()
    _no_measuring(ctx, monkeypatch)
    result = BitAllocationPass(BitAllocationConfig(mode="fast"), ctx)(model)
    assert not result.modified
    assert result.summary["headline"] == (
        "bits: the model is already quantized (3 of 4 weights), so the default leaves it as it is; "
        "pass --bits 8 or --bits auto --size-budget SIZE to quantize the other 1"
    )


@pytest.mark.parametrize("config, sentence", [
    ({"size_budget_bytes": 1000},
     ("the size budget 1.0 kB is below the smallest model the offered formats allow, 4.8 kB written (graph included) "
      "(4.38 bits per weight over the quantizable nodes): raise --size-budget to at least 4.8 kB.")),
    ({"avg_bits": 1.0},
     ("the average of 1 bits per weight is below the smallest model the offered formats allow, 4.5 kB of weights "
      "(4.38 bits per weight over the quantizable nodes): raise --avg-bits to at least 4.38.")),
])
def test_budget_below_the_floor_is_refused_before_measuring(config, sentence, monkeypatch):
    """The floor comes from shapes alone: no statistics, no errors, and no negative size in the sentence."""
    model, ctx = _two_weights()  # floor: 2 x 2368 bytes (4-bit, block 64, asymmetric)
    _no_measuring(ctx, monkeypatch)
    with pytest.raises(BadInputError) as err:
        BitAllocationPass(BitAllocationConfig(**config), ctx)(model)
    assert str(err.value) == sentence


def _two_weights() -> tuple[ir.Model, CompileContext]:
    """x -> mm0 -> Relu -> mm1 -> y: two float [64, 64] weights and nothing else in the file."""
    model, ctx = _mixed_float()
    proto = to_proto(model)
    keep = [n for n in proto.graph.node if n.name in ("mm0", "relu0", "mm1")]
    keep[-1].output[0] = "y"
    del proto.graph.node[:]
    proto.graph.node.extend(keep)
    inits = [i for i in proto.graph.initializer if i.name in ("W0", "W1")]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(inits)
    return ir.from_proto(proto), ctx


def test_size_budget_below_the_floor_through_the_cli(tmp_path, capsys):
    from edgeprune.cli import main

    model, _ = _two_weights()
    path = tmp_path / "m.onnx"
    onnx.save(to_proto(model), path)
    code = main(["compile", str(path), "-o", str(tmp_path / "out"), "--bits", "auto", "--size-budget", "1KB"])
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "out").exists()
    assert err.splitlines()[-1] == (
        "error: the size budget 1.0 kB is below the smallest model the offered formats allow, 4.8 kB written (graph included) "
        "(4.38 bits per weight over the quantizable nodes): raise --size-budget to at least 4.8 kB.")


# --------------------------------------------------------------------------- the default recipe: fast mode


def test_default_recipe_for_cpu_quantizes_with_the_fast_formats():
    from edgeprune.recipe import PassSpec, default_recipe

    assert default_recipe("cpu").passes == [PassSpec("cleanup"), PassSpec("bits", {"mode": "fast"})]
    assert default_recipe().passes == default_recipe("cpu").passes
    assert default_recipe("coreml").passes == [PassSpec("cleanup")]  # no fast int8 format measured there


def _fake_microbench(monkeypatch, tmp_path, int8_faster: bool):
    """Fixed microbenchmark figures: dynamic int8 twice as fast as float (or twice as slow)."""
    from edgeprune.passes.bits import microbench

    def fake_time(model):
        ops = sorted(n.op_type for n in model.graph)
        if ops in (["Identity"], ["DynamicQuantizeLinear"]):
            return 0.01
        if "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops:
            return 0.21 if int8_faster else 0.81
        return 0.41

    monkeypatch.setenv("EDGEPRUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(microbench, "_time_group", lambda models, target, threads: {
        k: fake_time(m) for k, (m, _) in models.items()})


@pytest.mark.parametrize("int8_faster", [True, False])
def test_fast_mode_takes_dynamic_int8_only_where_it_is_faster(int8_faster, monkeypatch, tmp_path):
    _fake_microbench(monkeypatch, tmp_path, int8_faster)
    model, ctx = _mixed_float()
    feed = ctx.holdout.samples[0]
    before = _run(model, feed)
    result = BitAllocationPass(BitAllocationConfig(mode="fast"), ctx)(model)
    formats = {r["format"] for r in result.records}
    if int8_faster:
        assert result.modified and formats == {"int8-dyn"}
        assert "MatMulInteger" in {n.op_type for n in model.graph}
        assert result.summary["headline"] == (
            "bits: dynamic int8 on 4 MatMul/Gemm; for more, add --prune 0.2 or --bits auto --size-budget SIZE"
        )
        assert _rel(_run(model, feed), before) < 0.05
    else:  # decided by the microbenchmarks before anything was measured
        assert not result.modified and result.records == []
        assert result.summary["kept_float"] == {f"mm{i}": "slower" for i in range(4)}
        assert result.summary["headline"] == (
            "bits: nothing quantized: float is the fastest format for all 4 weights here; "
            "for a smaller model, pass --bits auto --size-budget SIZE or --prune 0.2"
        )


def test_fast_mode_formats_for_conv_and_embeddings(monkeypatch, tmp_path):
    """Conv -> static QDQ int8, an embedding table -> 4-bit GatherBlockQuantized."""
    _fake_microbench(monkeypatch, tmp_path, True)
    proto = separable_proto()
    model, ctx = ir.from_proto(proto), image_context(proto)
    result = BitAllocationPass(BitAllocationConfig(mode="fast"), ctx)(model)
    assert {r["format"] for r in result.records} == {"qdq-a8w8"}
    assert result.summary["headline"].startswith("bits: static QDQ int8 on 3 Conv;")

    rng = np.random.default_rng(0)
    emb = onnx.parser.parse_model(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[N, {T}] ids) => (float[N, {T}, {D}] y) {{
            h = Gather <axis = 0> (E, ids)
            y = Tanh(h)
        }}
        """
    )
    emb.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal((4096, D)).astype(np.float32), "E"))
    rows = [{"ids": rng.integers(0, 4096, (1, T))} for _ in range(8)]
    calib = CalibrationSet(rows, "random ids", synthetic=True)
    model = ir.from_proto(emb)
    result = BitAllocationPass(BitAllocationConfig(mode="fast"), CompileContext(get_target("cpu"), calib, calib))(model)
    assert [r["format"] for r in result.records] == ["gather4-b32-asym"]  # a 1 MiB vocabulary
    assert "GatherBlockQuantized" in {n.op_type for n in model.graph}
    small = ir.from_proto(emb)
    small.graph.initializers["E"].const_value = ir.tensor(rng.standard_normal((4095, D)).astype(np.float32))
    result = BitAllocationPass(BitAllocationConfig(mode="fast"), CompileContext(get_target("cpu"), calib, calib))(small)
    assert not result.modified and result.summary["kept_float"] == {"Gather:h": "no format"}


def test_fast_mode_backs_off_by_keeping_the_worst_nodes_float(monkeypatch, tmp_path):
    _fake_microbench(monkeypatch, tmp_path, True)
    model, ctx = _mixed_float()
    p = BitAllocationPass(BitAllocationConfig(mode="fast"), ctx)
    result = p(model)
    worst = max(np.sqrt(r["importance"]) * r["rel_error"] for r in result.records)
    relaxed = p.relaxed(result)
    assert relaxed.config.max_output_error == pytest.approx(worst / 2)
    again = relaxed(_mixed_float()[0])
    kept = [r for r in again.records if r["format"] == "float"]
    assert kept and all(np.sqrt(r["importance"]) * r["rel_error"] <= worst / 2 for r in again.records if r["format"] != "float")
    assert f"{len(kept)} above the output error bound {worst / 2:.3g}" in again.summary["headline"]
    floated = BitAllocationPass(BitAllocationConfig(mode="fast", max_output_error=1e-9), ctx)(_mixed_float()[0])
    assert not floated.modified and relaxed.relaxed(floated) is None


def test_default_compile_of_a_conv_model_through_the_cli(tmp_path, capsys):
    """No options: cleanup + fast bits; the convs come out as static QDQ and the summary says so."""
    from edgeprune.cli import main

    path = tmp_path / "sep.onnx"
    onnx.save(separable_proto(), path)
    before = path.read_bytes()
    code = main(["compile", str(path), "-o", str(tmp_path / "out"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and path.read_bytes() == before
    assert [p["name"] for p in report["passes"]] == ["cleanup", "bits"]
    assert report["passes"][1]["summary"]["headline"].startswith("bits: static QDQ int8 on 3 Conv;")
    ops = {n.op_type for n in onnx.load(tmp_path / "out" / "model.onnx").graph.node}
    assert "ConvInteger" not in ops and "QuantizeLinear" in ops


def test_default_compile_says_what_it_did_in_the_terminal(tmp_path, capsys):
    from edgeprune.cli import main

    path = tmp_path / "sep.onnx"
    onnx.save(separable_proto(), path)
    code = main(["compile", str(path), "-o", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0
    assert "  • bits: static QDQ int8 on 3 Conv; for more, add --prune 0.2 or --bits auto --size-budget SIZE" in out.splitlines()


# --------------------------------------------------------------------------- real models


@pytest.mark.realmodel
def test_default_compile_of_minilm_is_smaller_faster_and_keeps_stsb(minilm_artifact, tmp_path):
    """The default recipe on the bundled example: smaller, faster, above the fidelity floor, STS-B kept."""
    import pathlib

    import edgeprune
    from edgeprune.models.tasks import stsb_spearman
    from edgeprune.pipeline import CompileOptions, compile_model

    calib = pathlib.Path(edgeprune.__file__).parent / "data" / "calibration_sentences.txt"
    opts = CompileOptions(calib=calib, tokenizer=minilm_artifact.tokenizer_path, profile=False)
    report = compile_model(minilm_artifact.model_path, tmp_path / "out", opts).report
    assert [p["name"] for p in report["passes"]] == ["cleanup", "bits"]
    bits = report["passes"][1]
    assert bits["modified"] and bits["summary"]["headline"].startswith("bits: dynamic int8 on ")
    assert report["size"]["ratio"] < 0.8 and report["latency"]["p50_ratio"] < 1.0
    assert report["verification"]["below_default_floor"] == []
    tok = minilm_artifact.tokenizer_path
    ref, out = stsb_spearman(minilm_artifact.model_path, tok, limit=500), stsb_spearman(tmp_path / "out" / "model.onnx", tok, limit=500)
    assert out > ref - 0.005, (ref, out)


@pytest.mark.realmodel
def test_efficientnet_lite0_depthwise_convs_take_bits(efficientnet_lite0_artifact, tmp_path):
    """EfficientNet-Lite0 (16 depthwise convs): --bits 8 compiles, all-QLinear, and the default is smaller and faster."""
    from edgeprune.cli import main
    from edgeprune.models.tasks import data_dir

    images = data_dir() / "imagenet-100"
    model = efficientnet_lite0_artifact.model_path
    for name, extra in (("bits8", ["--bits", "8"]), ("default", [])):
        out = tmp_path / name
        assert main(["compile", str(model), "-o", str(out), "--calib", str(images), "--max-samples", "32", "--json", *extra]) == 0
        report = json.loads((out / "report.json").read_text())
        assert report["verification"]["below_default_floor"] == []
        assert "ConvInteger" not in {n.op_type for n in onnx.load(out / "model.onnx").graph.node}
        assert report["size"]["ratio"] < 0.3
    assert report["latency"]["p50_ratio"] < 1.0  # the default
