"""Per-layer keep ratios for sparse attention: calibration measurements and an exact budgeted allocation.

Measurement (per layer, per candidate keep ratio, on the calibration rows): the layer's q, k, v are
read from one ORT run; dense causal softmax probabilities P are formed per head, and for the
blocks the op would select at that keep ratio (the same pooled-score TopK as
``edgeprune.DynamicSparseAttention``) we record

* recall: the dense attention mass that falls in the kept blocks (mean over query rows), and
* error: the relative L2 error of the layer's attention output, ||y_sparse - y_dense|| / ||y_dense||.

Restricting P to the kept blocks and renormalising is exactly what block-sparse attention computes,
so both numbers come from per-block sums of P and P·V without running the op per candidate.

Allocation: choose one candidate per layer minimising the summed error subject to the mean keep
ratio staying within the budget (a multiple-choice knapsack).  Costs are put on the grid of the
candidates' greatest common step, so dynamic programming over it is exact (ties: smaller total
keep, then the earlier layer sparser).
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import numpy as np

from edgeprune.errors import BadInputError


def select_blocks(q: np.ndarray, k: np.ndarray, block: int, keep: float, sink: int, per_group: bool) -> np.ndarray:
    """int64 [B, Hsel, nB, K] sorted key-block indices, chosen as DynamicSparseAttention does (min_len 0)."""
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    nb = -(-s // block)
    pad = ((0, 0), (0, 0), (0, nb * block - s), (0, 0))
    qp = np.pad(q, pad).reshape(b, hq, nb, block, d).sum(3, dtype=np.float32)
    kp = np.pad(k, pad).reshape(b, hkv, nb, block, d).sum(3, dtype=np.float32)
    g = hq // hkv
    if per_group:
        qp = qp.reshape(b, hkv, g, nb, d).sum(2)
    else:
        kp = np.repeat(kp, g, axis=1)
    scores = qp @ kp.transpose(0, 1, 3, 2)
    i, j = np.arange(nb)[:, None], np.arange(nb)[None, :]
    scores = np.where((j == i) | (j < sink), np.float32(1e30), scores)
    scores = np.where(j > i, np.float32(-1e30), scores)
    kk = min(max(math.ceil(nb * np.float32(keep)), sink + 1), nb)
    top = np.argsort(-scores, axis=-1, kind="stable")[..., :kk]
    return np.sort(top, axis=-1).astype(np.int64)


@dataclasses.dataclass
class LayerMeasure:
    """Running sums for one layer over calibration rows, one entry per candidate."""

    candidates: tuple[float, ...]
    mass: np.ndarray = None  # summed recalled mass per candidate
    rows: int = 0
    err_sq: np.ndarray = None  # summed ||y_sparse - y_dense||^2 per candidate
    ref_sq: float = 0.0  # summed ||y_dense||^2

    def __post_init__(self):
        self.mass = np.zeros(len(self.candidates))
        self.err_sq = np.zeros(len(self.candidates))

    def add(self, q, k, v, *, scale: float, block: int, sink: int, per_group: bool) -> None:
        """Accumulate one batch of a layer's q [B,Hq,S,D], k/v [B,Hkv,S,D]."""
        b, hq, s, d = q.shape
        hkv = k.shape[1]
        nb = -(-s // block)
        selections = [select_blocks(q, k, block, keep, sink, per_group) for keep in self.candidates]
        hsel = selections[0].shape[1]
        causal = np.tril(np.ones((s, s), bool))
        row_block = np.arange(s) // block
        for bi in range(b):
            for h in range(hq):
                hk, hs = h // (hq // hkv), h // (hq // hsel)
                logits = (q[bi, h].astype(np.float32) @ k[bi, hk].astype(np.float32).T) * np.float32(scale)
                logits = np.where(causal, logits, -np.inf)
                p = np.exp(logits - logits.max(-1, keepdims=True))
                p /= p.sum(-1, keepdims=True)
                pp = np.pad(p, ((0, 0), (0, nb * block - s)))
                vp = np.pad(v[bi, hk].astype(np.float32), ((0, nb * block - s), (0, 0)))
                pb = pp.reshape(s, nb, block).sum(-1)  # mass per key block
                yb = np.stack([pp[:, j * block:(j + 1) * block] @ vp[j * block:(j + 1) * block] for j in range(nb)], 1)
                dense = yb.sum(1)
                self.ref_sq += float((dense.astype(np.float64) ** 2).sum())
                for c, sel in enumerate(selections):
                    rows_sel = sel[bi, hs][row_block]  # [S, K] blocks kept by each query row
                    mass = np.take_along_axis(pb, rows_sel, 1).sum(1)
                    ys = np.take_along_axis(yb, rows_sel[..., None], 1).sum(1) / mass[:, None]
                    self.mass[c] += float(mass.sum())
                    self.err_sq[c] += float(((ys - dense).astype(np.float64) ** 2).sum())
                self.rows += s

    def recall(self) -> list[float]:
        return [float(m / max(self.rows, 1)) for m in self.mass]

    def error(self) -> list[float]:
        return [float(math.sqrt(e / self.ref_sq)) if self.ref_sq > 0 else 0.0 for e in self.err_sq]


def allocate(errors: list[list[float]], candidates: tuple[float, ...], budget: float) -> list[float]:
    """One keep ratio per layer minimising the summed error with mean keep <= ``budget`` (exact).

    ``errors[l][c]`` is layer l's error at ``candidates[c]``.  Raises BadInputError when even the
    smallest candidate everywhere exceeds the budget.
    """
    if not errors:
        return []
    fracs = [Fraction(c).limit_denominator(1 << 20) for c in candidates]
    den = math.lcm(*[f.denominator for f in fracs])
    nums = [int(f * den) for f in fracs]
    step = Fraction(math.gcd(*nums), den)  # every candidate is a whole number of steps
    units = [int(f / step) for f in fracs]
    cap = math.floor(Fraction(budget).limit_denominator(1 << 20) * len(errors) / step)
    if min(units) * len(errors) > cap:
        raise BadInputError(
            f"sparse attention keep budget {budget} is below the smallest candidate keep ratio {min(candidates)}: "
            "raise keep or add a smaller candidate."
        )
    # best[cost] = (summed error, choices) over the layers so far, for each total cost in steps
    best: dict[int, tuple[float, tuple[int, ...]]] = {0: (0.0, ())}
    for row in errors:
        nxt: dict[int, tuple[float, tuple[int, ...]]] = {}
        for cost, (err, picks) in best.items():
            for c, u in enumerate(units):
                if cost + u <= cap:
                    cand = (err + row[c], picks + (c,))
                    if cost + u not in nxt or _key(cand) < _key(nxt[cost + u]):
                        nxt[cost + u] = cand
        best = nxt
    _, picks = min(best.values(), key=lambda t: (round(t[0], 12), sum(units[c] for c in t[1]), t[1]))
    return [candidates[c] for c in picks]


def _key(entry: tuple[float, tuple[int, ...]]) -> tuple:
    return round(entry[0], 12), entry[1]
