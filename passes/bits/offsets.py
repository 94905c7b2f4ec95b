"""MatMulNBits with a float offset per block: llama.cpp's Q4_1 form (and HQQ's float zero point) on ORT's fast kernel.

MatMulNBits stores ``w = s (c - z)`` per block with an *integer* zero point ``z``, so a block's grid always holds 0 and
its levels sit at whole steps from it.  A block whose weights span ``[lo, hi]`` asymmetrically wastes part of a step
at one end, and a model whose weights were distributed on a ``s c + m`` grid (a dequantized Q4_1 GGUF, as SmolLM2's
here) cannot be written back exactly.  A float zero point would fix both, but ORT 1.32's CPU kernel runs it on a
fallback 7-18x slower (576x1536, 1 / 128 tokens, 2 threads: 753 / 1857 us against 44 / 1087 us with uint8 ones).

So the offset rides beside the kernel: the node keeps centred codes (no zero points, ``z = 2^(bits-1)``) and
``y = x W`` becomes ``MatMulNBits(x) + (block sums of x) @ O``, where ``O`` [k_blocks, N] holds each block's offset:
``sum_k x_k (s (c_k - z) + o) = s sum_k x_k (c_k - z) + o sum_k x_k`` per block.  The block sums are one small
MatMul of ``x`` with a 0/1 matrix [K, k_blocks] that the graph builds from a few scalars (ORT folds it at load, so it
costs no file bytes), shared by every node reading ``x`` with that block; each node adds one [k_blocks, N] MatMul
and an Add.  The file holds 4-bit codes + a float16 scale and offset per block: Q4_1's 5 bits per weight at block 32.

The grid (:func:`offset_grid`): ``rtn`` is Q4_1's rule (``s = (max - min) / (2^bits - 1)``, the offset at the
minimum), exact on weights already on such a grid; ``mse`` / ``wmse`` (the weighting of
``edgeprune.passes.bits.rounding``) also try shrunk ranges and refit ``(s, o)`` by weighted least squares for the
rounded codes (a closed form per block), keeping whatever lowers the weighted error, so never worse than ``rtn``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgeprune.passes.bits.memo import Memo

#: Range shrink factors tried by the searched roundings (1.0 = the block's min/max range).
ALPHAS = {2: (1.0, 0.9, 0.8, 0.7, 0.6, 0.5), 4: (1.0, 0.95, 0.9, 0.85, 0.8, 0.7)}
#: Re-round + refit rounds after the candidate search.
REFINE = 2
CHUNK = 1 << 12
#: float16's largest finite value: offsets beyond it keep float32.
FP16_MAX = float(np.finfo(np.float16).max)

_GRIDS = Memo()  # (weight, format, row weights) -> grid


def stored(values: np.ndarray, fp16: bool) -> np.ndarray:
    """The float32 values the kernel computes with when the file stores ``values`` as float16 (if all are finite
    there; a subnormal float16 keeps an absolute precision of 6e-8, far below any step, so small values are fine)."""
    if not fp16 or not np.isfinite(values).all() or np.abs(values).max(initial=0.0) > FP16_MAX:
        return values.astype(np.float32)
    return values.astype(np.float16).astype(np.float32)


def fits_fp16(values: np.ndarray) -> bool:
    """Whether float16 holds ``values`` exactly (offsets already rounded by :func:`stored` with ``fp16``)."""
    with np.errstate(over="ignore"):
        return bool(np.array_equal(values.astype(np.float16).astype(np.float32), values))


def offset_grid(w: np.ndarray, bits: int, block: int, weights: np.ndarray | None = None, rounding: str = "rtn",
                fp16: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes [N, K] uint8 in ``[0, 2^bits - 1]``, scales [N, k_blocks], offsets [N, k_blocks]) of ``w`` [K, N]
    (K a multiple of ``block``), scales and offsets as the kernel will read them (``fp16``: stored as float16).

    The weight MatMulNBits + offset computes with is ``s (c - 2^(bits-1)) + o``.  ``weights`` ([K], >= 0): each row's
    share of the error for ``mse``/``wmse`` (None: alike); ``rtn`` ignores it.
    """
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.shape[0] % block:
        raise ValueError(f"block offsets need K ({w.shape[0]}) to be a multiple of the block ({block})")
    wt = None if weights is None or rounding == "rtn" else np.ascontiguousarray(weights, dtype=np.float32)
    # the options of one weight (accuracy levels), its activation noise and emit ask for the same grid
    hit = _GRIDS.get(lambda: _grid(w, bits, block, wt, rounding != "rtn", fp16), f"{bits}|{block}|{rounding}|{fp16}", w, wt)
    return tuple(a.copy() for a in hit)


def dequant(codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray, bits: int, block: int,
            centred_only: bool = False) -> np.ndarray:
    """[K, N] float32 weight of the grid; ``centred_only``: MatMulNBits' part alone, ``s (c - 2^(bits-1))``."""
    n = codes.shape[0]
    c = codes.reshape(n, -1, block).astype(np.float32) - np.float32(1 << (bits - 1))
    deq = c * scales[..., None]
    if not centred_only:
        deq += offsets[..., None]
    return np.ascontiguousarray(deq.reshape(n, -1).T)


def _grid(w, bits, block, weights, search, fp16):
    k, n = w.shape
    kb = k // block
    x = np.ascontiguousarray(w.T).reshape(n * kb, block)
    d = None if weights is None else np.maximum(weights.reshape(kb, block), 0.0)
    codes = np.empty((n * kb, block), np.uint8)
    scales = np.empty(n * kb, np.float32)
    offsets = np.empty(n * kb, np.float32)
    for a in range(0, n * kb, CHUNK):
        b = min(a + CHUNK, n * kb)
        dd = None if d is None else d[np.arange(a, b) % kb]
        codes[a:b], scales[a:b], offsets[a:b] = _search(x[a:b], dd, bits, search)
    from edgeprune.passes.bits.sensitivity import stored_scales

    s = stored_scales(scales, fp16)  # float16 where the node's scales survive it, as emit stores them
    half = np.float32(1 << (bits - 1))
    if search:  # the offsets refitted to the stored scales (weighted mean of the residual), chunk by chunk
        for a in range(0, n * kb, CHUNK):
            b = min(a + CHUNK, n * kb)
            dd = np.ones((b - a, block), np.float32) if d is None else d[np.arange(a, b) % kb]
            den = dd.sum(axis=1)
            r = x[a:b] - s[a:b, None] * (codes[a:b].astype(np.float32) - half)
            fit = ((dd * r).sum(axis=1) / np.where(den > 0, den, 1.0)).astype(np.float32)
            offsets[a:b] = np.where(den > 0, fit, offsets[a:b])
    else:  # Q4_1's rule: the lowest code is the block's minimum
        offsets = (x.min(axis=1) + half * s).astype(np.float32)
    o = stored(offsets, fp16)
    return codes.reshape(n, k), s.reshape(n, kb), o.reshape(n, kb)


def _round(x, s, o, half, maxq):
    inv = np.where(s == 0, 0.0, 1.0 / np.where(s == 0, 1.0, s)).astype(np.float32)
    return np.clip(np.rint((x - o[:, None]) * inv[:, None] + half), 0, maxq)


def _err(x, d, c, s, o, half):
    r = x - (s[:, None] * (c - half) + o[:, None])
    return (r * r if d is None else d * r * r).sum(axis=1, dtype=np.float64)


def _fit(x, d, c, half, s_old, o_old):
    """Weighted least-squares (s, o) for fixed codes: the 2x2 normal equations per block."""
    u = (c - half).astype(np.float64)
    dd = np.ones_like(u) if d is None else d.astype(np.float64)
    xx = x.astype(np.float64)
    a, bm, cn = (dd * u * u).sum(1), (dd * u).sum(1), dd.sum(1)
    r1, r2 = (dd * u * xx).sum(1), (dd * xx).sum(1)
    det = a * cn - bm * bm
    ok = det > 1e-12 * np.maximum(a * cn, 1e-30)
    safe = np.where(ok, det, 1.0)
    s = np.where(ok, (cn * r1 - bm * r2) / safe, s_old)
    o = np.where(ok, (a * r2 - bm * r1) / safe, o_old)
    return s.astype(np.float32), o.astype(np.float32)


def _search(x, d, bits, search):
    """Best (codes, scale, offset) per block row of ``x`` [M, B]: Q4_1's min/max grid, then (``search``) shrunk
    centred ranges and least-squares refits, each kept only where it lowers the (weighted) error."""
    maxq = (1 << bits) - 1
    half = np.float32(1 << (bits - 1))
    lo, hi = x.min(axis=1), x.max(axis=1)
    s = ((hi - lo) / maxq).astype(np.float32)
    o = (lo + half * s).astype(np.float32)
    c = _round(x, s, o, half, maxq)
    if not search:
        return c.astype(np.uint8), s, o
    best_e, best_s, best_o = _err(x, d, c, s, o, half), s, o
    mid = (lo + hi) / 2
    for alpha in ALPHAS.get(bits, ALPHAS[4]):
        s_a = (alpha * (hi - lo) / maxq).astype(np.float32)
        o_a = (mid - s_a * (maxq / 2.0 - half)).astype(np.float32)
        for _ in range(1 + REFINE):
            c_a = _round(x, s_a, o_a, half, maxq)
            s_a, o_a = _fit(x, d, c_a, half, s_a, o_a)
            c_a = _round(x, s_a, o_a, half, maxq)
            e = _err(x, d, c_a, s_a, o_a, half)
            better = e < best_e
            best_e = np.where(better, e, best_e)
            best_s, best_o = np.where(better, s_a, best_s), np.where(better, o_a, best_o)
    c = _round(x, best_s, best_o, half, maxq)
    return c.astype(np.uint8), best_s.astype(np.float32), best_o.astype(np.float32)


# --------------------------------------------------------------------------- the graph


def block_indicator(k: int, block: int) -> np.ndarray:
    """The 0/1 [K, K / block] matrix whose product with ``x`` sums each block of K (what :func:`_block_matrix` builds in
    the graph and ORT folds at load)."""
    return np.kron(np.eye(k // block, dtype=np.float32), np.ones((block, 1), np.float32))


def _scalar(graph: ir.Graph, name: str, value) -> ir.Value:
    arr = np.asarray(value, dtype=np.int64)
    v = ir.Value(name=name, const_value=ir.tensor(arr), type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(arr.shape))
    graph.register_initializer(v)
    return v


def _block_matrix(graph: ir.Graph, before: ir.Node, k: int, block: int) -> ir.Value:
    """The 0/1 [K, k_blocks] matrix (``E[i, b] = 1`` where ``i // block == b``), built from scalars in the graph:
    every input is constant, so ORT folds it at load (checked: the optimized model holds one [K, k_blocks] initializer)."""
    p = f"block_offsets_{k}_b{block}"
    zero, one = _scalar(graph, f"{p}_zero", 0), _scalar(graph, f"{p}_one", 1)
    nodes = [ir.Node("", "Range", [zero, _scalar(graph, f"{p}_k", k), one], name=f"{p}_rows")]
    nodes.append(ir.Node("", "Div", [nodes[-1].outputs[0], _scalar(graph, f"{p}_block", block)], name=f"{p}_row_block"))
    # Reshape, not Unsqueeze: its axes became an input only at opset 13 (Range needs 11: ``units.build`` checks)
    nodes.append(ir.Node("", "Reshape", [nodes[-1].outputs[0], _scalar(graph, f"{p}_column_shape", [-1, 1])],
                         name=f"{p}_column"))
    cols = ir.Node("", "Range", [zero, _scalar(graph, f"{p}_blocks", k // block), one], name=f"{p}_blocks_range")
    eq = ir.Node("", "Equal", [nodes[-1].outputs[0], cols.outputs[0]], name=f"{p}_equal")
    cast = ir.Node("", "Cast", [eq.outputs[0]], attributes=[ir.AttrInt64("to", ir.DataType.FLOAT)], name=f"{p}_matrix")
    graph.insert_before(before, [*nodes, cols, eq, cast])
    out = cast.outputs[0]
    out.name, out.dtype, out.shape = p, ir.DataType.FLOAT, ir.Shape([k, k // block])
    return out


def add_corrections(model: ir.Model, table: dict[str, tuple[np.ndarray, int]], fp16: bool) -> int:
    """After each MatMulNBits named in ``table`` (name -> (offsets [N, k_blocks] as the kernel reads them, block)),
    add ``(x @ E) @ O``: its output keeps its name and readers, now those of the sum.  One block-sum MatMul per
    (input, block), one 0/1 matrix per (K, block).  ``fp16``: offsets stored as float16 behind a Cast (folded at load).
    Returns how many nodes got offsets."""
    graph = model.graph
    matrices: dict[tuple[int, int], ir.Value] = {}
    sums: dict[tuple[int, int], ir.Value] = {}
    done = 0
    for node in list(graph):
        if node.op_type != "MatMulNBits" or node.name not in table:
            continue
        off, block = table[node.name]
        k = node.attributes.get_int("K")
        x, y = node.inputs[0], node.outputs[0]
        if (k, block) not in matrices:
            matrices[(k, block)] = _block_matrix(graph, node, k, block)
        if (id(x), block) not in sums:
            mm = ir.Node("", "MatMul", [x, matrices[(k, block)]], name=f"{node.name}_block_sums")
            graph.insert_before(node, mm)
            mm.outputs[0].name, mm.outputs[0].dtype = f"{node.name}_block_sums", ir.DataType.FLOAT
            sums[(id(x), block)] = mm.outputs[0]
        o = np.ascontiguousarray(off.T.astype(np.float32))
        half = o.astype(np.float16) if fp16 and fits_fp16(o) else None
        init = ir.Value(name=f"{node.name}_offsets", const_value=ir.tensor(half if half is not None else o))
        graph.register_initializer(init)
        new = []
        if half is not None:
            new.append(ir.Node("", "Cast", [init], attributes=[ir.AttrInt64("to", ir.DataType.FLOAT)],
                               name=f"{node.name}_offsets_cast"))
            weight = new[-1].outputs[0]
            weight.name, weight.dtype = f"{node.name}_offsets_float", ir.DataType.FLOAT
        else:
            weight = init
        corr = ir.Node("", "MatMul", [sums[(id(x), block)], weight], name=f"{node.name}_offsets_mm")
        corr.outputs[0].name, corr.outputs[0].dtype = f"{node.name}_offsets_term", ir.DataType.FLOAT
        uses = list(y.uses())
        name, was_output = y.name, y.is_graph_output()
        add = ir.Node("", "Add", [y, corr.outputs[0]], name=f"{node.name}_offsets_add")
        graph.insert_after(node, [*new, corr, add])
        for use in uses:
            use.node.replace_input_with(use.idx, add.outputs[0])
        if was_output:
            graph.outputs[graph.outputs.index(y)] = add.outputs[0]
        y.name = f"{name}_centred"
        out = add.outputs[0]
        out.name, out.dtype = name, ir.DataType.FLOAT  # float32 weights only: MatMulNBits' output is float32
        if y.shape is not None:
            out.shape = y.shape
        done += 1
    if done != len(table):  # a node renamed or removed since its grid was written would silently lose its offsets
        missing = sorted(set(table) - {n.name for n in graph if n.op_type == "MatMulNBits"})
        raise RuntimeError(f"block offsets for {len(table) - done} MatMulNBits not in the graph: {missing[:3]}")
    return done
