"""Searched MatMulNBits grids (edgeprune.passes.bits.rounding): never worse than ORT's round-to-nearest,
same format and bytes, emitted exactly as simulated (the lookup sharing a tied head's table included)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from edgeprune.model_io import model_bytes, to_proto
from edgeprune.passes.bits import gptq, rounding
from edgeprune.passes.bits import sensitivity as S
from edgeprune.passes.bits.emit import emit
from edgeprune.passes.bits.sensitivity import Option

from tiny_models import tied_embedding_head


def _weight(k=200, n=48, seed=0) -> np.ndarray:
    """Heavy-tailed columns with a few outliers, as in transformer weights; K=200 pads the last block."""
    rng = np.random.default_rng(seed)
    w = rng.standard_t(4, (k, n)) * 0.02
    w[rng.integers(0, k, 20), rng.integers(0, n, 20)] *= 6.0
    return w.astype(np.float32)


def _rel(w, q) -> float:
    return float(np.linalg.norm(q - w) / np.linalg.norm(w))


@pytest.mark.parametrize("bits,block,sym", [(4, 32, False), (4, 32, True), (4, 128, False), (2, 64, False), (2, 32, True),
                                            (8, 32, False)])
def test_search_is_never_worse_than_orts_round_to_nearest(bits, block, sym):
    w = _weight()
    codes, scales, zeros = rounding.search_grid(w, bits, block, sym)
    k_blocks = -(-w.shape[0] // block)
    assert codes.shape == (w.shape[1], k_blocks * block) and codes.dtype == np.uint8
    assert scales.shape == zeros.shape == (w.shape[1], k_blocks) and scales.dtype == np.float32
    assert codes.max() <= (1 << bits) - 1 and zeros.max() <= (1 << bits) - 1
    if sym:  # no zero points stored: MatMulNBits' default
        assert np.all(zeros == 1 << (bits - 1))
    q = gptq.dequant(codes, scales, zeros, w.shape[0], block)
    np.testing.assert_array_equal(q, rounding.search_dequant(w, bits, block, sym))
    rtn = S.nbits_dequant(w, bits, block, sym)
    # block by block, not only in total
    per_block = lambda a: np.square(np.pad(a - w, ((0, k_blocks * block - w.shape[0]), (0, 0)))).reshape(k_blocks, block, -1).sum(1)
    assert np.all(per_block(q) <= per_block(rtn) * (1 + 1e-6) + 1e-12)
    assert _rel(w, q) < 0.985 * _rel(w, rtn)  # 3-19 % lower here; 14 % on SmolLM2's 4-bit b32 asym
    # padding rows decode to 0
    if k_blocks * block > w.shape[0]:
        pad = codes[:, w.shape[0]:].astype(np.int16) - zeros[:, -1:].astype(np.int16)
        assert not pad.any()


def test_a_weight_already_on_a_4bit_grid_comes_back_almost_exactly():
    """Blocks on an integer-zero-point 4-bit grid whose codes do not reach 0 and 15: ORT's min/max grid
    misses them (~5 % error), the search finds them again."""
    rng = np.random.default_rng(3)
    k, n, block = 128, 64, 32
    kb = k // block
    scale = rng.uniform(0.005, 0.02, (n, kb)).astype(np.float32)
    zero = rng.integers(4, 12, (n, kb))
    codes = rng.integers(2, 14, (n, kb, block))
    codes[:, :, 0], codes[:, :, 1] = 2, 13  # each block spans codes 2..13
    w = np.ascontiguousarray((((codes - zero[..., None]) * scale[..., None]).reshape(n, k).T).astype(np.float32))
    rtn, q = S.nbits_dequant(w, 4, block, False), rounding.search_dequant(w, 4, block, False)
    assert _rel(w, rtn) > 0.03
    assert _rel(w, q) < 0.02 * _rel(w, rtn)
    # a Q4_1-style grid (float minimum, as in llama.cpp files): not representable exactly, still far better
    w1 = np.ascontiguousarray(((codes * scale[..., None] + rng.uniform(-0.2, -0.05, (n, kb, 1)) * 0.5).reshape(n, k).T)
                              .astype(np.float32))
    assert _rel(w1, rounding.search_dequant(w1, 4, block, False)) < 0.8 * _rel(w1, S.nbits_dequant(w1, 4, block, False))


def test_row_weights_move_the_error_to_rows_that_count_less():
    w = _weight(k=128)
    d = np.ones(128)
    d[:16] = 100.0  # the first rows of every first block matter most
    q_w = rounding.search_dequant(w, 4, 32, False, weights=d)
    q_u = rounding.search_dequant(w, 4, 32, False)
    err = lambda q: float((d[:, None] * np.square(q - w)).sum())
    assert err(q_w) < err(q_u)
    assert err(q_w) <= err(S.nbits_dequant(w, 4, 32, False))


def test_zero_point_packing_is_orts():
    w = _weight(k=224)  # 7 blocks of 32: an odd count leaves a half byte per column
    for bits in (2, 4):
        _, _, zero = S._nbits_quantize(w, bits, 32, False)
        k_blocks, n = 7, w.shape[1]
        packed = np.zeros((n, k_blocks, 32 * bits // 8), np.uint8)
        zp = np.zeros((n, -(-k_blocks * bits // 8)), np.uint8)
        S._nbits_kernel(bits)(packed, w, np.zeros((n, k_blocks), np.float32), zp, 32, n, 224, False)
        np.testing.assert_array_equal(rounding.pack_zero_points(zero, bits), zp)


def test_all_zero_and_constant_blocks():
    w = np.zeros((64, 4), np.float32)
    w[32:, 1] = 0.5
    w[32:, 2] = -0.25
    for sym in (False, True):
        q = rounding.search_dequant(w, 4, 32, sym)
        np.testing.assert_allclose(q, w, atol=1e-7)


K, N, V = 72, 40, 30


def _model(k=K, n=N, seed=0) -> tuple[ir.Model, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = _weight(k, n, seed)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 7, k]))
    wv = ir.Value(name="W", const_value=ir.tensor(w))
    y = ir.Value(name="y", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 7, n]))
    graph = ir.Graph([x], [y], nodes=[ir.Node("", "MatMul", [x, wv], outputs=[y], name="mm")], initializers=[wv],
                     opset_imports={"": 17})
    return ir.Model(graph, ir_version=8), rng.standard_normal((2, 7, k)).astype(np.float32)


def _run(model: ir.Model, feeds) -> list[np.ndarray]:
    sess = ort.InferenceSession(to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


@pytest.mark.parametrize("bits,block,sym", [(4, 32, False), (4, 16, True), (2, 32, False), (2, 16, True), (4, 64, False)])
def test_emitted_node_computes_the_simulation(bits, block, sym):
    model, x = _model()
    w = model.graph.initializers["W"].const_value.numpy()
    o = Option("nbits", bits, block, sym, rounding="mse")
    assert o.key == f"nbits{bits}-b{block}-{'sym' if sym else 'asym'}-mse"
    out, log = emit(model, {"mm": o})
    assert log["searched_grids"] == 1
    assert [n.op_type for n in out.graph] == ["MatMulNBits"]
    (y,) = _run(out, {"x": x})
    q = S.simulate(o, w)
    np.testing.assert_allclose(y, x @ q, rtol=1e-5, atol=1e-5)
    # same format and bytes as ORT's own, and as the size model says
    rtn, _ = emit(model, {"mm": Option("nbits", bits, block, sym)})
    shapes = lambda m: sorted((v.const_value.dtype, tuple(v.const_value.shape)) for v in m.graph.initializers.values())
    assert shapes(out) == shapes(rtn)
    assert model_bytes(out) == model_bytes(rtn) == S.option_bytes(o, w.shape)
    assert _rel(w, q) < _rel(w, S.simulate(Option("nbits", bits, block, sym), w))
    assert model_bytes(model) == w.nbytes  # the input model is not touched


def test_emitted_node_at_accuracy_level_4():
    model, x = _model(k=128)
    w = model.graph.initializers["W"].const_value.numpy()
    o = Option("nbits", 4, 32, False, 4, rounding="mse")
    out, _ = emit(model, {"mm": o})
    (y,) = _run(out, {"x": x})
    np.testing.assert_allclose(y, S.block_int8_activation(x, 32) @ S.simulate(o, w), rtol=1e-4, atol=1e-4)


def _tied_toy(seed=0) -> ir.Model:
    return tied_embedding_head((np.random.default_rng(seed).standard_t(4, (V, 64)) * 0.05).astype(np.float32))


@pytest.mark.parametrize("bits,sym", [(4, False), (4, True), (2, False)])
def test_tied_lookup_reads_the_searched_table(bits, sym):
    model = _tied_toy()
    e = model.graph.initializers["E"].const_value.numpy()
    plan = {"head": Option("nbits", bits, 32, sym, rounding="mse"), "emb": Option("gather-tied", bits, 32, sym, rounding="mse")}
    out, log = emit(model, plan)
    assert log["tied_lookups"] == 1 and log["searched_grids"] == 1
    ids = {"ids": np.random.default_rng(1).integers(0, V, (2, 5))}
    y, h = _run(out, ids)
    e_sim = S.simulate(plan["emb"], e)
    np.testing.assert_array_equal(h, e_sim[ids["ids"]])
    np.testing.assert_allclose(y, h @ S.simulate(plan["head"], np.ascontiguousarray(e.T)), rtol=1e-5, atol=1e-5)
    assert _rel(e, e_sim) < _rel(e, S.simulate(Option("gather-tied", bits, 32, sym), e))
    assert model_bytes(out) == S.option_bytes(plan["head"], e.T.shape) + S.option_bytes(plan["emb"], e.shape)


@pytest.mark.parametrize("bits,sym", [(4, False), (2, True)])
def test_wmse_emission_weighs_by_the_grams_diagonal(bits, sym):
    model, x = _model(k=96)
    w = model.graph.initializers["W"].const_value.numpy()
    rows = np.random.default_rng(5).standard_normal((400, 96)) * np.r_[np.full(6, 10.0), np.ones(90)]
    gram = rows.T @ rows
    o = Option("nbits", bits, 32, sym, rounding="wmse")
    q = S.simulate(o, w, gram=gram)
    np.testing.assert_array_equal(q, S.simulate(o, w, gram=np.diag(gram)))  # the diagonal is all it reads
    for g in (gram, np.diag(gram)):
        out, log = emit(model, {"mm": o}, grams={"mm": g})
        assert log["searched_grids"] == 1
        (y,) = _run(out, {"x": x})
        np.testing.assert_allclose(y, x @ q, rtol=1e-5, atol=1e-5)
    e = lambda r: S.gram_rel_error(w, S.simulate(Option("nbits", bits, 32, sym, rounding=r), w, gram=gram), gram)
    assert e("wmse") < e("mse") and e("wmse") < e("rtn")
    with pytest.raises(ValueError, match="Gram"):
        emit(model, {"mm": o})
    with pytest.raises(ValueError, match="Gram"):
        S.simulate(o, w)
