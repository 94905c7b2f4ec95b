"""The sparse-attention op (portable function and C++ kernel) and the pass, on tiny models."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from edgeprune.errors import BadInputError
from edgeprune.passes.sparse_attention import SparseAttentionConfig, SparseAttentionPass, allocation
from edgeprune.runtime import kernels
from edgeprune.runtime.session import make_session, uses_kernel_ops, prepare_model

from sparse_attention import reference
from sparse_attention.models import HD, block_op_model, causal_gqa_proto, fused_proto, op_model, two_layer_proto

LIBRARY = kernels.sparse_attention_library()
needs_kernel = pytest.mark.skipif(LIBRARY is None, reason="the kernel was not built (no C++ compiler at install)")

# (batch, Hq, Hkv, head dim, seq, block, keep, per_group): seq not a multiple of block, seq 1, batch 2, MHA
CASES = [
    (2, 6, 2, 16, 37, 8, 0.3, True),
    (1, 6, 2, 16, 37, 8, 0.3, False),
    (1, 9, 3, 64, 130, 64, 0.25, True),
    (2, 4, 4, 8, 70, 16, 0.5, False),
    (1, 6, 2, 16, 1, 8, 0.25, True),
    (1, 4, 2, 8, 64, 8, 0.125, True),
]


# With a KV cache: (batch, Hq, Hkv, head dim, new tokens S, past P, block, keep, per_group): decode steps
# (S = 1), a few queries, and chunked prefill over a past that is not a multiple of the block.
KV_CASES = [
    (1, 6, 2, 16, 1, 100, 8, 0.3, True),
    (2, 6, 2, 16, 1, 77, 8, 0.25, False),
    (1, 6, 2, 16, 3, 100, 8, 0.3, False),
    (1, 6, 2, 16, 6, 29, 8, 0.3, True),
    (2, 4, 4, 8, 20, 45, 8, 0.5, False),
    (1, 6, 2, 16, 40, 13, 8, 0.25, True),
    (1, 9, 3, 64, 1, 700, 64, 0.25, True),
    (1, 9, 3, 64, 130, 190, 64, 0.25, True),
]


def _inputs(b, hq, hkv, d, s, seed=0, past=0):
    rng = np.random.default_rng(seed)
    return {
        "q": rng.standard_normal((b, hq, s, d)).astype(np.float32),
        "k": rng.standard_normal((b, hkv, past + s, d)).astype(np.float32),
        "v": rng.standard_normal((b, hkv, past + s, d)).astype(np.float32),
    }


def _sessions(model: ir.Model):
    data = ir.serde.serialize_model(model).SerializeToString()
    portable = ort.InferenceSession(data)
    if LIBRARY is None:
        return portable, None
    so = ort.SessionOptions()
    so.register_custom_ops_library(LIBRARY)
    return portable, ort.InferenceSession(data, so)


@pytest.mark.parametrize("b,hq,hkv,d,s,block,keep,per_group", CASES)
def test_both_paths_equal_the_numpy_block_mask(b, hq, hkv, d, s, block, keep, per_group):
    model = op_model(hq, hkv, d, block=block, keep=keep, per_group=per_group)
    onnx.checker.check_model(ir.serde.serialize_model(model))
    feeds = _inputs(b, hq, hkv, d, s)
    index = reference.select_blocks(feeds["q"], feeds["k"], block, keep, per_group=per_group)
    expected = reference.block_sparse_attention(feeds["q"], feeds["k"], feeds["v"], index, block, d**-0.5)
    portable, kernel = _sessions(model)
    got = portable.run(None, feeds)[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    if kernel is not None:
        np.testing.assert_allclose(kernel.run(None, feeds)[0], got, atol=1e-4, rtol=0)


@pytest.mark.parametrize("b,hq,hkv,d,s,past,block,keep,per_group", KV_CASES)
def test_with_a_kv_cache_both_paths_equal_the_numpy_block_mask(b, hq, hkv, d, s, past, block, keep, per_group):
    model = op_model(hq, hkv, d, block=block, keep=keep, per_group=per_group)
    feeds = _inputs(b, hq, hkv, d, s, seed=2, past=past)
    index = reference.select_blocks(feeds["q"], feeds["k"], block, keep, per_group=per_group)
    nbk = -(-(past + s) // block)
    assert index.shape[-1] < nbk  # blocks are dropped: the case is not dense
    expected = reference.block_sparse_attention(feeds["q"], feeds["k"], feeds["v"], index, block, d**-0.5)
    portable, kernel = _sessions(model)
    got = portable.run(None, feeds)[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    if kernel is not None:
        np.testing.assert_allclose(kernel.run(None, feeds)[0], got, atol=1e-4, rtol=0)


@pytest.mark.parametrize("opset", [13, 17, 18, 21])
def test_function_bodies_at_every_opset(opset):
    # ReduceMin/ReduceMax (the decode step's Quest statistics) take axes as an attribute before 18, an input from 18.
    feeds = _inputs(2, 6, 2, 16, 1, seed=opset, past=60)
    feeds["key_mask"] = _left_padding(2, 61, [0, 9])
    index = reference.select_blocks(feeds["q"], feeds["k"], 8, 0.3, per_group=True, key_mask=feeds["key_mask"])
    expected = reference.block_sparse_attention(feeds["q"], feeds["k"], feeds["v"], index, 8, 0.25, key_mask=feeds["key_mask"])
    model = op_model(6, 2, 16, block=8, keep=0.3, masked=True, opset=opset)
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    np.testing.assert_allclose(_sessions(model)[0].run(None, feeds)[0], expected, atol=1e-4, rtol=0)


def test_reference_block_attention_over_every_block_is_dense_attention_with_a_past():
    feeds = _inputs(2, 6, 2, 16, 11, past=21)
    q, k, v = feeds["q"], feeds["k"], feeds["v"]
    index = np.broadcast_to(np.arange(4), (2, 6, 2, 4))  # 32 keys in 4 blocks of 8, 2 query blocks
    np.testing.assert_allclose(reference.block_sparse_attention(q, k, v, index, 8, 0.25),
                               reference.dense_causal_attention(q, k, v, 0.25), atol=1e-12)  # fmt: skip


def test_decode_step_selects_key_blocks_by_the_quest_bound():
    # One query, 10 key blocks of 8 keys (80 cached), keep 0.3 -> 3 blocks: the sink, the current
    # block, and the one with the largest Quest bound.  Block 4 holds +10q and -10q: its mean key is
    # 0, so mean pooling would never pick it, but its min/max bound is the largest and its +10q key
    # takes nearly all the attention.  Block 6's keys all lean on q a little (the best mean).
    d, block = 8, 8
    rng = np.random.default_rng(7)
    q = rng.standard_normal((1, 1, 1, d)).astype(np.float32)
    unit = q[0, 0, 0] / np.linalg.norm(q[0, 0, 0])
    k = (0.01 * rng.standard_normal((1, 1, 80, d))).astype(np.float32)
    k[0, 0, 48:56] += 0.5 * unit
    k[0, 0, 32], k[0, 0, 33] = 10 * unit, -10 * unit
    v = rng.standard_normal((1, 1, 80, d)).astype(np.float32)
    # Quest by hand: per block, sum over d of max(q*min, q*max)
    bound = [float(np.maximum(q[0, 0, 0] * k[0, 0, j * 8 : j * 8 + 8].min(0), q[0, 0, 0] * k[0, 0, j * 8 : j * 8 + 8].max(0)).sum())
             for j in range(10)]  # fmt: skip
    assert int(np.argmax(bound[1:9])) + 1 == 4
    index = reference.select_blocks(q, k, block, 0.3, per_group=False)
    np.testing.assert_array_equal(index, [[[[0, 4, 9]]]])
    feeds = {"q": q, "k": k, "v": v}
    expected = reference.block_sparse_attention(q, k, v, index, block, d**-0.5)
    mean_pooled = reference.block_sparse_attention(q, k, v, np.array([[[[0, 6, 9]]]]), block, d**-0.5)
    assert np.abs(expected - mean_pooled).max() > 0.1
    for session in filter(None, _sessions(op_model(1, 1, d, block=block, keep=0.3, per_group=False))):
        np.testing.assert_allclose(session.run(None, feeds)[0], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("s,past,keep,min_len", [(1, 99, 1.0, 0), (1, 99, 0.25, 101), (7, 30, 0.25, 1000), (12, 20, 1.0, 0)])
def test_with_a_kv_cache_dense_settings_are_exact_causal_attention(s, past, keep, min_len):
    feeds = _inputs(2, 6, 2, 16, s, past=past)
    dense = reference.dense_causal_attention(feeds["q"], feeds["k"], feeds["v"], 16**-0.5)
    for session in filter(None, _sessions(op_model(6, 2, 16, block=8, keep=keep, min_len=min_len))):
        np.testing.assert_allclose(session.run(None, feeds)[0], dense, atol=1e-5, rtol=0)


def test_min_len_compares_the_cache_length_not_the_query_count():
    # One new token over 100 cached: the cache is at least min_len, so the step is sparse.
    feeds = _inputs(1, 6, 2, 16, 1, past=99)
    dense = reference.dense_causal_attention(feeds["q"], feeds["k"], feeds["v"], 16**-0.5)
    got = _sessions(op_model(6, 2, 16, block=8, keep=0.25, min_len=100))[0].run(None, feeds)[0]
    assert np.abs(got - dense).max() > 1e-2


def _left_padding(b, t, pads):
    mask = np.ones((b, t), np.int64)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    return mask


@pytest.mark.parametrize("b,hq,hkv,d,s,past,block,keep,per_group,mask", [
    (2, 6, 2, 16, 37, 0, 8, 0.3, True, "left"),      # left padding: rows before the prompt see no key
    (2, 6, 2, 16, 1, 100, 8, 0.3, False, "left"),    # decode over a left-padded cache
    (2, 4, 4, 8, 20, 45, 8, 0.5, False, "random"),
    (1, 9, 3, 64, 130, 190, 64, 0.25, True, "random"),
])  # fmt: skip
def test_masked_op_honours_the_attention_mask(b, hq, hkv, d, s, past, block, keep, per_group, mask):
    feeds = _inputs(b, hq, hkv, d, s, seed=6, past=past)
    t = past + s
    if mask == "left":
        feeds["key_mask"] = _left_padding(b, t, [0, 13][:b])
    else:
        feeds["key_mask"] = (np.random.default_rng(9).random((b, t)) > 0.3).astype(np.int64)
    index = reference.select_blocks(feeds["q"], feeds["k"], block, keep, per_group=per_group, key_mask=feeds["key_mask"])
    expected = reference.block_sparse_attention(feeds["q"], feeds["k"], feeds["v"], index, block, d**-0.5, key_mask=feeds["key_mask"])
    unmasked = reference.block_sparse_attention(feeds["q"], feeds["k"], feeds["v"], index, block, d**-0.5)
    assert np.abs(expected - unmasked).max() > 1e-2  # the mask changes the result
    portable, kernel = _sessions(op_model(hq, hkv, d, block=block, keep=keep, per_group=per_group, masked=True))
    got = portable.run(None, feeds)[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    if kernel is not None:
        np.testing.assert_allclose(kernel.run(None, feeds)[0], got, atol=1e-4, rtol=0)


def test_masked_op_with_dense_settings_is_masked_dense_attention():
    feeds = _inputs(2, 6, 2, 16, 9, past=30)
    feeds["key_mask"] = _left_padding(2, 39, [0, 11])
    index = np.broadcast_to(np.arange(5), (2, 6, 2, 5))  # every block (39 keys in 5 blocks of 8)
    expected = reference.block_sparse_attention(feeds["q"], feeds["k"], feeds["v"], index, 8, 0.25, key_mask=feeds["key_mask"])
    for session in filter(None, _sessions(op_model(6, 2, 16, block=8, keep=1.0, masked=True))):
        np.testing.assert_allclose(session.run(None, feeds)[0], expected, atol=1e-5, rtol=0)


def test_sparse_differs_from_dense_when_blocks_are_dropped():
    feeds = _inputs(1, 4, 2, 8, 64)
    got = _sessions(op_model(4, 2, 8, block=8, keep=0.125))[0].run(None, feeds)[0]
    dense = reference.dense_causal_attention(feeds["q"], feeds["k"], feeds["v"], 8**-0.5)
    assert np.abs(got - dense).max() > 1e-2


@pytest.mark.parametrize("keep,min_len", [(1.0, 0), (0.25, 1000)])
def test_dense_settings_are_exact_causal_attention(keep, min_len):
    feeds = _inputs(2, 6, 2, 16, 45)
    dense = reference.dense_causal_attention(feeds["q"], feeds["k"], feeds["v"], 16**-0.5)
    for session in filter(None, _sessions(op_model(6, 2, 16, block=8, keep=keep, min_len=min_len))):
        np.testing.assert_allclose(session.run(None, feeds)[0], dense, atol=1e-5, rtol=0)


def _run(model, x):
    return make_session(model, threads=1).run(None, {"x": x})[0]


@pytest.mark.parametrize("nan_guard", [True, False])
def test_pass_rewrites_causal_gqa(nan_guard):
    proto = causal_gqa_proto(nan_guard=nan_guard)
    model = ir.serde.deserialize_model(proto)
    result = SparseAttentionPass(SparseAttentionConfig(keep=0.25, block=4, min_len=0))(model)
    assert result.modified and result.summary["sparse_layers"] == 1
    assert [r["status"] for r in result.records] == ["sparse"]
    ops = {(n.domain, n.op_type) for n in model.graph}
    assert ("edgeprune", "DynamicSparseAttention") in ops and ("", "Softmax") not in ops
    onnx.checker.check_model(ir.serde.serialize_model(model))
    x = np.random.default_rng(1).standard_normal((2, 33, 32)).astype(np.float32)
    sparse, dense = _run(model, x), _run(proto, x)
    assert sparse.shape == dense.shape and np.abs(sparse - dense).max() > 1e-4


def test_pass_dense_path_reproduces_the_input_model():
    proto = causal_gqa_proto()
    model = ir.serde.deserialize_model(proto)
    SparseAttentionPass(SparseAttentionConfig(keep=0.25, block=4, min_len=1024))(model)
    for s in (1, 5, 33):
        x = np.random.default_rng(s).standard_normal((2, s, 32)).astype(np.float32)
        np.testing.assert_allclose(_run(model, x), _run(proto, x), atol=1e-5, rtol=0)


def _past_feeds(s, past, seed=0, batch=2):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((batch, s, 32)).astype(np.float32),
            "past_key_values.0.key": rng.standard_normal((batch, 2, past, HD)).astype(np.float32),
            "past_key_values.0.value": rng.standard_normal((batch, 2, past, HD)).astype(np.float32)}  # fmt: skip


def _with_outputs(proto: onnx.ModelProto, names) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    for name in names:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return model


@pytest.mark.parametrize("s,past", [(33, 0), (1, 30), (1, 47), (7, 29), (12, 40)])
def test_pass_rewrites_the_with_past_form_and_equals_the_numpy_block_mask(s, past):
    # optimum's text-generation-with-past: K/V = Concat(past, new), the mask bottom-right causal.
    proto = causal_gqa_proto(past=True)
    model = ir.serde.deserialize_model(proto)
    result = SparseAttentionPass(SparseAttentionConfig(keep=0.25, block=4, min_len=0))(model)
    assert result.summary["sparse_layers"] == 1 and [r["status"] for r in result.records] == ["sparse"]
    (node,) = [n for n in model.graph if n.op_type == "DynamicSparseAttention"]
    assert node.inputs[1].producer().op_type == "Concat"  # the cache, not the repeated heads
    rewritten = _with_outputs(ir.serde.serialize_model(model), [node.outputs[0].name])
    feeds = _past_feeds(s, past)
    q, k, v = ort.InferenceSession(_with_outputs(proto, ["qt", "kt", "vt"]).SerializeToString()).run(["qt", "kt", "vt"], feeds)
    index = reference.select_blocks(q, k, 4, 0.25, per_group=False)  # the default selection: per query head
    assert index.shape[-1] < -(-(past + s) // 4)
    expected = reference.block_sparse_attention(q, k, v, index, 4, HD**-0.5)
    got = make_session(rewritten, threads=1).run([node.outputs[0].name], feeds)[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    dense = make_session(proto, threads=1).run(None, feeds)
    sparse = make_session(rewritten, threads=1).run(None, feeds)
    np.testing.assert_array_equal(sparse[1], dense[1])  # the cache outputs are untouched
    np.testing.assert_array_equal(sparse[2], dense[2])


def test_pass_dense_path_reproduces_the_with_past_model():
    proto = causal_gqa_proto(past=True)
    model = ir.serde.deserialize_model(proto)
    SparseAttentionPass(SparseAttentionConfig(keep=0.25, block=4, min_len=1024))(model)
    assert any(n.op_type == "DynamicSparseAttention" for n in model.graph)
    for s, past in ((5, 0), (1, 40), (9, 23)):
        feeds = _past_feeds(s, past, seed=s)
        for got, want in zip(make_session(model, threads=1).run(None, feeds), make_session(proto, threads=1).run(None, feeds)):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def tiny_llama_past(tmp_path_factory):
    from tiny_models import tiny_llama_with_past

    return tiny_llama_with_past(tmp_path_factory.mktemp("llama_past"))


def _greedy(model, prompt, steps):
    """Logits and presents of a prefill then ``steps`` greedy decode steps, the cache fed back."""
    session = make_session(model, threads=1)
    layers = sum(1 for i in session.get_inputs() if i.name.startswith("past_key_values.") and i.name.endswith(".key"))
    heads, dim = session.get_inputs()[3].shape[1], session.get_inputs()[3].shape[3]
    cache = {f"past_key_values.{i}.{kind}": np.zeros((1, heads, 0, dim), np.float32) for i in range(layers) for kind in ("key", "value")}
    ids, outs, length = np.array([prompt], np.int64), [], 0
    for _ in range(steps + 1):
        n = ids.shape[1]
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, length + n), np.int64),
                 "position_ids": np.arange(length, length + n, dtype=np.int64)[None], **cache}  # fmt: skip
        names = [o.name for o in session.get_outputs()]
        result = dict(zip(names, session.run(None, feeds)))
        outs.append(result)
        cache = {k.replace("present", "past_key_values"): v for k, v in result.items() if k.startswith("present.")}
        length += n
        ids = result["logits"][:, -1:].argmax(-1).astype(np.int64)
    return outs


def test_optimum_with_past_export_compiles_and_decodes(tiny_llama_past):
    # The reported failure: ORT stopped on a Reshape (key length past + S against query length S).
    proto = onnx.load(str(tiny_llama_past))
    dense_model = ir.serde.deserialize_model(proto)
    result = SparseAttentionPass(SparseAttentionConfig(keep=0.5, block=4, min_len=1024))(dense_model)
    assert result.summary["sparse_layers"] == 2
    prompt = list(range(3, 40))
    want = _greedy(proto, prompt, 6)
    for got, ref in zip(_greedy(dense_model, prompt, 6), want):  # dense settings reproduce every step
        for name in ref:
            np.testing.assert_allclose(got[name], ref[name], atol=1e-4, rtol=0)
    sparse_model = ir.serde.deserialize_model(proto)
    SparseAttentionPass(SparseAttentionConfig(keep=0.25, block=4, min_len=0))(sparse_model)
    got = _greedy(sparse_model, prompt, 6)
    assert got[-1]["present.0.key"].shape[2] == len(prompt) + 6
    assert np.abs(got[0]["logits"] - want[0]["logits"]).max() > 1e-3  # blocks were dropped in the prefill


def _fused_feeds(op, s, past, seed=0):
    rng = np.random.default_rng(seed)
    heads = 2 if op == "GroupQueryAttention" else 4
    feeds = {"x": rng.standard_normal((1, s, 32)).astype(np.float32)}
    if past is not None:
        feeds["past_key"] = rng.standard_normal((1, heads, past, HD)).astype(np.float32)
        feeds["past_value"] = rng.standard_normal((1, heads, past, HD)).astype(np.float32)
    return feeds


@pytest.mark.parametrize("op", ["GroupQueryAttention", "MultiHeadAttention"])
@pytest.mark.parametrize("past", [False, True])
def test_fused_forms_are_rewritten_and_dense_settings_reproduce_them(op, past):
    proto = fused_proto(op, past=past)
    model = ir.serde.deserialize_model(proto)
    result = SparseAttentionPass(SparseAttentionConfig(keep=0.25, block=4, min_len=1024))(model)
    (gqa,) = [n.name for n in proto.graph.node if n.op_type == op]
    assert result.records == [{"layer": 0, "node": gqa, "form": op, "status": "sparse", "keep": 0.25}]
    assert result.summary["sparse_layers"] == 1 and result.summary["dense_layers"] == 0
    assert not any(n.domain == "com.microsoft" for n in model.graph)
    onnx.checker.check_model(ir.serde.serialize_model(model))
    for s, p in ((9, 0), (1, 20), (3, 21)) if past else ((9, None), (1, None)):
        feeds = _fused_feeds(op, s, p, seed=s)
        want = make_session(proto, threads=1).run(None, feeds)
        got = make_session(model, threads=1).run(None, feeds)
        assert len(got) == len(want)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("op", ["GroupQueryAttention", "MultiHeadAttention"])
def test_fused_form_sparse_equals_the_numpy_block_mask(op):
    proto = fused_proto(op, past=True)
    model = ir.serde.deserialize_model(proto)
    SparseAttentionPass(SparseAttentionConfig(keep=0.25, block=4, min_len=0, select="head"))(model)
    (node,) = [n for n in model.graph if n.op_type == "DynamicSparseAttention"]
    names = [v.name for v in node.inputs] + [node.outputs[0].name]
    rewritten = _with_outputs(ir.serde.serialize_model(model), names)
    for s, past in ((1, 30), (12, 25)):
        q, k, v, y = make_session(rewritten, threads=1).run(names, _fused_feeds(op, s, past, seed=past))
        assert k.shape[2] == s + past
        index = reference.select_blocks(q, k, 4, 0.25, per_group=False)
        assert index.shape[-1] < -(-(s + past) // 4)
        np.testing.assert_allclose(y, reference.block_sparse_attention(q, k, v, index, 4, HD**-0.5), atol=1e-4, rtol=0)


@pytest.mark.parametrize("op,attrs,reason", [
    ("MultiHeadAttention", {"unidirectional": 0},
     "the attention mask is not causal (MultiHeadAttention without unidirectional=1): left dense"),
    ("GroupQueryAttention", {"do_rotary": 1}, "GroupQueryAttention applies rotary embedding inside (do_rotary=1): left dense"),
    ("GroupQueryAttention", {"local_window_size": 4}, "GroupQueryAttention with a local window, softcap or smooth softmax: left dense"),
])  # fmt: skip
def test_fused_forms_it_cannot_rewrite_stay_dense_with_the_reason(op, attrs, reason):
    model = ir.serde.deserialize_model(fused_proto(op, past=True, **attrs))
    before = [n.op_type for n in model.graph]
    result = SparseAttentionPass(SparseAttentionConfig(keep=0.25, block=4, min_len=0))(model)
    assert not result.modified and [n.op_type for n in model.graph] == before
    assert [(r["form"], r["status"], r["reason"]) for r in result.records] == [(op, "dense", reason)]


def test_optimum_export_left_padded_batch_is_exact_on_real_tokens(tiny_llama_past):
    # The masked op takes the model's attention_mask: a left-padded batch under dense settings
    # reproduces the input model on every real token (the causal-only op did not).
    proto = onnx.load(str(tiny_llama_past))
    model = ir.serde.deserialize_model(proto)
    SparseAttentionPass(SparseAttentionConfig(keep=0.5, block=4, min_len=1024))(model)
    assert {n.op_type for n in model.graph if n.domain == "edgeprune"} == {"DynamicSparseAttentionMasked"}
    ids = np.array([list(range(5, 25)), [0] * 6 + list(range(30, 44))], np.int64)
    mask = (np.arange(20)[None, :] >= np.array([[0], [6]])).astype(np.int64)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    session = make_session(proto, threads=1)
    heads, dim = session.get_inputs()[3].shape[1], session.get_inputs()[3].shape[3]
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
             **{i.name: np.zeros((2, heads, 0, dim), np.float32) for i in session.get_inputs() if i.name.startswith("past_key_values")}}  # fmt: skip
    want = session.run(["logits"], feeds)[0]
    got = make_session(model, threads=1).run(["logits"], feeds)[0]
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)
    causal_only = ir.serde.deserialize_model(proto)
    SparseAttentionPass(SparseAttentionConfig(keep=0.5, block=4, min_len=1024))(causal_only)
    for node in causal_only.graph:  # the op without the mask (as before): padded keys leak into real rows
        if node.op_type == "DynamicSparseAttentionMasked":
            node.op_type = "DynamicSparseAttention"
            node.resize_inputs(3)
    from edgeprune.passes.sparse_attention import functions

    functions.add_functions(causal_only)
    leaked = make_session(causal_only, threads=1).run(["logits"], feeds)[0]
    assert np.abs(leaked[1][real[1]] - want[1][real[1]]).max() > 1e-3


def test_keep_one_returns_the_model_untouched():
    model = ir.serde.deserialize_model(causal_gqa_proto())
    before = [n.op_type for n in model.graph]
    result = SparseAttentionPass(SparseAttentionConfig(keep=1.0))(model)
    assert not result.modified and [n.op_type for n in model.graph] == before


def test_non_causal_attention_stays_dense_with_its_reason():
    model = ir.serde.deserialize_model(causal_gqa_proto(causal=False))
    result = SparseAttentionPass(SparseAttentionConfig(keep=0.25, block=4, min_len=0))(model)
    assert not result.modified
    assert result.records == [{"layer": 0, "softmax": "", "status": "dense", "keep": 1.0,
                               "reason": "the attention mask is not causal (encoder or cross-attention): left dense"}]  # fmt: skip


def test_a_model_that_already_has_the_op_is_left_alone():
    model = ir.serde.deserialize_model(causal_gqa_proto())
    SparseAttentionPass(SparseAttentionConfig(keep=0.25, block=4, min_len=0))(model)
    again = SparseAttentionPass(SparseAttentionConfig(keep=0.25, block=4, min_len=0))(model)
    assert not again.modified and again.summary["already_sparse"] == 1
    assert SparseAttentionPass.describe(model)["fields"] == {"sparse_attention_ops": 1}


@pytest.mark.parametrize("options,message", [
    ({"keep": 0.0}, "sparse attention keep must be a number in (0, 1], got 0.0: pass e.g. 0.25."),
    ({"keep": "x"}, "sparse attention keep must be a number in (0, 1], got 'x': pass e.g. 0.25."),
    ({"block": 0}, "sparse attention block must be an integer >= 1, got 0."),
    ({"select": "layer"}, "sparse attention select must be one of group, head, got 'layer'."),
])  # fmt: skip
def test_bad_options_are_refused(options, message):
    with pytest.raises(BadInputError) as err:
        SparseAttentionConfig(**options)
    assert str(err.value) == message


def test_make_session_registers_the_kernel_only_for_models_with_the_op():
    sparse = op_model(4, 2, 8, block=8, keep=0.25)
    assert uses_kernel_ops(prepare_model(sparse))
    assert not uses_kernel_ops(prepare_model(causal_gqa_proto()))
    feeds = _inputs(1, 4, 2, 8, 40)
    got = make_session(sparse, threads=1).run(None, feeds)[0]
    portable = _sessions(sparse)[0].run(None, feeds)[0]
    np.testing.assert_allclose(got, portable, atol=1e-4, rtol=0)


@needs_kernel
def test_kernel_replaces_the_function_body():
    # The kernel's exp is a polynomial: its outputs differ from the function body's in the last bits,
    # which shows ORT ran the kernel rather than inlining the same-named function.
    feeds = _inputs(1, 4, 2, 8, 64)
    portable, kernel = _sessions(op_model(4, 2, 8, block=8, keep=0.5))
    a, b = portable.run(None, feeds)[0], kernel.run(None, feeds)[0]
    assert 0 < np.abs(a - b).max() < 1e-4


@needs_kernel
def test_the_kernel_runs_the_whole_op_as_one_node(tmp_path):
    # With the library registered, DynamicSparseAttention (selection included) is one kernel node,
    # not the ~130 nodes of its inlined function body: what a decode step needs.
    so = ort.SessionOptions()
    so.register_custom_ops_library(LIBRARY)
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "profile")
    data = ir.serde.serialize_model(op_model(6, 2, 16, block=8, keep=0.25)).SerializeToString()
    session = ort.InferenceSession(data, so)
    session.run(None, _inputs(1, 6, 2, 16, 1, past=99))
    import json

    events = json.loads(open(session.end_profiling()).read())
    ops = [e["args"]["op_name"] for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    assert ops == ["DynamicSparseAttention"]


@needs_kernel
@pytest.mark.parametrize("b,hq,hkv,d,s,past,block,keep,per_group", [(*CASES[0][:5], 0, *CASES[0][5:]), KV_CASES[0], KV_CASES[2], KV_CASES[3], KV_CASES[7]])
def test_block_sparse_kernel_alone_equals_its_function_and_numpy(b, hq, hkv, d, s, past, block, keep, per_group):
    # BlockSparseAttention fed a block index (the numpy reference's choice): kernel, function body, numpy.
    feeds = _inputs(b, hq, hkv, d, s, seed=5, past=past)
    feeds["block_index"] = reference.select_blocks(feeds["q"], feeds["k"], block, keep, per_group=per_group)
    expected = reference.block_sparse_attention(feeds["q"], feeds["k"], feeds["v"], feeds["block_index"], block, d**-0.5)
    portable, kernel = _sessions(block_op_model(hq, hkv, d, feeds["block_index"].shape[1], block=block))
    got = portable.run(None, feeds)[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(kernel.run(None, feeds)[0], got, atol=1e-4, rtol=0)


@needs_kernel
@pytest.mark.parametrize("isa", ["avx512", "avx2", "base"])
@pytest.mark.parametrize("b,hq,hkv,d,s,past,block,keep,per_group", [
    (*CASES[0][:5], 0, *CASES[0][5:]), (*CASES[1][:5], 0, *CASES[1][5:]), (*CASES[2][:5], 0, *CASES[2][5:]),
    (1, 9, 3, 64, 300, 0, 64, 0.5, True), KV_CASES[6], KV_CASES[7], KV_CASES[3]])  # fmt: skip
def test_every_instruction_set_equals_the_portable_op(monkeypatch, isa, b, hq, hkv, d, s, past, block, keep, per_group):
    # The kernel picks its ISA per call (EDGEPRUNE_KERNEL_ISA forces one, or the widest below it
    # the CPU has), so each compiled tile variant is checked on this machine.
    monkeypatch.setenv("EDGEPRUNE_KERNEL_ISA", isa)
    feeds = _inputs(b, hq, hkv, d, s, seed=3, past=past)
    portable, kernel = _sessions(op_model(hq, hkv, d, block=block, keep=keep, per_group=per_group))
    np.testing.assert_allclose(kernel.run(None, feeds)[0], portable.run(None, feeds)[0], atol=1e-4, rtol=0)


@needs_kernel
def test_kernel_on_ort_threads_equals_one_thread():
    # Work is split over (batch, row, query block) units on ORT's intra-op pool: same result.
    data = ir.serde.serialize_model(op_model(9, 3, 64, block=64, keep=0.25)).SerializeToString()
    feeds = _inputs(2, 9, 3, 64, 520, seed=4)
    outs = []
    for threads in (1, 2, 4):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.register_custom_ops_library(LIBRARY)
        outs.append(ort.InferenceSession(data, so).run(None, feeds)[0])
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


def test_allocation_is_the_exact_optimum_of_a_constructed_table():
    # Three layers and a mean budget of 0.375: the exact optimum (brute force over all 64 choices) is unique.
    candidates = (0.125, 0.25, 0.5, 1.0)
    errors = [[0.9, 0.2, 0.1, 0.0], [0.5, 0.45, 0.05, 0.0], [0.3, 0.29, 0.28, 0.0]]
    got = allocation.allocate(errors, candidates, budget=0.375)
    brute = min(itertools.product(range(4), repeat=3),
                key=lambda p: (sum(errors[l][c] for l, c in enumerate(p)) if sum(candidates[c] for c in p) <= 1.125 else 9, p))  # fmt: skip
    assert got == [candidates[c] for c in brute] == [0.5, 0.5, 0.125]
    assert allocation.allocate(errors, candidates, budget=1.0) == [1.0, 1.0, 1.0]
    with pytest.raises(BadInputError):
        allocation.allocate(errors, candidates, budget=0.1)


def _calibrated_context(samples):
    from edgeprune.calibration import CalibrationSet
    from edgeprune.context import CompileContext
    from edgeprune.runtime.targets import get_target

    calib = CalibrationSet([{"x": x} for x in samples], "test")
    return CompileContext(target=get_target("cpu"), calibration=calib, holdout=calib)


def test_calibrated_allocation_gives_the_budget_to_the_layer_that_needs_it():
    # Layer 0's values are zero, so its output error is exactly 0 at every keep ratio: the exact
    # allocation gives it the smallest candidate and layer 1 the rest of the budget (mean 0.5).
    proto = two_layer_proto(mute_first=True)
    rng = np.random.default_rng(5)
    ctx = _calibrated_context([rng.standard_normal((1, 40, 32)).astype(np.float32) for _ in range(2)])
    model = ir.serde.deserialize_model(proto)
    cfg = SparseAttentionConfig(keep=0.5, block=4, min_len=0, allocation="calibrated", candidates=[0.25, 0.5, 0.75, 1.0])
    result = SparseAttentionPass(cfg, ctx)(model)
    assert [r["keep"] for r in result.records] == [0.25, 0.75]
    assert result.summary["mean_keep"] == 0.5 and result.summary["allocation"] == "calibrated"
    first, second = (r["measured"] for r in result.records)
    assert [m["error"] for m in first] == [0.0, 0.0, 0.0, 0.0]
    assert second[-1]["error"] < 1e-6 and second[-1]["recall"] > 1 - 1e-6  # keep 1.0 is dense
    assert second[0]["error"] > second[1]["error"] > second[2]["error"] > 0  # more blocks, less error
    assert [n.attributes["keep"].value for n in model.graph if n.op_type == "DynamicSparseAttention"] == [0.25, 0.75]


def test_calibrated_measurement_matches_running_the_op():
    # The measured error at a keep ratio equals the error of the rewritten layer's attention output.
    proto = causal_gqa_proto(seed=2)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, 48, 32)).astype(np.float32)
    q, k, v = _qkv(proto, x)
    measure = allocation.LayerMeasure((0.25,))
    measure.add(q, k, v, scale=HD**-0.5, block=4, sink=1, per_group=True)
    index = reference.select_blocks(q, k, 4, 0.25, per_group=True)
    sparse = reference.block_sparse_attention(q, k, v, index, 4, HD**-0.5)
    dense = reference.dense_causal_attention(q, k, v, HD**-0.5)
    expected = np.linalg.norm(sparse - dense) / np.linalg.norm(dense)
    np.testing.assert_allclose(measure.error()[0], expected, rtol=1e-4)
    np.testing.assert_array_equal(allocation.select_blocks(q, k, 4, 0.25, 1, True), index)


def _qkv(proto, x):
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    for name in ("qt", "kt", "vt"):
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return ort.InferenceSession(model.SerializeToString()).run(["qt", "kt", "vt"], {"x": x})


def test_calibrated_allocation_on_a_with_past_model_measures_prefills_from_an_empty_cache():
    from edgeprune.calibration import CalibrationSet
    from edgeprune.context import CompileContext
    from edgeprune.runtime.targets import get_target

    def context(past):
        rows = [_past_feeds(40, past, seed=i, batch=1) for i in range(2)]
        calib = CalibrationSet(rows, "test")
        return CompileContext(target=get_target("cpu"), calibration=calib, holdout=calib)

    cfg = SparseAttentionConfig(keep=0.5, block=4, min_len=0, allocation="calibrated", candidates=[0.25, 0.5, 1.0])
    model = ir.serde.deserialize_model(causal_gqa_proto(past=True))
    result = SparseAttentionPass(cfg, context(0))(model)
    assert [r["keep"] for r in result.records] == [0.5] and len(result.records[0]["measured"]) == 3
    with pytest.raises(BadInputError) as err:
        SparseAttentionPass(cfg, context(8))(ir.serde.deserialize_model(causal_gqa_proto(past=True)))
    assert "no calibration row had one" in str(err.value)


def test_calibrated_allocation_needs_calibration_data():
    model = ir.serde.deserialize_model(causal_gqa_proto())
    with pytest.raises(BadInputError) as err:
        SparseAttentionPass(SparseAttentionConfig(keep=0.25, block=4, min_len=0, allocation="calibrated"))(model)
    assert str(err.value) == ("sparse attention allocation 'calibrated' needs calibration data: pass calibration samples "
                              "(--calib) or use allocation = 'uniform'.")  # fmt: skip


def test_compile_cli_calibrated_allocation(tmp_path, capsys):
    """--sparse-attention KEEP --sparse-allocation calibrated: KEEP is the mean keep over layers, recorded per layer."""
    import json

    from edgeprune.cli import main

    from models import two_layer_proto

    src = tmp_path / "m.onnx"
    onnx.save(two_layer_proto(mute_first=True), src)
    out = tmp_path / "out"
    code = main(["compile", str(src), "-o", str(out), "--sparse-attention", "0.5", "--sparse-block", "4",
                 "--sparse-min-len", "0", "--sparse-allocation", "calibrated", "--max-drop", "1", "--json"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    (sparse,) = [p for p in report["passes"] if p["name"] == "sparse_attention"]
    assert sparse["config"]["allocation"] == "calibrated"
    # default candidates 0.125, 0.25, 0.375, 0.5, 0.75, 1.0: the muted layer gets the least, the other
    # the most the mean budget of 0.5 allows (0.875 is not a candidate)
    assert [r["keep"] for r in sparse["records"]] == [0.125, 0.75]
    assert sparse["summary"]["mean_keep"] == 0.4375


def test_a_packed_query_is_split_and_rewritten():
    """q/k/v packed into one MatMul feeding GroupQueryAttention's packed query (what the bits pass writes for packed
    siblings) is rewritten like q/k/v apart: under dense settings it computes what the input model computes."""
    from edgeprune.passes.bits.pack import fold_into_attention, pack_float_siblings

    proto = fused_proto("GroupQueryAttention", past=True)
    model = ir.serde.deserialize_model(proto)
    names = {n.name for n in model.graph if n.op_type == "MatMul" and n.outputs[0].name in ("q", "k", "v")}
    assert len(pack_float_siblings(model, names)) == 1 and fold_into_attention(model) == 1
    (gqa,) = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert gqa.inputs[1] is None and gqa.inputs[2] is None
    result = SparseAttentionPass(SparseAttentionConfig(keep=0.25, block=4, min_len=1024))(model)
    assert [r["status"] for r in result.records] == ["sparse"] and result.summary["sparse_layers"] == 1
    for s, p in ((9, 0), (1, 20), (3, 21)):
        feeds = _fused_feeds("GroupQueryAttention", s, p, seed=s)
        for a, b in zip(make_session(model, threads=1).run(None, feeds), make_session(proto, threads=1).run(None, feeds), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
