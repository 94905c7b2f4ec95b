"""Numpy reference of the sparse-attention ops: block selection and exact attention on a block mask."""

from __future__ import annotations

import math

import numpy as np


def select_blocks(q, k, block, keep, sink=1, min_len=0, per_group=False):
    """int64 [B, Hsel, nB, K] sorted key-block indices, chosen as DynamicSparseAttention does."""
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    nb = -(-s // block)
    pad = nb * block - s
    qp = np.pad(q, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(b, hq, nb, block, d).sum(3)
    kp = np.pad(k, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(b, hkv, nb, block, d).sum(3)
    g = hq // hkv
    if per_group:
        qp = qp.reshape(b, hkv, g, nb, d).sum(2)
    else:
        kp = np.repeat(kp, g, axis=1)
    scores = qp @ kp.transpose(0, 1, 3, 2)
    i, j = np.arange(nb)[:, None], np.arange(nb)[None, :]
    scores = np.where((j == i) | (j < sink), 1e30, scores)
    scores = np.where(j > i, -1e30, scores)
    kk = nb if s < min_len else min(max(math.ceil(nb * np.float32(keep)), sink + 1), nb)
    top = np.argsort(-scores, axis=-1, kind="stable")[..., :kk]
    return np.sort(top, axis=-1).astype(np.int64)


def block_sparse_attention(q, k, v, block_index, block, scale):
    """Exact causal softmax attention of each query block over its selected key blocks (float64)."""
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    hsel = block_index.shape[1]
    out = np.zeros((b, hq, s, d))
    for bi in range(b):
        for h in range(hq):
            hs = h // (hq // hsel)
            hk = hs * hkv // hsel
            for qb in range(block_index.shape[2]):
                keys = np.concatenate([np.arange(j * block, (j + 1) * block) for j in block_index[bi, hs, qb]])
                for qpos in range(qb * block, min((qb + 1) * block, s)):
                    ks = keys[(keys <= qpos) & (keys < s)]
                    logits = (q[bi, h, qpos].astype(np.float64) @ k[bi, hk, ks].T.astype(np.float64)) * scale
                    p = np.exp(logits - logits.max())
                    out[bi, h, qpos] = (p / p.sum()) @ v[bi, hk, ks]
    return out


def dense_causal_attention(q, k, v, scale):
    """Plain causal attention with GQA heads (float64)."""
    g = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, g, axis=1).astype(np.float64), np.repeat(v, g, axis=1).astype(np.float64)
    logits = q.astype(np.float64) @ k.transpose(0, 1, 3, 2) * scale
    s = q.shape[2]
    logits = np.where(np.tril(np.ones((s, s), bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v
