"""Bit allocation pass on tiny models: more bits where it hurts, exact sizes, clean refusals."""

from __future__ import annotations

import dataclasses

import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from edgeprune.calibration import CalibrationSet
from edgeprune.context import CompileContext
from edgeprune.errors import BadInputError
from edgeprune.model_io import model_bytes, to_proto
from edgeprune.passes.bits.bits_pass import BitAllocationConfig, BitAllocationPass
from edgeprune.passes.registry import get_pass
from edgeprune.runtime.targets import get_target

from tiny_models import D, T, two_layer_matmul as _two_layer


def _tied(seed: int = 0, vocab: int = 96, dim: int = 64) -> ir.Model:
    """ids -> Gather(E) -> Tanh -> MatMul(Transpose(E)): an embedding tied to its LM head."""
    rng = np.random.default_rng(seed)
    proto = onnx.parser.parse_model(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[N, {T}] ids) => (float[N, {T}, {vocab}] logits) {{
            h = Gather <axis = 0> (E, ids)
            t = Tanh(h)
            et = Transpose <perm = [1, 0]> (E)
            logits = MatMul(t, et)
        }}
        """
    )
    proto.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal((vocab, dim)).astype(np.float32), "E"))
    return ir.from_proto(proto)


def _ctx(model: ir.Model, target: str = "cpu") -> CompileContext:
    rng = np.random.default_rng(7)
    name = model.graph.inputs[0].name
    if name == "x":
        rows = [{"x": rng.standard_normal((1, T, D)).astype(np.float32)} for _ in range(12)]
    else:
        rows = [{"ids": rng.integers(0, 96, (1, T))} for _ in range(12)]
    calib = CalibrationSet(rows, "random test rows", synthetic=True)
    return CompileContext(target=get_target(target), calibration=calib, holdout=calib)


def _run(model: ir.Model, feeds) -> np.ndarray:
    return ort.InferenceSession(to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _by_layer(result) -> dict:
    return {r["layer"]: r for r in result.records}


def test_more_sensitive_layer_gets_more_bits():
    model = _two_layer()
    cfg = BitAllocationConfig(avg_bits=7.3, bit_options=(4, 8), block_size=32, dynamic_int8=False, output_checks=2,
                              accuracy_levels=(0,))
    result = BitAllocationPass(cfg, _ctx(model))(model)
    recs = _by_layer(result)
    assert result.modified
    assert recs["layerA"]["options"]["nbits4-b32-asym"]["rel_error"] > recs["layerB"]["options"]["nbits4-b32-asym"]["rel_error"]
    assert recs["layerA"]["bits"] > recs["layerB"]["bits"]
    assert recs["layerA"]["format"] == "nbits8-b32-asym" and recs["layerB"]["format"] == "nbits4-b32-asym"
    assert {n.op_type for n in model.graph} == {"Cast", "MatMulNBits", "Relu"}  # Cast: the float16 scales
    # the size the solver saw is the size written
    assert model_bytes(model) == result.summary["unit_bytes"] + result.summary["other_bytes"]
    assert result.summary["avg_bits"] <= 7.3
    assert result.summary["per_layer_chart"] == {"y": "bits", "ylabel": "bits per weight"}
    curve = result.summary["tradeoff"]
    assert len(curve) >= 2 and curve[0]["error"] >= curve[-1]["error"]
    assert any("output_rel_error" in r for r in result.records)
    probes = [r["probe"] for r in result.records]  # measured importance: one probe per node
    assert all(pr["output_rel_error"] > 0 and pr["option"] == "nbits4-b32-asym" for pr in probes)


def test_budget_at_float_size_is_a_no_op_with_equal_outputs():
    model = _two_layer()
    feeds = {"x": np.random.default_rng(1).standard_normal((1, T, D)).astype(np.float32)}
    before = _run(model, feeds)
    result = BitAllocationPass(BitAllocationConfig(avg_bits=32), _ctx(model))(model)
    assert not result.modified
    assert any("nothing to do" in n for n in result.summary["notes"])
    np.testing.assert_array_equal(_run(model, feeds), before)


def test_budget_below_floor_names_the_floor():
    model = _two_layer()
    with pytest.raises(BadInputError, match="smallest model .* 4.5 kB of weights"):
        BitAllocationPass(BitAllocationConfig(avg_bits=1.0), _ctx(model))(model)


def test_missing_or_conflicting_budget():
    model = _two_layer()
    with pytest.raises(BadInputError, match="needs a budget"):
        BitAllocationPass(BitAllocationConfig(), _ctx(model))(model)
    with pytest.raises(BadInputError, match="only one"):
        BitAllocationPass(BitAllocationConfig(avg_bits=4, size_budget_bytes=10_000), _ctx(model))(model)


def test_target_without_a_kernel_is_refused():
    model = _two_layer()
    with pytest.raises(BadInputError, match="coreml runs none"):
        BitAllocationPass(BitAllocationConfig(avg_bits=6), _ctx(model, "coreml"))(model)


@pytest.mark.parametrize("bits", [4, 8])
def test_uniform_with_tied_head(bits):
    model = _tied()
    feeds = {"ids": np.random.default_rng(2).integers(0, 96, (1, T))}
    before = _run(model, feeds)
    result = BitAllocationPass(BitAllocationConfig(mode="uniform", bits=bits, block_size=32), _ctx(model))(model)
    ops = sorted(n.op_type for n in model.graph)
    assert "Transpose" not in ops
    # Lookup and head share one packed table: the lookup reads the head's MatMulNBits initializers.
    assert ops == ["Cast", "GatherBlockQuantized", "MatMulNBits", "Reshape", "Tanh"]
    assert [r["format"] for r in result.records] == [f"tied{bits}-b32-asym", f"nbits{bits}-b32-asym"]
    after = _run(model, feeds)
    rel = np.linalg.norm(after - before) / np.linalg.norm(before)
    assert rel < (0.15 if bits == 4 else 0.02)
    assert model_bytes(model) == result.summary["unit_bytes"] + result.summary["other_bytes"]
    assert model_bytes(model) < 96 * 64 * (bits / 8 + 0.2)  # one quantized table, not two


def test_tight_budget_shares_the_tied_table_at_eight_bits():
    """Below two 8-bit copies of the table, sharing one 8-bit copy beats any 4-bit choice."""
    model = _tied()
    table = 96 * 64 * 4
    cfg = BitAllocationConfig(size_budget_bytes=int(table * 0.32), bit_options=(4, 8), block_size=32, dynamic_int8=False,
                              accuracy_levels=(0,), no_slower=False)
    result = BitAllocationPass(cfg, _ctx(model))(model)
    assert [r["format"] for r in result.records] == ["tied8-b32-asym", "nbits8-b32-asym"]
    assert result.records[0]["bits"] == result.records[1]["bits"] > 8
    assert model_bytes(model) <= table * 0.32


def test_tied_pair_gets_different_formats_and_float_table_counts_once():
    model = _tied()
    table = 96 * 64 * 4
    cfg = BitAllocationConfig(size_budget_bytes=int(table * 0.45), bit_options=(4, 8), block_size=32, dynamic_int8=True)
    result = BitAllocationPass(cfg, _ctx(model))(model)
    recs = result.records
    assert len(recs) == 2 and recs[0]["tied_unit"] == recs[1]["tied_unit"]
    assert model_bytes(model) <= table * 0.45
    # options: all pairs of (embedding format, head format); both-float costs the table once
    assert recs[0]["options"]["float"]["bytes"] == table


def test_uniform_two_bits_even_when_not_in_bit_options():
    model = _two_layer()
    result = BitAllocationPass(BitAllocationConfig(mode="uniform", bits=2), _ctx(model))(model)
    assert [r["format"] for r in result.records] == ["nbits2-b32-asym", "nbits2-b32-asym"]
    m2 = _two_layer()
    again = BitAllocationPass(BitAllocationConfig(mode="uniform", bits=2, gptq=True), _ctx(m2))(m2)
    assert [r["format"] for r in again.records] == ["gptq2-b32-asym", "gptq2-b32-asym"]  # the opt-in rounding


def test_already_quantized_and_activation_matmuls_are_left_alone():
    model = _two_layer()
    BitAllocationPass(BitAllocationConfig(mode="uniform", bits=4), _ctx(model))(model)
    again = BitAllocationPass(BitAllocationConfig(mode="uniform", bits=4), _ctx(model))(model)
    assert not again.modified
    assert again.summary["already_quantized"] == {"weights": 2, "of": 2}
    assert any("already quantized" in n for n in again.summary["notes"])

    proto = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[4, 8] a, float[8, 3] b) => (float[4, 3] y) { y = MatMul(a, b) }
        """
    )
    m = ir.from_proto(proto)
    ctx = CompileContext(get_target("cpu"), CalibrationSet([], "none"), CalibrationSet([], "none"))
    r = BitAllocationPass(BitAllocationConfig(avg_bits=4), ctx)(m)
    assert not r.modified and r.summary["nodes_without_constant_weight"] == 1


def test_registry_and_relaxed():
    assert get_pass("bits") is BitAllocationPass
    p = BitAllocationPass(BitAllocationConfig(avg_bits=4.0))
    assert p.relaxed().config.avg_bits == pytest.approx(4.6)
    s = BitAllocationPass(BitAllocationConfig(size_budget_bytes=1000, relax_step=0.5)).relaxed()
    assert s.config.size_budget_bytes == 1500
    # a run whose budget already kept every weight in float cannot back off further; one that did not can
    from edgeprune.passes.bits.bits_pass import BitsResult

    floated = BitsResult(ir.Model(ir.Graph([], [], nodes=[]), ir_version=10), modified=False, float_reached=True)
    assert s.relaxed(floated) is None
    assert s.relaxed(dataclasses.replace(floated, float_reached=False)).config.size_budget_bytes == 2250
    r = BitAllocationPass(BitAllocationConfig(latency_budget_ratio=0.9, relax_step=0.5)).relaxed()
    assert r.config.latency_budget_ratio == 1.0 and r.relaxed() is None
    r = BitAllocationPass(BitAllocationConfig(decode_budget_ratio=0.8, relax_step=0.5)).relaxed()
    assert r.config.decode_budget_ratio == 1.0 and r.relaxed() is None
    r = BitAllocationPass(BitAllocationConfig(size_budget_bytes=1000, decode_budget_ms=8.0, relax_step=0.5)).relaxed()
    assert (r.config.size_budget_bytes, r.config.decode_budget_ms) == (1500, 12.0)
    u = BitAllocationPass(BitAllocationConfig(mode="uniform", bits=4)).relaxed()
    assert u.config.bits == 8 and u.relaxed() is None
    with pytest.raises(BadInputError, match="no option"):
        BitAllocationPass.from_options({"bitz": 4})
    with pytest.raises(BadInputError):
        BitAllocationPass.from_options({"block_size": 24})


@pytest.mark.parametrize("target, op", [("cpu", "QuantizeLinear"), ("qnn", "QuantizeLinear")])
def test_conv_int8(target, op):
    """Conv at 8 bits: static QDQ on CPU (ConvInteger is slow there) and on an NPU-style target."""
    rng = np.random.default_rng(0)
    proto = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3, 8, 8] x) => (float[N, 4, 6, 6] y) { y = Conv(x, W) }
        """
    )
    proto.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W"))
    model = ir.from_proto(proto)
    rows = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(6)]
    calib = CalibrationSet(rows, "random test rows", synthetic=True)
    ctx = CompileContext(get_target(target), calib, calib)
    before = _run(model, rows[0])
    result = BitAllocationPass(BitAllocationConfig(mode="uniform", bits=8), ctx)(model)
    assert op in {n.op_type for n in model.graph}
    assert model_bytes(model) == result.summary["unit_bytes"]
    measured = np.linalg.norm(_run(model, rows[0]) - before) / np.linalg.norm(before)
    assert result.records[0]["rel_error"] / 3 < measured < result.records[0]["rel_error"] * 3


@pytest.mark.realmodel
def test_minilm_compile_at_six_bits(minilm_artifact, tmp_path):
    """A real compile: MiniLM at 6 bits per weight is about 5x smaller and keeps its embeddings."""
    from edgeprune.pipeline import CompileOptions, compile_model
    from edgeprune.recipe import PassSpec, Recipe

    recipe = Recipe([PassSpec("cleanup"), PassSpec("bits", {"avg_bits": 6, "output_checks": 2})], source="test")
    import edgeprune

    calib = pathlib.Path(edgeprune.__file__).parent / "data" / "calibration_sentences.txt"
    opts = CompileOptions(recipe=recipe, calib=calib, tokenizer=minilm_artifact.tokenizer_path, max_samples=16, seq_len=64,
                          latency_runs=3, profile=False, threads=2)
    report = compile_model(minilm_artifact.model_path, tmp_path / "out", opts).report
    bits = report["passes"][1]
    assert bits["modified"] and bits["summary"]["avg_bits"] <= 6.0
    assert report["size"]["candidate_bytes"] < 0.22 * report["size"]["reference_bytes"]
    cosines = [o["cosine_mean"] for o in report["verification"]["outputs"]]
    assert min(cosines) > 0.98, cosines
    assert len(bits["summary"]["tradeoff"]) >= 2
    assert {r["op"] for r in bits["records"]} == {"MatMul", "Gather"}
    cos = [r["block_cosine"] for r in bits["records"] if "block_cosine" in r]
    assert len(cos) == 36 and all(-1 <= c <= 1 for c in cos)  # 6 layers x (q, k, v, o, up, down)


def _fake_groups(monkeypatch, tmp_path, float_ms):
    """Microbenchmarks with fixed figures per op (a 64x64 MatMul sits at ORT's per-run overhead, so real
    timings could clamp every option to 0 ms) and the float model timed at ``float_ms[0]``; returns the
    list of side-by-side groups timed (each the sorted names of its models)."""
    from edgeprune.passes.bits import microbench

    groups = []

    def ms(model):
        ops = tuple(sorted(n.op_type for n in model.graph))
        return {("Identity",): 0.01, ("DynamicQuantizeLinear",): 0.02}.get(ops, 0.05 + 0.01 * len(ops))

    def fake_group(models, target, threads):
        groups.append(sorted(models))
        return {k: ms(m) for k, (m, _) in models.items()}

    monkeypatch.setenv("EDGEPRUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(microbench, "_time_group", fake_group)
    monkeypatch.setattr(microbench, "model_latency", lambda model, ctx, units, table, tokens, feed=None: (
        float_ms[0], sum(table[(p.node, "float")] for u in units for p in u.parts)))
    return groups


_GRID = ["dql", "float", "int8-dyn", "nbits4-b128-asym", "nbits4-b32-asym", "nbits4-b64-asym", "nbits8-b128-asym",
         "nbits8-b32-asym", "nbits8-b64-asym", "overhead"]


def test_latency_mode_microbenchmarks_are_cached_and_budgets_checked(tmp_path, monkeypatch):
    """All formats of a shape are timed side by side in one run, cached; budgets below the floor or above the
    float model are named."""
    import json

    from edgeprune.passes.bits import microbench

    groups = _fake_groups(monkeypatch, tmp_path, [1.0])
    model = _two_layer()
    kw = dict(latency_tokens=T, accuracy_levels=(0,))
    with pytest.raises(BadInputError, match="fastest model"):
        BitAllocationPass(BitAllocationConfig(latency_budget_ms=1e-6, **kw), _ctx(model))(model)
    assert groups == [_GRID]  # both layers are 64x64: one shape, every format and the overhead in one run
    with pytest.raises(BadInputError, match="fastest model"):
        BitAllocationPass(BitAllocationConfig(latency_budget_ratio=1e-6, **kw), _ctx(model))(model)
    assert groups == [_GRID, _GRID]  # a ratio out of reach: timed again once before the refusal
    del groups[1]
    cache = microbench.cache_path()
    assert cache.parent == tmp_path and cache.exists()
    entries = cache.read_text()
    (shape,) = [v["ms"] for k, v in json.loads(entries).items() if k.endswith("|matmul|64x64")]
    # quantize_dynamic writes 5 nodes: DynamicQuantizeLinear, MatMulInteger and the scaling's Mul, Cast, Mul.
    assert shape["int8-dyn"] == pytest.approx(0.05 + 0.01 * 5) and shape["dql"] == 0.02 and shape["overhead"] == 0.01
    result = BitAllocationPass(BitAllocationConfig(latency_budget_ms=1e6, **kw), _ctx(model))(model)
    assert not result.modified and any("latency budget" in n for n in result.summary["notes"])
    assert len(groups) == 1 and cache.read_text() == entries  # the later runs measured nothing new
    lat = result.summary["latency"]
    assert lat["float_ms"] == 1.0 and lat["microbenchmarks"] == "cached"
    assert lat["per_unit_ms"]["layerA|float"] == pytest.approx(0.06 - 0.01)
    # int8-dyn less the overhead and the DynamicQuantizeLinear, which is charged once per input.
    assert lat["per_unit_ms"]["layerA|int8-dyn"] == pytest.approx(0.1 - 0.01 - (0.02 - 0.01))
    assert lat["per_unit_ms"]["dql|x"] == pytest.approx(0.02 - 0.01)


def test_microbenchmarks_are_retimed_side_by_side_when_stale(tmp_path, monkeypatch):
    """A float model that now runs more than STALE slower or faster than when its shapes were timed, a shape
    re-timed since, or a format the cache lacks: every shape is timed again, all its formats in one run."""
    import json

    from edgeprune.passes.bits import microbench

    float_ms = [1.0]
    groups = _fake_groups(monkeypatch, tmp_path, float_ms)
    model = _two_layer()

    def run(**kw):
        cfg = BitAllocationConfig(latency_budget_ms=1e6, latency_tokens=T, accuracy_levels=(0,), **kw)
        return BitAllocationPass(cfg, _ctx(model))(model).summary["latency"]["microbenchmarks"]

    assert run(bit_options=(8,)) == "timed now" and len(groups) == 1 and "nbits4-b32-asym" not in groups[0]
    assert run() == "timed now" and groups[1] == _GRID  # 4-bit asked: the cached 8-bit formats timed again beside it
    float_ms[0] = 1.2  # within STALE of the record
    assert run() == "cached" and run(bit_options=(8,)) == "cached" and len(groups) == 2
    float_ms[0] = 2.0
    assert run() == "re-timed: the float model ran 2.00 ms against 1.00 ms when its shapes were timed"
    assert groups[2] == _GRID and run() == "cached"
    cache = json.loads(microbench.cache_path().read_text())
    (rec,) = [v for k, v in cache.items() if "|model|" in k]
    assert rec["float_ms"] == 2.0 and rec["units_float_ms"] == pytest.approx(2 * (0.06 - 0.01))
    for k in [k for k in cache if "|model|" in k]:  # shapes cached by another model, none by this one
        del cache[k]
    microbench.cache_path().write_text(json.dumps(cache))
    assert run() == "re-timed: no record of this model beside its cached shapes" and len(groups) == 4
    cache = json.loads(microbench.cache_path().read_text())
    (shape,) = [k for k in cache if k.endswith("|matmul|64x64")]
    cache[shape]["at"] = "2026-01-01T00:00:00+00:00"  # as if another model's run had re-timed it
    microbench.cache_path().write_text(json.dumps(cache))
    assert run() == "re-timed: a shape was timed again (for another model) since this model's record"
    assert len(groups) == 5 and run() == "cached"


def test_gemm_is_rewritten_to_matmul_and_quantized():
    rng = np.random.default_rng(5)
    proto = onnx.parser.parse_model(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, {D}] x) => (float[N, 48] y) {{ y = Gemm <transB = 1, alpha = 0.5, beta = 2.0> (x, W, C) }}
        """
    )
    proto.graph.initializer.extend([
        onnx.numpy_helper.from_array(rng.standard_normal((48, D)).astype(np.float32), "W"),
        onnx.numpy_helper.from_array(rng.standard_normal(48).astype(np.float32), "C"),
    ])  # fmt: skip
    model = ir.from_proto(proto)
    rows = [{"x": rng.standard_normal((1, D)).astype(np.float32)} for _ in range(8)]
    calib = CalibrationSet(rows, "random test rows", synthetic=True)
    feeds = {"x": rng.standard_normal((5, D)).astype(np.float32)}
    before = _run(model, feeds)
    BitAllocationPass(BitAllocationConfig(mode="uniform", bits=8), CompileContext(get_target("cpu"), calib, calib))(model)
    assert sorted(n.op_type for n in model.graph) == ["Add", "Cast", "MatMulNBits"]
    after = _run(model, feeds)
    assert np.linalg.norm(after - before) / np.linalg.norm(before) < 0.01


def test_latency_budget_is_checked_by_measurement_and_tightened(monkeypatch):
    """A measured miss tightens the solver's budget by the overshoot and re-solves; the check is recorded.

    Microbenchmarks and measurements are replaced by fixed figures: this checks the loop, not a clock.
    """
    from edgeprune.runtime import latency as latency_mod
    from edgeprune.passes.bits import microbench
    from edgeprune.runtime.latency import LatencyResult

    def table(units, target, **kw):  # per node: float 1 ms, int8-dyn 0.3 ms, MatMulNBits 0.8 ms
        t = {("dql", p.input): 0.05 for u in units for p in u.parts}
        for u in units:
            for p in u.parts:
                for o in p.options:
                    t[(p.node, o.key)] = {"keep": 1.0, "int8-dynamic": 0.3}.get(o.kind, 0.8)
        return t

    monkeypatch.setattr(microbench, "unit_latencies", table)
    monkeypatch.setattr(microbench, "model_latency", lambda model, ctx, units, t, tokens, feed=None: (3.0, 2.0))  # 1 ms outside

    def fake(models, feeds, target="cpu", *, warmup=5, runs=30, threads=None):
        r = next(ratios)
        res = lambda ms: LatencyResult(ms, ms, ms, ms, ms, 1000 / ms, runs, warmup, threads, None, None)  # noqa: E731
        return {"float": res(10.0), "candidate": res(10.0 * r)}

    monkeypatch.setattr(latency_mod, "measure_side_by_side", fake)
    ratios = iter([0.99, 0.6])  # the first emitted model misses a 0.9x budget (clearly: one measurement), the second meets it
    model = _two_layer()
    result = BitAllocationPass(BitAllocationConfig(latency_budget_ratio=0.9, accuracy_levels=(0,)), _ctx(model))(model)
    check = result.summary["latency_check"]
    assert check["met"] and check["target_ratio"] == 0.9
    first, second = check["attempts"]
    assert first["measured_ratio"] == 0.99 and second["measured_ratio"] == 0.6
    assert first["solver_budget_ms"] == pytest.approx(0.9 * 3.0 - 1.0)
    # Tightened from the first choice's prediction (1.6 ms in the units, inside the 1.7 ms budget) by the overshoot.
    assert first["predicted_ms"] == pytest.approx(1.0 + 1.6)
    assert second["solver_budget_ms"] == pytest.approx(1.6 - 0.09 * 3.0)
    assert second["predicted_ms"] < first["predicted_ms"]

    ratios = iter([0.99, 0.99, 0.99])  # never met: the last model is kept, with a note
    model = _two_layer()
    result = BitAllocationPass(BitAllocationConfig(latency_budget_ratio=0.9, accuracy_levels=(0,)), _ctx(model))(model)
    check = result.summary["latency_check"]
    assert not check["met"] and 2 <= len(check["attempts"]) <= 3
    assert any("misses the budget" in n for n in result.summary["notes"])


def test_a_latency_check_too_close_to_call_measures_again(monkeypatch):
    """Within the timing tolerance of the budget the check measures as many rounds again and decides on the median
    of every round's paired ratio; a clear verdict is taken from one measurement."""
    from edgeprune.passes.bits import microbench
    from edgeprune.runtime import latency as latency_mod
    from edgeprune.runtime.latency import _result

    monkeypatch.setattr(microbench, "unit_latencies", lambda units, target, **kw: {
        **{("dql", p.input): 0.05 for u in units for p in u.parts},
        **{(p.node, o.key): {"keep": 1.0, "int8-dynamic": 0.3}.get(o.kind, 0.8) for u in units for p in u.parts for o in p.options}})
    monkeypatch.setattr(microbench, "model_latency", lambda model, ctx, units, t, tokens, feed=None: (3.0, 2.0))
    calls = []

    def fake(models, feeds, target="cpu", *, warmup=5, runs=30, threads=None):
        ratios = next(measurements)
        calls.append(runs)
        return {"float": _result([10.0] * len(ratios), 1, warmup, threads, None, None),
                "candidate": _result([10.0 * r for r in ratios], 1, warmup, threads, None, None)}

    monkeypatch.setattr(latency_mod, "measure_side_by_side", fake)
    cfg = BitAllocationConfig(latency_budget_ratio=0.9, accuracy_levels=(0,), latency_runs=3)
    # 0.91: within 3 % of 0.9, so again; the second measurement's rounds at 0.99 put the median of all six at 0.95.
    measurements = iter([[0.90, 0.91, 0.92], [0.99, 0.99, 0.99], [0.6, 0.6, 0.6]])
    model = _two_layer()
    check = BitAllocationPass(cfg, _ctx(model))(model).summary["latency_check"]
    first, second = check["attempts"]
    assert (first["measured_ratio"], first["rounds"]) == (pytest.approx(0.955), 6)
    assert (second["measured_ratio"], second["rounds"], check["met"]) == (pytest.approx(0.6), 3, True)
    assert len(calls) == 3
    # Too close to call, then confirmed within the tolerance: met after one check, two measurements.
    measurements = iter([[0.92, 0.92, 0.93], [0.91, 0.92, 0.92]])
    model = _two_layer()
    check = BitAllocationPass(cfg, _ctx(model))(model).summary["latency_check"]
    assert [(a["measured_ratio"], a["rounds"]) for a in check["attempts"]] == [(pytest.approx(0.92), 6)] and check["met"]
    # Clearly inside the accepting line (0.9 x 1.03): one measurement decides.
    measurements = iter([[0.88, 0.88, 0.88]])
    model = _two_layer()
    check = BitAllocationPass(cfg, _ctx(model))(model).summary["latency_check"]
    assert [(a["measured_ratio"], a["rounds"]) for a in check["attempts"]] == [(pytest.approx(0.88), 3)] and check["met"]


def test_npu_target_gets_static_qdq():
    """qnn runs neither MatMulNBits nor dynamic int8: the pass offers static QDQ (8- or 16-bit activations)."""
    model = _two_layer()
    feeds = {"x": np.random.default_rng(3).standard_normal((1, T, D)).astype(np.float32)}
    before = _run(model, feeds)
    uniform = BitAllocationPass(BitAllocationConfig(mode="uniform", bits=8), _ctx(model, "qnn"))(model)
    assert [r["format"] for r in uniform.records] == ["qdq-a8w8", "qdq-a8w8"]
    assert "QuantizeLinear" in {n.op_type for n in model.graph}
    rel = np.linalg.norm(_run(model, feeds) - before) / np.linalg.norm(before)
    assert rel < 0.05

    model = _two_layer()
    # A budget bounds the written file: QDQ's Q/DQ nodes and their scales' names take about 2 kB more here.
    result = BitAllocationPass(BitAllocationConfig(size_budget_bytes=12_000), _ctx(model, "qnn"))(model)
    recs = {r["layer"]: r for r in result.records}
    assert set(recs["layerA"]["options"]) == {"float", "qdq-a8w8", "qdq-a16w8"}
    for r in recs.values():  # same bytes within a few: the finer activations win on error
        assert r["options"]["qdq-a16w8"]["rel_error"] < r["options"]["qdq-a8w8"]["rel_error"]
        assert r["format"] == "qdq-a16w8"
    assert model_bytes(model) <= 2 * D * D * 1.2 and result.summary["written_bytes"] <= 12_000
    rel = np.linalg.norm(_run(model, feeds) - before) / np.linalg.norm(before)
    assert rel < 0.02


def test_fastest_fallback_is_the_most_accurate_of_the_fastest():
    from edgeprune.passes.bits import knapsack, solve

    items = [[knapsack.Item(1.0, 10, 1.0), knapsack.Item(0.5, 10, 1.0), knapsack.Item(0.1, 20, 2.0)],
             [knapsack.Item(0.0, 40, 0.0), knapsack.Item(0.3, 5, 0.0), knapsack.Item(0.2, 8, 0.0)]]
    sol = solve.fastest(items, [], 20, "auto")
    assert sol.choice == [1, 2] and sol.latency == 1.0 and sol.error == pytest.approx(0.7)


def test_the_pass_is_reproducible():
    """Same model, same calibration rows, same budget: the same formats and byte-identical weights.  Without a
    latency bound: with one (``no_slower``'s implied one included) the choice follows measured timings."""
    outs = []
    for _ in range(2):
        model = _two_layer()
        cfg = BitAllocationConfig(avg_bits=6, bit_options=(2, 4, 8), no_slower=False)
        result = BitAllocationPass(cfg, _ctx(model))(model)
        outs.append(([r["format"] for r in result.records],
                     {k: v.const_value.numpy().tobytes() for k, v in model.graph.initializers.items()}))
    assert outs[0] == outs[1]


def test_microbenchmarks_take_the_least_of_the_interleaved_runs(monkeypatch):
    """Load only adds time: a shape's formats are compared by their fastest runs, not their medians."""
    from edgeprune.passes.bits import microbench
    from edgeprune.runtime import latency as latency_mod
    from edgeprune.runtime.latency import LatencyResult

    seen = {}

    def fake(models, feeds, target="cpu", *, warmup=5, runs=30, threads=None):
        seen.update(runs=runs, feeds=feeds)
        return {k: LatencyResult(2.0 + i, 3.0, 4.0, 2.5, 1.0 + i, 1.0, runs, warmup, threads, None, None)
                for i, k in enumerate(models)}

    monkeypatch.setattr(latency_mod, "measure_side_by_side", fake)
    base = microbench._matmul_model(8, 4, 2)
    out = microbench._time_group({"a": (base, {"x": 1}), "b": (base, {"x": 2})}, "cpu", 1)
    assert out == {"a": 1.0, "b": 2.0} and seen == {"runs": microbench._RUNS, "feeds": {"a": {"x": 1}, "b": {"x": 2}}}


def _decoder(tmp_path) -> tuple[ir.Model, CompileContext]:
    """The genai-style one-layer decoder with q/k/v apart, and calibration rows of 5 tokens on an empty cache."""
    from tiny_models import genai_style_decoder

    from edgeprune.model_io import load_model

    model = load_model(genai_style_decoder(tmp_path, packed=False))
    rng = np.random.default_rng(3)
    empty = np.zeros((1, 2, 0, 16), np.float32)
    rows = [{"input_ids": rng.integers(0, 48, (1, 5)), "attention_mask": np.ones((1, 5), np.int64),
             "past_key_values.0.key": empty, "past_key_values.0.value": empty} for _ in range(8)]
    calib = CalibrationSet(rows, "random test rows", synthetic=True)
    return model, CompileContext(target=get_target("cpu"), calibration=calib, holdout=calib)


def test_decode_budget_is_solved_on_one_token_timings_and_measured_on_a_decode_step(tmp_path, monkeypatch):
    """``decode_budget_ratio``: options are costed at one token (where here 4-bit is the fastest format and dynamic
    int8 is not), the emitted model is measured against the float one on one token after ``decode_context`` cached
    positions, and the check is recorded.  Microbenchmarks and measurements are fixed figures: the loop, not a clock."""
    from edgeprune.passes.bits import microbench
    from edgeprune.runtime import latency as latency_mod
    from edgeprune.runtime.latency import _result

    def table(units, target, *, tokens, **kw):
        cost = {"keep": 1.0, "int8-dynamic": 0.9} if tokens == 1 else {"keep": 1.0, "int8-dynamic": 0.3}
        t = {("dql", p.input): 0.01 for u in units for p in u.parts}
        t.update({(p.node, o.key): cost.get(o.kind, 0.2 if tokens == 1 else 0.8) for u in units for p in u.parts for o in p.options})
        return t

    monkeypatch.setattr(microbench, "unit_latencies", table)
    monkeypatch.setattr(microbench, "model_latency", lambda model, ctx, units, t, tokens, feed=None: (
        sum(t[(p.node, "float")] for u in units for p in u.parts), sum(t[(p.node, "float")] for u in units for p in u.parts)))
    feeds = []

    def fake(models, feed, target="cpu", *, warmup=5, runs=30, threads=None):
        feeds.append(feed)
        return {"float": _result([10.0] * 3, 1, warmup, threads, None, None),
                "candidate": _result([2.0] * 3, 1, warmup, threads, None, None)}

    monkeypatch.setattr(latency_mod, "measure_side_by_side", fake)
    model, ctx = _decoder(tmp_path)
    result = BitAllocationPass(BitAllocationConfig(decode_budget_ratio=0.25, decode_context=7, accuracy_levels=(0,)), ctx)(model)
    units = len(result.records)
    # 0.25 x the float step leaves 0.25 ms per unit: only the 0.2 ms formats fit (block-wise, and the embedding's
    # lookups); float (1.0) or dynamic int8 (0.9) on any unit breaks it, where without the budget all would stay float.
    assert {r["format"] for r in result.records} & {"float", "int8-dyn"} == set()
    # Calibrated on two measured steps: float (10 ms) and the fastest choice (0.2 x 10), against their unit sums
    # (1 ms and 0.2 ms per unit): decode ms = a x units + r with a = 8 / (0.8 x units), r = 0.
    dec = result.summary["latency"]["decode"]
    assert dec["scale"] == pytest.approx(8.0 / (0.8 * units)) and dec["rest_ms"] == pytest.approx(0.0, abs=1e-9)
    assert result.summary["predicted_decode_ms"] == pytest.approx(2.0)
    check = result.summary["decode_check"]
    assert check["met"] and check["target_ratio"] == 0.25 and [a["measured_ratio"] for a in check["attempts"]] == [0.2]
    shapes = {k: v.shape for k, v in feeds[-1].items()}
    assert shapes == {"input_ids": (1, 1), "attention_mask": (1, 8), "past_key_values.0.key": (1, 2, 7, 16),
                      "past_key_values.0.value": (1, 2, 7, 16)}
    assert result.summary["latency"]["decode"]["context"] == 7
    # A measured miss re-solves with the decode budget cut by the overshoot (from the choice's own prediction).
    ratios = iter([0.2, 0.6, 0.45])  # the calibration's fastest choice, then the chosen model twice

    def fake(models, feed, target="cpu", *, warmup=5, runs=30, threads=None):
        r = next(ratios)
        return {"float": _result([10.0] * 3, 1, warmup, threads, None, None),
                "candidate": _result([10.0 * r] * 3, 1, warmup, threads, None, None)}

    monkeypatch.setattr(latency_mod, "measure_side_by_side", fake)
    model, ctx = _decoder(tmp_path)
    result = BitAllocationPass(BitAllocationConfig(decode_budget_ratio=0.5, accuracy_levels=(0,)), ctx)(model)
    first, second = result.summary["decode_check"]["attempts"]
    float_ms = 10.0  # the measured float step (the calibration's)
    assert (first["measured_ratio"], second["measured_ratio"], result.summary["decode_check"]["met"]) == (0.6, 0.45, True)
    assert first["solver_budget_ms"] == pytest.approx(0.5 * float_ms)
    assert second["solver_budget_ms"] == pytest.approx(first["predicted_ms"] - (0.6 - 0.5) * float_ms)
    assert second["predicted_ms"] <= second["solver_budget_ms"] + 1e-9 < first["predicted_ms"]


def test_decode_budget_needs_a_kv_cache_and_one_bound():
    with pytest.raises(BadInputError) as err:
        BitAllocationConfig(decode_budget_ms=8, decode_budget_ratio=0.3)
    assert str(err.value) == "decode_budget_ms and decode_budget_ratio both bound the decode step: pass only one of them."
    model = _two_layer()
    with pytest.raises(BadInputError) as err:
        BitAllocationPass(BitAllocationConfig(decode_budget_ratio=0.5), _ctx(model))(model)
    assert str(err.value) == ("a decode budget needs a model with a KV cache (inputs past_key_values.N.key/value): export it "
                              "with past key/values (optimum's text-generation-with-past), or use --latency-budget.")


def test_one_token_microbenchmarks_time_cold_copies_with_distinct_weights(monkeypatch):
    """At one token each format is timed as copies holding several last-level caches of weights, each copy with its
    own values (ORT stores byte-identical initializers once); the first copy computes what the node computes."""
    import math

    from edgeprune.passes.bits import microbench
    from edgeprune.passes.bits.emit import emit
    from edgeprune.passes.bits.sensitivity import Option

    quant = emit(microbench._matmul_model(64, 32, 1), {"mm": Option("nbits", 4, 32, False, 4)})[0]
    copies = microbench._cold_copies(quant, 3)
    assert [n.op_type for n in copies.graph] == ["MatMulNBits"] * 3 and len(copies.graph.outputs) == 3
    codes = [n.inputs[1].const_value.numpy() for n in copies.graph]
    np.testing.assert_array_equal(codes[1], codes[0] + np.uint8(2))
    scales = [n.inputs[2].const_value.numpy() for n in copies.graph]
    np.testing.assert_array_equal(scales[2], scales[0] * np.float32(1.002))
    x = microbench._x(64, 1)
    np.testing.assert_array_equal(_run(copies, x), _run(quant, x))
    monkeypatch.setattr(microbench, "_llc_bytes", lambda: 1 << 20)
    models = {"overhead": (quant, x), "fmt": (quant, x)}
    assert microbench._cold(models, 128) == {"overhead": 1, "fmt": 1}
    want = min(microbench._MAX_COPIES, math.ceil(microbench._COLD_CACHES * (1 << 20) / microbench._weight_bytes(quant)))
    assert microbench._cold(models, 1) == {"overhead": 1, "fmt": want} and want > 1


def test_a_ratio_budget_below_the_predicted_floor_is_timed_again_before_it_is_refused(monkeypatch):
    """Under a load spike the small nodes' microbenchmarks slow down more than the float model, and a reachable ratio
    looks out of reach: every timing is taken again once, and only a budget still out of reach is refused."""
    from edgeprune.passes.bits import knapsack, latency

    calls = []

    def fake(model, units, rows, c, context, retime=False):
        calls.append(retime)
        fast = 0.2 if retime or len(calls) > 2 else 0.9  # ms per unit at its fastest: the first timing inflated
        new = [[knapsack.Item(it.error, it.size, 0.5 if i == 0 else fast) for i, it in enumerate(row)] for row in rows]
        return new, [], {"float_ms": 1.0, "rest_ms": 0.0, "units_float_ms": 1.0}

    monkeypatch.setattr(latency, "with_latency", fake)
    monkeypatch.setattr(latency, "meet", lambda model, units, rows, shared, bud, info, sol, new, log, *a, **k: (sol, new, log, {}))
    model = _two_layer()
    result = BitAllocationPass(BitAllocationConfig(latency_budget_ratio=0.5, accuracy_levels=(0,)), _ctx(model))(model)
    assert calls == [False, True] and result.modified
    assert ("the latency budget looked out of reach (0.5 x 1.0 ms against a predicted 1.0 ms at the fastest): every "
            "timing was taken again") in result.summary["notes"]
    calls.clear()
    monkeypatch.setattr(latency, "with_latency", lambda *a, retime=False, **k: calls.append(retime) or (
        [[knapsack.Item(it.error, it.size, 0.9) for it in row] for row in a[2]], [], {"float_ms": 1.0, "rest_ms": 0.0}))
    with pytest.raises(BadInputError, match="below the fastest model the offered formats allow"):
        BitAllocationPass(BitAllocationConfig(latency_budget_ratio=0.5, accuracy_levels=(0,)), _ctx(_two_layer()))(_two_layer())
    assert calls == [False, True]


def test_fresh_latencies_retime_times_every_shape_again(tmp_path, monkeypatch):
    from edgeprune.analysis import analyze
    from edgeprune.passes.bits import microbench
    from edgeprune.passes.bits.units import build, formats_for

    groups = _fake_groups(monkeypatch, tmp_path, [1.0])
    model = _two_layer()
    c = BitAllocationConfig(latency_budget_ms=1.0, accuracy_levels=(0,))
    units, _ = build(model, analyze(model), c, formats_for(None, c)[0], [])
    ctx = _ctx(model)
    assert microbench.fresh_latencies(model, ctx, units, tokens=T)[3] == "timed now"
    assert microbench.fresh_latencies(model, ctx, units, tokens=T)[3] == "cached" and len(groups) == 1
    assert microbench.fresh_latencies(model, ctx, units, tokens=T, retime=True)[3] == "timed again, as asked"
    assert groups == [_GRID, _GRID]
