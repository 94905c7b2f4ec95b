"""Attention blocks: which linears are Q, K, V and O, and how many heads they hold.

Head pruning needs the projections of each self-attention and the head count and size, which
exporters never state: they are read from the graph.  ``Softmax`` between a score
``MatMul(Q, K^T)`` and a context ``MatMul(P, V)`` marks a block; Q, K and V are traced back
through head-split/rotary/GQA-repeat ops to their linears and the context forward through
head-merge ops to the output linear.  Head counts come from the constant pieces of the
head-split ``Reshape`` shape, cross-checked with the linears' widths; contrib
``Attention``/``MultiHeadAttention``/``GroupQueryAttention`` read ``num_heads``.  The paths have
any length (mask/scale ops, rotary, GQA repeat, casts) and exporters order them differently, so
they are walked by hand with bounded walks rather than matched as fixed rewriter patterns.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterable

import onnx_ir as ir

from edgeprune.analysis.graph import (
    MS_DOMAIN,
    STD_DOMAINS,
    attr,
    const_shape,
    constant,
    consumers,
    is_std,
    node_name,
    static_ints,
    value_name,
    walk,
)
from edgeprune.analysis.linears import Linear

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class AttentionBlock:
    """Self-attention with its projections; heads are the prunable unit (query heads by default)."""

    q: Linear | None
    k: Linear | None
    v: Linear | None
    o: Linear | None
    num_heads: int | None
    num_kv_heads: int | None
    head_dim: int | None
    softmax: str | None
    rotary: bool
    layer: int = -1
    op_type: str = "subgraph"  # or the contrib op: Attention, MultiHeadAttention, GroupQueryAttention
    node: str | None = None  # the contrib op node, when there is one
    packed_qkv: Linear | None = None  # contrib Attention's packed [hidden, 3*hidden] weight
    score_matmul: str | None = None
    context_matmul: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Ops Q/K/V pass through between their linear and the score/context MatMul: head split and
# merge, scaling, rotary embedding (rotate_half: Slice/Neg/Concat, Mul/Add with cos/sin), GQA
# repeat (Unsqueeze/Expand/Reshape).  Only the data input of shape-taking ops is followed.
_DATA_INPUT_ONLY = {"Reshape", "Unsqueeze", "Squeeze", "Expand", "Slice", "Split", "Tile", "Flatten"}
_PATH_OPS = _DATA_INPUT_ONLY | {"Transpose", "Mul", "Div", "Add", "Sub", "Neg", "Concat", "Cast", "Identity"}
_SCORE_TO_SOFTMAX_OPS = {"Add", "Mul", "Div", "Sub", "Where", "Cast", "Identity", "Tanh"}
_SOFTMAX_TO_CONTEXT_OPS = {"Where", "Cast", "Identity", "Dropout", "Mul", "Div"}
_MERGE_OPS = {"Transpose", "Reshape", "Cast", "Identity", "Squeeze", "Flatten"}
_NATIVE_ATTENTION = ("Attention", "MultiHeadAttention", "GroupQueryAttention")


def find_attention_blocks(graph: ir.Graph, linears: list[Linear], by_output: dict[str, Linear]) -> list[AttentionBlock]:
    """Softmax-centred attention subgraphs plus contrib attention ops, numbered in graph order."""
    blocks: list[AttentionBlock] = []
    for node in graph:  # graph order, so ``layer`` counts blocks from the input
        if is_std(node, "Softmax"):
            block = _attention_at_softmax(node, by_output)
        elif node.domain == MS_DOMAIN and node.op_type in _NATIVE_ATTENTION:
            block = _native_attention(node, by_output)
        else:
            continue
        if block is not None:
            blocks.append(block)
    for i, block in enumerate(blocks):
        block.layer = i
    return blocks


def _is_activation_matmul(node: ir.Node | None) -> bool:
    """A MatMul of two computed tensors (scores or context), not a linear."""
    return (
        node is not None
        and is_std(node, "MatMul")
        and all(v is not None and constant(v) is None for v in node.inputs)
        and not (node.inputs[1].producer() is not None and is_std(node.inputs[1].producer(), "Transpose")
                 and constant(node.inputs[1].producer().inputs[0]) is not None)
    )  # fmt: skip


# The walks below are hand-written: mask/scale chains, rotary, GQA repeat and head merge have any
# length and order, which the rewriter's fixed-shape patterns cannot express.
def _score_matmul(softmax: ir.Node) -> ir.Node | None:
    """Walk back from Softmax over mask/scale ops to the MatMul(Q, K^T)."""
    frontier, seen = [softmax.inputs[0]], 0
    while frontier and seen < 16:
        value = frontier.pop(0)
        seen += 1
        node = value.producer() if value is not None else None
        if node is None:
            continue
        if _is_activation_matmul(node):
            return node
        if is_std(node, *_SCORE_TO_SOFTMAX_OPS):
            frontier.extend(v for v in node.inputs if v is not None and constant(v) is None)
    return None


def _context_matmul(softmax: ir.Node) -> ir.Node | None:
    """Walk forward from Softmax over NaN-guard/dropout ops to the MatMul(P, V)."""
    frontier, seen = [softmax.outputs[0]], 0
    while frontier and seen < 16:
        value = frontier.pop(0)
        seen += 1
        for node in consumers(value):
            if _is_activation_matmul(node) and node.inputs[0] is value:
                return node
            if is_std(node, *_SOFTMAX_TO_CONTEXT_OPS):
                frontier.extend(node.outputs)
    return None


def _path_inputs(node: ir.Node) -> Iterable[ir.Value] | None:
    if node.domain in STD_DOMAINS and node.op_type in _PATH_OPS:
        inputs = node.inputs[:1] if node.op_type in _DATA_INPUT_ONLY else node.inputs
        return [v for v in inputs if v is not None and constant(v) is None]
    if node.domain == MS_DOMAIN and node.op_type == "RotaryEmbedding":
        return node.inputs[:1]
    return []  # any other op (Sin/Cos, Shape, ...) ends this branch without a linear


def _trace_to_linear(value: ir.Value, by_output: dict[str, Linear]) -> tuple[Linear, list[ir.Node]] | None:
    """The single linear that ``value`` is computed from through head-split/rotary/repeat ops."""
    found = walk(value, _path_inputs, lambda v: v.name in by_output, max_nodes=80, graph_inputs_end=True)
    if found is None:
        return None
    ends, nodes = found
    names = {v.name for v in ends}
    if len(names) != 1:
        return None
    return by_output[names.pop()], nodes


def _output_linear(value: ir.Value, by_output: dict[str, Linear]) -> Linear | None:
    """The linear that reads the merged heads (through Transpose/Reshape)."""
    linears_by_input: dict[str, list[Linear]] = {}
    for lin in by_output.values():
        linears_by_input.setdefault(lin.input, []).append(lin)
    for _ in range(8):
        lins = linears_by_input.get(value.name or "")
        if lins and len(lins) == 1:
            return lins[0]
        users = [n for n in consumers(value) if not is_std(n, "Shape")]
        if len(users) != 1 or not is_std(users[0], *_MERGE_OPS):
            return None
        value = users[0].outputs[0]
    return None


def _attention_at_softmax(softmax: ir.Node, by_output: dict[str, Linear]) -> AttentionBlock | None:
    score, context = _score_matmul(softmax), _context_matmul(softmax)
    if score is None or context is None:
        return None
    q_trace = _trace_to_linear(score.inputs[0], by_output)
    k_trace = _trace_to_linear(score.inputs[1], by_output)
    v_trace = _trace_to_linear(context.inputs[1], by_output)
    if q_trace is None or k_trace is None or v_trace is None:
        logger.debug("softmax %s: q/k/v do not trace back to linears", softmax.name)
        return None
    (q, q_nodes), (k, k_nodes), (v, _) = q_trace, k_trace, v_trace
    if len({q.output, k.output, v.output}) != 3 or k.input != v.input:
        logger.debug("softmax %s: fused or cross q/k/v projections are not handled", softmax.name)
        return None
    o = _output_linear(context.outputs[0], by_output)
    heads, head_dim = _head_split(q, q_nodes)
    kv_heads, kv_dim = _head_split(k, k_nodes)
    heads, kv_heads, head_dim = _reconcile_heads(softmax.name, q, k, heads, head_dim, kv_heads, kv_dim)
    rotary = _has_rotary(q_nodes) and _has_rotary(k_nodes)
    return AttentionBlock(
        q=q, k=k, v=v, o=o, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        softmax=node_name(softmax), rotary=rotary, score_matmul=node_name(score), context_matmul=node_name(context),
    )  # fmt: skip


def _has_rotary(nodes: list[ir.Node]) -> bool:
    """rotate_half (Neg of a half, Concat) or a RotaryEmbedding op on the path."""
    ops = {n.op_type for n in nodes}
    return "RotaryEmbedding" in ops or ("Neg" in ops and "Concat" in ops)


def _head_split(lin: Linear, path: list[ir.Node]) -> tuple[int | None, int | None]:
    """(heads, head_dim) from the constant pieces of the Reshape right after ``lin``."""
    for node in path:
        if not is_std(node, "Reshape"):
            continue
        src = node.inputs[0]
        while src is not None and src.name != lin.output and src.producer() is not None and is_std(src.producer(), "Cast", "Identity"):
            src = src.producer().inputs[0]
        if src is None or src.name != lin.output:
            continue
        shape = static_ints(node.inputs[1])
        if shape is None or len(shape) < 2:
            out_shape = node.outputs[0].shape
            shape = None if out_shape is None else [d if isinstance(d, int) else None for d in out_shape]
        if shape is None or len(shape) < 2:
            return None, None
        h, d = shape[-2], shape[-1]
        h = h if h is not None and h > 0 else None
        d = d if d is not None and d > 0 else None
        return h, d
    return None, None


def _reconcile_heads(name, q, k, heads, head_dim, kv_heads, kv_dim):
    """Fill the unknowns from out_features = heads * head_dim and check the knowns agree."""
    head_dim = head_dim or kv_dim
    if head_dim is None and heads:
        head_dim = q.out_features // heads
    if head_dim is None and kv_heads:
        head_dim = k.out_features // kv_heads
    if head_dim:
        heads = heads or q.out_features // head_dim
        kv_heads = kv_heads or k.out_features // head_dim
    if heads and head_dim and heads * head_dim != q.out_features:
        logger.warning("%s: %d heads x %d != q width %d", name, heads, head_dim, q.out_features)
    if kv_heads and head_dim and kv_heads * head_dim != k.out_features:
        logger.warning("%s: %d KV heads x %d != k width %d", name, kv_heads, head_dim, k.out_features)
    if heads is None:
        logger.warning("%s: could not read the head count from the graph", name)
    return heads, kv_heads, head_dim


def _native_attention(node: ir.Node, by_output: dict[str, Linear]) -> AttentionBlock | None:
    """Contrib attention ops carry num_heads (and kv_num_heads) as attributes."""
    heads = attr(node, "num_heads")
    kv_heads = attr(node, "kv_num_heads", heads)
    o = _output_linear(node.outputs[0], by_output)
    packed, q = None, None
    if node.op_type == "Attention":
        shape = const_shape(node.inputs[1])
        if shape is None or len(shape) != 2:
            return None
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        packed = Linear.at(
            node, node.inputs[0], node.inputs[1], shape, transposed=False, output=node.outputs[0].name or "", bias=value_name(bias)
        )
        width = shape[1] // 3
        k = v = None
    else:
        traced = [_trace_to_linear(v, by_output) if v is not None else None for v in node.inputs[:3]]
        q, k, v = (t[0] if t else None for t in traced)
        width = q.out_features if q else None
        if q is not None and node.op_type == "GroupQueryAttention" and node.inputs[1] is None and heads and kv_heads:
            width = q.out_features * heads // (heads + 2 * kv_heads)  # packed QKV (onnxruntime-genai): q, k, v widths in one
    head_dim = width // heads if width and heads else None
    return AttentionBlock(
        q=q, k=k, v=v, o=o, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, softmax=None,
        rotary=bool(attr(node, "do_rotary", 0)), op_type=node.op_type, node=node_name(node), packed_qkv=packed,
    )  # fmt: skip


