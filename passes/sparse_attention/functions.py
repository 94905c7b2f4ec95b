"""The op's portable form: ``edgeprune.DynamicSparseAttention`` and ``edgeprune.BlockSparseAttention``
as model-local ONNX functions of standard ops, so any execution provider runs them.

Layout: q is [batch, Hq, S, head_dim]; k/v are [batch, Hkv, T, head_dim] with T >= S (T - S keys
of a KV cache precede the new ones; fewer heads for GQA).  Query row ``t`` sits at absolute
position ``T - S + t`` and sees keys ``0 .. T - S + t`` (causal, bottom-right aligned, as optimum's
with-past exports mask).  Query blocks are ``qblk = min(block, S)`` query rows (nB = ceil(S / qblk));
key blocks are ``block`` keys at absolute positions (nBk = ceil(T / block)).

* ``BlockSparseAttention(q, k, v, block_index) <block, scale>``: ``block_index`` is int64
  [B, Hsel, nB, K]; ``Hsel`` is Hq (selection per query head) or Hkv (per KV group: the group's
  query heads share the row).  Query block ``i`` of head ``h`` attends exactly (softmax over all
  kept keys) to the union of key blocks ``block_index[b, hsel, i, :]`` with the token-level causal
  mask and ``key_pos < T``.  Lengths that are not a multiple of the block are zero-padded and masked
  inside the op.  A registered C++ kernel of the same name replaces this body (runtime/kernels/).
* ``DynamicSparseAttention(q, k, v) <block, keep, sink, min_len, per_group, scale>``: the selection.
  Prefill (S >= block): summed (mean-pooled: same ranking) query and key blocks are scored against
  each other.  Decode (S < block, one query block: a token or a few): Quest's bound per key block,
  sum_d max(q_d * kmin_d, q_d * kmax_d) over the block's element-wise key min/max, per query head,
  summed over the heads of a selection row.  Future blocks are masked, the first ``sink`` blocks and
  the key blocks holding the query block's own positions are forced in, then the top
  K = clamp(ceil(keep * nBk), sink + 1 (+1 when a query block straddles two key blocks), nBk)
  blocks are kept, sorted by position.  A key length T shorter than ``min_len`` keeps every block,
  which is exact dense causal attention.

The bodies use opset-13+ forms (ReduceSum/Squeeze/Unsqueeze with axes inputs) that are unchanged
up to the newest opsets (ReduceMin/ReduceMax are written per opset), and are emitted at the model's
own default-domain opset.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

DOMAIN = "edgeprune"
DYNAMIC = "DynamicSparseAttention"
BLOCK = "BlockSparseAttention"
DYNAMIC_MASKED = "DynamicSparseAttentionMasked"  # + the model's 2-D attention_mask (padding beyond causality)
BLOCK_MASKED = "BlockSparseAttentionMasked"
OPS = (DYNAMIC, DYNAMIC_MASKED)
MIN_OPSET = 13
_BIG = "1e30"

#: Both bodies: shapes, the query block (the block, or the whole query when shorter: a decode step) and the
#: keys padded to whole blocks.
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
    skv = Slice (ks, i2, i3)
    qblk = Min (blk, sl)
    blkm1 = Sub (blk, i1)
    skvp = Add (skv, blkm1)
    nbk = Div (skvp, blk)
    kplen = Mul (nbk, blk)
    kpadn = Sub (kplen, skv)
    kpads = Concat <axis = 0> (i0, i0, i0, i0, i0, i0, kpadn, i0)
"""

_BLOCK_BODY = """
    scale_s = Constant <value_float: float = @scale> ()
    neg = Constant <value = float {-%(big)s}> ()
    is = Shape (block_index)
    hsel = Slice (is, i1, i2)
    nb = Slice (is, i2, i3)
    kk = Slice (is, i3, i4)
    qblk_s = Squeeze (qblk)
    past = Sub (skv, sl)
    past_s = Squeeze (past)
    qplen = Mul (nb, qblk)
    qpadn = Sub (qplen, sl)
    qpads = Concat <axis = 0> (i0, i0, i0, i0, i0, i0, qpadn, i0)
    qp = Pad (q, qpads)
    kp = Pad (k, kpads)
    vp = Pad (v, kpads)
    r = Div (hq, hsel)
    q6shape = Concat <axis = 0> (b, hsel, r, nb, qblk, d)
    q6 = Reshape (qp, q6shape)
    q6t = Transpose <perm = [0, 1, 3, 2, 4, 5]> (q6)
    rb = Mul (r, qblk)
    qgshape = Concat <axis = 0> (b, hsel, nb, rb, d)
    qg = Reshape (q6t, qgshape)
    flatshape = Concat <axis = 0> (m1, blk, d)
    kflat = Reshape (kp, flatshape)
    vflat = Reshape (vp, flatshape)
    hsel_s = Squeeze (hsel)
    hkv_s = Squeeze (hkv)
    b_s = Squeeze (b)
    nb_s = Squeeze (nb)
    nbk_s = Squeeze (nbk)
    skv_s = Squeeze (skv)
    hr = Range (s0, hsel_s, s1)
    hr_kv = Mul (hr, hkv_s)
    hkvi = Div (hr_kv, hsel_s)
    br = Range (s0, b_s, s1)
    br1 = Unsqueeze (br, i1)
    brk = Mul (br1, hkv_s)
    hkvi0 = Unsqueeze (hkvi, i0)
    base0 = Add (brk, hkvi0)
    base = Mul (base0, nbk_s)
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
    arq = Range (s0, qblk_s, s1)
    nbr = Range (s0, nb_s, s1)
    nbr1 = Unsqueeze (nbr, i1)
    qstart0 = Mul (nbr1, qblk_s)
    qstart = Add (qstart0, past_s)
    arq0 = Unsqueeze (arq, i0)
    qpos0 = Add (qstart, arq0)
    qpos0u = Unsqueeze (qpos0, i1)
    reps = Concat <axis = 0> (i1, r, i1)
    qpos1 = Tile (qpos0u, reps)
    qposshape = Concat <axis = 0> (nb, rb)
    qpos2 = Reshape (qpos1, qposshape)
    qpos = Unsqueeze (qpos2, i2)
    causal = LessOrEqual (kpos2, qpos)
    inside = Less (kpos2, skv_s)
    valid0 = And (causal, inside)%(mask_valid)s
    scm = Where (valid, sc, neg)
    p0 = Softmax <axis = -1> (scm)%(mask_rows)s
    o = MatMul (p, vg)
    o6shape = Concat <axis = 0> (b, hsel, nb, r, qblk, d)
    o6 = Reshape (o, o6shape)
    o6t = Transpose <perm = [0, 1, 3, 2, 4, 5]> (o6)
    o4shape = Concat <axis = 0> (b, hq, qplen, d)
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
    qblkm1 = Sub (qblk, i1)
    slp = Add (sl, qblkm1)
    nb = Div (slp, qblk)
    qplen = Mul (nb, qblk)
    qpadn = Sub (qplen, sl)
    qpads = Concat <axis = 0> (i0, i0, i0, i0, i0, i0, qpadn, i0)
    qp = Pad (q, qpads)%(mask_keys)s
    kp = Pad (ksel, kpads)
    qbshape = Concat <axis = 0> (b, hq, nb, qblk, d)
    qb = Reshape (qp, qbshape)
    pq = ReduceSum <keepdims = 0> (qb, i3)
    kbshape = Concat <axis = 0> (b, hkv, nbk, blk, d)
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
    pk5shape = Concat <axis = 0> (b, hkv, gr, nbk, d)
    pk5 = Expand (pku, pk5shape)
    pksshape = Concat <axis = 0> (b, hsel, nbk, d)
    pks = Reshape (pk5, pksshape)
    pkt = Transpose <perm = [0, 1, 3, 2]> (pks)
    dot = MatMul (pqs, pkt)
    %(kminmax)s
    nbm1 = Sub (nb, i1)
    pql = Slice (pq, nbm1, nb, i2)
    pql5 = Unsqueeze (pql, i3)
    hq5shape = Concat <axis = 0> (b, hkv, g, nbk, d)
    hqshape = Concat <axis = 0> (b, hq, nbk, d)
    kmnu = Unsqueeze (kmn, i2)
    kmn5 = Expand (kmnu, hq5shape)
    kmnh = Reshape (kmn5, hqshape)
    kmnh5 = Unsqueeze (kmnh, i2)
    kmxu = Unsqueeze (kmx, i2)
    kmx5 = Expand (kmxu, hq5shape)
    kmxh = Reshape (kmx5, hqshape)
    kmxh5 = Unsqueeze (kmxh, i2)
    qlo = Mul (pql5, kmnh5)
    qhi = Mul (pql5, kmxh5)
    qbound = Max (qlo, qhi)
    qst = ReduceSum <keepdims = 0> (qbound, i4)
    qst5shape = Concat <axis = 0> (b, hsel, r, i1, nbk)
    qst5 = Reshape (qst, qst5shape)
    quest = ReduceSum <keepdims = 0> (qst5, i2)
    decode = Less (sl, blk)
    scores = Where (decode, quest, dot)
    past = Sub (skv, sl)
    past_s = Squeeze (past)
    qblk_s = Squeeze (qblk)
    sl_s = Squeeze (sl)
    nb_s = Squeeze (nb)
    nbk_s = Squeeze (nbk)
    rq = Range (s0, nb_s, s1)
    rk = Range (s0, nbk_s, s1)
    ri = Unsqueeze (rq, i1)
    rj = Unsqueeze (rk, i0)
    first0 = Mul (ri, qblk_s)
    first = Add (first0, past_s)
    ri1 = Add (ri, s1)
    end0 = Mul (ri1, qblk_s)
    end = Min (end0, sl_s)
    last0 = Add (end, past_s)
    last = Sub (last0, s1)
    lo = Div (first, blk_s)
    hi = Div (last, blk_s)
    ge_lo = GreaterOrEqual (rj, lo)
    le_hi = LessOrEqual (rj, hi)
    diag = And (ge_lo, le_hi)
    sinks = Less (rj, sink_s)
    forced = Or (diag, sinks)
    future = Greater (rj, hi)
    kept = Where (forced, big, scores)
    masked = Where (future, neg, kept)
    nbkf = Cast <to = 1> (nbk)
    kfl = Mul (nbkf, keep_s)
    kce = Ceil (kfl)
    kf = Cast <to = 7> (kce)
    pmod = Mod (past, blk)
    span = Add (pmod, qblk)
    spans = Greater (span, blk)
    extra = Cast <to = 7> (spans)
    kmin_s = Add (sink_s, s1)
    kmin0 = Unsqueeze (kmin_s, i0)
    kmin = Add (kmin0, extra)
    kmax = Max (kf, kmin)
    k_sparse = Min (kmax, nbk)
    minlen = Unsqueeze (minlen_s, i0)
    short = Less (skv, minlen)
    kk = Where (short, nbk, k_sparse)
    top_v, top_i = TopK <axis = -1, largest = 1, sorted = 1> (masked, kk)
    top_f = Cast <to = 1> (top_i)
    sorted_v, sorted_i = TopK <axis = -1, largest = 0, sorted = 1> (top_f, kk)
    block_index = Cast <to = 7> (sorted_v)
    y = edgeprune.%(block_op)s <block: int = @block, scale: float = @scale> (q, k, v, block_index%(mask_arg)s)
"""

# The masked variants take the model's 2-D attention_mask [B, T] (nonzero: the key may be attended):
# masked keys are left out of the selection's pooled statistics (zeroed) and of the softmax; a query
# row with no key left (a left-padded position) outputs zeros.
_MASK_BLOCK_VALID = """
    kmb = Cast <to = 9> (key_mask)
    kmpads = Concat <axis = 0> (i0, i0, i0, kpadn)
    kmp = Pad (kmb, kmpads)
    kmshape = Concat <axis = 0> (m1, blk)
    kmflat = Reshape (kmp, kmshape)
    brb = Mul (br1, nbk_s)
    brb4 = Unsqueeze (brb, ax23)
    kmidx = Add (block_index, brb4)
    kmg0 = Gather <axis = 0> (kmflat, kmidx)
    kmg1 = Reshape (kmg0, kposshape)
    kmg = Unsqueeze (kmg1, i3)
    valid = And (valid0, kmg)"""
_MASK_BLOCK_ROWS = """
    validf = Cast <to = 1> (valid)
    nvalid = ReduceSum <keepdims = 1> (validf, m1)
    zero_f = Constant <value = float {0}> ()
    anyvalid = Greater (nvalid, zero_f)
    p = Where (anyvalid, p0, zero_f)"""
_MASK_KEYS = """
    kmf = Cast <to = 1> (key_mask)
    ax13 = Concat <axis = 0> (i1, i3)
    kmf4 = Unsqueeze (kmf, ax13)
    ksel = Mul (k, kmf4)"""


# ReduceMin/ReduceMax take their axes as an attribute before opset 18 and as an input from 18 on.
_KMINMAX_17 = "kmn = ReduceMin <axes = [3], keepdims = 0> (kb)\n    kmx = ReduceMax <axes = [3], keepdims = 0> (kb)"
_KMINMAX_18 = "kmn = ReduceMin <keepdims = 0> (kb, i3)\n    kmx = ReduceMax <keepdims = 0> (kb, i3)"


def _function(name: str, attrs: str, inputs: str, body: str, opset: int, masked: bool = False) -> ir.Function:
    fill = {"big": _BIG, "kminmax": _KMINMAX_18 if opset >= 18 else _KMINMAX_17,
            "mask_valid": _MASK_BLOCK_VALID if masked else "\n    valid = Identity (valid0)",
            "mask_rows": _MASK_BLOCK_ROWS if masked else "\n    p = Identity (p0)",
            "mask_keys": _MASK_KEYS if masked else "\n    ksel = Identity (k)",
            "block_op": BLOCK_MASKED if masked else BLOCK, "mask_arg": ", key_mask" if masked else ""}  # fmt: skip
    text = (
        f'<domain: "{DOMAIN}", opset_import: ["" : {opset}, "{DOMAIN}" : 1]>\n'
        f"{name} <{attrs}> ({inputs}) => (y) {{{_COMMON}{body % fill}}}"
    )
    return ir.serde.deserialize_function(onnx.parser.parse_function(text))


def block_sparse_function(opset: int, masked: bool = False) -> ir.Function:
    """``edgeprune.BlockSparseAttention[Masked]`` at default-domain ``opset`` (exact attention on chosen blocks)."""
    name, inputs = (BLOCK_MASKED, "q, k, v, block_index, key_mask") if masked else (BLOCK, "q, k, v, block_index")
    return _function(name, "block, scale", inputs, _BLOCK_BODY, opset, masked)


def dynamic_sparse_function(opset: int, masked: bool = False) -> ir.Function:
    """``edgeprune.DynamicSparseAttention[Masked]`` at default-domain ``opset`` (block selection, then BlockSparseAttention)."""
    name, inputs = (DYNAMIC_MASKED, "q, k, v, key_mask") if masked else (DYNAMIC, "q, k, v")
    return _function(name, "block, keep, sink, min_len, per_group, scale", inputs, _DYNAMIC_BODY, opset, masked)


def add_functions(model: ir.Model) -> None:
    """Give ``model`` the functions its sparse-attention nodes need (once) and the ``edgeprune`` opset import."""
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", MIN_OPSET))
    used = {n.op_type for n in model.graph if n.domain == DOMAIN}
    makers = [lambda o: block_sparse_function(o), lambda o: dynamic_sparse_function(o)]
    if used & {DYNAMIC_MASKED, BLOCK_MASKED}:
        makers += [lambda o: block_sparse_function(o, True), lambda o: dynamic_sparse_function(o, True)]
    for make in makers:
        fn = make(opset)
        if fn.identifier() not in model.functions:
            model.functions[fn.identifier()] = fn
    model.opset_imports.setdefault(DOMAIN, 1)
