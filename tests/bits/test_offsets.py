"""Block offsets (edgeprune.passes.bits.offsets): centred MatMulNBits codes + a float offset per block added beside the
kernel.  Exact on a Q4_1 grid, never worse than min/max when searched, emitted as simulated (packed siblings, accuracy
level 4, float16 storage), and its bytes are the size model's."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from edgeprune.model_io import model_bytes, to_proto
from edgeprune.passes.bits import offsets, rounding
from edgeprune.passes.bits import sensitivity as S
from edgeprune.passes.bits.emit import emit
from edgeprune.passes.bits.sensitivity import Option


def _q4_1(k=128, n=48, seed=0, block=32) -> np.ndarray:
    """A weight on llama.cpp's Q4_1 grid: codes 0..15 (each block reaching both ends), float16 step and minimum."""
    rng = np.random.default_rng(seed)
    kb = k // block
    d = rng.uniform(0.002, 0.02, (n, kb)).astype(np.float16).astype(np.float32)
    m = (-rng.uniform(2, 14, (n, kb)) * d).astype(np.float16).astype(np.float32)
    c = rng.integers(0, 16, (n, kb, block))
    c[:, :, 0], c[:, :, 1] = 0, 15
    return np.ascontiguousarray((c * d[..., None] + m[..., None]).reshape(n, k).T.astype(np.float32))


def _weight(k=128, n=48, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_t(4, (k, n)) * 0.02 + 0.01  # shifted: blocks sit off zero, where an integer zero point wastes levels
    return w.astype(np.float32)


def _rel(w, q) -> float:
    return float(np.linalg.norm(q - w) / np.linalg.norm(w))


def test_a_q4_1_weight_comes_back_exactly():
    w = _q4_1()
    for fp16 in (False, True):
        for rnd in ("rtn", "mse"):
            codes, scales, offs = offsets.offset_grid(w, 4, 32, rounding=rnd, fp16=fp16)
            assert codes.max() <= 15 and codes.dtype == np.uint8
            q = offsets.dequant(codes, scales, offs, 4, 32)
            assert _rel(w, q) < 1e-4, (fp16, rnd)
    # ORT's integer zero point cannot hold a float minimum: its best searched grid stays ~100x further
    assert _rel(w, rounding.search_dequant(w, 4, 32, False)) > 0.01


@pytest.mark.parametrize("bits,block", [(4, 32), (4, 64), (2, 32)])
def test_search_is_never_worse_than_min_max_and_beats_integer_zero_points(bits, block):
    w = _weight()
    d = np.random.default_rng(2).uniform(0.1, 10.0, w.shape[0]).astype(np.float32)
    kb = w.shape[0] // block
    for weights, rnd in ((None, "mse"), (d, "wmse")):
        q = offsets.dequant(*offsets.offset_grid(w, bits, block, weights, rnd), bits, block)
        mm = offsets.dequant(*offsets.offset_grid(w, bits, block), bits, block)
        dd = np.ones(w.shape[0]) if weights is None else weights
        per_block = lambda a: (dd[:, None] * np.square(a - w)).reshape(kb, block, -1).sum(1)
        assert np.all(per_block(q) <= per_block(mm) * (1 + 1e-5) + 1e-12)
        assert _rel(w, q) < _rel(w, rounding.search_dequant(w, bits, block, False, weights))


def test_constant_blocks_are_exact():
    w = np.zeros((64, 3), np.float32)
    w[32:, 1] = 0.5
    w[:, 2] = -0.25
    for rnd in ("rtn", "mse"):
        np.testing.assert_allclose(offsets.dequant(*offsets.offset_grid(w, 4, 32, rounding=rnd), 4, 32), w, atol=1e-7)


def _model(k: int, ns: list[int], seed=0, make=_weight):
    """x -> one MatMul per width in ``ns`` (siblings reading one input), each output a graph output."""
    rng = np.random.default_rng(seed)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 5, k]))
    nodes, inits, outs, ws = [], [], [], []
    for i, n in enumerate(ns):
        w = make(k, n, seed + i)
        wv = ir.Value(name=f"W{i}", const_value=ir.tensor(w))
        y = ir.Value(name=f"y{i}", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 5, n]))
        nodes.append(ir.Node("", "MatMul", [x, wv], outputs=[y], name=f"mm{i}"))
        inits.append(wv)
        outs.append(y)
        ws.append(w)
    graph = ir.Graph([x], outs, nodes=nodes, initializers=inits, opset_imports={"": 17})
    return ir.Model(graph, ir_version=8), ws, rng.standard_normal((2, 5, k)).astype(np.float32)


def _run(model: ir.Model, feeds) -> list[np.ndarray]:
    sess = ort.InferenceSession(to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


@pytest.mark.parametrize("fp16", [False, True])
def test_emitted_node_computes_the_simulation_with_the_size_models_bytes(fp16):
    model, (w,), x = _model(128, [40])
    o = Option("nbits", 4, 32, True, rounding="mse", fp16_scales=fp16, offsets=True)
    assert o.key == "nbits4-b32-off-mse"
    out, log = emit(model, {"mm0": o})
    assert log["block_offsets"] == 1
    kinds = [n.op_type for n in out.graph]
    assert kinds.count("MatMulNBits") == 1 and kinds.count("MatMul") == 2 and kinds.count("Add") == 1
    (y,) = _run(out, {"x": x})
    np.testing.assert_allclose(y, x @ S.simulate(o, w), rtol=1e-5, atol=2e-5)
    assert [v.name for v in out.graph.outputs] == ["y0"]
    assert model_bytes(out) == S.option_bytes(o, w.shape)
    assert model_bytes(model) == w.nbytes  # the input model is not touched


def test_emitted_q4_1_weight_is_exact_at_accuracy_level_0():
    """Exact with float32 offsets; float16 ones round ``min + 8 step`` by at most 2^-12 of itself (~0.1 % of a step)."""
    model, (w,), x = _model(128, [40], make=_q4_1)
    for fp16, tol in ((False, 1e-6), (True, 2e-4)):
        out, _ = emit(model, {"mm0": Option("nbits", 4, 32, True, fp16_scales=fp16, offsets=True)})
        (y,) = _run(out, {"x": x})
        assert _rel(x @ w, y) < tol
    # ORT's own 4-bit formats on the same bytes or more: ~100x the error
    rtn, _ = emit(model, {"mm0": Option("nbits", 4, 32, False, rounding="mse")})
    assert _rel(x @ w, _run(rtn, {"x": x})[0]) > 0.01


def test_accuracy_level_4_quantizes_only_the_centred_codes_input():
    model, (w,), x = _model(128, [40])
    o = Option("nbits", 4, 32, True, 4, offsets=True)
    out, _ = emit(model, {"mm0": o})
    (y,) = _run(out, {"x": x})
    centred = S.offset_dequant(w, o, centred_only=True)
    offs = S.simulate(o, w) - centred
    np.testing.assert_allclose(y, S.block_int8_activation(x, 32) @ centred + x @ offs, rtol=1e-4, atol=1e-4)


def test_packed_siblings_carry_their_offsets_and_share_the_block_sums():
    model, ws, x = _model(64, [32, 16, 16])
    plan = {f"mm{i}": Option("nbits", 4, 32, True, rounding="mse", fp16_scales=True, offsets=True) for i in range(3)}
    plan_plain = {"mm2": Option("nbits", 4, 32, True, fp16_scales=True)}  # no offsets: not packed with them
    out, log = emit(model, {**plan, **plan_plain})
    assert log["packed_siblings"]["groups"] == 1 and log["packed_siblings"]["nodes"] == 2 and log["block_offsets"] == 1
    kinds = [n.op_type for n in out.graph]
    assert kinds.count("MatMulNBits") == 2 and kinds.count("Split") == 1 and kinds.count("Add") == 1
    got = _run(out, {"x": x})
    for i, (y, w) in enumerate(zip(got, ws)):
        np.testing.assert_allclose(y, x @ S.simulate({**plan, **plan_plain}[f"mm{i}"], w), rtol=1e-5, atol=2e-5)
    out_all, log_all = emit(model, plan)
    assert log_all["packed_siblings"]["nodes"] == 3 and log_all["block_offsets"] == 1
    assert [n.op_type for n in out_all.graph].count("MatMul") == 2  # one block-sum MatMul + one offsets MatMul


def test_options_offer_offsets_only_where_the_block_divides_k():
    from edgeprune.passes.bits.config import BitAllocationConfig
    from edgeprune.passes.bits.units import _mm_options, _offsets_fit

    c = BitAllocationConfig(size_budget_bytes=1000, block_offsets=True, mse_rounding="wmse", block_size=(32, 128))
    opts = _mm_options(c, {"nbits", "int8-dynamic"})
    keys = [o.key for o in opts if o.offsets]
    assert keys == ["nbits4-b32-off-wmse", "nbits4-b128-off-wmse"]
    assert [o.key for o in _offsets_fit(opts, np.zeros((96, 8), np.float32)) if o.offsets] == ["nbits4-b32-off-wmse"]


def test_the_pass_offers_them_when_asked_and_writes_the_bytes_it_predicts():
    from edgeprune.passes.bits.bits_pass import BitAllocationConfig, BitAllocationPass

    from test_bit_allocation import _ctx, _run as _run_one
    from tiny_models import D, T, two_layer_matmul

    x = {"x": np.random.default_rng(1).standard_normal((1, T, D)).astype(np.float32)}
    model = two_layer_matmul()
    result = BitAllocationPass(BitAllocationConfig(mode="uniform", bits=4, block_size=32, block_offsets=True), _ctx(model))(model)
    assert [r["format"] for r in result.records] == ["nbits4-b32-off"] * 2
    # the block-sum graph's scalars are counted per node (errs high) and written once per K and block
    assert model_bytes(model) == result.summary["unit_bytes"] + result.summary["other_bytes"] - S.OFFSET_GRAPH_BYTES
    ops = [n.op_type for n in model.graph]
    assert ops.count("MatMulNBits") == 2 and ops.count("Add") == 2
    src = two_layer_matmul().graph.initializers
    a, b = (S.simulate(Option("nbits", 4, 32, True, fp16_scales=True, offsets=True), src[n].const_value.numpy()) for n in "AB")
    np.testing.assert_allclose(_run_one(model, x), np.maximum(x["x"] @ a, 0) @ b, rtol=1e-4, atol=1e-3)
    auto = two_layer_matmul()
    cfg = BitAllocationConfig(avg_bits=5.2, bit_options=(4,), block_size=32, dynamic_int8=False, output_checks=0,
                              accuracy_levels=(0,), no_slower=False, block_offsets=True)
    result = BitAllocationPass(cfg, _ctx(auto))(auto)
    for r in result.records:
        # no zero points (D columns x 2 blocks x 4 bits = D bytes), a float16 offset per block (D x 2 x 2 bytes)
        assert r["options"]["nbits4-b32-off"]["bytes"] == r["options"]["nbits4-b32-asym"]["bytes"] - D + 4 * D + S.OFFSET_GRAPH_BYTES


def test_offsets_between_packed_qkv_and_the_attention_keep_prefill_and_decode(tmp_path, monkeypatch):
    """q/k/v with offsets are packed into one MatMulNBits whose corrected output is GroupQueryAttention's packed query:
    a prefill and a decode step give the logits and cache of the same plan emitted with q/k/v apart."""
    from test_pack import _decode_steps
    from tiny_models import genai_style_decoder

    from edgeprune.model_io import load_model
    from edgeprune.passes.bits import emit as emit_mod

    model = load_model(genai_style_decoder(tmp_path, packed=False))
    plan = {f"{x}_proj": Option("nbits", 4, 32, True, 4, offsets=True) for x in "qkv"}
    new, log = emit_mod.emit(model, plan)
    gqa = next(n for n in new.graph if n.op_type == "GroupQueryAttention")
    assert log["packed_siblings"]["into_attention"] == 1 and log["block_offsets"] == 1
    assert gqa.inputs[0].producer().op_type == "Add" and gqa.inputs[1] is None
    monkeypatch.setattr(emit_mod, "pack_siblings", lambda *a, **k: {"groups": 0, "nodes": 0})
    apart, log_apart = emit_mod.emit(model, plan)
    assert log_apart["block_offsets"] == 3
    for want, got in zip(_decode_steps(apart), _decode_steps(new), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("opset", [11, 12, 13])
def test_older_opsets_get_a_model_ort_loads(opset):
    """Range exists from opset 11; the block matrix's column is a Reshape (Unsqueeze takes its axes as an input
    only from opset 13)."""
    model, (w,), x = _model(64, [24])
    model.opset_imports[""] = opset
    o = Option("nbits", 4, 32, True, offsets=True)
    out, log = emit(model, {"mm0": o})
    assert log["block_offsets"] == 1 and out.opset_imports[""] == opset
    np.testing.assert_allclose(_run(out, {"x": x})[0], x @ S.simulate(o, w), rtol=1e-5, atol=2e-5)


def test_below_opset_11_they_are_not_offered():
    from edgeprune.passes.bits.bits_pass import BitAllocationConfig, BitAllocationPass

    from test_bit_allocation import _ctx
    from tiny_models import two_layer_matmul

    model = two_layer_matmul()
    model.opset_imports[""] = 10
    result = BitAllocationPass(BitAllocationConfig(mode="uniform", bits=4, block_size=32, block_offsets=True), _ctx(model))(model)
    assert [r["format"] for r in result.records] == ["nbits4-b32-asym"] * 2
    assert "block offsets need opset 11 (their block sums use Range); this model has 10: not offered" in result.summary["notes"]


def test_siblings_whose_offsets_float16_cannot_hold_pack_apart():
    """add_corrections stores one node's offsets all in float16 or all in float32: a sibling with an offset beyond
    float16's range is not packed with one whose offsets fit, so every node's bytes are the size model's."""
    model, ws, x = _model(64, [16, 16])
    big = ws[1].copy()
    big[:32, 0] = 1e5 + np.arange(32, dtype=np.float32)  # a block far off zero: its offset overflows float16
    model.graph.initializers["W1"].const_value = ir.tensor(big)
    o = Option("nbits", 4, 32, True, fp16_scales=True, offsets=True)
    out, log = emit(model, {"mm0": o, "mm1": o})
    assert log["packed_siblings"]["groups"] == 0 and log["block_offsets"] == 2
    y0, y1 = _run(out, {"x": x})
    np.testing.assert_allclose(y0, x @ S.simulate(o, ws[0]), rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(y1, x @ S.simulate(o, big), rtol=1e-5, atol=0.5)
    dtypes = sorted(v.const_value.dtype.name for k, v in out.graph.initializers.items() if k.endswith("_offsets"))
    assert dtypes == ["FLOAT", "FLOAT16"]


def test_block_sums_are_timed_once_per_shape_and_charged_once_per_input(tmp_path, monkeypatch):
    """The microbenchmarks time a block-offset node with its own block sums and the block sums alone: the node's
    cost is the difference, and the knapsack charges the sums once per input and block (a shared cost), as the
    graph computes them once for every node reading that input."""
    from test_bit_allocation import _ctx
    from tiny_models import two_layer_matmul

    from edgeprune.analysis import analyze
    from edgeprune.passes.bits import knapsack, latency, microbench
    from edgeprune.passes.bits.config import BitAllocationConfig
    from edgeprune.passes.bits.units import build, formats_for

    fixed = {"overhead": 0.01, "dql": 0.02, "bsum32": 0.03, "float": 0.30, "nbits4-b32-asym": 0.15, "nbits4-b32-off": 0.20}
    timed = []
    monkeypatch.setenv("EDGEPRUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(microbench, "_time_group", lambda models, target, threads: timed.append(sorted(models)) or
                        {k: fixed[k] for k in models})
    model = two_layer_matmul()
    c = BitAllocationConfig(latency_budget_ratio=0.9, block_size=32, accuracy_levels=(0,), block_offsets=True,
                            bit_options=(4,), dynamic_int8=False)
    units, _ = build(model, analyze(model), c, formats_for(None, c)[0], [])
    table = microbench.unit_latencies(units, "cpu", tokens=8)
    assert timed == [sorted(fixed)]  # both layers are 64x64: one shape, the block sums timed beside its formats
    inputs = [u.parts[0].input for u in units]
    for u in units:
        assert table[(u.parts[0].node, "nbits4-b32-off")] == pytest.approx(0.20 - 0.01 - 0.02)
        assert table[(u.parts[0].node, "nbits4-b32-asym")] == pytest.approx(0.15 - 0.01)
    assert [table[("bsum32", i)] for i in inputs] == [pytest.approx(0.02)] * 2
    rows = [[knapsack.Item(0.0, 1.0)] * len(u.combos()) for u in units]
    monkeypatch.setattr(microbench, "fresh_latencies", lambda *a, **k: (table, 1.0, 0.5, "timed now"))
    _, shared, _ = latency.with_latency(model, units, rows, c, _ctx(model))
    off = [[i for i, cb in enumerate(u.combos()) if cb[0].offsets] for u in units]
    assert sorted((s.latency, s.members) for s in shared) == sorted(
        (pytest.approx(0.02), tuple((ui, oi) for oi in off[ui])) for ui in range(2))
