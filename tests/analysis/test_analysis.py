"""analysis.analyze on tiny hand-built graphs and on the real exported models."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import pytest

from onnxscript.rewriter import pattern

from edgeprune.analysis import Structures, analyze, ffn
from edgeprune.model_io import load_model


def _model(text: str, weights: dict[str, np.ndarray] | None = None) -> ir.Model:
    """Parse ONNX text and attach ``weights`` as initializers."""
    proto = onnx.parser.parse_model(text)
    for name, array in (weights or {}).items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array.astype(np.float32), name))
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def _w(*shape: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


HEADER = '<ir_version: 10, opset_import: ["" : 20, "com.microsoft" : 1]>'


# --------------------------------------------------------------------------- FFN


def test_mlp_with_gelu_op_is_one_ffn():
    model = _model(
        HEADER
        + """
        g (float[N, 8] x) => (float[N, 8] y) {
            h = MatMul(x, w1)
            hb = Add(h, b1)
            a = Gelu(hb)
            o = MatMul(a, w2)
            y = Add(b2, o)
        }""",
        {"w1": _w(8, 16), "b1": _w(16), "w2": _w(16, 8), "b2": _w(8)},
    )
    s = analyze(model)
    assert [lin.weight for lin in s.linears] == ["w1", "w2"]
    up, down = s.linears
    assert (up.in_features, up.out_features, up.bias, up.output) == (8, 16, "b1", "hb")
    assert (down.bias, down.output, down.input) == ("b2", "y", "a")
    assert len(s.ffn_blocks) == 1
    ffn = s.ffn_blocks[0]
    assert (ffn.up.weight, ffn.down.weight, ffn.gate) == ("w1", "w2", None)
    assert (ffn.hidden, ffn.gated, ffn.activation) == (16, False, "gelu")
    assert s.attention_blocks == []


def test_erf_gelu_as_exported_by_torch_is_named_by_pattern():
    model = _model(
        HEADER
        + """
        g (float[N, 8] x) => (float[N, 8] y) {
            h = MatMul(x, w1)
            sqrt2 = Constant<value = float {1.4142135}>()
            d = Div(h, sqrt2)
            e = Erf(d)
            one = Constant<value = float {1.0}>()
            e1 = Add(one, e)
            m = Mul(h, e1)
            half = Constant<value = float {0.5}>()
            a = Mul(half, m)
            y = MatMul(a, w2)
        }""",
        {"w1": _w(8, 12), "w2": _w(12, 8)},
    )
    (ffn,) = analyze(model).ffn_blocks
    assert (ffn.activation, ffn.hidden, ffn.gated) == ("gelu_erf", 12, False)


def test_erf_with_wrong_constants_is_not_called_gelu_by_pattern():
    """Erf*x with 0.25 instead of 0.5: the pattern check rejects it; the fallback still sees Erf."""
    model = _model(
        HEADER
        + """
        g (float[N, 8] x) => (float[N, 8] y) {
            h = MatMul(x, w1)
            sqrt2 = Constant<value = float {1.4142135}>()
            d = Div(h, sqrt2)
            e = Erf(d)
            one = Constant<value = float {1.0}>()
            e1 = Add(e, one)
            m = Mul(h, e1)
            q = Constant<value = float {0.25}>()
            a = Mul(m, q)
            y = MatMul(a, w2)
        }""",
        {"w1": _w(8, 12), "w2": _w(12, 8)},
    )
    mul = [n for n in model.graph if n.op_type == "Mul"][-1]
    tracer = pattern.MatchingTracer()
    patterns = ffn.ACTIVATION_PATTERNS["gelu_erf"]
    assert not any(p.match(model, model.graph, mul, check_nodes_are_removable=False, tracer=tracer) for p in patterns)
    assert ffn.match_activation(model, mul, mul.inputs[0].producer().inputs[0]) is None
    # the structure matched; only the constant check failed, and it says which constant and why
    failed = {
        info.match_result.reason
        for infos in tracer.best_matches_map.values()
        for info in infos
        if info.status == pattern.MatchStatus.CONDITION_FAILED
    }
    assert failed == {"c_half is 0.25, expected 0.5"}
    (block,) = analyze(model).ffn_blocks
    assert block.activation == "gelu_erf"  # named by the Erf fallback, not by the pattern


def test_gated_swiglu_ffn():
    model = _model(
        HEADER
        + """
        g (float[N, 8] x) => (float[N, 8] y) {
            g1 = MatMul(x, wg)
            s = Sigmoid(g1)
            act = Mul(g1, s)
            u = MatMul(x, wu)
            p = Mul(act, u)
            y = MatMul(p, wd)
        }""",
        {"wg": _w(8, 24), "wu": _w(8, 24), "wd": _w(24, 8)},
    )
    (ffn,) = analyze(model).ffn_blocks
    assert ffn.gated and ffn.hidden == 24 and ffn.activation == "silu"
    assert (ffn.gate.weight, ffn.up.weight, ffn.down.weight) == ("wg", "wu", "wd")


def test_two_linears_in_a_row_are_not_an_ffn():
    model = _model(
        HEADER + "g (float[N, 8] x) => (float[N, 8] y) { h = MatMul(x, w1)\n y = MatMul(h, w2) }",
        {"w1": _w(8, 16), "w2": _w(16, 8)},
    )
    s = analyze(model)
    assert len(s.linears) == 2 and s.ffn_blocks == []


# --------------------------------------------------------------------------- linears


def test_gemm_trans_b_and_shared_weight():
    model = _model(
        HEADER
        + """
        g (float[N, 8] x) => (float[N, 4] y, float[N, 3] z) {
            y = Gemm<transB = 1>(x, w, c)
            z = MatMul(x, ws)
            z2 = MatMul(x, ws)
        }""",
        {"w": _w(4, 8), "c": _w(4), "ws": _w(8, 3)},
    )
    s = analyze(model)
    gemm = next(lin for lin in s.linears if lin.op_type == "Gemm")
    assert (gemm.in_features, gemm.out_features, gemm.transposed, gemm.bias) == (8, 4, True, "c")
    assert not gemm.shared
    shared = [lin for lin in s.linears if lin.weight == "ws"]
    assert len(shared) == 2 and all(lin.shared for lin in shared)
    assert all((lin.in_features, lin.out_features, lin.transposed) == (8, 3, False) for lin in shared)


def test_matmul_on_a_graph_input_weight_is_not_a_linear():
    """A weight the caller feeds (graph input, or an initializer that is also an input) is not constant."""
    proto = onnx.parser.parse_model(
        HEADER
        + """
        g (float[N, 8] x, float[8, 4] w, float[8, 4] w_default) => (float[N, 4] y, float[N, 4] z) {
            y = MatMul(x, w)
            z = MatMul(x, w_default)
        }"""
    )
    proto.graph.initializer.append(onnx.numpy_helper.from_array(_w(8, 4), "w_default"))
    s = analyze(ir.serde.deserialize_model(proto))
    assert s.linears == []


def test_nothing_found_in_plain_elementwise_graph():
    model = _model(HEADER + "g (float[N, 8] x) => (float[N, 8] y) { a = Relu(x)\n y = Add(a, x) }")
    s = analyze(model)
    assert s.to_dict() == Structures().to_dict()
    assert s.summary() == ["0 linear layers (0 with shared weights)", "no MoE layers"]


# --------------------------------------------------------------------------- attention

_BERT_ATTENTION = """
    g (float[B, S, 16] x, float[B, 1, 1, S] mask) => (float[B, S, 16] y) {
        q = MatMul(x, wq)
        qb = Add(bq, q)
        k = MatMul(x, wk)
        kb = Add(bk, k)
        v = MatMul(x, wv)
        vb = Add(bv, v)
        shp = Shape(x)
        i0 = Constant<value = int64 {0}>()
        i1 = Constant<value = int64 {1}>()
        b = Gather<axis = 0>(shp, i0)
        s = Gather<axis = 0>(shp, i1)
        zero = Constant<value = int64[1] {0}>()
        bu = Unsqueeze(b, zero)
        su = Unsqueeze(s, zero)
        nh = Constant<value = int64[1] {2}>()
        hd = Constant<value = int64[1] {8}>()
        split = Concat<axis = 0>(bu, su, nh, hd)
        qr = Reshape(qb, split)
        qt = Transpose<perm = [0, 2, 1, 3]>(qr)
        kr = Reshape(kb, split)
        kt = Transpose<perm = [0, 2, 3, 1]>(kr)
        vr = Reshape(vb, split)
        vt = Transpose<perm = [0, 2, 1, 3]>(vr)
        sc = MatMul(qt, kt)
        scale = Constant<value = float {2.828427}>()
        scs = Div(sc, scale)
        scm = Add(scs, mask)
        p = Softmax<axis = -1>(scm)
        ctx = MatMul(p, vt)
        ct = Transpose<perm = [0, 2, 1, 3]>(ctx)
        width = Constant<value = int64[1] {16}>()
        merge = Concat<axis = 0>(bu, su, width)
        cm = Reshape(ct, merge)
        o = MatMul(cm, wo)
        y = Add(o, bo)
    }"""


def _bert_weights():
    return {f"w{n}": _w(16, 16) for n in "qkvo"} | {f"b{n}": _w(16) for n in "qkvo"}


def test_bert_attention_with_dynamic_reshape_shape():
    model = _model(HEADER + _BERT_ATTENTION, _bert_weights())
    s = analyze(model)
    (att,) = s.attention_blocks
    assert (att.q.weight, att.k.weight, att.v.weight, att.o.weight) == ("wq", "wk", "wv", "wo")
    assert (att.num_heads, att.num_kv_heads, att.head_dim) == (2, 2, 8)
    assert (att.softmax, att.score_matmul, att.context_matmul) == ("Softmax:p", "MatMul:sc", "MatMul:ctx")
    assert (att.rotary, att.layer, att.op_type, att.node, att.packed_qkv) == (False, 0, "subgraph", None, None)
    assert att.q.output == "qb" and att.o.output == "y"
    assert s.ffn_blocks == []
    assert "1 attention block: 2 query heads, 2 KV heads, head dim 8" in s.summary()


def test_head_count_comes_from_the_reshape_not_a_guess():
    """Same widths, 4 heads of 4: only the Reshape's constant pieces tell 2x8 from 4x4."""
    text = _BERT_ATTENTION.replace("int64[1] {2}", "int64[1] {4}").replace("int64[1] {8}", "int64[1] {4}")
    (att,) = analyze(_model(HEADER + text, _bert_weights())).attention_blocks
    assert (att.num_heads, att.head_dim) == (4, 4)


_GQA_ROTARY = """
    g (float[B, S, 16] x, float[B, 1, S, 4] cos, float[B, 1, S, 4] sin) => (float[B, S, 16] y) {
        q = MatMul(x, wq)
        k = MatMul(x, wk)
        v = MatMul(x, wv)
        shp = Shape(x)
        i0 = Constant<value = int64 {0}>()
        i1 = Constant<value = int64 {1}>()
        b = Gather<axis = 0>(shp, i0)
        s = Gather<axis = 0>(shp, i1)
        zero = Constant<value = int64[1] {0}>()
        bu = Unsqueeze(b, zero)
        su = Unsqueeze(s, zero)
        hd = Constant<value = int64[2] {-1, 4}>()
        split = Concat<axis = 0>(bu, su, hd)
        qr = Reshape(q, split)
        qt = Transpose<perm = [0, 2, 1, 3]>(qr)
        kr = Reshape(k, split)
        kt = Transpose<perm = [0, 2, 1, 3]>(kr)
        vr = Reshape(v, split)
        vt = Transpose<perm = [0, 2, 1, 3]>(vr)
        st0 = Constant<value = int64[1] {0}>()
        mid = Constant<value = int64[1] {2}>()
        big = Constant<value = int64[1] {100}>()
        ax = Constant<value = int64[1] {3}>()
        q1 = Slice(qt, st0, mid, ax)
        q2 = Slice(qt, mid, big, ax)
        qn = Neg(q2)
        qrot = Concat<axis = -1>(qn, q1)
        qc = Mul(qt, cos)
        qs = Mul(qrot, sin)
        qe = Add(qc, qs)
        k1 = Slice(kt, st0, mid, ax)
        k2 = Slice(kt, mid, big, ax)
        kn = Neg(k2)
        krot = Concat<axis = -1>(kn, k1)
        kc = Mul(kt, cos)
        ks = Mul(krot, sin)
        ke = Add(kc, ks)
        two = Constant<value = int64[1] {2}>()
        rep = Constant<value = int64[5] {1, 1, 2, 1, 1}>()
        ku = Unsqueeze(ke, two)
        kx = Expand(ku, rep)
        vu = Unsqueeze(vt, two)
        vx = Expand(vu, rep)
        tail = Constant<value = int64[3] {4, -1, 4}>()
        merge_heads = Concat<axis = 0>(bu, tail)
        kg = Reshape(kx, merge_heads)
        vg = Reshape(vx, merge_heads)
        kgt = Transpose<perm = [0, 1, 3, 2]>(kg)
        sc = MatMul(qe, kgt)
        half = Constant<value = float {0.5}>()
        scs = Mul(sc, half)
        p = Softmax<axis = -1>(scs)
        ctx = MatMul(p, vg)
        ct = Transpose<perm = [0, 2, 1, 3]>(ctx)
        m1 = Constant<value = int64[1] {-1}>()
        merge = Concat<axis = 0>(bu, su, m1)
        cm = Reshape(ct, merge)
        y = MatMul(cm, wo)
    }"""


def test_gqa_attention_with_rotary_and_kv_repeat():
    model = _model(HEADER + _GQA_ROTARY, {"wq": _w(16, 16), "wk": _w(16, 8), "wv": _w(16, 8), "wo": _w(16, 16)})
    (att,) = analyze(model).attention_blocks
    assert (att.num_heads, att.num_kv_heads, att.head_dim) == (4, 2, 4)
    assert att.rotary
    assert (att.q.weight, att.k.weight, att.v.weight, att.o.weight) == ("wq", "wk", "wv", "wo")


def test_contrib_multihead_attention_reads_num_heads():
    model = _model(
        HEADER
        + """
        g (float[B, S, 16] x) => (float[B, S, 16] y) {
            q = MatMul(x, wq)
            k = MatMul(x, wk)
            v = MatMul(x, wv)
            a = com.microsoft.MultiHeadAttention<num_heads = 4>(q, k, v)
            y = MatMul(a, wo)
        }""",
        {f"w{n}": _w(16, 16) for n in "qkvo"},
    )
    (att,) = analyze(model).attention_blocks
    assert (att.op_type, att.num_heads, att.num_kv_heads, att.head_dim) == ("MultiHeadAttention", 4, 4, 4)
    assert (att.q.weight, att.o.weight) == ("wq", "wo")


# --------------------------------------------------------------------------- convs, embeddings, MoE


def test_conv_chain_with_depthwise_conv():
    model = _model(
        HEADER
        + """
        g (float[1, 3, 16, 16] x) => (float[1, 6, 8, 8] y) {
            c1 = Conv<pads = [1, 1, 1, 1]>(x, w1, b1)
            n1 = BatchNormalization(c1, sc, bi, mu, va)
            r1 = Relu(n1)
            c2 = Conv<group = 8, pads = [1, 1, 1, 1]>(r1, w2)
            r2 = Clip(c2)
            c3 = Conv(r2, w3)
            p = MaxPool<kernel_shape = [2, 2], strides = [2, 2]>(c3)
            y = Conv(p, w4)
        }""",
        {"w1": _w(8, 3, 3, 3), "b1": _w(8), "sc": _w(8), "bi": _w(8), "mu": _w(8), "va": np.ones(8),
         "w2": _w(8, 1, 3, 3), "w3": _w(4, 8, 1, 1), "w4": _w(6, 4, 1, 1)},
    )  # fmt: skip
    s = analyze(model)
    c1, c2, c3, c4 = s.conv_layers
    assert (c1.out_channels, c1.in_channels, c1.kernel, c1.groups, c1.depthwise) == (8, 3, (3, 3), 1, False)
    assert (c1.bias, c1.batchnorm, c1.activation, c1.output) == ("b1", "BatchNormalization:n1", "relu", "r1")
    assert (c2.depthwise, c2.groups, c2.in_channels, c2.out_channels, c2.activation) == (True, 8, 8, 8, "clip")
    assert (c3.out_channels, c3.in_channels, c3.depthwise) == (4, 8, False)
    assert [chain.convs for chain in s.conv_chains] == [[c1.node, c2.node, c3.node], [c4.node]]
    assert s.linears == [] and s.attention_blocks == []


def test_embedding_tied_with_lm_head_through_transpose():
    model = _model(
        HEADER
        + """
        g (int64[B, S] ids) => (float[B, S, 10] logits, float[B, S, 4] pos_out) {
            h = Gather(table, ids)
            pe = Gather(pos, ids)
            pos_out = Add(h, pe)
            tt = Transpose<perm = [1, 0]>(table)
            logits = MatMul(h, tt)
        }""",
        {"table": _w(10, 4), "pos": _w(10, 4)},
    )
    s = analyze(model)
    emb = {e.table: e for e in s.embeddings}
    assert (emb["table"].vocab, emb["table"].dim, emb["table"].tied) == (10, 4, True)
    assert not emb["pos"].tied
    (head,) = s.linears
    assert (head.weight, head.transposed, head.in_features, head.out_features) == ("table", True, 4, 10)
    assert (head.weight_transpose, head.node, emb["table"].tied_with) == ("Transpose:tt", "MatMul:logits", "MatMul:logits")


def test_moe_router_with_topk():
    model = _model(
        HEADER
        + """
        g (float[N, 8] x) => (float[N, 2] vals, int64[N, 2] idx) {
            r = MatMul(x, wr)
            p = Softmax<axis = -1>(r)
            kk = Constant<value = int64[1] {2}>()
            vals, idx = TopK(p, kk)
        }""",
        {"wr": _w(8, 4)},
    )
    (moe,) = analyze(model).moe_layers
    assert (moe.num_experts, moe.top_k, moe.router.weight, moe.experts, moe.node) == (4, 2, "wr", [], "TopK:vals")


def test_analyze_leaves_the_model_unchanged_and_to_dict_is_json():
    model = _model(HEADER + _BERT_ATTENTION, _bert_weights())
    before = ir.serde.serialize_model(model).SerializeToString()
    s = analyze(model)
    assert ir.serde.serialize_model(model).SerializeToString() == before
    assert json.loads(json.dumps(s.to_dict())) == s.to_dict()


# --------------------------------------------------------------------------- real models


@pytest.mark.realmodel
def test_minilm_structures(minilm_onnx):
    s = analyze(load_model(minilm_onnx))
    assert len(s.attention_blocks) == 6
    assert all((b.num_heads, b.num_kv_heads, b.head_dim, b.rotary) == (12, 12, 32, False) for b in s.attention_blocks)
    assert [b.layer for b in s.attention_blocks] == list(range(6))
    assert all((b.q.out_features, b.o.in_features, b.o.out_features) == (384, 384, 384) for b in s.attention_blocks)
    assert len(s.ffn_blocks) == 6
    assert all((f.hidden, f.gated, f.activation) == (1536, False, "gelu_erf") for f in s.ffn_blocks)
    assert [(e.table.rsplit(".", 2)[-2], e.vocab, e.dim, e.tied) for e in s.embeddings] == [
        ("word_embeddings", 30522, 384, False), ("token_type_embeddings", 2, 384, False), ("position_embeddings", 512, 384, False)]  # fmt: skip
    assert s.moe_layers == []
    assert json.loads(json.dumps(s.to_dict())) == s.to_dict()


@pytest.mark.realmodel
def test_smollm2_structures(smollm2_onnx):
    s = analyze(load_model(smollm2_onnx))
    assert len(s.attention_blocks) == 30
    assert all(
        (b.num_heads, b.num_kv_heads, b.head_dim, b.rotary) == (9, 3, 64, True) for b in s.attention_blocks
    )
    assert all((b.o.in_features, b.o.out_features) == (576, 576) for b in s.attention_blocks)
    assert len(s.ffn_blocks) == 30
    assert all((f.hidden, f.gated, f.activation) == (1536, True, "silu") for f in s.ffn_blocks)
    # The optimum export ties them: lm_head is MatMul(h, Transpose(model.embed_tokens.weight)).
    (emb,) = s.embeddings
    assert (emb.table, emb.vocab, emb.dim, emb.tied, emb.tied_with) == ("model.embed_tokens.weight", 49152, 576, True, "/lm_head/MatMul")
    assert "30 attention blocks: 9 query heads, 3 KV heads, head dim 64, rotary" in s.summary()
