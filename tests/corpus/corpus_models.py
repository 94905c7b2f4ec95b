"""The robustness corpus: one small graph per third-party feature of issue 10, written to a folder.

Each builder returns an ``onnx.ModelProto`` (``write_case`` saves it, with external data where the
case asks for it). Widths stay small so the whole corpus compiles in about a minute.
"""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _w(rng, *shape, scale=None):
    fan = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    scale = scale if scale is not None else 1.0 / np.sqrt(fan)
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _finish(
    text: str, weights: dict[str, np.ndarray], check: bool = True
) -> onnx.ModelProto:
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.extend(
        numpy_helper.from_array(a, n) for n, a in weights.items()
    )
    if check:
        onnx.checker.check_model(proto, full_check=True)
    return proto


def _header(opset: int = 17, ir_version: int = 8) -> str:
    return f'<ir_version: {ir_version}, opset_import: ["" : {opset}]>'


def depthwise_proto(seed: int = 0, c: int = 16) -> onnx.ModelProto:
    """1x1 expand -> Relu -> depthwise 3x3 (group = c) -> Relu -> 1x1 project -> GAP -> Flatten -> Gemm (class scores)."""
    rng = np.random.default_rng(seed)
    text = f"""{_header()}
    g (float[N, 3, 8, 8] x) => (float[N, 5] y) {{
        e = Conv (x, w1, b1)
        er = Relu (e)
        d = Conv <group = {c}, pads = [1, 1, 1, 1]> (er, w2, b2)
        dr = Relu (d)
        p = Conv (dr, w3, b3)
        gp = GlobalAveragePool (p)
        f = Flatten <axis = 1> (gp)
        y = Gemm <transB = 1> (f, wf, bf)
    }}"""
    weights = {"w1": _w(rng, c, 3, 1, 1), "b1": 0.3 + _w(rng, c, scale=0.1), "w2": _w(rng, c, 1, 3, 3),
               "b2": 0.3 + _w(rng, c, scale=0.1), "w3": _w(rng, 8, c, 1, 1), "b3": _w(rng, 8, scale=0.1),
               "wf": _w(rng, 5, 8), "bf": _w(rng, 5, scale=0.1)}  # fmt: skip
    return _finish(text, weights)


def grouped_proto(seed: int = 0, c: int = 16, groups: int = 4) -> onnx.ModelProto:
    """conv 3x3 -> Relu -> grouped conv 3x3 (group = 4, 4 channels per group) -> Relu -> 1x1 conv (a feature map)."""
    rng = np.random.default_rng(seed)
    text = f"""{_header()}
    g (float[N, 3, 8, 8] x) => (float[N, 6, 8, 8] y) {{
        h = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        hr = Relu (h)
        gc = Conv <group = {groups}, pads = [1, 1, 1, 1]> (hr, w2, b2)
        gr = Relu (gc)
        y = Conv (gr, w3, b3)
    }}"""
    weights = {"w1": _w(rng, c, 3, 3, 3), "b1": 0.3 + _w(rng, c, scale=0.1), "w2": _w(rng, c, c // groups, 3, 3),
               "b2": 0.3 + _w(rng, c, scale=0.1), "w3": _w(rng, 6, c, 1, 1), "b3": _w(rng, 6, scale=0.1)}  # fmt: skip
    return _finish(text, weights)


def mlp_text(
    opset: int = 17, d_in: int = 32, hidden: int = 64, d_out: int = 6, batch: str = "N"
) -> str:
    return f"""{_header(opset)}
    g (float[{batch}, {d_in}] x) => (float[{batch}, {d_out}] y) {{
        h = MatMul (x, w1)
        hb = Add (h, b1)
        r = Relu (hb)
        y = Gemm (r, w2, b2)
    }}"""


def _mlp_weights(
    rng, d_in: int = 32, hidden: int = 64, d_out: int = 6
) -> dict[str, np.ndarray]:
    return {"w1": _w(rng, d_in, hidden, scale=1 / np.sqrt(d_in)), "b1": 0.2 + _w(rng, hidden, scale=0.1),
            "w2": _w(rng, hidden, d_out, scale=1 / np.sqrt(hidden)), "b2": _w(rng, d_out, scale=0.1)}  # fmt: skip


def neg_dims_proto(seed: int = 0, zero_height: bool = False) -> onnx.ModelProto:
    """An image net whose input dims are written as Paddle does: batch -1, height and width with no value at all
    (or, ``zero_height``, a height of 0, which onnxruntime enforces literally)."""
    proto = depthwise_proto(seed)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    dims[0].Clear()
    dims[0].dim_value = -1
    dims[2].Clear()  # unnamed: neither a value nor a name
    if zero_height:
        dims[2].dim_value = 0
    dims[3].Clear()
    out = proto.graph.output[0].type.tensor_type.shape.dim
    out[0].Clear()
    out[0].dim_value = -1
    return proto


def fixed_height_proto(seed: int = 0, c: int = 8, height: int = 16) -> onnx.ModelProto:
    """A text-line recognizer: x[N, 3, 16, W] -> conv -> pool 2 -> Reshape [0, c * 8, -1] (needs height 16)
    -> Transpose -> MatMul -> Softmax over classes: only the width is free."""
    rng = np.random.default_rng(seed)
    h2 = height // 2
    text = f"""{_header()}
    g (float[N, 3, {height}, W] x) => (float[N, T, 7] y) {{
        h = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        hr = Relu (h)
        p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (hr)
        s = Reshape (p, shp)
        t = Transpose <perm = [0, 2, 1]> (s)
        m = MatMul (t, w2)
        mb = Add (m, b2)
        y = Softmax <axis = -1> (mb)
    }}"""
    weights = {"w1": _w(rng, c, 3, 3, 3), "b1": 0.2 + _w(rng, c, scale=0.1), "shp": np.asarray([0, c * h2, -1], np.int64),
               "w2": _w(rng, c * h2, 7), "b2": _w(rng, 7, scale=0.1)}  # fmt: skip
    return _finish(text, weights)


def nhwc_proto(seed: int = 0, c: int = 16) -> onnx.ModelProto:
    """An NHWC image input (x[N, 8, 8, 3]) transposed to NCHW first, then conv -> Relu -> conv -> GAP -> Gemm."""
    rng = np.random.default_rng(seed)
    text = f"""{_header()}
    g (float[N, 8, 8, 3] x) => (float[N, 4] y) {{
        t = Transpose <perm = [0, 3, 1, 2]> (x)
        h = Conv <pads = [1, 1, 1, 1]> (t, w1, b1)
        hr = Relu (h)
        h2 = Conv <pads = [1, 1, 1, 1]> (hr, w2, b2)
        h2r = Relu (h2)
        gp = GlobalAveragePool (h2r)
        f = Flatten <axis = 1> (gp)
        y = Gemm <transB = 1> (f, wf, bf)
    }}"""
    weights = {"w1": _w(rng, c, 3, 3, 3), "b1": 0.3 + _w(rng, c, scale=0.1), "w2": _w(rng, c, c, 3, 3),
               "b2": 0.3 + _w(rng, c, scale=0.1), "wf": _w(rng, 4, c), "bf": _w(rng, 4, scale=0.1)}  # fmt: skip
    return _finish(text, weights)


def qdq_proto(seed: int = 0) -> onnx.ModelProto:
    """An already-quantized (static QDQ) MLP: int8 weights and activations behind DequantizeLinear, as ORT's quantize_static writes."""
    rng = np.random.default_rng(seed)
    w1 = _w(rng, 8, 32, scale=0.35)
    w2 = _w(rng, 32, 6, scale=0.18)
    s1 = np.float32(np.abs(w1).max() / 127)
    s2 = np.float32(np.abs(w2).max() / 127)
    text = f"""{_header(13)}
    g (float[N, 8] x) => (float[N, 6] y) {{
        xq = QuantizeLinear (x, xs, xz)
        xd = DequantizeLinear (xq, xs, xz)
        w1d = DequantizeLinear (w1q, w1s, wz)
        h = MatMul (xd, w1d)
        hb = Add (h, b1)
        r = Relu (hb)
        rq = QuantizeLinear (r, rs, rz)
        rd = DequantizeLinear (rq, rs, rz)
        w2d = DequantizeLinear (w2q, w2s, wz)
        y = MatMul (rd, w2d)
    }}"""
    weights = {"xs": np.float32(4 / 127), "xz": np.int8(0), "w1q": np.round(w1 / s1).astype(np.int8), "w1s": s1,
               "wz": np.int8(0), "b1": 0.2 + _w(rng, 32, scale=0.1), "rs": np.float32(4 / 255), "rz": np.uint8(0),
               "w2q": np.round(w2 / s2).astype(np.int8), "w2s": s2}  # fmt: skip
    weights = {k: np.asarray(v) for k, v in weights.items()}
    return _finish(
        text, weights
    )  # the activation after Relu is uint8 (zero point 0), as quantize_static writes it


def matmul_integer_proto(seed: int = 0) -> onnx.ModelProto:
    """An already-quantized (dynamic int8) MLP as ORT's quantize_dynamic writes it: DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul."""
    rng = np.random.default_rng(seed)
    w1 = _w(rng, 8, 32, scale=0.35)
    w2 = _w(rng, 32, 6, scale=0.18)
    s1 = np.float32(np.abs(w1).max() / 127)
    s2 = np.float32(np.abs(w2).max() / 127)
    text = f"""{_header(13)}
    g (float[N, 8] x) => (float[N, 6] y) {{
        xq, xs, xz = DynamicQuantizeLinear (x)
        m1 = MatMulInteger (xq, w1q, xz, wz)
        m1f = Cast <to = 1> (m1)
        sc1 = Mul (xs, w1s)
        h = Mul (m1f, sc1)
        hb = Add (h, b1)
        r = Relu (hb)
        rq, rs, rz = DynamicQuantizeLinear (r)
        m2 = MatMulInteger (rq, w2q, rz, wz)
        m2f = Cast <to = 1> (m2)
        sc2 = Mul (rs, w2s)
        y = Mul (m2f, sc2)
    }}"""
    weights = {"w1q": np.round(w1 / s1).astype(np.int8), "w1s": np.asarray(s1), "wz": np.asarray(np.int8(0)),
               "b1": 0.2 + _w(rng, 32, scale=0.1), "w2q": np.round(w2 / s2).astype(np.int8), "w2s": np.asarray(s2)}  # fmt: skip
    return _finish(text, weights)


def constant_weights_proto(seed: int = 0) -> onnx.ModelProto:
    """The MLP with every weight a Constant node instead of an initializer (older exporters)."""
    rng = np.random.default_rng(seed)
    proto = _finish(mlp_text(), {}, check=False)
    nodes = [helper.make_node("Constant", [], [n], value=numpy_helper.from_array(a, n + "_value"))
             for n, a in _mlp_weights(rng).items()]  # fmt: skip
    nodes.extend(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def grouped_output_proto(seed: int = 0) -> onnx.ModelProto:
    """A grouped conv whose output is also a graph output (two causes to keep one channel group), then a 1x1 conv."""
    rng = np.random.default_rng(seed)
    text = f"""{_header()}
    g (float[N, 4, 8, 8] x) => (float[N, 8, 8, 8] g1, float[N, 4, 8, 8] y) {{
        g1 = Conv <group = 2, pads = [1, 1, 1, 1]> (x, w1, b1)
        r = Relu (g1)
        y = Conv (r, w2, b2)
    }}"""
    weights = {
        "w1": _w(rng, 8, 2, 3, 3),
        "b1": 0.2 + _w(rng, 8, scale=0.1),
        "w2": _w(rng, 4, 8, 1, 1),
        "b2": _w(rng, 4, scale=0.1),
    }
    return _finish(text, weights)


def shared_weights_proto(seed: int = 0, d: int = 32) -> onnx.ModelProto:
    """Two residual FFN blocks that read the same up and down weights (weight tying), then a head."""
    rng = np.random.default_rng(seed)
    text = f"""{_header()}
    g (float[N, {d}] x) => (float[N, 5] y) {{
        h1 = MatMul (x, w_up)
        r1 = Relu (h1)
        d1 = MatMul (r1, w_down)
        y1 = Add (d1, x)
        h2 = MatMul (y1, w_up)
        r2 = Relu (h2)
        d2 = MatMul (r2, w_down)
        y2 = Add (d2, y1)
        y = MatMul (y2, w_head)
    }}"""
    weights = {"w_up": _w(rng, d, 64, scale=1 / np.sqrt(d)), "w_down": _w(rng, 64, d, scale=0.5 / np.sqrt(64)),
               "w_head": _w(rng, d, 5, scale=1 / np.sqrt(d))}  # fmt: skip
    return _finish(text, weights)


def shared_conv_proto(seed: int = 0, c: int = 8) -> onnx.ModelProto:
    """The same 3x3 conv weight applied twice (a recurrent-style block), then a 1x1 head conv."""
    rng = np.random.default_rng(seed)
    text = f"""{_header()}
    g (float[N, {c}, 8, 8] x) => (float[N, 4, 8, 8] y) {{
        h1 = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        r1 = Relu (h1)
        h2 = Conv <pads = [1, 1, 1, 1]> (r1, w, b)
        r2 = Relu (h2)
        y = Conv (r2, wh, bh)
    }}"""
    weights = {
        "w": _w(rng, c, c, 3, 3),
        "b": 0.2 + _w(rng, c, scale=0.1),
        "wh": _w(rng, 4, c, 1, 1),
        "bh": _w(rng, 4, scale=0.1),
    }
    return _finish(text, weights)


def opset_proto(opset: int, seed: int = 0, d: int = 32) -> onnx.ModelProto:
    """A small encoder-ish graph written in ``opset``'s own forms: an FFN (MatMul+Add, Relu, MatMul), then
    ReduceMean (axes an attribute before 18, an input from 18), Sub, Softmax, Unsqueeze (axes an attribute
    before 13, an input from 13) and Concat."""
    rng = np.random.default_rng(seed)
    if opset >= 18:
        reduce = "mu = ReduceMean <keepdims = 1> (m, rax)"
    else:
        reduce = "mu = ReduceMean <axes = [-1], keepdims = 1> (m)"
    unsq = (
        "u = Unsqueeze (sm, uax)" if opset >= 13 else "u = Unsqueeze <axes = [1]> (sm)"
    )
    text = f"""{_header(opset, 7 if opset <= 13 else 8 if opset <= 17 else 10)}
    g (float[N, {d}] x) => (float[N, 2, {d}] y) {{
        h = MatMul (x, w1)
        hb = Add (h, b1)
        r = Relu (hb)
        m = MatMul (r, w2)
        {reduce}
        c = Sub (m, mu)
        sm = Softmax <axis = 1> (c)
        {unsq}
        y = Concat <axis = 1> (u, u)
    }}"""
    weights = {
        "w1": _w(rng, d, 64),
        "b1": 0.2 + _w(rng, 64, scale=0.1),
        "w2": _w(rng, 64, d),
    }
    if opset >= 18:
        weights["rax"] = np.asarray([-1], np.int64)
    if opset >= 13:
        weights["uax"] = np.asarray([1], np.int64)
    return _finish(text, weights)


def external_data_proto(seed: int = 0) -> onnx.ModelProto:
    """The MLP; written with every weight in one external data file (``write_case`` does that)."""
    rng = np.random.default_rng(seed)
    return _finish(mlp_text(), _mlp_weights(rng))


#: case name -> builder; the external-data case is saved with ``save_as_external_data``.
CASES = {
    "depthwise": depthwise_proto,
    "grouped": grouped_proto,
    "grouped_output": grouped_output_proto,
    "neg_dims": neg_dims_proto,
    "zero_dim": lambda: neg_dims_proto(zero_height=True),
    "fixed_height": fixed_height_proto,
    "nhwc": nhwc_proto,
    "qdq": qdq_proto,
    "matmul_integer": matmul_integer_proto,
    "constant_weights": constant_weights_proto,
    "shared_weights": shared_weights_proto,
    "shared_conv": shared_conv_proto,
    "external_data": external_data_proto,
    "opset11": lambda: opset_proto(11),
    "opset13": lambda: opset_proto(13),
    "opset17": lambda: opset_proto(17),
    "opset21": lambda: opset_proto(21),
}

EXTERNAL_DATA_FILE = "weights.bin"


def write_case(name: str, folder: pathlib.Path) -> list[pathlib.Path]:
    """Save case ``name`` to ``folder/name.onnx``; returns every file the model consists of (model first)."""
    folder.mkdir(parents=True, exist_ok=True)
    proto = CASES[name]()
    path = folder / f"{name}.onnx"
    if name == "external_data":
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=EXTERNAL_DATA_FILE, size_threshold=0)  # fmt: skip
        return [path, folder / EXTERNAL_DATA_FILE]
    onnx.save(proto, str(path))
    return [path]
