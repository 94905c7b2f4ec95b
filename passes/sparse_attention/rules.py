"""Rewrite rules: causal self-attention subgraphs -> ``edgeprune.DynamicSparseAttention``.

Matched form (optimum's LLaMA/GQA export, with or without its NaN guard after Softmax):

    k_rep = Reshape(Expand(Unsqueeze(k, axes), shape), shape2)          # repeat_kv
    p     = Softmax(MatMul(Mul(q, cq), Mul(Transpose(k_rep, [0,1,3,2]), ck)) + mask)
    p     = Where(IsNaN(p), 0, p)                                       # optional guard
    out   = MatMul(p, Reshape(Expand(Unsqueeze(v, axes), shape), shape2))

becomes ``out = DynamicSparseAttention(q, k, v; scale = cq * ck)`` on the un-repeated k and v, so
the op sees the KV heads and the query heads.  In optimum's text-generation-with-past form k and v
are ``Concat(past_key_values.N, new)``: the op takes keys longer than the queries and aligns the
causal mask bottom-right (query t at position past + t), as the exported mask does.  The additive
``mask`` must come from a causal
comparison of positions (a LessOrEqual/GreaterOrEqual/Less/Greater or Trilu upstream of it);
anything else (BERT's padding-only mask, cross-attention) fails the check with that reason and
stays dense.  The op applies only the causal mask: a right-padded batch is exact on its real
tokens (they never see later positions), a left-padded one is not.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common
from onnxscript.rewriter.pattern import MatchResult, RewriteRule, RewriteRuleSet

from edgeprune.passes.sparse_attention.functions import DOMAIN

_CAUSAL_OPS = {"LessOrEqual", "GreaterOrEqual", "Less", "Greater", "Trilu"}


def _repeat(op, x, axes, shape, shape2):
    return op.Reshape(op.Expand(op.Unsqueeze(x, axes), shape), shape2)


def _core(op, q, k, v, cq, ck, mask, ka, ke, ks, va, ve, vs):
    kt = op.Transpose(_repeat(op, k, ka, ke, ks), perm=[0, 1, 3, 2])
    scores = op.MatMul(op.Mul(q, cq), op.Mul(kt, ck))
    return op.Softmax(op.Add(scores, mask), _outputs=["probs"]), _repeat(op, v, va, ve, vs)


def _guarded_pattern(op, q, k, v, cq, ck, mask, ka, ke, ks, va, ve, vs, nan):
    probs, v_rep = _core(op, q, k, v, cq, ck, mask, ka, ke, ks, va, ve, vs)
    return op.MatMul(op.Where(op.IsNaN(probs), nan, probs), v_rep)


def _plain_pattern(op, q, k, v, cq, ck, mask, ka, ke, ks, va, ve, vs):
    probs, v_rep = _core(op, q, k, v, cq, ck, mask, ka, ke, ks, va, ve, vs)
    return op.MatMul(probs, v_rep)


def _scalar(value: ir.Value | None) -> float | None:
    const = None if value is None else ir.convenience.get_const_tensor(value)
    if const is None:
        return None
    array = const.numpy()
    return float(array.reshape(-1)[0]) if array.size == 1 else None


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


def _check(context, q, k, v, cq, ck, mask, probs, *, plan: dict[str, dict[str, Any]], **_) -> MatchResult:
    result = MatchResult()
    softmax = probs.producer()
    if softmax.name not in plan:
        return result.fail(f"{softmax.name} is not planned for sparse attention")
    if softmax.attributes.get_int("axis", -1) not in (-1, 3):
        return result.fail("softmax is not over the key axis")
    if _scalar(cq) is None or _scalar(ck) is None:
        return result.fail("the score scale is not a constant scalar")
    if not is_causal(mask):
        return result.fail("the attention mask is not causal (encoder or cross-attention)")
    return result


def _rewrite(op, q, k, v, cq, ck, probs, *, plan: dict[str, dict[str, Any]], **_):
    options = plan[probs.producer().name]
    return op.DynamicSparseAttention(
        q, k, v, _domain=DOMAIN,
        block=int(options["block"]), keep=float(options["keep"]), sink=int(options["sink"]),
        min_len=int(options["min_len"]), per_group=int(options["per_group"]),
        scale=float(np.float32(_scalar(cq)) * np.float32(_scalar(ck))),
    )  # fmt: skip


def _rules(plan: dict[str, dict[str, Any]]) -> RewriteRuleSet:
    check = functools.partial(_check, plan=plan)
    rewrite = functools.partial(_rewrite, plan=plan)
    return RewriteRuleSet([
        RewriteRule(_guarded_pattern, rewrite, check, name="SparseAttentionGuarded", remove_nodes=False),
        RewriteRule(_plain_pattern, rewrite, check, name="SparseAttention", remove_nodes=False),
    ])  # fmt: skip


def apply(model: ir.Model, plan: dict[str, dict[str, Any]]) -> int:
    """Rewrite the planned attention blocks (by Softmax name) in place; the number rewritten.

    Matched nodes are not removed by the rule: exporters read the repeated K's shape for the mask
    (``Shape(k_rep)``), which the rewriter counts as an outside use.  The replaced score/softmax
    nodes are dead afterwards and removed here.
    """
    count = _rules(plan).apply_to_model(model)
    if count:
        ir.passes.common.RemoveUnusedNodesPass()(model)
    return count


def reason_not_matched(softmax: ir.Node) -> str:
    """Why a Softmax-centred block stays dense, for the report (the common failures, in check order)."""
    add = softmax.inputs[0].producer() if softmax.inputs[0] is not None else None
    if add is None or add.op_type != "Add":
        return "no additive mask: not causal self-attention (left dense)"
    if not any(is_causal(v) for v in add.inputs if v is not None):
        return "the attention mask is not causal (encoder or cross-attention): left dense"
    return "the attention subgraph is not in a form the rules match: left dense"
