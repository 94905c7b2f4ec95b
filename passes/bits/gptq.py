"""GPTQ rounding on ORT's own MatMulNBits grid.

Round-to-nearest rounds every weight on its own; GPTQ (Frantar et al., 2022) rounds the K rows
of a [K, N] weight one at a time and pushes each row's rounding error onto the rows not yet
rounded, weighted by the inverse Hessian of the layer's output error, ``H = X^T X`` (the Gram
of the node's input, which the statistics pass already collects).  The output error
``||X (W - Q)||`` drops well below round-to-nearest's at the same bits.

Why it is written here: ORT 1.32 ships GPTQ (``quantization.neural_compressor.weight_only.gptq``)
but its update reads a column of the upper Cholesky factor where the algorithm needs a row, so
no error is ever propagated and it returns round-to-nearest (see
``tests/bits/test_gptq.py::test_orts_gptq_is_round_to_nearest``).  The grid is not ours: the scales
and zero points are those ORT's MatMulNBits quantizer computes for the same weight, so the
emitted node, its scales and its zero points come from ORT's tool and only the packed codes are
replaced (``edgeprune.passes.bits.emit``).
"""

from __future__ import annotations

import numpy as np

from edgeprune.passes.bits.memo import Memo

#: Dampening, as a fraction of the Hessian's mean diagonal (GPTQ's default), and the lazy-batch width.
DAMP = 0.01
LAZY_BLOCK = 128


_FACTORS = Memo()  # Gram -> (U, dead rows)


def hessian_factor(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(U, dead): the upper Cholesky factor of the dampened ``H^-1`` (``H^-1 = U^T U``), and zero-input rows.

    The nodes reading one input (q/k/v, gate/up) and every option of a node share it, so the last
    few are kept: the O(K^3) factorisation is paid once per input, not once per node and option.
    """
    return _FACTORS.get(lambda: _factor(gram), "hessian", np.ascontiguousarray(gram))


def _factor(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h = np.array(gram, dtype=np.float64, copy=True)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.diag_indices(h.shape[0])] += DAMP * float(np.mean(np.diag(h)))
    u = np.linalg.cholesky(np.linalg.inv(h)).T.astype(np.float32)
    return u, dead


def gptq_codes(w: np.ndarray, gram: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int, block: int) -> np.ndarray:
    """Codes [N, k_blocks * block] (uint8, unpacked; padding rows 0) of ``w`` [K, N] rounded by GPTQ.

    ``scales`` and ``zeros`` ([N, k_blocks]) are the grid: ``sensitivity.nbits_grid``, i.e. ORT's.
    """
    k, n = w.shape
    maxq = (1 << bits) - 1
    row_block = np.arange(k) // block
    scale_rows = np.ascontiguousarray(scales.T[row_block], dtype=np.float32)  # [K, N]: the scale of each weight
    zero_rows = np.ascontiguousarray(zeros.T[row_block], dtype=np.float32)
    u, dead = hessian_factor(gram)
    work = np.array(w, dtype=np.float32, copy=True)
    work[dead] = 0.0

    codes = np.zeros((k, n), dtype=np.float32)
    for i1 in range(0, k, LAZY_BLOCK):
        i2 = min(i1 + LAZY_BLOCK, k)
        w1 = work[i1:i2].copy()
        err1 = np.zeros_like(w1)
        for i in range(i2 - i1):
            r = i1 + i
            c = np.clip(np.round(w1[i] / scale_rows[r] + zero_rows[r]), 0, maxq)
            codes[r] = c
            e = (w1[i] - (c - zero_rows[r]) * scale_rows[r]) / u[r, r]
            w1[i:] -= np.outer(u[r, r:i2], e)
            err1[i] = e
        work[i2:] -= u[i1:i2, i2:].T @ err1
    k_blocks = -(-k // block)
    out = np.zeros((n, k_blocks * block), dtype=np.uint8)
    out[:, :k] = codes.T.astype(np.uint8)
    return out


def dequant(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, k: int, block: int) -> np.ndarray:
    """[K, N] float32 weight that MatMulNBits computes with from unpacked ``codes`` and the grid."""
    n = codes.shape[0]
    c = codes.reshape(n, -1, block).astype(np.float32)
    deq = (c - zeros[..., None].astype(np.float32)) * scales[..., None].astype(np.float32)
    return np.ascontiguousarray(deq.reshape(n, -1)[:, :k].T)


def pack(codes: np.ndarray, bits: int, block: int) -> np.ndarray:
    """Unpacked codes [N, k_blocks * block] -> MatMulNBits' B [N, k_blocks, block * bits / 8], low bits first."""
    n = codes.shape[0]
    per = 8 // bits
    c = codes.reshape(n, -1, block // per, per).astype(np.uint16)
    shifts = (np.arange(per) * bits).astype(np.uint16)
    return (c << shifts).sum(axis=-1).astype(np.uint8)
