"""Quantization simulators match what ORT's tools emit; Gram error equals the direct error."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from edgeprune.passes.bits import sensitivity as S
from edgeprune.model_io import model_bytes, to_proto
from edgeprune.passes.bits.emit import emit
from edgeprune.passes.bits.sensitivity import KEEP, Option

from tiny_models import tied_embedding_head

K, N, V = 72, 40, 30  # K not a multiple of the block: exercises padding


def _toy(seed=0) -> ir.Model:
    """ids -> Gather(E) -> MatMul(W): one embedding and one linear, outputs y and h."""
    rng = np.random.default_rng(seed)
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([2, 5]))
    e = ir.Value(name="E", const_value=ir.tensor(rng.standard_normal((V, 64)).astype(np.float32)))
    w = ir.Value(name="W", const_value=ir.tensor(rng.standard_normal((64, N)).astype(np.float32)))
    h = ir.Value(name="h", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 5, 64]))
    y = ir.Value(name="y", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 5, N]))
    nodes = [ir.Node("", "Gather", [e, ids], outputs=[h], name="emb"), ir.Node("", "MatMul", [h, w], outputs=[y], name="mm")]
    graph = ir.Graph([ids], [y, h], nodes=nodes, initializers=[e, w], opset_imports={"": 17})
    return ir.Model(graph, ir_version=8)


def _run(model: ir.Model, feeds) -> list[np.ndarray]:
    sess = ort.InferenceSession(to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


IDS = {"ids": np.random.default_rng(1).integers(0, V, (2, 5))}


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("block", [16, 32])
def test_nbits_simulation_and_size_match_emitted_model(bits, sym, block):
    model = _toy()
    w = model.graph.initializers["W"].const_value.numpy()
    e = model.graph.initializers["E"].const_value.numpy()
    plan = {"mm": Option("nbits", bits, block, sym)}
    if bits == 4:
        plan["emb"] = Option("gather-nbits", 4, block, sym)
    out, log = emit(model, plan)
    assert {n.op_type for n in out.graph} == ({"GatherBlockQuantized", "MatMulNBits"} if bits == 4 else {"Gather", "MatMulNBits"})
    y, h = _run(out, IDS)
    e_sim = S.simulate(plan["emb"], e) if bits == 4 else e
    np.testing.assert_array_equal(h, e_sim[IDS["ids"]])
    np.testing.assert_allclose(y, h @ S.simulate(plan["mm"], w), rtol=1e-4, atol=1e-4)
    expected = S.option_bytes(plan["mm"], w.shape) + (S.option_bytes(plan["emb"], e.shape) if bits == 4 else e.nbytes)
    assert model_bytes(out) == expected
    assert model_bytes(model) == w.nbytes + e.nbytes  # the input model is not touched


def test_padding_of_k_not_multiple_of_block():
    w = np.random.default_rng(2).standard_normal((K, N)).astype(np.float32)
    q = S.nbits_dequant(w, 4, 32, False)
    assert q.shape == w.shape
    assert 0 < np.abs(q - w).max() < 0.5 * np.abs(w).max()


def test_dynamic_int8_simulation_matches_quantize_dynamic():
    model = _toy()
    w = model.graph.initializers["W"].const_value.numpy()
    e = model.graph.initializers["E"].const_value.numpy()
    plan = {"mm": Option("int8-dynamic", 8), "emb": Option("int8-gather", 8)}
    out, _ = emit(model, plan)
    ops = {n.op_type for n in out.graph}
    assert "MatMulInteger" in ops and "DequantizeLinear" in ops
    inits = {k: v.const_value.numpy() for k, v in out.graph.initializers.items()}
    np.testing.assert_array_equal(inits["W_quantized"] * inits["W_scale"], S.simulate(plan["mm"], w))
    y, h = _run(out, IDS)
    np.testing.assert_allclose(h, S.simulate(plan["emb"], e)[IDS["ids"]], atol=1e-6)
    assert model_bytes(out) == S.option_bytes(plan["mm"], w.shape) + S.option_bytes(plan["emb"], e.shape)


def test_gram_error_equals_direct_error():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((500, K)) * rng.uniform(0.1, 5, K)
    w = rng.standard_normal((K, N)).astype(np.float32)
    q = S.nbits_dequant(w, 4, 32, True)
    direct = np.linalg.norm(x @ w - x @ q) / np.linalg.norm(x @ w)
    assert S.gram_rel_error(w, q, x.T @ x) == pytest.approx(direct, rel=1e-9)
    fast = S.gram_rel_errors(w, [q, w], x.T @ x)  # float32 path
    assert fast[0] == pytest.approx(direct, rel=1e-4) and fast[1] == 0.0
    counts = rng.integers(0, 5, K).astype(float)
    rows = np.repeat(np.arange(K), counts.astype(int))
    direct_rows = np.linalg.norm((q - w)[rows]) / np.linalg.norm(w[rows])
    assert S.row_weighted_rel_error(w, q, counts) == pytest.approx(direct_rows, rel=1e-6)
    assert S.gram_rel_error(w, w, x.T @ x) == 0.0


def test_dynamic_error_model_is_close_to_measured():
    """The activation-noise model of dynamic int8 is within a factor of two of the real ORT error."""
    rng = np.random.default_rng(4)
    k, n = 64, 48
    x = (rng.standard_normal((1, 256, k)) * np.r_[np.full(4, 8.0), np.ones(k - 4)]).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    xi = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 256, k]))
    wv = ir.Value(name="w", const_value=ir.tensor(w))
    y = ir.Value(name="y", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 256, n]))
    model = ir.Model(ir.Graph([xi], [y], nodes=[ir.Node("", "MatMul", [xi, wv], outputs=[y], name="mm")],
                              initializers=[wv], opset_imports={"": 17}), ir_version=8)
    out, _ = emit(model, {"mm": Option("int8-dynamic", 8)})
    measured = np.linalg.norm(_run(out, {"x": x})[0] - x @ w) / np.linalg.norm(x @ w)
    x2 = x.reshape(-1, k).astype(np.float64)
    est = S.dynamic_rel_error(w, S.simulate(Option("int8-dynamic", 8), w), x2.T @ x2, float(np.abs(x).max()), 256)
    assert measured / 2 < est < measured * 2
    # and it is much larger than the weight-only part: activations dominate with outlier channels
    assert est > 2 * S.gram_rel_error(w, S.simulate(Option("int8-dynamic", 8), w), x2.T @ x2)


def test_sizes_of_keep_and_keys():
    assert S.option_bytes(Option(KEEP), (10, 20)) == 800
    assert Option("nbits", 4, 32, False).key == "nbits4-b32-asym"
    assert Option(KEEP).key == "float"
    # 4-bit asym block 32 on K=64: 2 blocks: 16 B data + 4 B scale per block + 1 B of packed zero points per column
    assert S.option_bytes(Option("nbits", 4, 32, False), (64, 1)) == 2 * 16 + 2 * 4 + 1


def test_proxies():
    w = np.zeros(1000)
    w[:5] = 100.0
    assert S.outlier_share(w) == pytest.approx(0.005)
    assert S.outlier_share(np.ones(10)) == 0.0
    a = np.random.default_rng(0).standard_normal((4, 8))
    assert S.cosine(a, a) == pytest.approx(1.0)
    assert S.cosine(a, -a) == pytest.approx(-1.0)


def _tied_toy(seed=0) -> ir.Model:
    """ids -> Gather(E) -> h -> MatMul(h, Transpose(E)) -> logits: a tied embedding and LM head."""
    return tied_embedding_head(np.random.default_rng(seed).standard_normal((V, 64)).astype(np.float32))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_tied_lookup_reads_the_heads_packed_table(bits, sym):
    model = _tied_toy()
    e = model.graph.initializers["E"].const_value.numpy()
    plan = {"head": Option("nbits", bits, 32, sym), "emb": Option("gather-tied", bits, 32, sym)}
    out, log = emit(model, plan)
    assert log["tied_lookups"] == 1
    assert sorted(n.op_type for n in out.graph) == ["GatherBlockQuantized", "MatMulNBits", "Reshape"]
    gbq = next(n for n in out.graph if n.op_type == "GatherBlockQuantized")
    mnb = next(n for n in out.graph if n.op_type == "MatMulNBits")
    assert gbq.inputs[0] is mnb.inputs[1].producer().inputs[0]  # one packed table ...
    assert gbq.inputs[2] is mnb.inputs[2]  # ... one set of scales
    y, h = _run(out, IDS)
    e_sim = S.simulate(plan["emb"], e)
    np.testing.assert_array_equal(h, e_sim[IDS["ids"]])
    np.testing.assert_allclose(y, h @ e_sim.T, rtol=1e-4, atol=1e-4)
    # The table is stored once: the head's format, and nothing for the lookup.
    assert S.option_bytes(plan["emb"], e.shape) == 3 * 8  # the Reshape's shape
    assert model_bytes(out) == S.option_bytes(plan["head"], e.T.shape) + S.option_bytes(plan["emb"], e.shape)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_emission_matches_its_simulation(bits, sym):
    """ORT's tool writes the MatMulNBits node and grid; the codes are GPTQ's, exactly as simulated."""
    model = _toy()
    e = model.graph.initializers["E"].const_value.numpy()
    w = model.graph.initializers["W"].const_value.numpy()
    h = np.concatenate([e, e[:7] * 3.0]).astype(np.float64)  # uneven rows: a non-trivial Gram
    gram = h.T @ h
    plan = {"mm": Option("gptq", bits, 32, sym)}
    out, log = emit(model, plan, grams={"mm": gram})
    assert log["gptq_nodes"] == 1
    assert sorted(n.op_type for n in out.graph) == ["Gather", "MatMulNBits"]
    assert model_bytes(out) == e.nbytes + S.option_bytes(plan["mm"], w.shape)
    q = S.simulate(plan["mm"], w, gram=gram)
    y, hh = _run(out, IDS)
    np.testing.assert_allclose(y, hh @ q, rtol=1e-4, atol=1e-4)
    assert S.gram_rel_error(w, q, gram) < S.gram_rel_error(w, S.simulate(Option("nbits", bits, 32, sym), w), gram)
    with pytest.raises(ValueError, match="Gram"):
        emit(model, plan)


@pytest.mark.parametrize("bits", [8, 16])
def test_static_qdq_emission_matches_simulated_weights(bits):
    """NPU-style static QDQ: int8 weights per output channel as simulated, activations calibrated."""
    model = _toy()
    w = model.graph.initializers["W"].const_value.numpy()
    rng = np.random.default_rng(4)
    rows = [{"ids": rng.integers(0, V, (2, 5))} for _ in range(6)]
    plan = {"mm": Option("qdq", bits)}
    out, log = emit(model, plan, calibration=rows)
    assert [s["tool"] for s in log["steps"]] == ["quantize_static"]
    ops = sorted(n.op_type for n in out.graph)
    assert ops.count("DequantizeLinear") == 3 and "MatMul" in ops  # weight, input and output rounded
    deq = next(n for n in out.graph if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None)
    qw, scale = (v.const_value.numpy() for v in deq.inputs[:2])
    np.testing.assert_allclose(qw.astype(np.float32) * scale, S.simulate(plan["mm"], w), rtol=1e-6, atol=1e-7)
    y, h = _run(out, IDS)
    rel = np.linalg.norm(y - h @ w) / np.linalg.norm(h @ w)
    assert rel < (0.02 if bits == 8 else 0.01)
    assert model_bytes(out) == model_bytes(model) - w.nbytes + S.option_bytes(plan["mm"], w.shape)
    with pytest.raises(ValueError, match="calibration rows"):
        emit(model, plan)


@pytest.mark.parametrize("kind, bits, sym, rounding", [("nbits", 4, False, "rtn"), ("nbits", 8, True, "rtn"), ("nbits", 2, False, "rtn"),
                                                     ("nbits", 4, False, "wmse"), ("gptq", 4, False, "rtn")])
def test_fp16_scales_are_what_the_kernel_computes_with_and_what_the_file_holds(kind, bits, sym, rounding):
    """Scales stored as float16 behind a Cast: ORT's outputs equal the simulation with the scales rounded through
    float16 (and differ from the float32-scale model's), and the bytes are the predicted ones."""
    model = _toy()
    e = model.graph.initializers["E"].const_value.numpy()
    w = model.graph.initializers["W"].const_value.numpy()
    gram = (e.T @ e).astype(np.float64)
    plan = {"mm": Option(kind, bits, 32, sym, rounding=rounding, fp16_scales=True)}
    if bits == 4:
        plan["emb"] = Option("gather-nbits", 4, 32, sym, fp16_scales=True)
    out, log = emit(model, plan, grams={"mm": gram})
    assert log["fp16_scales"] == {"converted": len(plan), "kept_float32": 0}
    assert sorted(n.op_type for n in out.graph).count("Cast") == len(plan)
    y, h = _run(out, IDS)
    e_sim = S.simulate(plan["emb"], e) if bits == 4 else e
    np.testing.assert_array_equal(h, e_sim[IDS["ids"]])
    np.testing.assert_allclose(y, h @ S.simulate(plan["mm"], w, gram=gram), rtol=1e-5, atol=1e-5)
    fp32 = {k: dataclasses.replace(o, fp16_scales=False) for k, o in plan.items()}
    y32 = _run(emit(model, fp32, grams={"mm": gram})[0], IDS)[0]
    assert not np.array_equal(y, y32)  # the float16 rounding is real, and simulated
    expected = S.option_bytes(plan["mm"], w.shape) + (S.option_bytes(plan["emb"], e.shape) if bits == 4 else e.nbytes)
    assert model_bytes(out) == expected
    k_blocks = -(-w.shape[0] // 32)
    saved = {k: S.option_bytes(fp32[k], shape) - S.option_bytes(plan[k], shape) for k, shape in (("mm", w.shape), ("emb", e.shape)) if k in plan}
    assert saved == {"mm": 2 * N * k_blocks, **({"emb": 2 * V * 2} if bits == 4 else {})}  # 2 bytes per block scale


def test_tied_lookup_shares_its_heads_fp16_scales():
    model = _tied_toy()
    e = model.graph.initializers["E"].const_value.numpy()
    plan = {"head": Option("nbits", 4, 32, False, fp16_scales=True), "emb": Option("gather-tied", 4, 32, False, fp16_scales=True)}
    out, log = emit(model, plan)
    assert log["fp16_scales"] == {"converted": 1, "kept_float32": 0}
    gbq = next(n for n in out.graph if n.op_type == "GatherBlockQuantized")
    mnb = next(n for n in out.graph if n.op_type == "MatMulNBits")
    assert gbq.inputs[2] is mnb.inputs[2] and mnb.inputs[2].producer().op_type == "Cast"
    y, h = _run(out, IDS)
    e_sim = S.simulate(plan["emb"], e)
    np.testing.assert_array_equal(h, e_sim[IDS["ids"]])
    np.testing.assert_allclose(y, h @ S.simulate(plan["head"], e.T).astype(np.float32), rtol=1e-5, atol=1e-5)
    assert model_bytes(out) == S.option_bytes(plan["head"], e.T.shape) + S.option_bytes(plan["emb"], e.shape)


def test_scales_float16_cannot_hold_stay_float32():
    """A weight so small its block scales would be float16 subnormals keeps float32 scales, in the file and the simulation."""
    model = _toy()
    w = model.graph.initializers["W"].const_value.numpy() * np.float32(1e-5)
    model.graph.initializers["W"].const_value = ir.tensor(w)
    plan = {"mm": Option("nbits", 4, 32, False, fp16_scales=True)}
    out, log = emit(model, plan)
    assert log["fp16_scales"] == {"converted": 0, "kept_float32": 1}
    np.testing.assert_array_equal(S.simulate(plan["mm"], w), S.simulate(Option("nbits", 4, 32, False), w))
    y, h = _run(out, IDS)
    np.testing.assert_allclose(y, h @ S.simulate(plan["mm"], w), rtol=1e-5, atol=1e-9)
