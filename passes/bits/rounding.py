"""Scale and zero-point search on MatMulNBits' own format: less weight error at the same bytes.

ORT's MatMulNBits quantizer takes each block's min/max (0 forced into the range), sets
``scale = (max - min) / (2^bits - 1)`` and an integer zero point, and rounds to nearest.  The
extremes of a block set its grid, so one outlier coarsens every other weight of the block: on
SmolLM2 (4-bit b32 asym) that leaves ~9 % relative weight error.

``search_grid`` keeps the format exactly (codes in ``[0, 2^bits - 1]``, one float scale and one
integer zero point in ``[0, 2^bits - 1]`` per block: the bytes ORT writes, and ORT's fast CPU
kernel; float zero points would run 7-18x slower there) and chooses each block's scale and zero
point to minimise ``sum_i d_i (w_i - s (c_i - z))^2`` along K.  Two weightings (``ROUNDINGS``):

- ``mse``: ``d = 1``, data-free;
- ``wmse``: ``d`` = each input feature's energy on the calibration rows (the diagonal of the node
  input's Gram, dampened like GPTQ's), so blocks spend their levels where the inputs are large.
  Unlike GPTQ it fits no cross-feature statistics, only a scale and zero point per block.

Search: for each candidate scale (ORT's range shrunk by ``ALPHAS``, at ORT's zero point or centred
on the block, and grown to ``2^bits - 2 .. SPANS`` steps, which finds a block already on a grid
whose codes do not reach both ends) the codes ``c`` are rounded once; then, codes fixed, the
least-squares scale for every integer zero point has a closed form from five sums per block
(``s(z) = sum d w (c - z) / sum d (c - z)^2``), so all 2^bits zero points cost O(1) each.  The best
(s, z) per block is refined by a few rounds of re-rounding + refit (each kept only if it lowers the
error) and finally compared with ORT's own codes, block by block, so the result is never worse
than ORT's round-to-nearest on the weighted error.  Vectorised over blocks: SmolLM2's 49152 x 576
head took 24 s at nice 19 on 2 cores at load ~4 (ORT's quantizer 2.7 s there), a 576 x 1536 linear
~0.5 s; the whole model added ~60-120 s to emit (each weight is searched once per process: cached).

Measured on SmolLM2-135M (its weights come from a Q4_1 GGUF, so they sit on a 4-bit grid with
float minima), every linear and the head at 4-bit b32 asym, WikiText-2 perplexity over the first
4096 tokens (float 19.50): ORT's rounding 25.84, ``mse`` 23.86, ``wmse`` calibrated on Tiny
Shakespeare 21.93 (on other WikiText-2 rows 21.34); at 4-bit b32 sym 25.00 / 26.85 / 22.09 (wmse
undampened).  Per layer (relative output error over ORT's, 211 linears, 2048 rows per domain): ``mse``
lowers every weight error (x0.83) but the output error only on average (x0.88, 9 layers worse in
each domain); ``wmse`` calibrated on Shakespeare gives x0.72 on held-back WikiText-2 rows (1 layer
worse, by 2.7 %), calibrated on WikiText-2 x0.72 on Shakespeare (none worse).

Symmetric blocks (no zero points stored: ``z = 2^(bits-1)``) search the scale alone, of either sign
(ORT's own symmetric scale is negative when the block's largest magnitude is negative).
"""

from __future__ import annotations

import numpy as np

from edgeprune.passes.bits.memo import Memo

#: Range shrink factors tried per block (1.0 = ORT's min/max range: scale = range / (2^bits - 1)).
# (Finer steps bought < 0.1 % of relative error on SmolLM2's weights at twice the time.)
ALPHAS = {2: (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3), 4: (1.0, 0.9, 0.8, 0.7, 0.6), 8: (1.0, 0.95, 0.9, 0.85)}
#: Range growth, centred window only: scale = range / m for m = 2^bits - 2 down to this many steps, which
#: finds again a block already on a grid whose codes do not reach both ends (ORT's min/max misses it).
SPANS = {2: 2, 4: 10, 8: 255}
#: Where a shrunk window sits: at ORT's zero point, and/or centred on the block.
PLACEMENTS = ("ort", "centre")
#: Re-round + refit rounds after the candidate search (a second and third changed SmolLM2's errors by < 1e-5).
REFINE = 1
#: Blocks per vectorised chunk (bounds the temporaries: ~chunk * block * 4 bytes each).
CHUNK = 1 << 12

_GRIDS = Memo()  # (weight, format, row weights) -> grid


def search_grid(w: np.ndarray, bits: int, block: int, symmetric: bool,
                weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes [N, k_blocks * block] uint8, scales [N, k_blocks] float32, zero points [N, k_blocks] uint8) of ``w`` [K, N].

    ``weights`` ([K], >= 0): how much each row's error counts (e.g. the diagonal of the node input's
    Gram); None: every row alike (data-free).  Padding rows (K not a multiple of ``block``) get the
    block's zero point as code (value 0) and count nothing.
    """
    w = np.ascontiguousarray(w, dtype=np.float32)
    wt = None if weights is None else np.ascontiguousarray(weights, dtype=np.float32)
    # the options of one weight (accuracy levels, a tied lookup) and emit ask for the same grid
    hit = _GRIDS.get(lambda: _search_grid(w, bits, block, symmetric, wt), f"{bits}|{block}|{symmetric}", w, wt)
    return tuple(a.copy() for a in hit)


def _search_grid(w, bits, block, symmetric, weights):
    from edgeprune.passes.bits import sensitivity

    k, n = w.shape
    k_blocks = -(-k // block)
    kp = k_blocks * block
    maxq = (1 << bits) - 1
    q0, s0, z0 = sensitivity._nbits_quantize(w, bits, block, symmetric)  # ORT's grid and codes: the floor
    x = np.zeros((n, kp), dtype=np.float32)
    x[:, :k] = w.T
    x = x.reshape(n * k_blocks, block)
    d = np.zeros(kp, dtype=np.float32)
    d[:k] = 1.0 if weights is None else np.maximum(np.asarray(weights, np.float32).ravel()[:k], 0.0)
    d = d.reshape(k_blocks, block)
    codes = q0.reshape(n * k_blocks, block).copy()
    scales = s0.reshape(-1).astype(np.float32).copy()
    zeros = z0.reshape(-1).astype(np.uint8).copy()
    for a in range(0, n * k_blocks, CHUNK):
        b = min(a + CHUNK, n * k_blocks)
        rows = np.arange(a, b) % k_blocks  # block index along K of each chunk row: its weights d
        c, s, z = _search(x[a:b], d[rows], bits, symmetric, q0.reshape(-1, block)[a:b], scales[a:b], zeros[a:b], maxq)
        codes[a:b], scales[a:b], zeros[a:b] = c, s, z
    codes = codes.reshape(n, kp)
    if kp > k:  # padding rows: the zero point's code (dequantizes to 0)
        codes[:, k:] = np.repeat(zeros.reshape(n, k_blocks)[:, -1:], kp - k, axis=1)
    return codes, scales.reshape(n, k_blocks), zeros.reshape(n, k_blocks)


def _err(x, dx, d, c, s, z):
    """Weighted squared error per block of the grid (s, z) with codes c."""
    r = x - (c - z[:, None]) * s[:, None]
    return (np.einsum("ij,ij->i", r * d, r) if d is not None else np.einsum("ij,ij->i", r, r)).astype(np.float64)


def _round(x, s, z, maxq):
    """Nearest codes of the grid (s, z): round-to-nearest is optimal per weight once the grid is fixed."""
    inv = (1.0 / np.where(s == 0, 1.0, s)).astype(np.float32)
    c = x * inv[:, None]
    c += z[:, None]
    np.rint(c, out=c)
    return np.clip(c, 0, maxq, out=c)


def _refit(x, dx, d, c, zs, maxq, sums):
    """Codes fixed: for each candidate zero point (all of them, or the fixed symmetric one), the
    least-squares scale and its error; returns the best (err, s, z) per block."""
    sww, sw, s1 = sums
    # float32 sums over one block (<= a few hundred terms) are exact enough; the closed form runs in float64
    swc = np.einsum("ij,ij->i", dx, c).astype(np.float64)
    dc = c * d if d is not None else c
    sc = dc.sum(axis=1).astype(np.float64)
    scc = np.einsum("ij,ij->i", dc, c).astype(np.float64)
    zc = np.asarray(zs, dtype=np.float64)[None, :]  # [1, Z]
    num = swc[:, None] - zc * sw[:, None]
    den = scc[:, None] - 2.0 * zc * sc[:, None] + zc * zc * s1[:, None]
    ok = den > 1e-30
    err = np.where(ok, sww[:, None] - np.square(num) / np.where(ok, den, 1.0), sww[:, None])
    best = np.argmin(err, axis=1)
    pick = np.arange(len(best))
    s = np.where(ok[pick, best], num[pick, best] / np.where(ok[pick, best], den[pick, best], 1.0), 0.0)
    return err[pick, best], s.astype(np.float32), zc[0, best].astype(np.float32)


def _search(x, d, bits, symmetric, c0, s0, z0, maxq):
    """Best (codes, scales, zero points) of a chunk of blocks x [M, B] (weights d [M, B]); ORT's (c0, s0, z0) is the floor."""
    uniform = bool(np.all(d == 1.0))
    dd = None if uniform else d
    dx = x if uniform else x * d
    sums = (np.einsum("ij,ij->i", dx, x, dtype=np.float64), dx.sum(axis=1, dtype=np.float64),
            (d.sum(axis=1, dtype=np.float64) if not uniform else np.full(len(x), x.shape[1], np.float64)))
    c0 = c0.astype(np.float32)
    z0f = z0.astype(np.float32)
    e0 = _err(x, dx, dd, c0, s0, z0f)
    best_e = np.full(len(x), np.inf)
    best_s = s0.astype(np.float32).copy()
    best_z = z0f.copy()
    half = float(1 << (bits - 1))
    if symmetric:
        zs = (half,)
        amax_i = np.argmax(np.abs(x), axis=1)
        signed = x[np.arange(len(x)), amax_i]
        starts = [(signed / -half, None), (signed / (maxq - half), None)]
    else:
        zs = tuple(range(maxq + 1))
        lo = np.minimum(x.min(axis=1), 0.0)
        hi = np.maximum(x.max(axis=1), 0.0)
        rng = (hi - lo) / maxq
        starts = [(rng, place) for place in PLACEMENTS]
    grow = [(maxq / m, ("centre",) if not symmetric else None) for m in range(maxq - 1, SPANS.get(bits, maxq) - 1, -1)]
    for alpha, only in [(a, None) for a in ALPHAS.get(bits, ALPHAS[4])] + grow:
        for base, place in starts:
            if only is not None and place not in only:
                continue
            s = (base * np.float32(alpha)).astype(np.float32)
            if symmetric:
                z = np.full(len(x), half, np.float32)
            elif place == "ort":
                z = z0f
            else:
                safe = np.where(s == 0, 1.0, s)
                z = np.clip(np.rint(maxq / 2.0 - (lo + hi) / (2.0 * safe)), 0, maxq).astype(np.float32)
            c = _round(x, s, z, maxq)
            e, s2, z2 = _refit(x, dx, dd, c, zs, maxq, sums)
            better = e < best_e
            best_e = np.where(better, e, best_e)
            best_s = np.where(better, s2, best_s)
            best_z = np.where(better, z2, best_z)
    s, z = best_s, best_z
    for _ in range(REFINE):  # re-round on the refitted grid, refit again: each step only lowers the error
        c = _round(x, s, z, maxq)
        _, s2, z2 = _refit(x, dx, dd, c, zs, maxq, sums)
        e_old = _err(x, dx, dd, c, s, z)
        e_new = _err(x, dx, dd, _round(x, s2, z2, maxq), s2, z2)
        take = e_new < e_old
        s, z = np.where(take, s2, s), np.where(take, z2, z)
    c = _round(x, s, z, maxq)
    e = _err(x, dx, dd, c, s, z)
    keep = ~(e < e0)  # ORT's codes where the search found nothing better (ties included)
    c = np.where(keep[:, None], c0, c)
    s = np.where(keep, s0, s).astype(np.float32)
    z = np.where(keep, z0f, z)
    return c.astype(np.uint8), s, z.astype(np.uint8)


#: The searched roundings: ``mse`` weighs every weight alike (data-free), ``wmse`` by its input's energy.
ROUNDINGS = ("mse", "wmse")
#: ``wmse``: share of the mean input energy added to every row's (GPTQ's dampening, ``gptq.DAMP``).
DAMP = 0.01


def row_weights(rounding: str, gram: np.ndarray | None) -> np.ndarray | None:
    """The per-row weights ``rounding`` searches with: None for ``rtn`` and ``mse``; for ``wmse`` the diagonal of the
    node input's Gram (a [K, K] Gram, or its [K] diagonal), i.e. each input feature's energy."""
    if rounding in ("rtn", "mse"):  # ORT's grid, or the data-free search: every row alike
        return None
    if rounding != "wmse":
        raise ValueError(f"unknown rounding {rounding!r}: ORT's is 'rtn', the searched ones {ROUNDINGS}")
    if gram is None:
        raise ValueError("wmse rounding weighs each row by its input's energy: it needs the Gram of the node's input")
    g = np.asarray(gram, dtype=np.float64)
    d = np.maximum(np.diag(g) if g.ndim == 2 else g.ravel(), 0.0)
    # Dampened like GPTQ's Hessian: a feature the calibration rows never lit still counts a little.
    return np.ascontiguousarray(d + DAMP * float(d.mean()), dtype=np.float32)


def search_dequant(w: np.ndarray, bits: int, block: int, symmetric: bool, weights: np.ndarray | None = None,
                   fp16: bool = False) -> np.ndarray:
    """[K, N] float32 weight MatMulNBits computes with after :func:`search_grid` (exactly what emit writes;
    ``fp16``: with the scales stored as float16)."""
    from edgeprune.passes.bits import gptq
    from edgeprune.passes.bits.sensitivity import stored_scales

    codes, scales, zeros = search_grid(w, bits, block, symmetric, weights)
    return gptq.dequant(codes, stored_scales(scales, fp16), zeros, w.shape[0], block)


def pack_zero_points(zeros: np.ndarray, bits: int) -> np.ndarray:
    """Zero points [N, k_blocks] -> MatMulNBits' packed uint8 [N, ceil(k_blocks * bits / 8)], low bits first
    (a row's unused slots hold the default zero point 2^(bits-1), as ORT's quantizer fills them)."""
    n, kb = zeros.shape
    per = 8 // bits
    padded = np.full((n, -(-kb // per) * per), 1 << (bits - 1), dtype=np.uint16)
    padded[:, :kb] = zeros
    shifts = (np.arange(per) * bits).astype(np.uint16)
    return (padded.reshape(n, -1, per) << shifts).sum(axis=-1).astype(np.uint8)
