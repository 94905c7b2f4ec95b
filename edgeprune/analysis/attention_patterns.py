"""Rewriter patterns for exported causal self-attention, shared by the passes that replace it.

``sparse_attention`` (-> ``edgeprune.DynamicSparseAttention``) and ``fuse_attention`` (-> ORT's
``GroupQueryAttention``) act on the same blocks, so the matching lives here once; each pass keeps
its own check and rewrite.  Matched form (optimum's LLaMA/GQA export, with or without its NaN guard
after Softmax):

    k_rep = Reshape(Expand(Unsqueeze(k, axes), shape), shape2)          # repeat_kv
    p     = Softmax(MatMul(Mul(q, cq), Mul(Transpose(k_rep, [0,1,3,2]), ck)) + mask)
    p     = Where(IsNaN(p), 0, p)                                       # optional guard
    out   = MatMul(p, Reshape(Expand(Unsqueeze(v, axes), shape), shape2))

The bound values are named ``q, k, v, cq, ck, mask, probs`` (``probs`` is the Softmax output),
and ``k``/``v`` are the un-repeated keys/values.  ``UNREPEATED_PATTERNS`` are the same without the
repeat (transformers skips ``repeat_kv`` when every query head has its own KV head); there ``k``
and ``v`` already hold one head per query head, which a pass must check (a GQA block's repeated
``k_rep`` matches them too).  ``is_causal`` tells a causal additive mask from an encoder's or a
cross-attention's; ``score_scale`` reads ``cq * ck`` as the float32 the exporter computed.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

_CAUSAL_OPS = {"LessOrEqual", "GreaterOrEqual", "Less", "Greater", "Trilu"}


def _repeat(op, x, axes, shape, shape2):
    return op.Reshape(op.Expand(op.Unsqueeze(x, axes), shape), shape2)


def _probs(op, q, kt, cq, ck, mask):
    return op.Softmax(op.Add(op.MatMul(op.Mul(q, cq), op.Mul(kt, ck)), mask), _outputs=["probs"])


def _guard(op, probs, nan):
    return op.Where(op.IsNaN(probs), nan, probs)


def guarded_pattern(op, q, k, v, cq, ck, mask, ka, ke, ks, va, ve, vs, nan):
    """repeat_kv form with optimum's NaN guard after Softmax."""
    probs = _probs(op, q, op.Transpose(_repeat(op, k, ka, ke, ks), perm=[0, 1, 3, 2]), cq, ck, mask)
    return op.MatMul(_guard(op, probs, nan), _repeat(op, v, va, ve, vs))


def plain_pattern(op, q, k, v, cq, ck, mask, ka, ke, ks, va, ve, vs):
    """repeat_kv form without the guard."""
    probs = _probs(op, q, op.Transpose(_repeat(op, k, ka, ke, ks), perm=[0, 1, 3, 2]), cq, ck, mask)
    return op.MatMul(probs, _repeat(op, v, va, ve, vs))


def unrepeated_guarded_pattern(op, q, k, v, cq, ck, mask, nan):
    """No repeat_kv (KV heads == query heads), with the NaN guard."""
    probs = _probs(op, q, op.Transpose(k, perm=[0, 1, 3, 2]), cq, ck, mask)
    return op.MatMul(_guard(op, probs, nan), v)


def unrepeated_plain_pattern(op, q, k, v, cq, ck, mask):
    """No repeat_kv (KV heads == query heads), no guard."""
    probs = _probs(op, q, op.Transpose(k, perm=[0, 1, 3, 2]), cq, ck, mask)
    return op.MatMul(probs, v)


#: (name suffix, pattern) in match priority: the guarded form first, as the plain one is its tail
PATTERNS = (("Guarded", guarded_pattern), ("", plain_pattern))
UNREPEATED_PATTERNS = (("UnrepeatedGuarded", unrepeated_guarded_pattern), ("Unrepeated", unrepeated_plain_pattern))


def scalar(value: ir.Value | None) -> float | None:
    """The value of a constant one-element tensor, else None."""
    const = None if value is None else ir.convenience.get_const_tensor(value)
    if const is None:
        return None
    array = const.numpy()
    return float(array.reshape(-1)[0]) if array.size == 1 else None


def score_scale(cq: ir.Value, ck: ir.Value) -> float | None:
    """cq * ck in float32 (the exporter splits 1/sqrt(d) over q and k^T), or None when not constant."""
    a, b = scalar(cq), scalar(ck)
    return None if a is None or b is None else float(np.float32(a) * np.float32(b))


def is_causal(mask: ir.Value, limit: int = 200) -> bool:
    """Whether an additive mask is built from a causal comparison of positions (bounded upstream walk)."""
    frontier, seen = [mask], set()
    while frontier and len(seen) < limit:
        value = frontier.pop(0)
        node = value.producer() if value is not None else None
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type in _CAUSAL_OPS:
            return True
        frontier.extend(v for v in node.inputs if v is not None)
    return False


def not_causal_reason(softmax: ir.Node, left: str) -> str | None:
    """Why a Softmax is not causal self-attention (``left`` ends the sentence: "left dense"), or None."""
    add = softmax.inputs[0].producer() if softmax.inputs[0] is not None else None
    if add is None or add.op_type != "Add":
        return f"no additive mask: not causal self-attention ({left})"
    if not any(is_causal(v) for v in add.inputs if v is not None):
        return f"the attention mask is not causal (encoder or cross-attention): {left}"
    return None
