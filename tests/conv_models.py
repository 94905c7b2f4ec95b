"""Tiny conv nets for the dependency-group and conv-pruning tests (ONNX text + numpy weights, no files)."""

from __future__ import annotations

import numpy as np
import onnx

_HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def _finish(text: str, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(a, n) for n, a in weights.items())
    onnx.checker.check_model(proto)
    return proto


def _w(rng, *shape, mean=0.0):
    fan = int(np.prod(shape[1:]))
    return (rng.standard_normal(shape) / np.sqrt(fan) + mean).astype(np.float32)


def _bn(rng, prefix: str, c: int) -> dict[str, np.ndarray]:
    return {
        f"{prefix}_s": (1 + 0.1 * rng.standard_normal(c)).astype(np.float32),
        f"{prefix}_b": (0.1 * rng.standard_normal(c)).astype(np.float32),
        f"{prefix}_m": (0.1 * rng.standard_normal(c)).astype(np.float32),
        f"{prefix}_v": (1 + 0.1 * rng.random(c)).astype(np.float32),
    }


def chain_proto(seed: int = 0, c: int = 16) -> onnx.ModelProto:
    """conv 3x3 -> BN -> Relu -> per-channel Mul -> conv 1x1: one group of ``c`` channels."""
    rng = np.random.default_rng(seed)
    text = f"""{_HEADER}
    g (float[N, 3, 8, 8] x) => (float[N, 8, 8, 8] y) {{
        h = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        n = BatchNormalization (h, bn_s, bn_b, bn_m, bn_v)
        r = Relu (n)
        m = Mul (r, scale)
        y = Conv (m, w2, b2)
    }}"""
    weights = {"w1": _w(rng, c, 3, 3, 3), "b1": _w(rng, c, 1)[:, 0], "w2": _w(rng, 8, c, 1, 1), "b2": _w(rng, 8, 1)[:, 0],
               "scale": (1 + 0.1 * rng.standard_normal((c, 1, 1))).astype(np.float32), **_bn(rng, "bn", c)}  # fmt: skip
    return _finish(text, weights)


def separable_proto(seed: int = 0, c: int = 16, project_bias: bool = True) -> onnx.ModelProto:
    """1x1 expand -> Clip (ReLU6) -> depthwise 3x3 -> Clip -> 1x1 project: expand, depthwise and project move together."""
    rng = np.random.default_rng(seed)
    bias = ", b3" if project_bias else ""
    text = f"""{_HEADER}
    g (float[N, 4, 8, 8] x) => (float[N, 6, 8, 8] y) {{
        lo = Constant <value = float {{0.0}}> ()
        hi = Constant <value = float {{6.0}}> ()
        e = Conv (x, w1, b1)
        e6 = Clip (e, lo, hi)
        d = Conv <group = {c}, pads = [1, 1, 1, 1]> (e6, w2, b2)
        d6 = Clip (d, lo, hi)
        y = Conv (d6, w3{bias})
    }}"""
    weights = {"w1": _w(rng, c, 4, 1, 1), "b1": (0.5 + 0.1 * rng.standard_normal(c)).astype(np.float32),
               "w2": _w(rng, c, 1, 3, 3), "b2": (0.5 + 0.1 * rng.standard_normal(c)).astype(np.float32),
               "w3": _w(rng, 6, c, 1, 1)}  # fmt: skip
    if project_bias:
        weights["b3"] = _w(rng, 6, 1)[:, 0]
    return _finish(text, weights)


def residual_proto(seed: int = 0, c: int = 8, e: int = 24) -> onnx.ModelProto:
    """stem conv -> [1x1 expand -> Relu -> 1x1 project] + skip -> head conv: stem, project and head input are one residual group."""
    rng = np.random.default_rng(seed)
    text = f"""{_HEADER}
    g (float[N, 3, 8, 8] x) => (float[N, 10, 8, 8] y) {{
        s = Conv (x, ws, bs)
        sr = Relu (s)
        h = Conv (sr, we, be)
        hr = Relu (h)
        p = Conv (hr, wp, bp)
        a = Add (p, sr)
        y = Conv (a, wh, bh)
    }}"""
    weights = {"ws": _w(rng, c, 3, 1, 1), "bs": _w(rng, c, 1)[:, 0], "we": _w(rng, e, c, 1, 1), "be": _w(rng, e, 1)[:, 0],
               "wp": _w(rng, c, e, 1, 1), "bp": _w(rng, c, 1)[:, 0], "wh": _w(rng, 10, c, 1, 1), "bh": _w(rng, 10, 1)[:, 0]}  # fmt: skip
    return _finish(text, weights)


def unknown_op_proto(seed: int = 0, c: int = 8) -> onnx.ModelProto:
    """conv -> LRN (no rule) -> conv: the group must stop there."""
    rng = np.random.default_rng(seed)
    text = f"""{_HEADER}
    g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y) {{
        h = Conv (x, w1, b1)
        l = LRN <size = 3> (h)
        y = Conv (l, w2, b2)
    }}"""
    weights = {"w1": _w(rng, c, 3, 1, 1), "b1": _w(rng, c, 1)[:, 0], "w2": _w(rng, 4, c, 1, 1), "b2": _w(rng, 4, 1)[:, 0]}
    return _finish(text, weights)


def gap_head_proto(seed: int = 0, c: int = 32, reshape: bool = False) -> onnx.ModelProto:
    """conv -> Relu -> GlobalAveragePool -> Flatten (or Reshape [-1, c]) -> Gemm(transB): channels become features."""
    rng = np.random.default_rng(seed)
    flat = "f = Reshape (p, shp)" if reshape else "f = Flatten <axis = 1> (p)"
    text = f"""{_HEADER}
    g (float[N, 3, 8, 8] x) => (float[N, 5] y) {{
        h = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        r = Relu (h)
        p = GlobalAveragePool (r)
        {flat}
        y = Gemm <transB = 1> (f, wf, bf)
    }}"""
    weights = {"w1": _w(rng, c, 3, 3, 3), "b1": (0.3 + _w(rng, c, 1)[:, 0]), "wf": _w(rng, 5, c), "bf": _w(rng, 5, 1)[:, 0]}
    if reshape:
        weights["shp"] = np.asarray([-1, c], dtype=np.int64)
    return _finish(text, weights)


def image_context(proto: onnx.ModelProto, samples: int = 16, seed: int = 0, size: int = 8):
    """A CompileContext with random image-like calibration rows for ``proto``'s single input."""

    from edgeprune.calibration import CalibrationSet
    from edgeprune.context import CompileContext
    from edgeprune.runtime.targets import get_target

    rng = np.random.default_rng(seed)
    inp = proto.graph.input[0]
    channels = inp.type.tensor_type.shape.dim[1].dim_value
    rows = [{inp.name: rng.standard_normal((1, channels, size, size)).astype(np.float32)} for _ in range(samples)]
    calib = CalibrationSet(rows, "random images", synthetic=True)
    return CompileContext(target=get_target("cpu"), calibration=calib, holdout=calib)


def inception_proto(seed: int = 0, c1: int = 16, c2: int = 8) -> onnx.ModelProto:
    """Two conv branches (1x1 and 3x3) -> Concat on channels -> BN -> Relu -> depthwise 3x3 -> 1x1 conv.

    Each branch is its own group; BN, the depthwise conv and the last conv hold both at offsets 0 and ``c1``.
    """
    rng = np.random.default_rng(seed)
    c = c1 + c2
    text = f"""{_HEADER}
    g (float[N, 3, 8, 8] x) => (float[N, 6, 8, 8] y) {{
        a = Conv (x, wa, ba)
        ar = Relu (a)
        b = Conv <pads = [1, 1, 1, 1]> (x, wb, bb)
        br = Relu (b)
        cat = Concat <axis = 1> (ar, br)
        n = BatchNormalization (cat, bn_s, bn_b, bn_m, bn_v)
        nr = Relu (n)
        d = Conv <group = {c}, pads = [1, 1, 1, 1]> (nr, wd, bd)
        y = Conv (d, wy, by)
    }}"""
    weights = {"wa": _w(rng, c1, 3, 1, 1), "ba": _w(rng, c1, 1)[:, 0], "wb": _w(rng, c2, 3, 3, 3), "bb": _w(rng, c2, 1)[:, 0],
               "wd": _w(rng, c, 1, 3, 3), "bd": _w(rng, c, 1)[:, 0], "wy": _w(rng, 6, c, 1, 1), "by": _w(rng, 6, 1)[:, 0],
               **_bn(rng, "bn", c)}  # fmt: skip
    return _finish(text, weights)


def split_proto(seed: int = 0, c: int = 8, explicit: bool = True) -> onnx.ModelProto:
    """conv (2c channels) -> Relu -> Split on channels (constant sizes [c, c], or implied equal halves) -> two conv branches -> Add."""
    rng = np.random.default_rng(seed)
    split = "Split <axis = 1> (r, sizes)" if explicit else "Split <axis = 1> (r)"
    text = f"""{_HEADER}
    g (float[N, 3, 8, 8] x) => (float[N, 6, 8, 8] y) {{
        h = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        r = Relu (h)
        s0, s1 = {split}
        p = Conv (s0, w2, b2)
        s1r = Sigmoid (s1)
        q = Conv <pads = [1, 1, 1, 1]> (s1r, w3, b3)
        y = Add (p, q)
    }}"""
    weights = {"w1": _w(rng, 2 * c, 3, 3, 3), "b1": _w(rng, 2 * c, 1)[:, 0], "w2": _w(rng, 6, c, 1, 1), "b2": _w(rng, 6, 1)[:, 0],
               "w3": _w(rng, 6, c, 3, 3), "b3": _w(rng, 6, 1)[:, 0]}  # fmt: skip
    if explicit:
        weights["sizes"] = np.asarray([c, c], dtype=np.int64)
    return _finish(text, weights)


def slice_proto(seed: int = 0, c: int = 16, begin: int = 4, end: int = 12) -> onnx.ModelProto:
    """conv -> Relu -> (Slice of channels ``begin:end`` -> conv) + (conv of all channels): one group, the slice bounds move."""
    rng = np.random.default_rng(seed)
    text = f"""{_HEADER}
    g (float[N, 3, 8, 8] x) => (float[N, 6, 8, 8] y) {{
        h = Conv (x, w1, b1)
        r = Relu (h)
        s = Slice (r, starts, ends, axes)
        p = Conv (s, w2, b2)
        q = Conv (r, w3, b3)
        y = Add (p, q)
    }}"""
    weights = {"w1": _w(rng, c, 3, 1, 1), "b1": _w(rng, c, 1)[:, 0], "w2": _w(rng, 6, end - begin, 1, 1), "b2": _w(rng, 6, 1)[:, 0],
               "w3": _w(rng, 6, c, 1, 1), "b3": _w(rng, 6, 1)[:, 0], "starts": np.asarray([begin], dtype=np.int64),
               "ends": np.asarray([end], dtype=np.int64), "axes": np.asarray([-3], dtype=np.int64)}  # fmt: skip
    return _finish(text, weights)


def gather_proto(seed: int = 0, c: int = 8) -> onnx.ModelProto:
    """conv -> Gather of a channel permutation -> conv: no index map for Gather yet, so the group stops with a reason."""
    rng = np.random.default_rng(seed)
    text = f"""{_HEADER}
    g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y) {{
        h = Conv (x, w1, b1)
        p = Gather <axis = 1> (h, perm)
        y = Conv (p, w2, b2)
    }}"""
    weights = {"w1": _w(rng, c, 3, 1, 1), "b1": _w(rng, c, 1)[:, 0], "w2": _w(rng, 4, c, 1, 1), "b2": _w(rng, 4, 1)[:, 0],
               "perm": np.random.default_rng(1).permutation(c).astype(np.int64)}  # fmt: skip
    return _finish(text, weights)
