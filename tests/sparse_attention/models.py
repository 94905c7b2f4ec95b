"""Tiny causal LLaMA-GQA attention models in optimum's export form, built from ONNX text."""

from __future__ import annotations

import numpy as np
import onnx

D = 32  # hidden size
HD = 8  # head dim


def causal_gqa_proto(seed: int = 0, heads: int = 4, kv_heads: int = 2, nan_guard: bool = True, causal: bool = True) -> onnx.ModelProto:
    """One attention layer: q/k/v projections, repeat_kv (Unsqueeze/Expand/Reshape), split scale, additive mask, NaN guard."""
    rng = np.random.default_rng(seed)
    rep = heads // kv_heads
    root = float(HD ** -0.25)
    if causal:
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
    text = f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[B, S, {D}] x{extra}) => (float[B, S, {D}] y) {{
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
        kt = Transpose <perm = [0, 2, 1, 3]> (k4)
        v4 = Reshape(v, split)
        vt = Transpose <perm = [0, 2, 1, 3]> (v4)
        eshape = Concat <axis = 0> (ub, kvc, repc, us, hdc)
        rshape = Concat <axis = 0> (ub, nhc, us, hdc)
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
    weights = {"wq": (D, heads * HD), "wk": (D, kv_heads * HD), "wv": (D, kv_heads * HD), "wo": (heads * HD, D)}
    for name, shape in weights.items():
        arr = (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
        proto.graph.initializer.append(onnx.numpy_helper.from_array(arr, name))
    onnx.checker.check_model(proto)
    return proto


def op_model(hq: int, hkv: int, d: int, *, block: int, keep: float, sink: int = 1, min_len: int = 0, per_group: bool = True):
    """A model that is one DynamicSparseAttention node over inputs q, k, v (with both functions)."""
    import onnx_ir as ir

    from edgeprune.passes.sparse_attention import functions

    def value(name, heads):
        return ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["B", heads, "S", d]))

    q, k, v = value("q", hq), value("k", hkv), value("v", hkv)
    attrs = [ir.AttrInt64("block", block), ir.AttrFloat32("keep", keep), ir.AttrInt64("sink", sink),
             ir.AttrInt64("min_len", min_len), ir.AttrInt64("per_group", int(per_group)), ir.AttrFloat32("scale", d**-0.5)]  # fmt: skip
    node = ir.Node(functions.DOMAIN, functions.DYNAMIC, [q, k, v], attributes=attrs, num_outputs=1)
    out = node.outputs[0]
    out.name, out.type, out.shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape(["B", hq, "S", d])
    model = ir.Model(ir.Graph([q, k, v], [out], nodes=[node], opset_imports={"": 17}, name="op"), ir_version=10)
    functions.add_functions(model)
    return model


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
