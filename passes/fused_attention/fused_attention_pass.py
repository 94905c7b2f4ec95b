"""The ``fuse_attention`` pass: exported causal self-attention -> ORT's fused ``GroupQueryAttention``.

optimum exports a decoder's attention as ~40 small ops per layer (head split, rotary, repeat_kv
Unsqueeze/Expand/Reshape, scores, an additive causal mask built from ``attention_mask``, Softmax,
NaN guard, context).  On a CPU each op costs a dispatch, which dominates a decode step (one token),
and the unfused form materializes the repeated K/V and the full score matrix.  ORT's contrib
``GroupQueryAttention`` does the same computation in one kernel (the form onnxruntime-genai's builder
emits).  GQA reads the un-repeated K/V heads.  Multi-head attention (as many KV heads as query heads),
which transformers exports without repeat_kv, becomes GQA with ``kv_num_heads == num_heads``.

Rotary embedding (``rotary``, on by default) moves inside GQA too when Q and K get transformers'
rotate_half embedding from the same cos/sin tables (``graph_forms.rotary``) and the head size is a
multiple of 16 (ORT's rotary kernels): ``do_rotary=1``, the model's ``position_ids`` passed through, and
cos/sin caches of ``max_positions`` rows computed by a copy of the model's own table subgraph fed positions
0..max_positions-1 (folded by ORT when the session loads, so the file does not grow).  The fused model then
refuses a total length past ``max_positions`` (ORT's error), where the exported graph would go on; 8192 is
SmolLM2's and LLaMA-3.2's context.  The head split before attention (Reshape + Transpose of each
projection) and the merge after it are dropped where they only split the last dimension, since GQA reads and
writes [batch, sequence, heads * head_size]: on SmolLM2 a decode step runs 429 ORT nodes instead of 1617
with the embedding outside (3149 unfused; onnxruntime-genai's int4 model: 309).  The sparse-attention pass
cannot carry rotary inside GQA: with both, run this one with ``rotary = false``.

With a KV cache (``text-generation-with-past``: K = Concat(past_key_values.N.key, new)), the past
tensors become GQA's ``past_key``/``past_value`` and GQA's ``present_key``/``present_value`` become the
graph's ``present.N.*`` outputs under the same names, so the cache interface is unchanged.

Padding: GQA reads each row's length from ``attention_mask`` (``seqlens_k = sum(mask) - 1``), which
is exact for right-padded batches (the real tokens' outputs) and for decoding with a cache; a
left-padded batch is not the same computation (the exported graph masks any pattern).
The pass leaves a block unfused, with the reason, when the model has no 2-D ``attention_mask`` input
of a decoder (then the total length comes from K) or when the block is not causal.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common
from onnxscript.rewriter.pattern import MatchResult, RewriteRule, RewriteRuleSet

from edgeprune.analysis import analyze
from edgeprune.analysis import attention_patterns as patterns
from edgeprune.errors import BadInputError
from edgeprune.passes.base import EdgePass, EdgePassResult
from edgeprune.passes.fused_attention import graph_forms as forms

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
_PERM = [0, 2, 1, 3]  # [B, H, S, D] <-> [B, S, H, D]


@dataclasses.dataclass
class FusedAttentionConfig:
    """A block is fused exactly, or left as it was with the reason."""

    rotary: bool = True
    """Move a rotate_half rotary embedding into GQA (``do_rotary``, cos/sin caches from the model's own tables)."""
    max_positions: int = 8192
    """Rows of those caches: the largest position (``position_ids``) the fused model can take, plus one."""

    def __post_init__(self):
        if isinstance(self.max_positions, bool) or not isinstance(self.max_positions, int) or self.max_positions < 1:
            raise BadInputError(f"fuse_attention's max_positions must be a positive number of positions, got {self.max_positions!r}.")


@dataclasses.dataclass
class _Made:
    """One fused block: what the cache rewiring and the output merge need."""

    k: ir.Value
    v: ir.Value
    present_k: ir.Value
    present_v: ir.Value
    cached: bool
    rotary: bool
    y: ir.Value  # GQA's output [B, S, H*D]
    y4: ir.Value  # that split into heads [B, H, S, D], as the exported block's output
    rows: tuple[ir.Value, ...]  # values whose leading dims are y's [B, S] (the query projection and its input)
    heads: int
    head_dim: int


def _rotary_pair(q: ir.Value, k: ir.Value, head_dim: int) -> tuple[ir.Value, ir.Value, ir.Value, ir.Value] | None:
    """(q before rotary, k before rotary, cos table, sin table) when both get the same rotary embedding
    from tables that a copy can compute from positions alone; else None (the block is fused without it).
    ORT's rotary kernels take head sizes in multiples of 16."""
    if head_dim % 16:
        return None
    q_rope, k_rope = forms.rotary(q, head_dim), forms.rotary(k, head_dim)
    if q_rope is None or k_rope is None or q_rope[1:] != k_rope[1:]:
        return None
    if not forms.table_inputs(q_rope[1:])[0]:
        return None
    return q_rope[0], k_rope[0], q_rope[1], q_rope[2]


def _merge_outputs(model: ir.Model, made: list[_Made]) -> int:
    """Where the exporter merges the heads back (Transpose + Reshape to [B, S, H*D]), read GQA's output as it is."""
    merged = 0
    outputs = set(model.graph.outputs)
    for m in made:
        if not m.rows:
            continue
        value = forms.merged_heads(m.y4, m.rows, m.heads, m.head_dim)
        if value is None or value in outputs:
            continue
        value.replace_all_uses_with(m.y)
        merged += 1
    return merged


def _past_and_new(x: ir.Value) -> tuple[ir.Value | None, ir.Value]:
    """(the cache input, the new keys/values) when ``x`` is Concat(past graph input, new) on the sequence axis."""
    node = x.producer()
    if node is not None and node.op_type == "Concat" and len(node.inputs) == 2 and node.inputs[0] is not None \
            and node.inputs[0].is_graph_input() and node.attributes.get_int("axis", 0) in (2, -2):
        return node.inputs[0], node.inputs[1]
    return None, x


def _mask_input(model: ir.Model) -> ir.Value | None:
    for value in model.graph.inputs:
        if value.name == "attention_mask" and value.shape is not None and len(value.shape) == 2:
            return value
    return None


def _reason(softmax: ir.Node, analyzed: bool) -> str:
    """Why a Softmax-centred block stays unfused (the common failures, in the rules' check order)."""
    reason = patterns.not_causal_reason(softmax, "left unfused")
    if reason is not None:
        return reason
    if not analyzed:
        return "no attention block with head counts found here (quantized projections are not read as linears): left unfused"
    return "the attention subgraph is not in a form the rules match: left unfused"


class FusedAttentionPass(EdgePass):
    """Causal self-attention blocks become one ``com.microsoft.GroupQueryAttention`` each."""

    name: ClassVar[str] = "fuse_attention"
    Config: ClassVar[type] = FusedAttentionConfig

    def call(self, model: ir.Model) -> EdgePassResult:
        blocks = {b.softmax: b for b in analyze(model).attention_blocks if b.op_type == "subgraph" and b.softmax}
        softmaxes = [n for n in model.graph if n.op_type == "Softmax" and n.domain in ("", "ai.onnx")]
        reasons = {n.name: _reason(n, n.name in blocks) for n in softmaxes}
        mask_input = _mask_input(model)
        made: list[_Made] = []

        def check(context, q, k, v, cq, ck, mask, probs, *, repeated: bool, **_) -> MatchResult:
            result = MatchResult()
            if not patterns.is_causal(mask):
                return result.fail("not causal")
            if patterns.score_scale(cq, ck) is None:
                return result.fail("the score scale is not a constant scalar")
            block = blocks.get(probs.producer().name)
            if block is None or not (block.num_heads and block.num_kv_heads and block.head_dim):
                reasons[probs.producer().name] = "head counts not found by the analysis: left unfused"
                return result.fail("no head counts")
            if not repeated and block.num_kv_heads != block.num_heads:  # k is a GQA block's repeated k_rep
                return result.fail("KV heads differ from query heads and K/V are not repeated here")
            if (_past_and_new(k)[0] is None) != (_past_and_new(v)[0] is None):
                reasons[probs.producer().name] = "only one of K and V reads a cache input: left unfused"
                return result.fail("mixed cache")
            return result

        shared: dict = {}  # values built once and read by every block (rules rewrite blocks in graph order)

        def once(key, build):
            if key not in shared:
                shared[key] = build()
            return shared[key]

        def rewrite(op, q, k, v, cq, ck, probs, **_):
            block = blocks[probs.producer().name]
            hq, hkv, d = block.num_heads, block.num_kv_heads, block.head_dim
            past_k, new_k = _past_and_new(k)
            past_v, new_v = _past_and_new(v)
            rope = _rotary_pair(q, new_k, d) if self.config.rotary else None
            if rope is not None:
                q, new_k = rope[0], rope[1]
            sources = [forms.split_heads_source(x, h, d) for x, h in ((q, hq), (new_k, hkv), (new_v, hkv))]
            flat = once("flat", lambda: op.Constant(value=ir.tensor(np.array([0, 0, -1], np.int64))))
            qf, kf, vf = (p if p is not None else op.Reshape(op.Transpose(x, perm=_PERM), flat)
                          for x, p in zip((q, new_k, new_v), sources))  # fmt: skip
            if mask_input is not None:  # per-row lengths; the mask spans the past and the new tokens

                def lengths_and_total():
                    one = op.Constant(value=ir.tensor(np.array(1, np.int64)))
                    lengths = op.ReduceSum(mask_input, op.Constant(value=ir.tensor(np.array([1], np.int64))), keepdims=0)
                    total = op.Squeeze(op.Shape(mask_input, start=1, end=2))
                    return op.Cast(op.Sub(lengths, one), to=ir.DataType.INT32), op.Cast(total, to=ir.DataType.INT32)

                seqlens, total = once("lengths", lengths_and_total)
            else:  # every row is full length: the keys' length (past included)
                one = op.Constant(value=ir.tensor(np.array(1, np.int64)))
                total = op.Squeeze(op.Shape(k, start=2, end=3))
                lengths = op.Expand(total, op.Shape(q, start=0, end=1))
                seqlens, total = op.Cast(op.Sub(lengths, one), to=ir.DataType.INT32), op.Cast(total, to=ir.DataType.INT32)
            scale = patterns.score_scale(cq, ck)
            rotary_inputs, rotary_attributes = (), {}
            if rope is not None:
                rotary_inputs = once(("rotary", rope[2], rope[3]),
                                     lambda: forms.position_tables(op, (rope[2], rope[3]), self.config.max_positions, d))
                rotary_attributes = {"do_rotary": 1, "rotary_interleaved": 0}
            y, present_k, present_v = op.GroupQueryAttention(
                qf, kf, vf, past_k, past_v, seqlens, total, *rotary_inputs, _domain=MS_DOMAIN,
                num_heads=hq, kv_num_heads=hkv, scale=scale, **rotary_attributes, _outputs=3,
            )  # fmt: skip
            y.type = q.type  # ONNX shape inference does not know the contrib op: say what it returns
            if sources[0] is not None:  # [B, S, H*D], as the query projection
                y.shape = sources[0].shape
            heads = op.Constant(value=ir.tensor(np.array([0, 0, hq, d], np.int64)))
            y4 = op.Transpose(op.Reshape(y, heads), perm=_PERM)
            rows = forms.rows_source(sources[0]) if sources[0] is not None else ()
            made.append(_Made(k, v, present_k, present_v, past_k is not None, rope is not None, y, y4, rows, hq, d))
            return y4

        rule_set = RewriteRuleSet([
            RewriteRule(pattern, rewrite, functools.partial(check, repeated=repeated), name=f"FuseAttention{suffix}", remove_nodes=False)
            for repeated, rules in ((True, patterns.PATTERNS), (False, patterns.UNREPEATED_PATTERNS)) for suffix, pattern in rules
        ])  # fmt: skip
        count = rule_set.apply_to_model(model) if blocks else 0
        if count:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            self._rewire_cache(model, made)
            merged = _merge_outputs(model, made)
            logger.debug("fuse_attention: %d head merges read GQA's output directly", merged)
            ir.passes.common.RemoveUnusedNodesPass()(model)
        left = {n.name for n in model.graph if n.op_type == "Softmax"}
        records = [{"layer": i, "softmax": n.name, "status": "unfused" if n.name in left else "fused",
                    **({"reason": reasons[n.name]} if n.name in left else {})}
                   for i, n in enumerate(softmaxes)]  # fmt: skip
        summary = {"fused": count, "unfused": len(softmaxes) - count, "with_cache": sum(1 for m in made if m.cached)}
        if self.config.rotary:
            summary["rotary_inside"] = sum(1 for m in made if m.rotary)
        logger.info("fuse_attention: %d of %d attention blocks -> GroupQueryAttention", count, len(softmaxes))
        return EdgePassResult(model, modified=bool(count), records=records, summary=summary)

    @staticmethod
    def _rewire_cache(model: ir.Model, made) -> None:
        """The graph's present.N outputs (the Concats) now come from GQA's present outputs, under the same names."""
        outputs = model.graph.outputs
        for m in made:
            for old, new in ((m.k, m.present_k), (m.v, m.present_v)):
                if old in outputs:
                    name = old.name
                    old.name = f"{name}.unfused"
                    new.name = name
                    new.type, new.shape = old.type, old.shape  # a graph output declares its type
                    outputs[outputs.index(old)] = new

    @classmethod
    def describe(cls, model: ir.Model) -> dict[str, Any] | None:
        fused = sum(1 for n in model.graph if n.domain == MS_DOMAIN and n.op_type == "GroupQueryAttention")
        if not fused:
            return None
        return {"summary": [f"{fused} com.microsoft.GroupQueryAttention op(s) (fused attention)"], "fields": {"gqa_ops": fused}}
