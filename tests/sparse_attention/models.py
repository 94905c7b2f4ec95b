"""Tiny causal LLaMA-GQA attention models in optimum's export form, built from ONNX text."""

from __future__ import annotations

import numpy as np
import onnx

D = 32  # hidden size
HD = 8  # head dim


def causal_gqa_proto(seed: int = 0, heads: int = 4, kv_heads: int = 2, nan_guard: bool = True, causal: bool = True,
                     past: bool = False) -> onnx.ModelProto:
    """One attention layer: q/k/v projections, repeat_kv (Unsqueeze/Expand/Reshape), split scale, additive mask, NaN guard.

    ``past``: optimum's text-generation-with-past form: inputs ``past_key_values.0.key/value``
    [B, kv_heads, P, HD] are concatenated in front of the new keys/values (outputs ``present.0.*``)
    and the causal mask is bottom-right aligned (query t at position P + t sees keys 0 .. P + t).
    """
    rng = np.random.default_rng(seed)
    rep = heads // kv_heads
    root = float(HD ** -0.25)
    if causal and past:
        mask = """
        tl = Gather <axis = 2> (kshape, i2)
        pl = Sub(tl, sl)
        qend = Add(pl, sl)
        qpos = Range(pl, qend, i1)
        kpos = Range(i0, tl, i1)
        pi = Unsqueeze(qpos, ax1)
        pj = Unsqueeze(kpos, ax0)
        allowed = LessOrEqual(pj, pi)
        mask = Where(allowed, zero, ninf)
        """
    elif causal:
        mask = """
        pos = Range(i0, sl, i1)
        pi = Unsqueeze(pos, ax1)
        pj = Unsqueeze(pos, ax0)
        allowed = LessOrEqual(pj, pi)
        mask = Where(allowed, zero, ninf)
        """
    else:
        mask = """
        mb = Cast <to = 9> (x_mask)
        mask = Where(mb, zero, ninf)
        """
    guard = "nan_p = IsNaN(p)\n        pg = Where(nan_p, zero, p)" if nan_guard else ""
    extra = ", float[B, S] x_mask" if not causal else ""
    cache = ""
    if past:
        extra += f", float[B, {kv_heads}, P, {HD}] past_key, float[B, {kv_heads}, P, {HD}] past_value"
        cache = f", float[B, {kv_heads}, T, {HD}] present_key, float[B, {kv_heads}, T, {HD}] present_value"
    kv = """
        kt = Concat <axis = 2> (past_key, kn)
        vt = Concat <axis = 2> (past_value, vn)
        present_key = Identity(kt)
        present_value = Identity(vt)
        i2 = Constant <value = int64 {2}> ()
        kshape = Shape(kt)
        ul = Unsqueeze(tl, ax0)
        eshape = Concat <axis = 0> (ub, kvc, repc, ul, hdc)
        rshape = Concat <axis = 0> (ub, nhc, ul, hdc)""" if past else """
        kt = Identity(kn)
        vt = Identity(vn)
        eshape = Concat <axis = 0> (ub, kvc, repc, us, hdc)
        rshape = Concat <axis = 0> (ub, nhc, us, hdc)"""
    if past:  # the key length is read before the mask needs it
        kv = kv.replace("ul = Unsqueeze(tl, ax0)", "tl = Gather <axis = 0> (kshape, i2)\n        ul = Unsqueeze(tl, ax0)")
        mask = mask.replace("tl = Gather <axis = 2> (kshape, i2)\n", "")
    text = f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[B, S, {D}] x{extra}) => (float[B, S, {D}] y{cache}) {{
        i0 = Constant <value = int64 {{0}}> ()
        i1 = Constant <value = int64 {{1}}> ()
        ax0 = Constant <value = int64[1] {{0}}> ()
        ax1 = Constant <value = int64[1] {{1}}> ()
        ax2 = Constant <value = int64[1] {{2}}> ()
        neg1 = Constant <value = int64[1] {{-1}}> ()
        hdc = Constant <value = int64[1] {{{HD}}}> ()
        kvc = Constant <value = int64[1] {{{kv_heads}}}> ()
        repc = Constant <value = int64[1] {{{rep}}}> ()
        nhc = Constant <value = int64[1] {{{heads}}}> ()
        zero = Constant <value = float {{0}}> ()
        ninf = Constant <value = float {{-inf}}> ()
        cq = Constant <value = float {{{root}}}> ()
        ck = Constant <value = float {{{root}}}> ()
        sh = Shape(x)
        bsz = Gather <axis = 0> (sh, i0)
        sl = Gather <axis = 0> (sh, i1)
        ub = Unsqueeze(bsz, ax0)
        us = Unsqueeze(sl, ax0)
        split = Concat <axis = 0> (ub, us, neg1, hdc)
        q = MatMul(x, wq)
        k = MatMul(x, wk)
        v = MatMul(x, wv)
        q4 = Reshape(q, split)
        qt = Transpose <perm = [0, 2, 1, 3]> (q4)
        k4 = Reshape(k, split)
        kn = Transpose <perm = [0, 2, 1, 3]> (k4)
        v4 = Reshape(v, split)
        vn = Transpose <perm = [0, 2, 1, 3]> (v4)
        {kv}
        ku = Unsqueeze(kt, ax2)
        ke = Expand(ku, eshape)
        kf = Reshape(ke, rshape)
        vu = Unsqueeze(vt, ax2)
        ve = Expand(vu, eshape)
        vf = Reshape(ve, rshape)
        ktt = Transpose <perm = [0, 1, 3, 2]> (kf)
        qs = Mul(qt, cq)
        ks = Mul(ktt, ck)
        sc = MatMul(qs, ks)
        {mask}
        scm = Add(sc, mask)
        p = Softmax <axis = -1> (scm)
        {guard}
        c = MatMul({"pg" if nan_guard else "p"}, vf)
        ct = Transpose <perm = [0, 2, 1, 3]> (c)
        mshape = Concat <axis = 0> (ub, us, neg1)
        m = Reshape(ct, mshape)
        o = MatMul(m, wo)
        y = Add(o, x)
    }}"""
    proto = onnx.parser.parse_model(text)
    if past:  # optimum's names (the ONNX text parser takes no dots in names)
        names = {"past_key": "past_key_values.0.key", "past_value": "past_key_values.0.value",
                 "present_key": "present.0.key", "present_value": "present.0.value"}  # fmt: skip
        for value in [*proto.graph.input, *proto.graph.output]:
            value.name = names.get(value.name, value.name)
        for node in proto.graph.node:
            node.input[:] = [names.get(i, i) for i in node.input]
            node.output[:] = [names.get(o, o) for o in node.output]
    weights = {"wq": (D, heads * HD), "wk": (D, kv_heads * HD), "wv": (D, kv_heads * HD), "wo": (heads * HD, D)}
    for name, shape in weights.items():
        arr = (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
        proto.graph.initializer.append(onnx.numpy_helper.from_array(arr, name))
    onnx.checker.check_model(proto)
    return proto


def op_model(hq: int, hkv: int, d: int, *, block: int, keep: float, sink: int = 1, min_len: int = 0, per_group: bool = True,
             masked: bool = False, opset: int = 17):
    """A model that is one DynamicSparseAttention node over inputs q [B,Hq,S,d], k/v [B,Hkv,T,d] (with both functions)."""
    import onnx_ir as ir

    from edgeprune.passes.sparse_attention import functions

    def value(name, heads, length):
        return ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["B", heads, length, d]))

    # keys/values may be longer than the queries (a KV cache: T = past + S)
    q, k, v = value("q", hq, "S"), value("k", hkv, "T"), value("v", hkv, "T")
    inputs = [q, k, v]
    if masked:  # DynamicSparseAttentionMasked: + key_mask [B, T] int64
        inputs.append(ir.Value(name="key_mask", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["B", "T"])))
    attrs = [ir.AttrInt64("block", block), ir.AttrFloat32("keep", keep), ir.AttrInt64("sink", sink),
             ir.AttrInt64("min_len", min_len), ir.AttrInt64("per_group", int(per_group)), ir.AttrFloat32("scale", d**-0.5)]  # fmt: skip
    name = functions.DYNAMIC_MASKED if masked else functions.DYNAMIC
    node = ir.Node(functions.DOMAIN, name, inputs, attributes=attrs, num_outputs=1)
    out = node.outputs[0]
    out.name, out.type, out.shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape(["B", hq, "S", d])
    model = ir.Model(ir.Graph(inputs, [out], nodes=[node], opset_imports={"": opset}, name="op"), ir_version=10)
    functions.add_functions(model)
    return model


def block_op_model(hq: int, hkv: int, d: int, hsel: int, *, block: int):
    """A model that is one BlockSparseAttention node over q, k, v and an int64 block_index [B, hsel, nB, K]."""
    import onnx_ir as ir

    from edgeprune.passes.sparse_attention import functions

    def value(name, heads, length, dtype=ir.DataType.FLOAT, last=d):
        return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(["B", heads, length, last]))

    inputs = [value("q", hq, "S"), value("k", hkv, "T"), value("v", hkv, "T"), value("block_index", hsel, "NB", ir.DataType.INT64, "K")]
    attrs = [ir.AttrInt64("block", block), ir.AttrFloat32("scale", d**-0.5)]
    node = ir.Node(functions.DOMAIN, functions.BLOCK, inputs, attributes=attrs, num_outputs=1)
    out = node.outputs[0]
    out.name, out.type, out.shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape(["B", hq, "S", d])
    model = ir.Model(ir.Graph(inputs, [out], nodes=[node], opset_imports={"": 17}, name="block_op"), ir_version=10)
    functions.add_functions(model)
    return model


def fused_proto(op: str = "GroupQueryAttention", seed: int = 0, heads: int = 4, kv_heads: int = 2, past: bool = True,
                **attrs) -> onnx.ModelProto:
    """One attention layer as ORT's fused ``com.microsoft.GroupQueryAttention`` or ``MultiHeadAttention``
    (q/k/v [B, S, heads * HD], cache [B, heads, P, HD] concatenated into present), then an output projection.

    MultiHeadAttention has one head count (``kv_heads`` is ignored) and is causal with ``unidirectional=1``
    (the default here; pass ``unidirectional=0`` for bidirectional)."""
    rng = np.random.default_rng(seed)
    gqa = op == "GroupQueryAttention"
    kv_heads = kv_heads if gqa else heads
    attrs = {"num_heads": heads, **({"kv_num_heads": kv_heads} if gqa else {"unidirectional": 1}), **attrs}
    attr_text = ", ".join(f"{k} = {v}" for k, v in attrs.items())
    cache_in = f", float[B, {kv_heads}, P, {HD}] past_key, float[B, {kv_heads}, P, {HD}] past_value" if past else ""
    cache_out = f", float[B, {kv_heads}, T, {HD}] present_key, float[B, {kv_heads}, T, {HD}] present_value" if past else ""
    pk, pv = ("past_key", "past_value") if past else ("", "")
    outs = "o, present_key, present_value" if past else "o, unused_k, unused_v"
    if gqa:
        call = f"""
        one = Constant <value = int64[1] {{1}}> ()
        ql = Shape <start = 1, end = 2> (x)
        pl = Shape <start = 2, end = 3> ({pk if past else "x"})
        tl = {"Add(ql, pl)" if past else "Identity(ql)"}
        bl = Shape <start = 0, end = 1> (x)
        lm1 = Sub(tl, one)
        lb = Expand(lm1, bl)
        seqlens = Cast <to = 6> (lb)
        tls = Squeeze(tl)
        total = Cast <to = 6> (tls)
        {outs} = com.microsoft.GroupQueryAttention <{attr_text}> (q, k, v, {pk}, {pv}, seqlens, total)"""
    else:
        call = f"""
        {outs} = com.microsoft.MultiHeadAttention <{attr_text}> (q, k, v, , , , {pk}, {pv})"""
    text = f"""<ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
    g (float[B, S, {D}] x{cache_in}) => (float[B, S, {D}] y{cache_out}) {{
        q = MatMul(x, wq)
        k = MatMul(x, wk)
        v = MatMul(x, wv)
        {call}
        y = MatMul(o, wo)
    }}"""
    proto = onnx.parser.parse_model(text)
    weights = {"wq": (D, heads * HD), "wk": (D, kv_heads * HD), "wv": (D, kv_heads * HD), "wo": (heads * HD, D)}
    for name, shape in weights.items():
        arr = (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
        proto.graph.initializer.append(onnx.numpy_helper.from_array(arr, name))
    for i, node in enumerate(proto.graph.node):
        node.name = node.name or f"{node.op_type.lower()}_{i}"
    return proto


def two_layer_proto(seed: int = 0, mute_first: bool = False) -> onnx.ModelProto:
    """Two causal GQA layers in sequence (``y0 = layer0(x)``, ``y = layer1(y0)``).

    ``mute_first`` zeroes layer 0's value projection: its attention output is then 0 whatever
    blocks are kept, so its output error is exactly 0 at every keep ratio.
    """
    first, second = causal_gqa_proto(seed=seed), causal_gqa_proto(seed=seed + 1)
    if mute_first:
        for init in first.graph.initializer:
            if init.name == "wv":
                init.CopyFrom(onnx.numpy_helper.from_array(np.zeros((D, 2 * HD), np.float32), "wv"))
    for proto in (first, second):
        for i, node in enumerate(proto.graph.node):
            node.name = node.name or f"{node.op_type.lower()}_{i}"
    first = onnx.compose.add_prefix(first, "l0_")
    second = onnx.compose.add_prefix(second, "l1_")
    merged = onnx.compose.merge_models(first, second, io_map=[("l0_y", "l1_x")])
    for value in merged.graph.input:
        value.name = "x" if value.name == "l0_x" else value.name
    for node in merged.graph.node:
        node.input[:] = ["x" if i == "l0_x" else i for i in node.input]
    merged.graph.output[0].name = "y"
    for node in merged.graph.node:
        node.output[:] = ["y" if o == "l1_y" else o for o in node.output]
    onnx.checker.check_model(merged)
    return merged
