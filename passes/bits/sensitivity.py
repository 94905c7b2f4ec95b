"""Quantization sensitivity, measured: simulators of ORT's weight formats and Gram-based output error.

Everything here is pure (arrays in, numbers out), so the bit-allocation pass, its tests and the
benchmarks compare formats on the same footing.

- Simulators quantize-dequantize a weight exactly as ONNX Runtime's tools will emit it, by calling
  the very functions those tools call: the C++ ``quantize_matmul_{2,4,8}bits`` that
  ``MatMulNBitsQuantizer`` uses (then unpacking its blob layout), ``DefaultWeightOnlyQuantizer
  .quantize_ndarray`` for ``GatherBlockQuantized``, and ``quant_utils.quantize_data`` for the
  per-channel symmetric int8 weights of ``quantize_dynamic``.  A test checks each against the
  emitted model's outputs.
- Output error of a linear ``Y = X W`` on calibration rows, via the Gram matrix ``G = X^T X``:
  ``||X W - X Q(W)||_F^2 / ||X W||_F^2 = tr(dW^T G dW) / tr(W^T G W)`` (exact, no rows kept).
  For an embedding ``Gather`` the "rows" are one-hot tokens, so ``G`` is diag(token counts).
- Dynamic int8 also quantizes the activation (``DynamicQuantizeLinear``: uint8, per tensor, range
  [min(x,0), max(x,0)]).  Its error is modelled as uniform rounding noise of variance ``s^2/12``
  per element with ``s = range / 255``, i.e. ``rows * s^2/12 * ||Q(W)||_F^2``; the range comes from
  the calibration absmax (an upper bound, so the estimate errs on the safe side).
- MatMulNBits at accuracy level 4 quantizes the activation on CPU to symmetric int8 per row and per
  block of the weight's block size along K (step ``absmax_block / 127``): ``block_int8_activation``
  reproduces ORT's output within 1e-5 relative; its error term is the same noise model per block,
  each block's step bounded by the calibration's per-feature absmax over it
  (``block_activation_noise_sq``: 2-10x the real squared error on Gaussian-like rows).
- Proxies recorded beside the measured error: share of outlier weights (|z| > 3) and the cosine
  between a block's input and output hidden states (low cosine = the block changes a lot).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

#: Float formats: "keep" is the weight's own dtype, untouched.
KEEP = "keep"


@dataclasses.dataclass(frozen=True)
class Option:
    """One way to store a unit's weight.

    ``kind``: ``keep`` (float as is), ``nbits`` (MatMulNBits, weight-only, block-wise along K),
    ``gather-nbits`` (GatherBlockQuantized, block-wise along the embedding dim), ``int8-dynamic``
    (quantize_dynamic: int8 weight per output channel + uint8 dynamic activation), ``int8-gather``
    (quantize_dynamic on a Gather: uint8 table per tensor + DequantizeLinear after the lookup),
    ``qdq`` (static QDQ, for Conv on CPU and NPU-style targets: int8 weights per output channel, activations of
    ``bits`` 8 or 16 quantized per tensor with a range calibrated once), ``gptq`` (MatMulNBits on the same grid, its codes rounded by GPTQ against the Gram of the node's
    input: ``edgeprune.passes.bits.gptq``), ``gather-tied`` (GatherBlockQuantized reading the packed table of the tied LM head's MatMulNBits with
    the same bits/block/symmetry: the table is stored once, so the lookup itself costs no bytes).

    ``accuracy_level`` (``nbits``/``gptq`` only): the MatMulNBits ``accuracy_level`` the node is emitted
    with; 0 leaves it to the pass's ``accuracy_level`` (ORT's default), 4 quantizes the activation to
    int8 per block of ``block`` along K at run time (:func:`block_int8_activation`), faster on CPU.

    ``rounding`` (``nbits``, and the ``gather-tied`` lookups sharing its table): ``rtn``, ORT's own
    grid and round-to-nearest; ``mse``, the same format and bytes with each block's scale and integer
    zero point searched for the least weight error (``edgeprune.passes.bits.rounding``, data-free);
    ``wmse``, the same search with each weight's error weighted by its input's energy (the diagonal
    of the node input's Gram: needs the Gram, like ``gptq``; not for a tied lookup).

    ``fp16_scales`` (block-wise kinds): the file stores the block scales as float16 behind a Cast,
    which ORT folds at load (the kernel then sees the float32 scales it always did); the codes stay
    those of the float32 grid.  Not part of ``key``: one pass offers it for every option or none.

    ``offsets`` (``nbits`` only): centred codes (no zero points) plus a float offset per block, added beside the
    kernel (``edgeprune.passes.bits.offsets``: llama.cpp's Q4_1 form); its ``rounding`` is ``rtn`` for Q4_1's
    min/max grid or ``mse``/``wmse`` for the searched one.  ``symmetric`` is True for it (no zero points stored).
    """

    kind: str
    bits: int = 32
    block: int = 0
    symmetric: bool = True
    accuracy_level: int = 0
    rounding: str = "rtn"
    fp16_scales: bool = False
    offsets: bool = False

    @property
    def key(self) -> str:
        if self.kind == KEEP:
            return "float"
        if self.kind == "int8-dynamic":
            return "int8-dyn"
        if self.kind == "int8-gather":
            return "int8-gather"
        if self.kind == "qdq":
            return f"qdq-a{self.bits}w8"
        prefix = {"nbits": "nbits", "gptq": "gptq", "gather-nbits": "gather", "gather-tied": "tied"}[self.kind]
        acc = f"-acc{self.accuracy_level}" if self.accuracy_level else ""
        rnd = f"-{self.rounding}" if self.rounding != "rtn" else ""
        grid = "off" if self.offsets else "sym" if self.symmetric else "asym"
        return f"{prefix}{self.bits}-b{self.block}-{grid}{acc}{rnd}"

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "key": self.key}


# --------------------------------------------------------------------------- sizes


#: The int64 constants of a block-offset node's block-sum graph (``offsets._block_matrix``: 5 scalars and a 2-element
#: shape, shared by every node of one K and block; counted per node, so the prediction errs high by a few hundred bytes).
OFFSET_GRAPH_BYTES = 7 * 8


def option_bytes(option: Option, shape: tuple[int, int], float_bytes: int = 4) -> int:
    """Bytes the emitted initializers of one unit take (weight + scales + zero points).

    ``shape`` is the stored weight's shape: [K, N] for a MatMul, [vocab, dim] for an embedding.
    Layouts are those of ORT 1.32's tools (checked against emitted models in the tests).
    """
    rows, cols = int(shape[0]), int(shape[1])
    if option.kind == KEEP:
        return rows * cols * float_bytes
    if option.kind == "int8-dynamic":
        return rows * cols + cols * (float_bytes + 1)  # int8 weight, per-channel scale + zero point
    if option.kind == "int8-gather":
        return rows * cols + float_bytes + 1  # uint8 table, one scale + zero point
    if option.kind == "qdq":  # int8 weight, per-channel scale + zero point; scale + zero point of input and output
        return rows * cols + cols * (float_bytes + 1) + 2 * (float_bytes + option.bits // 8)
    if option.kind == "gather-tied":
        return 3 * 8  # the head's MatMulNBits initializers (counted there) + the int64 shape of their Reshape
    bits, block = option.bits, option.block
    if option.fp16_scales:
        float_bytes = 2
    if option.kind in ("nbits", "gptq"):  # [N, k_blocks, blob] + scales [N, k_blocks] + zp [N, ceil(k_blocks*bits/8)]
        k_blocks = -(-rows // block)
        blob = -(-block * bits // 8)
        size = cols * k_blocks * blob + cols * k_blocks * float_bytes
        if not option.symmetric:
            size += cols * -(-k_blocks * bits // 8)
        if option.offsets:  # [k_blocks, N] offsets + the block-sum graph's int64 scalars (counted per node)
            size += cols * k_blocks * float_bytes + OFFSET_GRAPH_BYTES
        return size
    if option.kind == "gather-nbits":  # packed [vocab, dim] + scales [vocab, d_blocks] (+ zp, same packing)
        d_blocks = -(-cols // block)
        size = -(-rows * cols * bits // 8) + rows * d_blocks * float_bytes
        if not option.symmetric:
            size += -(-rows * d_blocks * bits // 8)
        return size
    raise ValueError(f"unknown option kind {option.kind!r}")


# --------------------------------------------------------------------------- simulators


def simulate(option: Option, weight: np.ndarray, gram: np.ndarray | None = None) -> np.ndarray:
    """``weight`` after quantize-dequantize in ``option``'s format (float32, same shape).

    ``gram`` (the node input's ``X^T X``) is needed by ``gptq`` only.
    """
    w = np.ascontiguousarray(weight, dtype=np.float32)
    if option.kind == KEEP:
        return w
    if option.kind == "nbits":
        return _nbits_dequant_as(w, option, gram)
    if option.kind == "gptq":
        if gram is None:
            raise ValueError("GPTQ rounding needs the Gram matrix of the node's input")
        return gptq_dequant(w, gram, option.bits, option.block, option.symmetric, option.fp16_scales)
    if option.kind == "gather-nbits":
        return gather_dequant(w, option.bits, option.block, option.symmetric, option.fp16_scales)
    if option.kind == "gather-tied":  # the head's [dim, vocab] weight is the table transposed
        return np.ascontiguousarray(_nbits_dequant_as(np.ascontiguousarray(w.T), option).T)
    if option.kind in ("int8-dynamic", "qdq"):  # both: ORT's symmetric int8 per output channel
        return int8_channel_dequant(w, axis=1)
    if option.kind == "int8-gather":
        return uint8_tensor_dequant(w)
    raise ValueError(f"unknown option kind {option.kind!r}")


@functools.cache
def _nbits_kernel(bits: int):
    from onnxruntime.capi import _pybind_state as c

    return {2: c.quantize_matmul_2bits, 4: c.quantize_matmul_4bits, 8: c.quantize_matmul_8bits}[bits]


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Unpack the last axis of uint8 ``packed`` into ``count`` values, low bits first (ORT's order)."""
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    vals = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return vals.reshape(*packed.shape[:-1], -1)[..., :count]


def _nbits_quantize(w: np.ndarray, bits: int, block: int, symmetric: bool):
    """ORT's C++ MatMulNBits quantizer on a [K, N] weight: (codes [N, k_blocks, block], scales, zero points)."""
    rows, cols = w.shape
    k_blocks = -(-rows // block)
    kpack = 8 // bits
    src = w if rows == k_blocks * block else np.pad(w, ((0, k_blocks * block - rows), (0, 0)))
    src = np.ascontiguousarray(src, dtype=np.float32)
    packed = np.zeros((cols, k_blocks, -(-block // kpack)), dtype=np.uint8)
    zp = np.zeros((cols, -(-k_blocks // kpack)), dtype=np.uint8)
    scales = np.zeros((cols, k_blocks), dtype=np.float32)
    _nbits_kernel(bits)(packed, src, scales, zp, block, cols, rows, symmetric)
    q = _unpack(packed, bits, block).reshape(cols, k_blocks, block)
    if symmetric:
        zero = np.full((cols, k_blocks), 1 << (bits - 1), dtype=np.uint8)
    else:
        zero = _unpack(zp, bits, k_blocks).astype(np.uint8)
    return q, scales, zero


#: float16's smallest normal number: a smaller scale would lose relative precision as a subnormal.
FP16_TINY = float(np.finfo(np.float16).tiny)


def fp16_scales(scales: np.ndarray) -> np.ndarray | None:
    """``scales`` as float16 when they survive it (finite, every nonzero one at least ``FP16_TINY``), else None:
    emit then keeps that node's scales float32, and the simulators use what emit stores (``stored_scales``)."""
    f16 = scales.astype(np.float16)
    a = np.abs(scales)
    if not np.isfinite(f16).all() or ((a > 0) & (a < FP16_TINY)).any():
        return None
    return f16


def stored_scales(scales: np.ndarray, fp16: bool) -> np.ndarray:
    """The float32 scales the kernel computes with when the file stores them as float16 (if they survive it)."""
    f16 = fp16_scales(scales) if fp16 else None
    return scales if f16 is None else f16.astype(np.float32)


def nbits_grid(w: np.ndarray, bits: int, block: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """(scales, zero points), each [N, k_blocks], of ORT's MatMulNBits quantizer for a [K, N] weight."""
    _, scales, zero = _nbits_quantize(w, bits, block, symmetric)
    return scales, zero


def nbits_dequant(w: np.ndarray, bits: int, block: int, symmetric: bool, fp16: bool = False) -> np.ndarray:
    """MatMulNBits round trip of a [K, N] weight, using ORT's own C++ quantizer (``fp16``: scales stored as float16)."""
    from edgeprune.passes.bits import gptq

    q, scales, zero = _nbits_quantize(w, bits, block, symmetric)
    return gptq.dequant(q.reshape(q.shape[0], -1), stored_scales(scales, fp16), zero, w.shape[0], block)


def _nbits_dequant_as(w: np.ndarray, option: Option, gram: np.ndarray | None = None) -> np.ndarray:
    """MatMulNBits round trip of a [K, N] weight with ``option``'s rounding (ORT's, or a searched grid)."""
    from edgeprune.passes.bits import rounding

    if option.offsets:
        return offset_dequant(w, option, gram)
    if option.rounding == "rtn":
        return nbits_dequant(w, option.bits, option.block, option.symmetric, option.fp16_scales)

    return rounding.search_dequant(w, option.bits, option.block, option.symmetric,
                                   rounding.row_weights(option.rounding, gram), fp16=option.fp16_scales)


def offset_dequant(w: np.ndarray, option: Option, gram: np.ndarray | None = None, centred_only: bool = False) -> np.ndarray:
    """[K, N] weight of a block-offset option as emit writes it (``centred_only``: MatMulNBits' part alone, which
    is what accuracy level 4's int8 activations multiply; the offsets see the exact block sums)."""
    from edgeprune.passes.bits import offsets, rounding

    codes, scales, offs = offsets.offset_grid(w, option.bits, option.block, rounding.row_weights(option.rounding, gram),
                                              option.rounding, option.fp16_scales)
    return offsets.dequant(codes, scales, offs, option.bits, option.block, centred_only)


def gptq_dequant(w: np.ndarray, gram: np.ndarray, bits: int, block: int, symmetric: bool, fp16: bool = False) -> np.ndarray:
    """MatMulNBits weight after GPTQ rounding on ORT's grid (``edgeprune.passes.bits.gptq``), as a [K, N] float."""
    from edgeprune.passes.bits import gptq

    scales, zero = nbits_grid(w, bits, block, symmetric)
    codes = gptq.gptq_codes(w, gram, scales, zero, bits, block)
    return gptq.dequant(codes, stored_scales(scales, fp16), zero, w.shape[0], block)


def gather_dequant(table: np.ndarray, bits: int, block: int, symmetric: bool, fp16: bool = False) -> np.ndarray:
    """GatherBlockQuantized round trip of a [vocab, dim] table (quantize_axis 1), via ORT's numpy code."""
    if bits != 4:
        raise ValueError("ORT's quantizer writes GatherBlockQuantized with 4 bits only")
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer as Q

    rows, cols = table.shape
    d_blocks = -(-cols // block)
    packed, scales, zp = Q.quantize_ndarray(np.ascontiguousarray(table, np.float32), 1, block, symmetric)
    q = _unpack(packed, 4, rows * cols).reshape(rows, cols).astype(np.int16)
    if symmetric:  # two's-complement nibbles, no zero point
        q = np.where(q > 7, q - 16, q)
        zero = np.zeros((rows, cols), dtype=np.float32)
    else:
        zero = _unpack(zp, 4, rows * d_blocks).reshape(rows, d_blocks).astype(np.float32)
        zero = np.repeat(zero, block, axis=1)[:, :cols]
    scale = np.repeat(stored_scales(scales.reshape(rows, d_blocks), fp16), block, axis=1)[:, :cols]
    return ((q.astype(np.float32) - zero) * scale).astype(np.float32)


def int8_channel_dequant(w: np.ndarray, axis: int = 1) -> np.ndarray:
    """quantize_dynamic's weight round trip: symmetric int8 per channel along ``axis`` (ORT's quantize_data)."""
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import quantize_data

    out = np.empty_like(w)
    moved = np.moveaxis(w, axis, 0)
    target = np.moveaxis(out, axis, 0)
    for i in range(moved.shape[0]):
        zero, scale, q = quantize_data(moved[i].ravel(), TensorProto.INT8, True)
        target[i] = ((q.astype(np.float32) - np.float32(zero)) * np.float32(scale)).reshape(moved[i].shape)
    return out


def int8_tensor_dequant(w: np.ndarray) -> np.ndarray:
    """quantize_dynamic's Conv weight round trip: symmetric int8, one scale (ConvInteger is per tensor)."""
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import quantize_data

    zero, scale, q = quantize_data(w.ravel(), TensorProto.INT8, True)
    return ((q.astype(np.float32) - np.float32(zero)) * np.float32(scale)).reshape(w.shape)


def uint8_tensor_dequant(table: np.ndarray) -> np.ndarray:
    """quantize_dynamic's Gather round trip: asymmetric uint8, one scale for the whole table."""
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import quantize_data

    zero, scale, q = quantize_data(table.ravel(), TensorProto.UINT8, False)
    return ((q.astype(np.float32) - np.float32(zero)) * np.float32(scale)).reshape(table.shape)


# --------------------------------------------------------------------------- error


def gram_rel_error(weight: np.ndarray, quantized: np.ndarray, gram: np.ndarray) -> float:
    """sqrt(tr(dW^T G dW) / tr(W^T G W)): relative Frobenius error of X W on the calibration rows."""
    return gram_rel_errors(weight, [quantized], gram, exact=True)[0]


def _quad(g: np.ndarray, m: np.ndarray, exact: bool) -> float:
    """tr(M^T G M); float32 BLAS unless ``exact`` (relative errors need ~3 digits, float32 gives ~6)."""
    dt = np.float64 if exact else np.float32
    m = np.asarray(m, dtype=dt)
    return float(np.einsum("ij,ij->", np.asarray(g, dtype=dt) @ m, m, dtype=np.float64))


def gram_rel_errors(weight: np.ndarray, quantized: list[np.ndarray], gram: np.ndarray, *, exact: bool = False,
                    extra_sq: list[float] | None = None) -> list[float]:
    """``gram_rel_error`` for several quantized versions of one weight (the denominator is computed once).

    ``extra_sq`` adds a known squared error per version (e.g. activation rounding of dynamic int8).
    """
    w = np.asarray(weight, dtype=np.float64)
    den = _quad(gram, w, exact)
    if den <= 0:
        return [0.0] * len(quantized)
    out = []
    for i, q in enumerate(quantized):
        num = _quad(gram, np.asarray(q, np.float64) - w, exact) + (extra_sq[i] if extra_sq else 0.0)
        out.append(float(np.sqrt(max(num, 0.0) / den)))
    return out


def row_weighted_rel_error(table: np.ndarray, quantized: np.ndarray, counts: np.ndarray) -> float:
    """Relative error of an embedding lookup: the Gram of one-hot rows is diag(counts)."""
    c = np.asarray(counts, dtype=np.float64)
    num = float(c @ np.square(np.asarray(quantized, np.float64) - table).sum(axis=1))
    den = float(c @ np.square(np.asarray(table, np.float64)).sum(axis=1))
    return float(np.sqrt(num / den)) if den > 0 else 0.0


def activation_noise_sq(quantized: np.ndarray, absmax: float, rows: int, bits: int = 8) -> float:
    """Expected ||dX Q(W)||_F^2 from per-tensor activation rounding to ``bits`` (uniform noise model).

    Dynamic int8 takes the range of each run, static QDQ one calibrated range: both are bounded
    by the calibration rows' absolute maximum.
    """
    scale = 2.0 * float(absmax) / float((1 << bits) - 1)
    return rows * scale * scale / 12.0 * float(np.square(np.asarray(quantized, np.float64)).sum())


def block_int8_activation(x: np.ndarray, block: int) -> np.ndarray:
    """``x`` [..., K] after MatMulNBits' accuracy-level-4 activation round trip on CPU.

    ORT's CPU kernel (MLAS, int8 compute) quantizes each row of the activation in blocks of the
    weight's ``block`` along K, symmetric: scale = absmax / 127, code = round-to-nearest(x / scale);
    the int8 dot products times both scales then equal ``block_int8_activation(x) @ dequant(W)``
    up to float summation order (checked against ORT in ``tests/bits``).  A K not divisible by the
    block is zero-padded, as the kernel pads the last block.
    """
    x = np.asarray(x, dtype=np.float32)
    k = x.shape[-1]
    pad = -k % block
    xp = np.pad(x.reshape(-1, k), ((0, 0), (0, pad))).reshape(-1, (k + pad) // block, block)
    amax = np.abs(xp).max(axis=-1, keepdims=True)
    scale = amax / np.float32(127.0)
    inv = np.where(amax > 0, np.float32(127.0) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.clip(np.rint(xp * inv), -127, 127)
    return (q * scale).astype(np.float32).reshape(-1, k + pad)[:, :k].reshape(x.shape)


def block_activation_noise_sq(quantized: np.ndarray, absmax: np.ndarray, rows: int, block: int) -> float:
    """Expected ||dX Q(W)||_F^2 from accuracy level 4's per-block int8 activation rounding.

    Each (row, block) has step ``s_b = absmax_b / 127`` (symmetric int8) and adds uniform noise of
    variance ``s_b^2 / 12`` per element into ``||Q(W)[block rows]||^2``.  A row's block absmax is
    bounded by the calibration's per-feature absmax over that block, so the estimate is an upper
    bound (like dynamic int8's per-tensor term), much tighter than a per-tensor range.
    """
    q = np.asarray(quantized, np.float64)
    k = q.shape[0]
    pad = -k % block
    amax = np.pad(np.asarray(absmax, np.float64).ravel()[:k], (0, pad)).reshape(-1, block).max(axis=1)
    energy = np.pad(np.square(q).sum(axis=1), (0, pad)).reshape(-1, block).sum(axis=1)
    return float(rows * (np.square(amax / 127.0) / 12.0 * energy).sum())


def dynamic_rel_error(weight: np.ndarray, quantized: np.ndarray, gram: np.ndarray, absmax: float, rows: int) -> float:
    """Relative error of a dynamic-int8 MatMul: weight rounding (exact) + activation rounding (modelled)."""
    return gram_rel_errors(weight, [quantized], gram, extra_sq=[activation_noise_sq(quantized, absmax, rows)])[0]


# --------------------------------------------------------------------------- proxies


def outlier_share(weight: np.ndarray, z: float = 3.0) -> float:
    """Share of weights more than ``z`` standard deviations from the mean (heavy tails quantize badly)."""
    w = np.asarray(weight, dtype=np.float64)
    std = w.std()
    return float((np.abs(w - w.mean()) > z * std).mean()) if std > 0 else 0.0


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine between matching rows of ``a`` and ``b`` (last axis = features)."""
    a = np.asarray(a, np.float64).reshape(-1, np.shape(a)[-1])
    b = np.asarray(b, np.float64).reshape(-1, np.shape(b)[-1])
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-30)))
