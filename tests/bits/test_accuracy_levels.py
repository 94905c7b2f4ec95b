"""MatMulNBits accuracy level 4 as a per-node option, and size budgets that bound the written files."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from edgeprune.calibration import CalibrationSet
from edgeprune.context import CompileContext
from edgeprune.errors import BadInputError
from edgeprune.model_io import file_size, save_model, to_proto
from edgeprune.passes.bits import emit, microbench, sensitivity
from edgeprune.passes.bits.bits_pass import BitAllocationConfig, BitAllocationPass
from edgeprune.passes.bits.sensitivity import Option
from edgeprune.runtime.targets import get_target

from tiny_models import D, T, two_layer_matmul as _two_layer


def _ctx(model: ir.Model) -> CompileContext:
    rng = np.random.default_rng(7)
    rows = [{"x": rng.standard_normal((1, T, D)).astype(np.float32)} for _ in range(12)]
    calib = CalibrationSet(rows, "random test rows", synthetic=True)
    return CompileContext(target=get_target("cpu"), calibration=calib, holdout=calib)

# ORT's int8 kernel sums int8 products per block in int32 and scales them in float: the same
# numbers as block_int8_activation(x) @ dequant(W) up to float summation order.
ORT_TOLERANCE = 1e-5


def _session(model: ir.Model):
    return ort.InferenceSession(to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bits, block, sym, k", [(4, 32, False, 256), (8, 32, False, 256), (4, 64, True, 256),
                                                 (8, 128, True, 256), (4, 32, False, 200)])
def test_simulated_accuracy_level_4_equals_ort(bits, block, sym, k):
    """The simulator's int8-per-block activation times the dequantized weight is what ORT computes."""
    n, t = 48, 16
    base = microbench._matmul_model(k, n, t)
    w = base.graph.initializers["w"].const_value.numpy()
    x = np.random.default_rng(3).standard_normal((1, t, k)).astype(np.float32)
    x[..., 5] *= 20.0  # an outlier feature: its blocks get a coarser step than the others
    new, log = emit.emit(base, {"mm": Option("nbits", bits, block, sym, accuracy_level=4)})
    node = next(nd for nd in new.graph if nd.op_type == "MatMulNBits")
    assert node.attributes["accuracy_level"].value == 4 and log["steps"][0]["accuracy_level"] == 4
    y = _session(new).run(None, {"x": x})[0]
    wq = sensitivity.nbits_dequant(w, bits, block, sym)
    sim = sensitivity.block_int8_activation(x, block) @ wq
    assert np.abs(y - sim).max() <= ORT_TOLERANCE * np.abs(sim).max()
    # Not vacuous: weight-only rounding alone (accuracy level 0) is much further from ORT's level 4.
    assert np.abs(y - x @ wq).max() > 100 * ORT_TOLERANCE * np.abs(sim).max()
    level0 = emit.emit(base, {"mm": Option("nbits", bits, block, sym)})[0]
    assert "accuracy_level" not in next(nd for nd in level0.graph if nd.op_type == "MatMulNBits").attributes or \
        next(nd for nd in level0.graph if nd.op_type == "MatMulNBits").attributes["accuracy_level"].value == 0
    assert np.abs(_session(level0).run(None, {"x": x})[0] - x @ wq).max() <= ORT_TOLERANCE * np.abs(sim).max()


def test_block_noise_model_bounds_the_real_activation_error():
    """The error model's level-4 term is an upper bound of ||(bq(X) - X) Q(W)||^2 on the rows, and not a loose one."""
    rng = np.random.default_rng(0)
    k, n, block = 128, 32, 32
    x = rng.standard_normal((256, k)).astype(np.float32)
    x[:, 7] *= 10.0
    wq = sensitivity.nbits_dequant(rng.standard_normal((k, n)).astype(np.float32), 4, block, False)
    real = float(np.square((sensitivity.block_int8_activation(x, block) - x) @ wq).sum())
    model = sensitivity.block_activation_noise_sq(wq, np.abs(x).max(axis=0), x.shape[0], block)
    assert real <= model <= 12 * real  # an upper bound: a row's block absmax is below the rows' per-feature absmax


@pytest.mark.parametrize("cpu_levels", [(0,), (0, 4)])
def test_accuracy_levels_by_default_on_cpu_budgets_only(cpu_levels, monkeypatch):
    """Default: ``CPU_BUDGET_LEVELS`` for a budget on the CPU EP (level 0 alone today); level 0 only with an
    ``accuracy_level``, a uniform width, fast mode or another execution provider."""
    from edgeprune.passes.bits import config as config_mod

    monkeypatch.setattr(config_mod, "CPU_BUDGET_LEVELS", cpu_levels)
    _fake_latencies(monkeypatch)
    cpu, cuda = get_target("cpu"), get_target("cuda")
    assert BitAllocationConfig(avg_bits=6).accuracy_levels is None
    assert BitAllocationConfig(avg_bits=6).for_target(cpu).accuracy_levels == cpu_levels
    assert BitAllocationConfig(avg_bits=6).for_target(None).accuracy_levels == cpu_levels
    assert BitAllocationConfig(avg_bits=6).for_target(cuda).accuracy_levels == (0,)
    assert BitAllocationConfig(avg_bits=6, accuracy_level=4).for_target(cpu).accuracy_levels == (0,)
    assert BitAllocationConfig(mode="uniform", bits=8).for_target(cpu).accuracy_levels == (0,)
    assert BitAllocationConfig(mode="fast").for_target(cpu).accuracy_levels == (0,)
    assert BitAllocationConfig(avg_bits=6, accuracy_levels=(0,)).for_target(cpu).accuracy_levels == (0,)
    model = _two_layer()
    default = BitAllocationPass(BitAllocationConfig(avg_bits=6, block_size=32, dynamic_int8=False, output_checks=0),
                                _ctx(model))(model)
    assert {k for k in default.summary["formats_offered"] if "acc" in k} == (
        {"nbits4-b32-asym-acc4", "nbits8-b32-asym-acc4"} if cpu_levels == (0, 4) else set())
    model = _two_layer()
    only0 = BitAllocationPass(BitAllocationConfig(avg_bits=6, block_size=32, dynamic_int8=False, output_checks=0,
                                                  accuracy_levels=(0,)), _ctx(model))(model)
    assert not any("acc" in k for k in only0.summary["formats_offered"])
    m2 = _two_layer()
    cfg = BitAllocationConfig(avg_bits=6, bit_options=(2, 4, 8), block_size=32, dynamic_int8=False, output_checks=0,
                              accuracy_levels=(0, 4), speed_slack=0.0)
    both = BitAllocationPass(cfg, _ctx(m2))(m2)
    offered = both.summary["formats_offered"]
    assert {"nbits4-b32-asym-acc4", "nbits8-b32-asym-acc4", "nbits4-b32-asym", "nbits2-b32-asym"} <= set(offered)
    assert "nbits2-b32-asym-acc4" not in offered  # no int8-compute kernel for 2 bits
    rec = both.records[0]["options"]
    # Same bytes, more error: the activation rounding is counted.
    assert rec["nbits4-b32-asym-acc4"]["bytes"] == rec["nbits4-b32-asym"]["bytes"]
    assert rec["nbits4-b32-asym-acc4"]["rel_error"] > rec["nbits4-b32-asym"]["rel_error"]
    assert rec["nbits8-b32-asym-acc4"]["rel_error"] > rec["nbits8-b32-asym"]["rel_error"]


@pytest.mark.parametrize("levels", [(1,), (0, 3)])
def test_levels_without_a_cpu_kernel_are_refused(levels):
    with pytest.raises(BadInputError, match="0 and/or 4"):
        BitAllocationConfig(avg_bits=4, accuracy_levels=levels)
    with pytest.raises(BadInputError, match="not both"):
        BitAllocationConfig(avg_bits=4, accuracy_levels=(0, 4), accuracy_level=4)


def _level4_fast(o) -> float:
    return 1.0 if o.kind == "keep" else 0.6 if o.accuracy_level == 4 else 2.0


def _fake_latencies(monkeypatch, ms=_level4_fast):
    """Microbenchmarks ``ms(option)`` per node (default: as on a CPU where level 4 is fast: float 1.0 ms,
    level-0 MatMulNBits 2.0, level 4 0.6), 0.1 ms per DynamicQuantizeLinear."""
    def table(units, target, **_):
        out = {}
        for u in units:
            for p in u.parts:
                out[("dql", p.input)] = 0.1
                for o in p.options:
                    out[(p.node, o.key)] = ms(o)
        return out

    monkeypatch.setattr(microbench, "unit_latencies", table)
    monkeypatch.setattr(microbench, "model_latency", lambda model, context, units, table, tokens, feed=None: (2.2, 2.0))


def _levels(model: ir.Model) -> list[int]:
    return sorted(int(n.attributes["accuracy_level"].value) if "accuracy_level" in n.attributes else 0
                  for n in model.graph if n.op_type == "MatMulNBits")


def test_latency_budget_chooses_accuracy_level_4(monkeypatch):
    _fake_latencies(monkeypatch)
    model = _two_layer()
    cfg = BitAllocationConfig(latency_budget_ratio=0.7, block_size=32, dynamic_int8=False, output_checks=0,
                              accuracy_levels=(0, 4), latency_checks=1)
    result = BitAllocationPass(cfg, _ctx(model))(model)
    assert [r["format"] for r in result.records] == ["nbits8-b32-asym-acc4"] * 2
    assert _levels(model) == [4, 4]


def test_size_budget_breaks_ties_for_speed(monkeypatch):
    """Same size, objective within speed_slack's allowance: the faster level-4 format; with level 0 only, the old choice."""
    _fake_latencies(monkeypatch)
    m_old, m_new = _two_layer(), _two_layer()
    budget = 12_000  # room for 8 bits on both (2 x 4.6 kB), not for float (2 x 16 kB)
    common = dict(size_budget_bytes=budget, block_size=32, dynamic_int8=False, output_checks=0, no_slower=False)
    old = BitAllocationPass(BitAllocationConfig(**common, accuracy_levels=(0,)), _ctx(m_old))(m_old)
    assert [r["format"] for r in old.records] == ["nbits8-b32-asym"] * 2 and _levels(m_old) == [0, 0]
    new = BitAllocationPass(BitAllocationConfig(**common, accuracy_levels=(0, 4), speed_slack=0.05), _ctx(m_new))(m_new)
    assert [r["format"] for r in new.records] == ["nbits8-b32-asym-acc4"] * 2 and _levels(m_new) == [4, 4]
    assert new.summary["objective"] <= old.summary["objective"] + 0.05 ** 2 * sum(r["importance"] for r in new.records)
    # The default slack (0) keeps the least error.
    m0 = _two_layer()
    strict = BitAllocationPass(BitAllocationConfig(**common, accuracy_levels=(0, 4)), _ctx(m0))(m0)
    assert [r["format"] for r in strict.records] == ["nbits8-b32-asym"] * 2


def test_size_budget_alone_is_no_slower_than_float(monkeypatch):
    """On the CPU EP a size budget alone also bounds the predicted latency to the float model's: the least-error
    choice that the microbenchmarks time as fast as float, not the slow level-0 8-bit one; ``no_slower=False`` and
    an explicit latency budget leave it out."""
    _fake_latencies(monkeypatch)
    budget = 12_000
    cfg = BitAllocationConfig(size_budget_bytes=budget, block_size=32, dynamic_int8=False, output_checks=0)
    settled = cfg.for_target(get_target("cpu"))
    assert (settled.latency_budget_ratio, settled.latency_implicit, settled.accuracy_levels) == (1.0, True, (4,))
    two = BitAllocationConfig(size_budget_bytes=budget, bit_options=(2, 4)).for_target(get_target("cpu"))
    assert two.accuracy_levels == (0, 4)  # 2 bits has no level-4 kernel
    assert cfg.for_target(get_target("cuda")).latency_budget_ratio is None
    off = BitAllocationConfig(size_budget_bytes=budget, no_slower=False).for_target(get_target("cpu"))
    assert off.latency_budget_ratio is None and not off.latency_implicit
    told = BitAllocationConfig(size_budget_bytes=budget, latency_budget_ratio=0.8).for_target(get_target("cpu"))
    assert (told.latency_budget_ratio, told.latency_implicit) == (0.8, False)
    m = _two_layer()
    result = BitAllocationPass(cfg, _ctx(m))(m)
    assert [r["format"] for r in result.records] == ["nbits8-b32-asym-acc4"] * 2 and _levels(m) == [4, 4]
    assert result.summary["budget"].endswith("no slower than float (implied by the size budget: no_slower) "
                                             f"(model outside the units: {result.summary['latency']['rest_ms']:.1f} ms)")


# --------------------------------------------------------------------------- exact budgets


@pytest.mark.parametrize("budget", [5_400, 6_000, 7_500, 9_500, 10_000, 12_000, 20_000, 30_000])
def test_written_model_never_exceeds_the_size_budget(budget, tmp_path):
    """Bytes on disk (graph, scales, zero points, padding included) stay within the budget; the summary says both."""
    model = _two_layer()
    cfg = BitAllocationConfig(size_budget_bytes=budget, bit_options=(2, 4, 8), block_size=(32, 64),
                              dynamic_int8=True, output_checks=0)
    result = BitAllocationPass(cfg, _ctx(model))(model)
    path = tmp_path / "m.onnx"
    save_model(model, path)
    written = file_size(path)
    assert written <= budget
    assert result.summary["written_bytes"] == written
    assert result.summary["predicted_bytes"] <= budget
    assert any(n.startswith("size: predicted") for n in result.summary["notes"])


@pytest.mark.parametrize("options", [{"avg_bits": 6.0}, {"mode": "uniform", "bits": 4}, {"mode": "uniform", "bits": 8}])
def test_summary_has_predicted_and_written_bytes_without_a_size_budget(options, tmp_path, monkeypatch):
    """Every budget's summary says what the solver predicted (option bytes + the float model's other written
    bytes) and what the model writes (the file itself)."""
    _fake_latencies(monkeypatch)
    model = _two_layer()
    float_path = tmp_path / "float.onnx"
    save_model(model, float_path)
    result = BitAllocationPass(BitAllocationConfig(block_size=32, output_checks=0, **options), _ctx(model))(model)
    path = tmp_path / "m.onnx"
    save_model(model, path)
    s = result.summary
    assert s["written_bytes"] == file_size(path)
    other = file_size(float_path) - 2 * 64 * 64 * 4
    assert s["predicted_bytes"] == sum(r["bytes"] for r in result.records) + other
    assert 0 < s["written_bytes"] - s["predicted_bytes"] < 1_000  # the quantizers' node and initializer names


def test_budget_only_the_unwritten_model_fits_is_refused():
    """Above the shapes' floor but below what any choice writes: refused with the written size, nothing written."""
    model = _two_layer()
    cfg = BitAllocationConfig(size_budget_bytes=5_000, bit_options=(4, 8), block_size=64, dynamic_int8=False,
                              output_checks=0)
    with pytest.raises(BadInputError, match="cannot be met once written"):
        BitAllocationPass(cfg, _ctx(model))(model)


def test_tied_lookup_shares_the_table_of_a_level_4_head():
    """The level changes how the head computes, not what it stores: the lookup still reads the head's packed table."""
    vocab, dim = 96, 64
    rng = np.random.default_rng(0)
    proto = onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[N, {T}] ids) => (float[N, {T}, {vocab}] logits) {{
            h = Gather <axis = 0> (E, ids)
            t = Tanh(h)
            et = Transpose <perm = [1, 0]> (E)
            logits = MatMul(t, et)
        }}
    """)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal((vocab, dim)).astype(np.float32), "E"))
    model = ir.from_proto(proto)
    rows = [{"ids": rng.integers(0, vocab, (1, T))} for _ in range(12)]
    calib = CalibrationSet(rows, "random test rows", synthetic=True)
    ctx = CompileContext(target=get_target("cpu"), calibration=calib, holdout=calib)
    feeds = {"ids": rows[0]["ids"]}
    before = _session(model).run(None, feeds)[0]
    cfg = BitAllocationConfig(mode="uniform", bits=8, block_size=32, accuracy_levels=(4,), output_checks=0)
    result = BitAllocationPass(cfg, ctx)(model)
    assert [r["format"] for r in result.records] == ["tied8-b32-asym", "nbits8-b32-asym-acc4"]
    assert {n.op_type for n in model.graph} >= {"GatherBlockQuantized", "MatMulNBits"} and _levels(model) == [4]
    after = _session(model).run(None, feeds)[0]
    assert np.linalg.norm(after - before) / np.linalg.norm(before) < 0.03


def test_compile_writes_no_more_than_the_size_budget(tmp_path):
    """Through the CLI: the file the compile writes is the pass's written size, within --size-budget."""
    import json

    from edgeprune.cli import main

    path = tmp_path / "m.onnx"
    onnx.save(to_proto(_two_layer()), path)
    for budget in (7_000, 10_000):
        out = tmp_path / f"out{budget}"
        assert main(["compile", str(path), "-o", str(out), "--bits", "auto", "--size-budget", f"{budget}B"]) == 0
        report = json.loads((out / "report.json").read_text())
        bits = next(p for p in report["passes"] if p["name"] == "bits")["summary"]
        assert report["size"]["candidate_bytes"] == bits["written_bytes"] == file_size(out / "model.onnx") <= budget
        assert bits["predicted_bytes"] > 0


@pytest.mark.parametrize("allow_slower", [False, True])
def test_allow_slower_lifts_the_size_budgets_implied_speed_bound(allow_slower, tmp_path, capsys, monkeypatch):
    """``--allow-slower``: a size budget alone chooses for accuracy, with no speed bound and no clock."""
    import json

    from edgeprune.cli import main

    _fake_latencies(monkeypatch)
    path = tmp_path / "m.onnx"
    onnx.save(to_proto(_two_layer()), path)
    assert main(["compile", str(path), "-o", str(tmp_path / "out"), "--bits", "auto", "--size-budget", "12000B", "--json",
                 *(["--allow-slower"] if allow_slower else [])]) == 0
    bits = next(p for p in json.loads(capsys.readouterr().out)["passes"] if p["name"] == "bits")
    assert bits["config"]["no_slower"] is not allow_slower
    size = "12.0 kB of weights (11.7 kB for the quantizable nodes)"
    if allow_slower:
        assert (bits["summary"]["budget"], bits["summary"]["latency"]) == (size, None)
    else:
        lat = bits["summary"]["latency"]
        assert bits["summary"]["budget"] == (f"{size}; latency 1 x the float model's {lat['float_ms']:.1f} ms = "
                                             f"{lat['float_ms']:.1f} ms, no slower than float (implied by the size budget: "
                                             f"no_slower) (model outside the units: {lat['rest_ms']:.1f} ms)")


@pytest.mark.parametrize("latency, note", [
    (0.65, "the written size left no choice within the latency budget: the fastest choice that fits the size is emitted"),
    (None, "the written size left no choice as fast as float: the least-error choice that fits is emitted"),
])
def test_written_size_overshoot_under_a_latency_budget_takes_the_fastest_choice_that_fits(latency, note, monkeypatch):
    """When the file overshoots and nothing smaller meets the latency budget, the size (a hard bound on the file)
    wins: the fastest choice that fits is emitted with a note, instead of refusing a budget that can be met; under
    the bound a size budget only implies (no_slower), the least-error choice that fits."""
    from edgeprune.passes.bits import bits_pass

    # 8-bit level 4 fast, 4-bit level 4 slow: a smaller file means a slower model.
    _fake_latencies(monkeypatch, lambda o: 1.0 if o.kind == "keep" else 0.6 if o.bits == 8 else 2.0)
    real, calls = bits_pass.written_bytes, []

    def overshoot_once(model):  # the first emit writes 3 kB more than predicted (as graph bytes might)
        calls.append(1)
        return real(model) + (3_000 if len(calls) == 2 else 0)  # call 1 measures the graph before quantizing

    monkeypatch.setattr(bits_pass, "written_bytes", overshoot_once)
    model = _two_layer()
    cfg = BitAllocationConfig(size_budget_bytes=12_000, latency_budget_ratio=latency, block_size=32, dynamic_int8=False,
                              output_checks=0, latency_checks=1)
    result = BitAllocationPass(cfg, _ctx(model))(model)
    # The least latency within 8.3 kB left after the overshoot: one 8-bit node (0.6 ms), the other 4-bit.
    assert [r["format"] for r in result.records] == ["nbits8-b32-asym-acc4", "nbits4-b32-asym-acc4"]
    assert note in result.summary["notes"]
    assert result.summary["written_bytes"] <= 12_000


# --------------------------------------------------------------------------- the implied bound, checked end to end


class _FloorByFormat(CompileContext):
    """A context whose held-back check gives cosine 0.95 (under the 0.99 floor) for any model holding a 4-bit
    MatMulNBits and ``other`` for the rest: the decision logic of the implied-bound check, apart from any real error."""

    other: float = 0.999
    checked: list = []

    def held_back_fidelity(self, model):
        from edgeprune.fidelity import OutputFidelity

        four = any(n.op_type == "MatMulNBits" and n.attributes["bits"].value == 4 for n in model.graph)
        self.checked.append("4-bit" if four else "other")
        cosine = 0.95 if four else self.other
        return [OutputFidelity("y", 12, cosine, cosine, 0.1, 0.1)]


@pytest.mark.parametrize("other, replaced, note", [
    (0.999, True, "no slower than float (the size budget's implied bound) gave way: with it the held-back y cosine mean "
                  "0.9500 < 0.99; the least-error choice of the same size holds the default floor"),
    (0.97, True, "no slower than float (the size budget's implied bound) gave way: with it the held-back y cosine mean "
                 "0.9500 < 0.99; the least-error choice of the same size misses the default floor by less (y cosine mean "
                 "0.9700 < 0.99)"),
    (0.95, False, "no slower than float (the size budget's implied bound) was kept: the least-error choice of the same "
                  "size misses the default floor by as much (y cosine mean 0.9500 < 0.99 vs y cosine mean 0.9500 < 0.99)"),
])
def test_the_implied_bound_gives_way_where_it_costs_measured_accuracy(other, replaced, note, monkeypatch, tmp_path):
    """A size budget's implied "no slower than float" holds unless the model it chose misses the default fidelity
    floor on the held-back rows and the least-error choice of the same size holds it, or misses it by less: then
    that one is emitted.  Where both miss alike, the faster choice stays."""
    # 8-bit slower than float, 4-bit faster: the bound forces 4-bit; 12 kB fits 8-bit for both.
    _fake_latencies(monkeypatch, lambda o: 1.0 if o.kind == "keep" else 1.5 if o.bits == 8 else 0.6)
    model = _two_layer()
    ctx = _FloorByFormat(**vars(_ctx(model)))
    ctx.other, ctx.checked = other, []
    cfg = BitAllocationConfig(size_budget_bytes=12_000, block_size=32, dynamic_int8=False, output_checks=0, latency_checks=1)
    result = BitAllocationPass(cfg, ctx)(model)
    check = result.summary["implied_bound_check"]
    assert ctx.checked == ["4-bit", "other"]
    assert check["bounded"] == [{"output": "y", "measure": "cosine mean", "limit": 0.99, "value": 0.95, "ok": False}]
    assert note in result.summary["notes"]
    assert [r["format"] for r in result.records] == [f"nbits{8 if replaced else 4}-b32-asym-acc4"] * 2
    assert check.get("replaced", False) is replaced
    assert _levels(model) == [4, 4] and result.summary["written_bytes"] <= 12_000
    save_model(model, tmp_path / "m.onnx")
    assert result.summary["written_bytes"] == file_size(tmp_path / "m.onnx")


def test_the_implied_bound_is_not_checked_further_where_it_holds_the_floor(monkeypatch):
    _fake_latencies(monkeypatch, lambda o: 1.0 if o.kind == "keep" else 1.5 if o.bits == 8 else 0.6)
    model = _two_layer()
    ctx = _FloorByFormat(**vars(_ctx(model)))
    ctx.checked = []
    monkeypatch.setattr(_FloorByFormat, "held_back_fidelity", lambda self, m: ctx.checked.append(1) or [])
    cfg = BitAllocationConfig(size_budget_bytes=12_000, block_size=32, dynamic_int8=False, output_checks=0, latency_checks=1)
    result = BitAllocationPass(cfg, ctx)(model)
    assert ctx.checked == [1] and result.summary["implied_bound_check"] == {"bounded": "holds the default floor"}
    assert [r["format"] for r in result.records] == ["nbits4-b32-asym-acc4"] * 2


def test_held_back_fidelity_compares_with_the_compile_input():
    """The context's end-to-end check: the input itself scores cosine 1 on the held-back rows, a changed model less."""
    from edgeprune.verify import run_batches

    model = _two_layer()
    ctx = _ctx(model)
    assert ctx.held_back_fidelity(model) is None  # no reference outside a compile
    ctx.holdout_batches = list(ctx.holdout.batches(4))
    ctx.reference_outputs = run_batches(model, ctx.holdout_batches)
    same = ctx.held_back_fidelity(model)
    assert [(f.name, f.cosine_mean, f.max_abs_error) for f in same] == [("y", 1.0, 0.0)]
    other = _two_layer(seed=1)
    assert ctx.held_back_fidelity(other)[0].cosine_mean < 0.5
