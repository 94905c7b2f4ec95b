"""analysis.attention_patterns: which exported attention forms each pattern matches, what it binds, the
causal-mask test and the score scale (shared by sparse_attention and fuse_attention)."""

from __future__ import annotations

import numpy as np
import onnx.parser
import onnx_ir as ir
import pytest
from onnxscript.rewriter.pattern import MatchResult, RewriteRule, RewriteRuleSet

from edgeprune.analysis import attention_patterns as patterns

_CAUSAL = """
    ones = Constant <value = float[4, 4] {1,1,1,1, 1,1,1,1, 1,1,1,1, 1,1,1,1}> ()
    tri = Trilu <upper = 0> (ones)
    keep = Cast <to = 9> (tri)
    zero = Constant <value = float {0.0}> ()
    ninf = Constant <value = float {-1e9}> ()
    mask = Where (keep, zero, ninf)"""
_REPEAT = """
    ax = Constant <value = int64[1] {2}> ()
    shp = Constant <value = int64[5] {1, 1, 2, 4, 8}> ()
    shp2 = Constant <value = int64[4] {1, 2, 4, 8}> ()
    ku = Unsqueeze (k, ax)
    ke = Expand (ku, shp)
    kr = Reshape (ke, shp2)
    vu = Unsqueeze (v, ax)
    ve = Expand (vu, shp)
    vr = Reshape (ve, shp2)"""


def _attention(*, repeat: bool, guard: bool, causal: bool = True, add_mask: bool = True) -> ir.Model:
    kv_heads = 1 if repeat else 2
    k, v = ("kr", "vr") if repeat else ("k", "v")
    mask_input = "" if causal else ", float[4, 4] mask"
    scores = "sm = Add (s, mask)" if add_mask else "sm = Identity (s)"
    probs = "pn = IsNaN (p)\n    nan = Constant <value = float {0.0}> ()\n    pg = Where (pn, nan, p)" if guard else ""
    text = f"""<ir_version: 10, opset_import: ["" : 17]>
    g (float[1, 2, 4, 8] q, float[1, {kv_heads}, 4, 8] k, float[1, {kv_heads}, 4, 8] v{mask_input}) => (float[1, 2, 4, 8] y) {{
    {_CAUSAL if causal else ""}
    {_REPEAT if repeat else ""}
    cq = Constant <value = float {{0.5946}}> ()
    ck = Constant <value = float {{0.5946}}> ()
    qs = Mul (q, cq)
    kt = Transpose <perm = [0, 1, 3, 2]> ({k})
    ks = Mul (kt, ck)
    s = MatMul (qs, ks)
    {scores}
    p = Softmax <axis = -1> (sm)
    {probs}
    y = MatMul ({"pg" if guard else "p"}, {v})
    }}"""
    return ir.from_proto(onnx.parser.parse_model(text))


def _matches(model: ir.Model, forms) -> list[tuple[str, str, str, str]]:
    """(pattern, q, k, v) of each match; the check records and then refuses, so nothing is rewritten."""
    found = []

    def check(name):
        def record(context, q, k, v, probs, **_):
            found.append((name, q.name, k.name, v.name))
            assert probs.producer().op_type == "Softmax"
            return MatchResult().fail("recorded")

        return record

    RewriteRuleSet([RewriteRule(p, lambda op, **_: None, check(name), remove_nodes=False) for name, p in forms]).apply_to_model(model)
    return found


@pytest.mark.parametrize("guard", [True, False])
def test_repeat_kv_form_binds_the_unrepeated_keys_and_values(guard):
    name = "Guarded" if guard else ""
    assert _matches(_attention(repeat=True, guard=guard), patterns.PATTERNS) == [(name, "q", "k", "v")]


@pytest.mark.parametrize("guard", [True, False])
def test_unrepeated_form_is_matched_only_by_the_unrepeated_patterns(guard):
    model = _attention(repeat=False, guard=guard)
    assert _matches(model, patterns.PATTERNS) == []
    assert _matches(model, patterns.UNREPEATED_PATTERNS) == [("UnrepeatedGuarded" if guard else "Unrepeated", "q", "k", "v")]


def test_unrepeated_patterns_also_fit_a_repeat_kv_block_on_its_repeated_values():
    """Why a pass must check the head counts before using them (fuse_attention does)."""
    assert _matches(_attention(repeat=True, guard=True), patterns.UNREPEATED_PATTERNS) == [("UnrepeatedGuarded", "q", "kr", "vr")]


def test_score_scale_is_the_float32_product_or_none():
    cq = ir.Value(name="cq", const_value=ir.tensor(np.array(0.5946, np.float32)))
    ck = ir.Value(name="ck", const_value=ir.tensor(np.array([0.5946], np.float32)))
    assert patterns.score_scale(cq, ck) == float(np.float32(0.5946) * np.float32(0.5946))
    assert patterns.score_scale(cq, ir.Value(name="fed")) is None
    assert patterns.score_scale(cq, ir.Value(name="vec", const_value=ir.tensor(np.ones(2, np.float32)))) is None


def test_causal_and_not_causal_reasons():
    def softmax(model):
        return next(n for n in model.graph if n.op_type == "Softmax")

    causal = _attention(repeat=True, guard=True)
    assert patterns.is_causal(softmax(causal).inputs[0].producer().inputs[1])
    assert patterns.not_causal_reason(softmax(causal), "left dense") is None
    assert patterns.not_causal_reason(softmax(_attention(repeat=True, guard=True, causal=False)), "left unfused") == \
        "the attention mask is not causal (encoder or cross-attention): left unfused"
    assert patterns.not_causal_reason(softmax(_attention(repeat=True, guard=True, add_mask=False)), "left dense") == \
        "no additive mask: not causal self-attention (left dense)"
