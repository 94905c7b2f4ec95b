"""Rewrite rules: causal self-attention subgraphs -> ``edgeprune.DynamicSparseAttention``.

The matched form (optimum's LLaMA/GQA export with repeat_kv, with or without its NaN guard) is
``edgeprune.analysis.attention_patterns.PATTERNS``, shared with the fuse_attention pass:

    p   = Softmax(MatMul(Mul(q, cq), Mul(Transpose(repeat_kv(k), [0,1,3,2]), ck)) + mask)
    out = MatMul(p, repeat_kv(v))                            (a NaN guard on p, optional)

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

from edgeprune.analysis import attention_patterns as patterns
from edgeprune.analysis.attention_patterns import is_causal
from edgeprune.passes.sparse_attention.functions import DOMAIN, DYNAMIC, DYNAMIC_MASKED


def _check(context, q, k, v, cq, ck, mask, probs, *, plan: dict[str, dict[str, Any]], **_) -> MatchResult:
    result = MatchResult()
    softmax = probs.producer()
    if softmax.name not in plan:
        return result.fail(f"{softmax.name} is not planned for sparse attention")
    if softmax.attributes.get_int("axis", -1) not in (-1, 3):
        return result.fail("softmax is not over the key axis")
    if patterns.score_scale(cq, ck) is None:
        return result.fail("the score scale is not a constant scalar")
    if not is_causal(mask):
        return result.fail("the attention mask is not causal (encoder or cross-attention)")
    return result


def key_mask_input(mask: ir.Value, limit: int = 200) -> ir.Value | None:
    """The model's 2-D attention_mask [B, T] the additive mask is built from (bounded upstream walk), if any."""
    frontier, seen = [mask], set()
    while frontier and len(seen) < limit:
        value = frontier.pop(0)
        if value is None:
            continue
        if value.is_graph_input():
            if value.shape is not None and len(value.shape) == 2 and value.dtype is not None and (value.dtype.is_integer() or value.dtype == ir.DataType.BOOL):
                return value
            continue
        node = value.producer()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        frontier.extend(node.inputs)
    return None


def _rewrite(op, q, k, v, cq, ck, mask, probs, *, plan: dict[str, dict[str, Any]], **_):
    options = plan[probs.producer().name]
    inputs, name = [q, k, v], DYNAMIC
    key_mask = key_mask_input(mask)
    if key_mask is not None:  # padding beyond causality: the masked op leaves those keys out
        inputs.append(key_mask if key_mask.dtype == ir.DataType.INT64 else op.Cast(key_mask, to=ir.DataType.INT64))
        name = DYNAMIC_MASKED
    return getattr(op, name)(
        *inputs, _domain=DOMAIN,
        block=int(options["block"]), keep=float(options["keep"]), sink=int(options["sink"]),
        min_len=int(options["min_len"]), per_group=int(options["per_group"]),
        scale=patterns.score_scale(cq, ck),
    )  # fmt: skip


def _rules(plan: dict[str, dict[str, Any]]) -> RewriteRuleSet:
    check = functools.partial(_check, plan=plan)
    rewrite = functools.partial(_rewrite, plan=plan)
    return RewriteRuleSet([RewriteRule(pattern, rewrite, check, name=f"SparseAttention{suffix}", remove_nodes=False)
                           for suffix, pattern in patterns.PATTERNS])  # fmt: skip


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
    return patterns.not_causal_reason(softmax, "left dense") or "the attention subgraph is not in a form the rules match: left dense"


# ---------------------------------------------------------------------------- ORT's fused forms
#
# com.microsoft.GroupQueryAttention / MultiHeadAttention take q/k/v as [B, S, heads * D] and the
# cache as [B, heads, P, D] (BNSH).  A causal one becomes
#
#     q4 = Transpose(Reshape(q, [0, 0, Hq, -1]), [0, 2, 1, 3])        (k4, v4 likewise with Hkv)
#     k  = Concat(past_key, k4, axis=2)  (present_key)                 (v likewise)
#     y  = Reshape(Transpose(DynamicSparseAttention(q4, k, v), [0, 2, 1, 3]), [0, 0, -1])
#
# when nothing else the fused op does is in use (rotary, biases, padding masks, a local window,
# softcap, a past/present buffer shared in place; MultiHeadAttention's packed QKV); otherwise it
# stays dense with that reason.  A GroupQueryAttention's packed query (q, k, v side by side, key and
# value empty: the bits pass writes it for packed siblings) is split first.  This is a direct graph edit rather than a pattern: the fused node is one node
# with optional trailing inputs.

FUSED_DOMAIN = "com.microsoft"
FUSED_OPS = ("GroupQueryAttention", "MultiHeadAttention")


def fused_nodes(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.domain == FUSED_DOMAIN and n.op_type in FUSED_OPS]


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if index < len(node.inputs) else None


def _dim(value: ir.Value | None, axis: int):
    if value is None or value.shape is None or len(value.shape) <= axis:
        return None
    return value.shape[axis]


def _fused_heads(node: ir.Node) -> tuple[int, int]:
    hq = node.attributes.get_int("num_heads", 0)
    return hq, node.attributes.get_int("kv_num_heads", hq) if node.op_type == "GroupQueryAttention" else hq


def _width(value: ir.Value | None, depth: int = 3) -> int | None:
    """The static last dim of a [B, S, W] value: its shape, or the weight of the projection that makes it."""
    if value is None:
        return None
    if isinstance(_dim(value, 2), int):
        return int(_dim(value, 2))
    node = value.producer()
    if node is None or depth == 0 or node.op_type not in ("MatMul", "Add"):
        return None
    for x in node.inputs:
        const = ir.convenience.get_const_tensor(x) if x is not None else None
        if const is not None and len(const.shape) >= 1 and (node.op_type == "MatMul" or len(const.shape) == 1):
            return int(const.shape[-1])
    return _width(node.inputs[0], depth - 1) if node.op_type == "Add" else None


def _packed(node: ir.Node) -> bool:
    """A GroupQueryAttention reading q, k and v packed in its query ([B, S, (heads + 2 kv heads) x head size])."""
    return node.op_type == "GroupQueryAttention" and _input(node, 1) is None and _input(node, 2) is None


def _head_dim(node: ir.Node) -> int | None:
    hq, hkv = _fused_heads(node)
    past = _input(node, 3 if node.op_type == "GroupQueryAttention" else 6)
    width = _width(node.inputs[0])
    if isinstance(_dim(past, 3), int):
        return int(_dim(past, 3))
    heads = hq + 2 * hkv if _packed(node) else hq
    if isinstance(width, int) and heads and width % heads == 0:
        return width // heads
    return None


def fused_reason(node: ir.Node) -> str | None:
    """Why a fused attention node stays dense (None: it can be rewritten)."""
    a = node.attributes
    hq, hkv = _fused_heads(node)
    if hq <= 0 or hkv <= 0 or hq % hkv:
        return f"{node.op_type} without valid num_heads/kv_num_heads: left dense"
    if _packed(node) and _head_dim(node) is None:
        return f"{node.op_type} with packed QKV of unknown head size (no static shape): left dense"
    if (_input(node, 1) is None or _input(node, 2) is None) and not _packed(node):
        return f"{node.op_type} with packed QKV (no separate key/value): left dense"
    if node.op_type == "GroupQueryAttention":
        if a.get_int("do_rotary", 0):
            return "GroupQueryAttention applies rotary embedding inside (do_rotary=1): left dense"
        if a.get_int("local_window_size", -1) != -1 or a.get_float("softcap", 0.0) or a.get_int("smooth_softmax", 0):
            return "GroupQueryAttention with a local window, softcap or smooth softmax: left dense"
        if any(_input(node, i) is not None for i in range(7, len(node.inputs))):
            return "GroupQueryAttention with rotary caches, position ids, an attention bias or head sinks: left dense"
        past, present = _input(node, 3), node.outputs[1] if len(node.outputs) > 1 else None
    else:
        if not a.get_int("unidirectional", 0):
            return "the attention mask is not causal (MultiHeadAttention without unidirectional=1): left dense"
        if any(_input(node, i) is not None for i in (3, 4, 5, 8, 9)):
            return "MultiHeadAttention with a bias, padding mask, attention bias or beam-search cache: left dense"
        if _dim(node.inputs[1], 3) is not None:
            return "MultiHeadAttention with 4-D (cross-attention) key/value: left dense"
        past, present = _input(node, 6), node.outputs[1] if len(node.outputs) > 1 else None
    if past is not None and present is not None and _dim(past, 2) is not None and _dim(past, 2) == _dim(present, 2):
        return f"{node.op_type} shares its past and present buffer in place: left dense"
    if not a.get_float("scale", 0.0) and _head_dim(node) is None:
        return f"{node.op_type}'s head size is unknown (no static shape) and it has no scale: left dense"
    return None


def rewrite_fused(model: ir.Model, node: ir.Node, options: dict[str, Any]) -> ir.Node:
    """Replace one fused attention node (``fused_reason`` is None) by DynamicSparseAttention; the new node."""
    graph = model.graph
    hq, hkv = _fused_heads(node)
    gqa = node.op_type == "GroupQueryAttention"
    past_k, past_v = (_input(node, 3), _input(node, 4)) if gqa else (_input(node, 6), _input(node, 7))
    scale = node.attributes.get_float("scale", 0.0) or float(_head_dim(node)) ** -0.5
    new: list[ir.Node] = []

    def add(op_type, inputs, domain="", **attrs):
        n = ir.node(op_type, inputs, attributes=attrs or None, domain=domain, name=f"{node.name}/sparse/{op_type}_{len(new)}")
        n.outputs[0].name = f"{n.name}_output_0"
        new.append(n)
        return n.outputs[0]

    def const(values):
        return add("Constant", [], value=ir.tensor(np.array(values, np.int64)))

    def heads(x, h):
        return add("Transpose", [add("Reshape", [x, const([0, 0, h, -1])])], perm=[0, 2, 1, 3])

    q, k, v = node.inputs[:3]
    if _packed(node):  # q, k and v side by side along the last axis (the bits pass packs siblings so)
        d = _head_dim(node)
        split = ir.node("Split", [q, const([hq * d, hkv * d, hkv * d])], attributes={"axis": -1}, num_outputs=3,
                        name=f"{node.name}/sparse/Split_{len(new)}")
        for i, out in enumerate(split.outputs):
            out.name = f"{split.name}_output_{i}"
        new.append(split)
        q, k, v = split.outputs
    q4, k4, v4 = heads(q, hq), heads(k, hkv), heads(v, hkv)
    k = add("Concat", [past_k, k4], axis=2) if past_k is not None else k4
    v = add("Concat", [past_v, v4], axis=2) if past_v is not None else v4
    y4 = add("DynamicSparseAttention", [q4, k, v], DOMAIN, block=int(options["block"]), keep=float(options["keep"]),
             sink=int(options["sink"]), min_len=int(options["min_len"]), per_group=int(options["per_group"]),
             scale=float(np.float32(scale)))  # fmt: skip
    sparse = new[-1]
    y = add("Reshape", [add("Transpose", [y4], perm=[0, 2, 1, 3]), const([0, 0, -1])])
    graph.insert_before(node, new)
    replacements = [y, k, v]
    for old, rep in zip(node.outputs, replacements):
        is_output = old.is_graph_output()
        rep.type, rep.shape = old.type, old.shape
        ir.convenience.replace_all_uses_with(old, rep, replace_graph_outputs=True)
        if is_output:  # keep the interface's names (present.N.key, ...)
            name, old.name = old.name, None
            rep.name = name
    graph.remove(node, safe=True)
    return sparse
