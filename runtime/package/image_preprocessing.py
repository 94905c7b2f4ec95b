"""Image classifiers with ``--with-preprocessing``: encoded image bytes in, top-k classes out.

In front: onnxruntime-extensions' ``DecodeImage`` (JPEG/PNG bytes to BGR, BGRA or gray uint8, made
RGB as Pillow's ``convert("RGB")`` does),
then edgeprune's ImageNet evaluation preprocessing (``models.tasks.imagenet_pixels``) written
in standard ONNX ops so it reproduces Pillow exactly:

* the shorter side goes to ``round(max(H, W) * 256 / 224)``, the other to
  ``max(size, round(side * scale))`` (``Round`` is half-to-even like Python's ``round``);
* Pillow's ``BILINEAR`` resize is a separable triangle filter whose support widens with the
  downscale factor, with 22-bit fixed-point coefficients and a horizontal-then-vertical pass,
  each rounded to uint8.  The graph computes the same coefficients in double
  (``center = (x + 0.5) * scale``, ``w = max(0, 1 - |(i - center + 0.5) / filterscale|)``,
  normalised, ``floor(k * 2**22 + 0.5)``), gathers each output pixel's taps and sums the integer
  products in int32 (exact in any order), then ``min(255, (sum + 2**21) >> 22)`` per pass.
  (The weight normaliser is a ``ReduceSum``, whose order may differ from Pillow's loop in the
  last bit; no coefficient moved on the 100 shared images and the sizes the tests try.)
  ONNX ``Resize(antialias=1)`` is close but not equal (it differs from Pillow on 37 of the first 40
  shared images, by up to 8 levels), hence the explicit filter.  Only the centre crop's output pixels are
  computed; each output pixel depends only on its taps, so this changes no value;
* ``(pixels / 255 - mean) / std`` in float32, channels first, batch axis added.

Behind: the logits' top-k class indices (``TopK``, lower index first on ties like ``argmax``),
their softmax probabilities and, given a labels file, their names.

What differs from the Python pipeline is the JPEG decoder: Pillow's and the extensions library's
(0.15.2) decoded pixels differ on 63 of the 100 shared JPEGs (colour ones by up to 62 levels; the one
grayscale JPEG decodes wrongly, 7.5 % of its pixels off by more than 10 levels), which can move a
top-1 class (1 of 100 for EfficientNet-Lite0).  PNGs decode identically.  Everything after decoding is bit-exact, so the bundle's check feeds the Python pipeline the
extensions' decoded pixels (the gate) and reports the agreement with Pillow's decoding beside it.
"""

from __future__ import annotations

import logging
import pathlib

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgeprune.errors import BadInputError

logger = logging.getLogger(__name__)

TOP_K = 5
_PRECISION_BITS = 22  # Pillow's Resample.c: 32 - 8 - 2
_EXT_DOMAIN = "com.microsoft.extensions"  # DecodeImage's domain in onnxruntime-extensions
_MIN_OPSET = 13  # Unsqueeze/ReduceSum with axes as inputs, Softmax over the last axis


def image_input(proto: onnx.ModelProto) -> tuple[str, int] | None:
    """(input name, square size) when the model is an NCHW float image classifier, else None.

    A dynamic height/width counts as 224 (what ``imagenet_pixels`` feeds by default).
    """
    initializers = {i.name for i in proto.graph.initializer}
    inputs = [v for v in proto.graph.input if v.name not in initializers]
    if len(inputs) != 1:
        return None
    value = inputs[0]
    tensor = value.type.tensor_type
    if tensor.elem_type != TensorProto.FLOAT or len(tensor.shape.dim) != 4:
        return None
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor.shape.dim]
    if dims[1] != 3:
        return None
    height, width = dims[2] or 224, dims[3] or 224
    if height != width:
        raise BadInputError(
            f"--with-preprocessing feeds square centre crops (ImageNet evaluation), but input {value.name} is {height}x{width}: "
            "package it without --with-preprocessing."
        )
    return value.name, height


class _Graph:
    """Nodes and constants with prefixed names (``pre/`` in front, ``post/`` behind)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def const(self, value, dtype, name: str | None = None) -> str:
        name = f"{self.prefix}{name or f'c{len(self.initializers)}'}"
        self.initializers.append(onnx.numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, **attrs) -> str | list[str]:
        self._count += 1
        if isinstance(outputs, int):
            names = [f"{self.prefix}{op_type.lower()}{self._count}" + (f"_{i}" if outputs > 1 else "") for i in range(outputs)]
        else:
            names = outputs
        domain = attrs.pop("domain", "")
        self.nodes.append(helper.make_node(op_type, inputs, names, name=f"{self.prefix}{op_type}_{self._count}", domain=domain, **attrs))
        return names[0] if len(names) == 1 else names


def _taps(g: _Graph, in_size: str, out_size: str, first: str, count: int) -> tuple[str, str]:
    """Pillow's bilinear coefficients for output pixels ``first .. first+count-1`` of an ``in_size -> out_size`` resize.

    Returns (tap indices [count, T] int64, fixed-point coefficients [count, T] int32), with
    T = 2 * ceil(support) + 1 as in Pillow; taps past the image edge get weight 0 and a valid index.
    """
    d = TensorProto.DOUBLE
    in_d = g.op("Cast", [in_size], to=d)
    out_d = g.op("Cast", [out_size], to=d)
    scale = g.op("Div", [in_d, out_d])
    filterscale = g.op("Max", [scale, g.const(1.0, np.float64)])
    support = filterscale  # bilinear support 1.0 * filterscale
    ss = g.op("Div", [g.const(1.0, np.float64), filterscale])
    first_d = g.op("Cast", [first], to=d)
    xx = g.op("Add", [g.op("Range", [g.const(0.0, np.float64), g.const(float(count), np.float64), g.const(1.0, np.float64)]), first_d])
    center = g.op("Mul", [g.op("Add", [xx, g.const(0.5, np.float64)]), scale])  # [count]
    half = g.const(0.5, np.float64)
    zero = g.const(0.0, np.float64)
    xmin = g.op("Max", [g.op("Floor", [g.op("Add", [g.op("Sub", [center, support]), half])]), zero])
    xend = g.op("Min", [g.op("Floor", [g.op("Add", [g.op("Add", [center, support]), half])]), in_d])
    ksize = g.op("Add", [g.op("Mul", [g.op("Ceil", [support]), g.const(2.0, np.float64)]), g.const(1.0, np.float64)])
    t = g.op("Range", [zero, ksize, g.const(1.0, np.float64)])  # [T]
    axis_last = g.const([-1], np.int64)
    idx = g.op("Add", [g.op("Unsqueeze", [xmin, axis_last]), t])  # [count, T]
    valid = g.op("Less", [idx, g.op("Unsqueeze", [xend, axis_last])])
    # Pillow: filter((x + xmin - center + 0.5) * ss), 1 - |v| inside the support, else 0
    arg = g.op("Mul", [g.op("Add", [g.op("Sub", [idx, g.op("Unsqueeze", [center, axis_last])]), half]), ss])
    w = g.op("Relu", [g.op("Sub", [g.const(1.0, np.float64), g.op("Abs", [arg])])])
    w = g.op("Where", [valid, w, zero])
    ww = g.op("ReduceSum", [w, axis_last], keepdims=1)
    k = g.op("Div", [w, ww])
    fixed = g.op("Floor", [g.op("Add", [g.op("Mul", [k, g.const(float(1 << _PRECISION_BITS), np.float64)]), half])])
    last = g.op("Sub", [in_d, g.const(1.0, np.float64)])
    safe_idx = g.op("Cast", [g.op("Min", [idx, last])], to=TensorProto.INT64)
    return safe_idx, g.op("Cast", [fixed], to=TensorProto.INT32)


def _resample(g: _Graph, pixels: str, idx: str, coeff: str) -> str:
    """One Pillow pass along the first axis of [A, B, 3] uint8 pixels: gather taps, integer dot, round, clip to uint8.

    Gathering along the first axis copies whole [B, 3] rows and the coefficients broadcast over
    them: ORT runs that layout several times faster than gathering single bytes off the last axis.
    """
    taps = g.op("Cast", [g.op("Gather", [pixels, idx], axis=0)], to=TensorProto.INT32)  # [n, T, B, 3]
    weights = g.op("Unsqueeze", [coeff, g.const([-1, -2], np.int64)])  # [n, T, 1, 1]
    summed = g.op("ReduceSum", [g.op("Mul", [taps, weights]), g.const([1], np.int64)], keepdims=0)
    rounded = g.op("Div", [g.op("Add", [summed, g.const(1 << (_PRECISION_BITS - 1), np.int32)]), g.const(1 << _PRECISION_BITS, np.int32)])
    return g.op("Cast", [g.op("Min", [rounded, g.const(255, np.int32)])], to=TensorProto.UINT8)


def front(g: _Graph, rgb: str, size: int, out_name: str, mean, std) -> None:
    """RGB uint8 [H, W, 3] -> ``out_name`` float32 [1, 3, size, size], exactly as ``imagenet_pixels``."""
    d = TensorProto.DOUBLE
    shape = g.op("Shape", [rgb])
    h = g.op("Gather", [shape, g.const(0, np.int64)])
    w = g.op("Gather", [shape, g.const(1, np.int64)])
    h_d, w_d = g.op("Cast", [h], to=d), g.op("Cast", [w], to=d)
    short = float(round(size * 256 / 224))
    scale = g.op("Div", [g.const(short, np.float64), g.op("Min", [h_d, w_d])])
    size_d = g.const(float(size), np.float64)
    new_w = g.op("Cast", [g.op("Max", [g.op("Round", [g.op("Mul", [w_d, scale])]), size_d])], to=TensorProto.INT64)
    new_h = g.op("Cast", [g.op("Max", [g.op("Round", [g.op("Mul", [h_d, scale])]), size_d])], to=TensorProto.INT64)
    two, crop = g.const(2, np.int64), g.const(size, np.int64)
    left = g.op("Div", [g.op("Sub", [new_w, crop]), two])  # non-negative: floor division like Python's //
    top = g.op("Div", [g.op("Sub", [new_h, crop]), two])
    idx_w, coeff_w = _taps(g, w, new_w, left, size)
    idx_h, coeff_h = _taps(g, h, new_h, top, size)
    columns = g.op("Transpose", [rgb], perm=[1, 0, 2])  # [W, H, 3]
    horizontal = _resample(g, columns, idx_w, coeff_w)  # [size (w), H, 3]: Pillow's first pass
    vertical = _resample(g, g.op("Transpose", [horizontal], perm=[1, 0, 2]), idx_h, coeff_h)  # [size (h), size (w), 3]
    chw = g.op("Cast", [g.op("Transpose", [vertical], perm=[2, 0, 1])], to=TensorProto.FLOAT)  # channels first, then per-plane constants
    scaled = g.op("Div", [chw, g.const(255.0, np.float32)])
    column = (3, 1, 1)
    normed = g.op("Div", [g.op("Sub", [scaled, g.const(np.reshape(mean, column), np.float32)]), g.const(np.reshape(std, column), np.float32)])
    g.op("Unsqueeze", [normed, g.const([0], np.int64)], [out_name])


def back(g: _Graph, logits: str, classes: int, k: int, labels: list[str] | None) -> list[onnx.ValueInfoProto]:
    """Top-k behind the logits: class_index [1, k] int64, probability [1, k] float32, label [1, k] string."""
    flat = g.op("Reshape", [logits, g.const([1, -1], np.int64)])
    _, indices = g.op("TopK", [flat, g.const([k], np.int64)], 2, axis=-1, largest=1, sorted=1)
    g.op("Identity", [indices], ["class_index"])
    probs = g.op("Softmax", [flat], axis=-1)
    g.op("GatherElements", [probs, indices], ["probability"], axis=-1)
    outputs = [helper.make_tensor_value_info("class_index", TensorProto.INT64, [1, k]),
               helper.make_tensor_value_info("probability", TensorProto.FLOAT, [1, k])]
    if labels is not None:
        names = g.const(np.array(labels, dtype=object), object, "labels")
        picked = g.op("Gather", [names, g.op("Squeeze", [indices, g.const([0], np.int64)])])
        g.op("Unsqueeze", [picked, g.const([0], np.int64)], ["label"])
        outputs.append(helper.make_tensor_value_info("label", TensorProto.STRING, [1, k]))
    return outputs


def read_labels(path: pathlib.Path, classes: int) -> list[str]:
    """One class name per line, as many lines as the model has classes."""
    try:
        lines = [ln.strip() for ln in pathlib.Path(path).read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"the labels file {path} could not be read ({type(exc).__name__}): give a UTF-8 text file, one class name per line.") from exc
    while lines and not lines[-1]:
        lines.pop()
    if len(lines) != classes:
        raise BadInputError(f"the labels file {path} has {len(lines)} lines but the model has {classes} classes: give one class name per line, in class-index order.")
    return lines


def classes_of(proto: onnx.ModelProto) -> int:
    """The class count: the last dimension of the first output, which must be [N, C] logits."""
    out = proto.graph.output[0]
    dims = out.type.tensor_type.shape.dim
    if len(dims) != 2 or not (dims[1].HasField("dim_value") and dims[1].dim_value > 1):
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
        raise BadInputError(
            f"--with-preprocessing puts top-k behind an image classifier's [N, classes] logits, but the first output "
            f"{out.name} has shape {shape}: package it without --with-preprocessing."
        )
    return dims[1].dim_value


def _decode(g: _Graph, data: str, out_name: str | None = None) -> str:
    """``DecodeImage`` (JPEG/PNG bytes -> BGR [H, W, 3], BGRA [H, W, 4] or gray [H, W, 1] uint8), then RGB.

    As Pillow's ``convert("RGB")``: channels reversed, alpha dropped, one gray channel repeated three times.
    """
    decoded = g.op("DecodeImage", [data], domain=_EXT_DOMAIN)
    channels = g.op("Gather", [g.op("Shape", [decoded]), g.const(2, np.int64)])
    gray = g.op("Less", [channels, g.const(3, np.int64)])
    order = g.op("Where", [gray, g.const([0, 0, 0], np.int64), g.const([2, 1, 0], np.int64)])
    return g.op("Gather", [decoded, order], [out_name] if out_name else 1, axis=2)


def decode_model(opset: int = 17) -> onnx.ModelProto:
    """The decoding step alone, as the bundle runs it: encoded bytes in, RGB uint8 [H, W, 3] out."""
    g = _Graph("pre/")
    _decode(g, "image", "rgb")
    graph = helper.make_graph(g.nodes, "decode", [helper.make_tensor_value_info("image", TensorProto.UINT8, ["num_bytes"])],
                              [helper.make_tensor_value_info("rgb", TensorProto.UINT8, ["height", "width", 3])], initializer=g.initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(_EXT_DOMAIN, 1)])


def preprocess_model(size: int, *, opset: int = 17) -> onnx.ModelProto:
    """The front alone, without decoding: RGB uint8 [H, W, 3] in, ``pixel_values`` [1, 3, size, size] out.

    Equal, bit for bit, to ``models.tasks.imagenet_pixels`` on the same decoded pixels.
    """
    from edgeprune.models.tasks import IMAGENET_MEAN, IMAGENET_STD

    g = _Graph("pre/")
    front(g, "rgb", size, "pixel_values", IMAGENET_MEAN, IMAGENET_STD)
    graph = helper.make_graph(g.nodes, "imagenet_preprocessing", [helper.make_tensor_value_info("rgb", TensorProto.UINT8, ["height", "width", 3])],
                              [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1, 3, size, size])], initializer=g.initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def merge(model: onnx.ModelProto, input_name: str, size: int, labels: list[str] | None) -> onnx.ModelProto:
    """The model with decoding + ImageNet preprocessing in front and top-k behind: ``image`` (encoded bytes) in."""
    from edgeprune.models.tasks import IMAGENET_MEAN, IMAGENET_STD

    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < _MIN_OPSET:
        raise BadInputError(f"--with-preprocessing on an image model needs ONNX opset {_MIN_OPSET} or later, and this model is at opset {opset}: re-export it at a newer opset.")
    classes = classes_of(model)
    k = min(TOP_K, classes)
    pre, post = _Graph("pre/"), _Graph("post/")
    rgb = _decode(pre, "image")
    graph_input = helper.make_tensor_value_info("image", TensorProto.UINT8, ["num_bytes"])
    front(pre, rgb, size, input_name, IMAGENET_MEAN, IMAGENET_STD)
    outputs = back(post, model.graph.output[0].name, classes, k, labels)
    graph = helper.make_graph(pre.nodes + list(model.graph.node) + post.nodes, f"{model.graph.name or 'model'}_with_preprocessing",
                              [graph_input], outputs, initializer=list(model.graph.initializer) + pre.initializers + post.initializers)
    graph.value_info.extend(model.graph.value_info)
    opsets = [o for o in model.opset_import if o.domain != _EXT_DOMAIN] + [helper.make_opsetid(_EXT_DOMAIN, 1)]
    merged = helper.make_model(graph, opset_imports=opsets, ir_version=model.ir_version)
    merged.functions.extend(model.functions)
    return merged
