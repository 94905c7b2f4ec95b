"""The op's portable form: ``edgeprune.DynamicSparseAttention`` and ``edgeprune.BlockSparseAttention``
as model-local ONNX functions of standard ops, so any execution provider runs them.

Layout (every tensor is [batch, heads, seq, head_dim], keys/values may have fewer heads (GQA)):

* ``BlockSparseAttention(q, k, v, block_index) <block, scale>``: ``block_index`` is int64
  [B, Hsel, nB, K] with nB = ceil(S / block); ``Hsel`` is Hq (selection per query head) or Hkv
  (per KV group: the group's query heads share the row).  Query block ``i`` of head ``h`` attends
  exactly (softmax over all kept keys) to the union of key blocks ``block_index[b, hsel, i, :]``
  with the token-level causal mask ``key_pos <= query_pos`` and ``key_pos < S``.  Lengths that are
  not a multiple of ``block`` are zero-padded and masked inside the op.  A registered C++ kernel
  of the same name replaces this body (runtime/kernels/).
* ``DynamicSparseAttention(q, k, v) <block, keep, sink, min_len, per_group, scale>``: the selection.
  Mean-pooled (summed: same ranking) query and key blocks are scored against each other, future
  blocks masked, the first ``sink`` blocks and the diagonal forced in, then the top
  K = clamp(ceil(keep * nB), sink + 1, nB) blocks are kept, sorted by position.  Sequences shorter
  than ``min_len`` keep every block, which is exact dense causal attention.

The bodies use opset-13+ forms (ReduceSum/Squeeze/Unsqueeze with axes inputs) that are unchanged
up to the newest opsets, and are emitted at the model's own default-domain opset.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

DOMAIN = "edgeprune"
DYNAMIC = "DynamicSparseAttention"
BLOCK = "BlockSparseAttention"
MIN_OPSET = 13
_BIG = "1e30"

_COMMON = """
    i0 = Constant <value = int64[1] {0}> ()
    i1 = Constant <value = int64[1] {1}> ()
    i2 = Constant <value = int64[1] {2}> ()
    i3 = Constant <value = int64[1] {3}> ()
    i4 = Constant <value = int64[1] {4}> ()
    m1 = Constant <value = int64[1] {-1}> ()
    s0 = Constant <value = int64 {0}> ()
    s1 = Constant <value = int64 {1}> ()
    blk_s = Constant <value_int: int = @block> ()
    blk = Unsqueeze (blk_s, i0)
    qs = Shape (q)
    ks = Shape (k)
    b = Slice (qs, i0, i1)
    hq = Slice (qs, i1, i2)
    sl = Slice (qs, i2, i3)
    d = Slice (qs, i3, i4)
    hkv = Slice (ks, i1, i2)
"""

_BLOCK_BODY = """
    scale_s = Constant <value_float: float = @scale> ()
    neg = Constant <value = float {-%(big)s}> ()
    is = Shape (block_index)
    hsel = Slice (is, i1, i2)
    nb = Slice (is, i2, i3)
    kk = Slice (is, i3, i4)
    plen = Mul (nb, blk)
    padn = Sub (plen, sl)
    pads = Concat <axis = 0> (i0, i0, i0, i0, i0, i0, padn, i0)
    qp = Pad (q, pads)
    kp = Pad (k, pads)
    vp = Pad (v, pads)
    r = Div (hq, hsel)
    q6shape = Concat <axis = 0> (b, hsel, r, nb, blk, d)
    q6 = Reshape (qp, q6shape)
    q6t = Transpose <perm = [0, 1, 3, 2, 4, 5]> (q6)
    rb = Mul (r, blk)
    qgshape = Concat <axis = 0> (b, hsel, nb, rb, d)
    qg = Reshape (q6t, qgshape)
    flatshape = Concat <axis = 0> (m1, blk, d)
    kflat = Reshape (kp, flatshape)
    vflat = Reshape (vp, flatshape)
    hsel_s = Squeeze (hsel)
    hkv_s = Squeeze (hkv)
    b_s = Squeeze (b)
    nb_s = Squeeze (nb)
    sl_s = Squeeze (sl)
    hr = Range (s0, hsel_s, s1)
    hr_kv = Mul (hr, hkv_s)
    hkvi = Div (hr_kv, hsel_s)
    br = Range (s0, b_s, s1)
    br1 = Unsqueeze (br, i1)
    brk = Mul (br1, hkv_s)
    hkvi0 = Unsqueeze (hkvi, i0)
    base0 = Add (brk, hkvi0)
    base = Mul (base0, nb_s)
    ax23 = Concat <axis = 0> (i2, i3)
    base4 = Unsqueeze (base, ax23)
    flat = Add (block_index, base4)
    kb = Mul (kk, blk)
    shape_g = Concat <axis = 0> (b, hsel, nb, kb, d)
    kg0 = Gather <axis = 0> (kflat, flat)
    kg = Reshape (kg0, shape_g)
    vg0 = Gather <axis = 0> (vflat, flat)
    vg = Reshape (vg0, shape_g)
    kgt = Transpose <perm = [0, 1, 2, 4, 3]> (kg)
    sc0 = MatMul (qg, kgt)
    sc = Mul (sc0, scale_s)
    ar = Range (s0, blk_s, s1)
    bi5 = Unsqueeze (block_index, i4)
    kstart = Mul (bi5, blk_s)
    kpos = Add (kstart, ar)
    kposshape = Concat <axis = 0> (b, hsel, nb, kb)
    kpos1 = Reshape (kpos, kposshape)
    kpos2 = Unsqueeze (kpos1, i3)
    nbr = Range (s0, nb_s, s1)
    nbr1 = Unsqueeze (nbr, i1)
    qstart = Mul (nbr1, blk_s)
    ar0 = Unsqueeze (ar, i0)
    qpos0 = Add (qstart, ar0)
    qpos0u = Unsqueeze (qpos0, i1)
    reps = Concat <axis = 0> (i1, r, i1)
    qpos1 = Tile (qpos0u, reps)
    qposshape = Concat <axis = 0> (nb, rb)
    qpos2 = Reshape (qpos1, qposshape)
    qpos = Unsqueeze (qpos2, i2)
    causal = LessOrEqual (kpos2, qpos)
    inside = Less (kpos2, sl_s)
    valid = And (causal, inside)
    scm = Where (valid, sc, neg)
    p = Softmax <axis = -1> (scm)
    o = MatMul (p, vg)
    o6shape = Concat <axis = 0> (b, hsel, nb, r, blk, d)
    o6 = Reshape (o, o6shape)
    o6t = Transpose <perm = [0, 1, 3, 2, 4, 5]> (o6)
    o4shape = Concat <axis = 0> (b, hq, plen, d)
    o4 = Reshape (o6t, o4shape)
    y = Slice (o4, i0, sl, i2)
"""

_DYNAMIC_BODY = """
    keep_s = Constant <value_float: float = @keep> ()
    sink_s = Constant <value_int: int = @sink> ()
    minlen_s = Constant <value_int: int = @min_len> ()
    pg_s = Constant <value_int: int = @per_group> ()
    big = Constant <value = float {%(big)s}> ()
    neg = Constant <value = float {-%(big)s}> ()
    blkm1 = Sub (blk, i1)
    slp = Add (sl, blkm1)
    nb = Div (slp, blk)
    plen = Mul (nb, blk)
    padn = Sub (plen, sl)
    pads = Concat <axis = 0> (i0, i0, i0, i0, i0, i0, padn, i0)
    qp = Pad (q, pads)
    kp = Pad (k, pads)
    qbshape = Concat <axis = 0> (b, hq, nb, blk, d)
    qb = Reshape (qp, qbshape)
    pq = ReduceSum <keepdims = 0> (qb, i3)
    kbshape = Concat <axis = 0> (b, hkv, nb, blk, d)
    kb = Reshape (kp, kbshape)
    pk = ReduceSum <keepdims = 0> (kb, i3)
    g = Div (hq, hkv)
    pg = Unsqueeze (pg_s, i0)
    gm1 = Sub (g, i1)
    pgg = Mul (pg, gm1)
    r = Add (i1, pgg)
    hsel = Div (hq, r)
    gr = Div (g, r)
    pq5shape = Concat <axis = 0> (b, hsel, r, nb, d)
    pq5 = Reshape (pq, pq5shape)
    pqs = ReduceSum <keepdims = 0> (pq5, i2)
    pku = Unsqueeze (pk, i2)
    pk5shape = Concat <axis = 0> (b, hkv, gr, nb, d)
    pk5 = Expand (pku, pk5shape)
    pksshape = Concat <axis = 0> (b, hsel, nb, d)
    pks = Reshape (pk5, pksshape)
    pkt = Transpose <perm = [0, 1, 3, 2]> (pks)
    scores = MatMul (pqs, pkt)
    nb_s = Squeeze (nb)
    rng = Range (s0, nb_s, s1)
    ri = Unsqueeze (rng, i1)
    rj = Unsqueeze (rng, i0)
    diag = Equal (rj, ri)
    sinks = Less (rj, sink_s)
    forced = Or (diag, sinks)
    future = Greater (rj, ri)
    kept = Where (forced, big, scores)
    masked = Where (future, neg, kept)
    nbf = Cast <to = 1> (nb)
    kfl = Mul (nbf, keep_s)
    kce = Ceil (kfl)
    kf = Cast <to = 7> (kce)
    kmin_s = Add (sink_s, s1)
    kmin = Unsqueeze (kmin_s, i0)
    kmax = Max (kf, kmin)
    k_sparse = Min (kmax, nb)
    minlen = Unsqueeze (minlen_s, i0)
    short = Less (sl, minlen)
    kk = Where (short, nb, k_sparse)
    top_v, top_i = TopK <axis = -1, largest = 1, sorted = 1> (masked, kk)
    top_f = Cast <to = 1> (top_i)
    sorted_v, sorted_i = TopK <axis = -1, largest = 0, sorted = 1> (top_f, kk)
    block_index = Cast <to = 7> (sorted_v)
    y = edgeprune.BlockSparseAttention <block: int = @block, scale: float = @scale> (q, k, v, block_index)
"""


def _function(name: str, attrs: str, inputs: str, body: str, opset: int) -> ir.Function:
    text = (
        f'<domain: "{DOMAIN}", opset_import: ["" : {opset}, "{DOMAIN}" : 1]>\n'
        f"{name} <{attrs}> ({inputs}) => (y) {{{_COMMON}{body % {'big': _BIG}}}}"
    )
    return ir.serde.deserialize_function(onnx.parser.parse_function(text))


def block_sparse_function(opset: int) -> ir.Function:
    """``edgeprune.BlockSparseAttention`` at default-domain ``opset`` (exact attention on chosen blocks)."""
    return _function(BLOCK, "block, scale", "q, k, v, block_index", _BLOCK_BODY, opset)


def dynamic_sparse_function(opset: int) -> ir.Function:
    """``edgeprune.DynamicSparseAttention`` at default-domain ``opset`` (block selection, then BlockSparseAttention)."""
    return _function(DYNAMIC, "block, keep, sink, min_len, per_group, scale", "q, k, v", _DYNAMIC_BODY, opset)


def add_functions(model: ir.Model) -> None:
    """Give ``model`` both functions (once) and the ``edgeprune`` opset import."""
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", MIN_OPSET))
    for make in (block_sparse_function, dynamic_sparse_function):
        fn = make(opset)
        if fn.identifier() not in model.functions:
            model.functions[fn.identifier()] = fn
    model.opset_imports.setdefault(DOMAIN, 1)
