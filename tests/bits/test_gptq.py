"""GPTQ rounding (edgeprune.passes.bits.gptq): beats round-to-nearest on its objective, on ORT's own grid."""

from __future__ import annotations

import numpy as np
import pytest

from edgeprune.passes.bits import gptq
from edgeprune.passes.bits import sensitivity as S


def _layer(k=256, n=96, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1500, k)) @ (np.eye(k) + 0.3 * rng.standard_normal((k, k)))
    x[:, :4] *= 15.0  # outlier input channels, as in transformer activations
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    return w, x.T @ x


@pytest.mark.parametrize("bits,block,sym", [(4, 32, False), (4, 128, True), (2, 64, False)])
def test_gptq_beats_round_to_nearest_on_the_same_grid(bits, block, sym):
    w, gram = _layer()
    scales, zeros = S.nbits_grid(w, bits, block, sym)
    codes = gptq.gptq_codes(w, gram, scales, zeros, bits, block)
    assert codes.max() <= (1 << bits) - 1
    q = gptq.dequant(codes, scales, zeros, w.shape[0], block)
    rtn = S.simulate(S.Option("nbits", bits, block, sym), w)
    # same grid: every GPTQ weight is a grid point of ORT's scales/zero points
    rows = np.arange(w.shape[0]) // block
    level = q / scales.T[rows] + zeros.T[rows].astype(np.float32)
    np.testing.assert_allclose(level, np.round(level), atol=1e-3)
    assert np.round(level).min() >= 0 and np.round(level).max() <= (1 << bits) - 1
    assert S.gram_rel_error(w, q, gram) < 0.75 * S.gram_rel_error(w, rtn, gram)
    # with an identity Hessian there is nothing to compensate: GPTQ is round-to-nearest
    q_id = gptq.dequant(gptq.gptq_codes(w, np.eye(w.shape[0]), scales, zeros, bits, block), scales, zeros, w.shape[0], block)
    np.testing.assert_allclose(q_id, rtn, atol=1e-6)


def test_pack_matches_orts_layout():
    w, _ = _layer(k=100, n=8)  # K not a multiple of the block: padded rows
    for bits in (2, 4, 8):
        codes, _, _ = S._nbits_quantize(w, bits, 32, False)
        packed = np.zeros((8, 4, 32 * bits // 8), dtype=np.uint8)
        S._nbits_kernel(bits)(packed, np.pad(w, ((0, 28), (0, 0))), np.zeros((8, 4), np.float32),
                              np.zeros((8, -(-4 * bits // 8)), np.uint8), 32, 8, 100, False)
        np.testing.assert_array_equal(gptq.pack(codes.reshape(8, -1), bits, 32), packed)


def test_orts_gptq_is_round_to_nearest():
    """Why edgeprune carries its own GPTQ: ORT 1.32's propagates no error (it reads U's column, not row)."""
    from onnxruntime.quantization.neural_compressor.weight_only import gptq as ort_gptq

    w, gram = _layer()
    theirs = ort_gptq(w.copy(), gram.copy(), num_bits=4, group_size=32, scheme="asym")
    ours = gptq.dequant(gptq.gptq_codes(w, gram, *S.nbits_grid(w, 4, 32, False), 4, 32), *S.nbits_grid(w, 4, 32, False),
                        w.shape[0], 32)
    rtn = S.simulate(S.Option("nbits", 4, 32, False), w)
    e_theirs, e_ours, e_rtn = (S.gram_rel_error(w, q.astype(np.float32), gram) for q in (theirs, ours, rtn))
    assert abs(e_theirs - e_rtn) < 0.02 * e_rtn  # no better than rounding to nearest
    assert e_ours < 0.75 * e_theirs
