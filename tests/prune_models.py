"""Tiny transformer-shaped ONNX models for the structured-pruning tests (built from ONNX text, no files)."""

from __future__ import annotations

import numpy as np
import onnx

from edgeprune.calibration import CalibrationSet
from edgeprune.context import CompileContext
from edgeprune.runtime.targets import get_target

D = 32  # hidden size of every tiny model
HD = 8  # head dim

_HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
_SHAPE_OPS = """
    sh = Shape(x)
    bsz = Gather <axis = 0> (sh, i0)
    sl = Gather <axis = 0> (sh, i1)
    ub = Unsqueeze(bsz, ax0)
    us = Unsqueeze(sl, ax0)
"""
_CONSTS = """
    i0 = Constant <value = int64 {0}> ()
    i1 = Constant <value = int64 {1}> ()
    ax0 = Constant <value = int64[1] {0}> ()
"""


def _finish(text: str, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(a, n) for n, a in weights.items())
    onnx.checker.check_model(proto)
    return proto


def _w(rng, *shape, scale=None, mean=0.0):
    scale = scale if scale is not None else 1.0 / np.sqrt(shape[0])
    return (rng.standard_normal(shape) * scale + mean).astype(np.float32)


def ffn_proto(seed: int = 0, hidden: int = 64, bias_mean: float = 0.0, second_up_as_input: bool = False) -> onnx.ModelProto:
    """Two residual FFN blocks (MatMul + bias -> Relu -> MatMul + bias); optionally block 2's up weight is a graph input."""
    rng = np.random.default_rng(seed)
    extra_in = f", float[{D}, {hidden}] w_up2" if second_up_as_input else ""
    text = f"""{_HEADER}
    g (float[B, S, {D}] x{extra_in}) => (float[B, S, {D}] y) {{
        h1 = MatMul(x, w_up1)
        hb1 = Add(h1, b_up1)
        r1 = Relu(hb1)
        d1 = MatMul(r1, w_down1)
        db1 = Add(d1, b_down1)
        y1 = Add(db1, x)
        h2 = MatMul(y1, w_up2)
        hb2 = Add(h2, b_up2)
        r2 = Relu(hb2)
        d2 = MatMul(r2, w_down2)
        db2 = Add(d2, b_down2)
        y = Add(db2, y1)
    }}"""
    weights = {
        "w_up1": _w(rng, D, hidden), "b_up1": _w(rng, hidden, scale=0.5, mean=bias_mean),
        "w_down1": _w(rng, hidden, D), "b_down1": _w(rng, D, scale=0.1),
        "w_up2": _w(rng, D, hidden), "b_up2": _w(rng, hidden, scale=0.5, mean=bias_mean),
        "w_down2": _w(rng, hidden, D), "b_down2": _w(rng, D, scale=0.1),
    }  # fmt: skip
    return _finish(text, weights)


def shared_ffn_proto(seed: int = 0, hidden: int = 64) -> onnx.ModelProto:
    """Two FFN blocks that use the same down weight: neither may be pruned."""
    rng = np.random.default_rng(seed)
    text = f"""{_HEADER}
    g (float[B, S, {D}] x) => (float[B, S, {D}] y) {{
        h1 = MatMul(x, w_up1)
        r1 = Relu(h1)
        d1 = MatMul(r1, w_down)
        y1 = Add(d1, x)
        h2 = MatMul(y1, w_up2)
        r2 = Relu(h2)
        d2 = MatMul(r2, w_down)
        y = Add(d2, y1)
    }}"""
    return _finish(text, {"w_up1": _w(rng, D, hidden), "w_up2": _w(rng, D, hidden), "w_down": _w(rng, hidden, D)})


def bert_proto(seed: int = 0, heads: int = 4, ffn: int = 64, shapes: str = "dynamic") -> onnx.ModelProto:
    """BERT-like layer: MHA (Reshape via Shape/Gather/Concat, or constant [0,0,H,D] shapes) + erf-GELU FFN."""
    rng = np.random.default_rng(seed)
    hid = heads * HD
    if hid != D:
        raise ValueError(f"{heads} heads of {HD} make {hid} channels, not the hidden size {D}")
    if shapes == "dynamic":
        shape_nodes = _CONSTS + _SHAPE_OPS + f"""
        nh = Constant <value = int64[1] {{{heads}}}> ()
        hdc = Constant <value = int64[1] {{{HD}}}> ()
        hidc = Constant <value = int64[1] {{{hid}}}> ()
        shape4 = Concat <axis = 0> (ub, us, nh, hdc)
        shape3 = Concat <axis = 0> (ub, us, hidc)
        """
    else:
        shape_nodes = f"""
        shape4 = Constant <value = int64[4] {{0, 0, {heads}, {HD}}}> ()
        shape3 = Constant <value = int64[3] {{0, 0, {hid}}}> ()
        """
    text = f"""{_HEADER}
    g (float[B, S, {D}] x) => (float[B, S, {D}] y) {{
        {shape_nodes}
        scale = Constant <value = float {{{1 / np.sqrt(HD)}}}> ()
        sqrt2 = Constant <value = float {{1.4142135}}> ()
        one = Constant <value = float {{1.0}}> ()
        half = Constant <value = float {{0.5}}> ()
        q0 = MatMul(x, wq)
        q = Add(q0, bq)
        k0 = MatMul(x, wk)
        k = Add(k0, bk)
        v0 = MatMul(x, wv)
        v = Add(v0, bv)
        q4 = Reshape(q, shape4)
        qt = Transpose <perm = [0, 2, 1, 3]> (q4)
        k4 = Reshape(k, shape4)
        kt = Transpose <perm = [0, 2, 3, 1]> (k4)
        v4 = Reshape(v, shape4)
        vt = Transpose <perm = [0, 2, 1, 3]> (v4)
        sc = MatMul(qt, kt)
        scs = Mul(sc, scale)
        p = Softmax <axis = -1> (scs)
        c = MatMul(p, vt)
        ct = Transpose <perm = [0, 2, 1, 3]> (c)
        m = Reshape(ct, shape3)
        o0 = MatMul(m, wo)
        o = Add(o0, bo)
        h = Add(o, x)
        u0 = MatMul(h, w1)
        u = Add(u0, b1)
        e1 = Div(u, sqrt2)
        e2 = Erf(e1)
        e3 = Add(e2, one)
        e4 = Mul(u, e3)
        gl = Mul(e4, half)
        d0 = MatMul(gl, w2)
        d = Add(d0, b2)
        y = Add(d, h)
    }}"""
    weights = {
        "wq": _w(rng, D, hid), "bq": _w(rng, hid, scale=0.1), "wk": _w(rng, D, hid), "bk": _w(rng, hid, scale=0.1),
        "wv": _w(rng, D, hid), "bv": _w(rng, hid, scale=0.1), "wo": _w(rng, hid, D), "bo": _w(rng, D, scale=0.1),
        "w1": _w(rng, D, ffn), "b1": _w(rng, ffn, scale=0.5), "w2": _w(rng, ffn, D), "b2": _w(rng, D, scale=0.1),
    }  # fmt: skip
    return _finish(text, weights)


def llama_proto(seed: int = 0, heads: int = 4, kv_heads: int = 2, ffn: int = 48) -> onnx.ModelProto:
    """LLaMA-like layer: GQA (repeat_kv as Unsqueeze/Expand/Reshape), rotate-half rotary, SwiGLU FFN, no biases."""
    rng = np.random.default_rng(seed)
    rep = heads // kv_heads
    half = HD // 2
    freqs = ", ".join(f"{1.0 / (10000 ** (2 * (i % half) / HD)):.6f}" for i in range(HD))
    text = f"""{_HEADER}
    g (float[B, S, {D}] x) => (float[B, S, {D}] y) {{
        {_CONSTS}
        {_SHAPE_OPS}
        neg1 = Constant <value = int64[1] {{-1}}> ()
        hdc = Constant <value = int64[1] {{{HD}}}> ()
        kvc = Constant <value = int64[1] {{{kv_heads}}}> ()
        repc = Constant <value = int64[1] {{{rep}}}> ()
        nhc = Constant <value = int64[1] {{{heads}}}> ()
        ax1 = Constant <value = int64[1] {{1}}> ()
        ax2 = Constant <value = int64[1] {{2}}> ()
        ax3 = Constant <value = int64[1] {{3}}> ()
        s0 = Constant <value = int64[1] {{0}}> ()
        sh4 = Constant <value = int64[1] {{{half}}}> ()
        sh8 = Constant <value = int64[1] {{{HD}}}> ()
        freq = Constant <value = float[{HD}] {{{freqs}}}> ()
        scale = Constant <value = float {{{1 / np.sqrt(HD)}}}> ()
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
        pos = Range(i0, sl, i1)
        posf = Cast <to = 1> (pos)
        posu = Unsqueeze(posf, ax1)
        ang = Mul(posu, freq)
        cosv = Cos(ang)
        sinv = Sin(ang)
        q1 = Slice(qt, s0, sh4, ax3)
        q2 = Slice(qt, sh4, sh8, ax3)
        nq2 = Neg(q2)
        rq = Concat <axis = -1> (nq2, q1)
        qc = Mul(qt, cosv)
        qs = Mul(rq, sinv)
        qr = Add(qc, qs)
        k1 = Slice(kt, s0, sh4, ax3)
        k2 = Slice(kt, sh4, sh8, ax3)
        nk2 = Neg(k2)
        rk = Concat <axis = -1> (nk2, k1)
        kc = Mul(kt, cosv)
        ks = Mul(rk, sinv)
        kr = Add(kc, ks)
        eshape = Concat <axis = 0> (ub, kvc, repc, us, hdc)
        rshape = Concat <axis = 0> (ub, nhc, us, hdc)
        ku = Unsqueeze(kr, ax2)
        ke = Expand(ku, eshape)
        kf = Reshape(ke, rshape)
        vu = Unsqueeze(vt, ax2)
        ve = Expand(vu, eshape)
        vf = Reshape(ve, rshape)
        ktt = Transpose <perm = [0, 1, 3, 2]> (kf)
        sc = MatMul(qr, ktt)
        scs = Mul(sc, scale)
        p = Softmax <axis = -1> (scs)
        c = MatMul(p, vf)
        ct = Transpose <perm = [0, 2, 1, 3]> (c)
        mshape = Concat <axis = 0> (ub, us, neg1)
        m = Reshape(ct, mshape)
        o = MatMul(m, wo)
        h = Add(o, x)
        gt = MatMul(h, wg)
        sg = Sigmoid(gt)
        act = Mul(gt, sg)
        up = MatMul(h, wu)
        mm = Mul(act, up)
        dn = MatMul(mm, wd)
        y = Add(dn, h)
    }}"""
    weights = {
        "wq": _w(rng, D, heads * HD), "wk": _w(rng, D, kv_heads * HD), "wv": _w(rng, D, kv_heads * HD),
        "wo": _w(rng, heads * HD, D), "wg": _w(rng, D, ffn), "wu": _w(rng, D, ffn), "wd": _w(rng, ffn, D),
    }  # fmt: skip
    return _finish(text, weights)


def inputs(batch: int, seq: int, seed: int = 0, mean: float = 0.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": (rng.standard_normal((batch, seq, D)) + mean).astype(np.float32)}


def context(proto: onnx.ModelProto, samples: int = 24, seq: int = 6, seed: int = 100, mean: float = 0.0) -> CompileContext:
    """A CompileContext whose calibration rows are random [1, seq, D] inputs."""
    rows = [inputs(1, seq, seed + i, mean) for i in range(samples)]
    calib = CalibrationSet(rows, "random test rows", synthetic=True)
    return CompileContext(target=get_target("cpu"), calibration=calib, holdout=calib)
