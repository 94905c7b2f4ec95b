"""Numpy reference of the sparse-attention ops: block selection and exact attention on a block mask.

Keys/values may be longer than the queries (a KV cache): with ``past = Skv - Sq`` query row ``t``
sits at absolute position ``past + t`` and sees keys ``0 .. past + t``.  Query blocks are taken in
query rows (``qblk = min(block, Sq)`` rows each), key blocks at absolute positions (``block`` keys).
"""

from __future__ import annotations

import math

import numpy as np


def select_blocks(q, k, block, keep, sink=1, min_len=0, per_group=False, key_mask=None):
    """int64 [B, Hsel, nBq, K] sorted key-block indices, chosen as DynamicSparseAttention does.

    Prefill (Sq >= block): score = pooled (summed) query block . pooled key block.  Decode (Sq <
    block, one query block): Quest's bound, per query head sum_d max(q_d * kmin_d, q_d * kmax_d)
    over each key block's element-wise min/max, summed over the heads that share a selection row.
    Forced in: the first ``sink`` key blocks and the key blocks the query block's positions fall in.
    ``key_mask`` [B, T] (the masked op): masked keys count as zero vectors in the statistics.
    """
    if key_mask is not None:
        k = k * (key_mask != 0).astype(np.float32)[:, None, :, None]
    b, hq, s, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    past = skv - s
    qblk = min(block, s)
    nbq, nbk = -(-s // qblk), -(-skv // block)
    qp = np.pad(q, ((0, 0), (0, 0), (0, nbq * qblk - s), (0, 0))).reshape(b, hq, nbq, qblk, d).sum(3, dtype=np.float32)
    kb = np.pad(k, ((0, 0), (0, 0), (0, nbk * block - skv), (0, 0))).reshape(b, hkv, nbk, block, d)
    kp = kb.sum(3, dtype=np.float32)
    g = hq // hkv
    r = g if per_group else 1
    if s < block:
        kmn = np.repeat(kb.min(3), g, axis=1)[:, :, None]  # [b, hq, 1, nbk, d]
        kmx = np.repeat(kb.max(3), g, axis=1)[:, :, None]
        ql = qp[:, :, -1:, None, :]
        scores = np.maximum(ql * kmn, ql * kmx).sum(-1, dtype=np.float32)  # [b, hq, 1, nbk]
        scores = scores.reshape(b, hq // r, r, 1, nbk).sum(2, dtype=np.float32)
    else:
        if per_group:
            qp = qp.reshape(b, hkv, g, nbq, d).sum(2, dtype=np.float32)
        else:
            kp = np.repeat(kp, g, axis=1)
        scores = qp @ kp.transpose(0, 1, 3, 2)
    i, j = np.arange(nbq)[:, None], np.arange(nbk)[None, :]
    lo = (past + i * qblk) // block
    hi = (past + np.minimum((i + 1) * qblk, s) - 1) // block
    scores = np.where(((j >= lo) & (j <= hi)) | (j < sink), np.float32(1e30), scores)
    scores = np.where(j > hi, np.float32(-1e30), scores)
    extra = int(past % block + qblk > block)
    kk = nbk if skv < min_len else min(max(math.ceil(np.float32(nbk) * np.float32(keep)), sink + 1 + extra), nbk)
    top = np.argsort(-scores, axis=-1, kind="stable")[..., :kk]
    return np.sort(top, axis=-1).astype(np.int64)


def block_sparse_attention(q, k, v, block_index, block, scale, key_mask=None):
    """Exact causal softmax attention of each query block over its selected key blocks (float64).

    ``key_mask`` [B, T]: keys where it is 0 are left out too; a row with no key left is 0."""
    b, hq, s, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    past = skv - s
    qblk = min(block, s)
    hsel = block_index.shape[1]
    out = np.zeros((b, hq, s, d))
    for bi in range(b):
        for h in range(hq):
            hs = h // (hq // hsel)
            hk = hs * hkv // hsel
            for qb in range(block_index.shape[2]):
                keys = np.concatenate([np.arange(j * block, (j + 1) * block) for j in block_index[bi, hs, qb]])
                for t in range(qb * qblk, min((qb + 1) * qblk, s)):
                    ks = keys[(keys <= past + t) & (keys < skv)]
                    if key_mask is not None:
                        ks = ks[key_mask[bi, ks] != 0]
                    if ks.size == 0:
                        continue
                    logits = (q[bi, h, t].astype(np.float64) @ k[bi, hk, ks].T.astype(np.float64)) * scale
                    p = np.exp(logits - logits.max())
                    out[bi, h, t] = (p / p.sum()) @ v[bi, hk, ks]
    return out


def dense_causal_attention(q, k, v, scale):
    """Plain causal attention with GQA heads (float64); keys may extend into a past (bottom-right aligned)."""
    g = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, g, axis=1).astype(np.float64), np.repeat(v, g, axis=1).astype(np.float64)
    logits = q.astype(np.float64) @ k.transpose(0, 1, 3, 2) * scale
    s, skv = q.shape[2], k.shape[2]
    logits = np.where(np.arange(skv)[None, :] <= np.arange(s)[:, None] + (skv - s), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v
