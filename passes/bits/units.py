"""What the pass chooses formats for: each weight-bearing node (or tied embedding + head pair) as a
unit of parts, with the option grid its target runs.  Kept apart from measuring and solving so the
format rules (which node gets which options) live in one place."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import onnx_ir as ir

from edgeprune.analysis.graph import node_name
from edgeprune.errors import BadInputError
from edgeprune.passes.bits import sensitivity
from edgeprune.passes.bits.config import BitAllocationConfig
from edgeprune.passes.bits.sensitivity import KEEP, Option

NBITS_TOOL_BITS = (2, 4, 8)  # what ORT 1.32's MatMulNBitsQuantizer writes (it asserts bits in [2, 4, 8])
QDQ_BITS = (8, 16)  # activation widths of static QDQ (int8 weights either way)
SEARCH_BITS = (2, 4)  # widths offered with searched grids (``mse_rounding``): 8-bit's RTN error is already ~0.5 %
# Fast mode quantizes an embedding table from this size up (vocabularies): position and token-type
# tables are small, and 4-bit costs MiniLM's output cosine more there than the bytes are worth.
FAST_MIN_TABLE_BYTES = 1 << 20


@dataclasses.dataclass
class Part:
    """One node of a unit: its weight and how its error is measured."""

    node: str
    op: str  # MatMul, Gemm, Conv, Gather
    weight: np.ndarray  # as the quantizer sees it: [K, N] for MatMul/Gemm, [vocab, dim] for Gather
    input: str
    options: list[Option]
    errors: dict[str, float] = dataclasses.field(default_factory=dict)
    sizes: dict[str, int] = dataclasses.field(default_factory=dict)
    importance: float = 1.0  # weight of this node's squared relative error in the objective
    probe: dict | None = None  # the measured model-output error behind a "measured" importance
    output: str = ""  # the node's output tensor (static QDQ quantizes it too)
    # Other nodes reading the same weight: they take this part's option, so the weight is stored once
    # (its bytes and parameters count once; its error is measured at this node's input).
    readers: tuple[str, ...] = ()


@dataclasses.dataclass
class Unit:
    parts: list[Part]
    tied_bytes: int = 0  # bytes of a float table shared by all parts (counted once while all are float)
    joint: bool = False  # siblings reading one input: one format for all (``joint_siblings``), packed by the emitter

    @property
    def name(self) -> str:
        return " + ".join(p.node for p in self.parts)

    def combos(self) -> list[tuple[Option, ...]]:
        """Every choice of one option per part; a ``gather-tied`` lookup only beside its matching head; the same
        option for every part of a joint unit (whose parts are offered the same options)."""
        if self.joint:
            return [tuple(p.options[i] for p in self.parts) for i in range(len(self.parts[0].options))]
        return [cb for cb in itertools.product(*[p.options for p in self.parts]) if tied_ok(cb)]

    def size(self, combo: tuple[Option, ...]) -> int:
        if self.tied_bytes and all(o.kind == KEEP for o in combo):
            return self.tied_bytes
        return sum(p.sizes[o.key] for p, o in zip(self.parts, combo))

    def error(self, combo: tuple[Option, ...]) -> float:
        return sum(p.importance * p.errors[o.key] ** 2 for p, o in zip(self.parts, combo))

    @property
    def params(self) -> int:
        """Distinct weights: a tied table counts once."""
        if self.tied_bytes:
            return self.tied_bytes // self.parts[0].weight.dtype.itemsize
        return sum(p.weight.size for p in self.parts)

    @property
    def float_size(self) -> int:
        return self.tied_bytes or sum(p.weight.nbytes for p in self.parts)


def tied_ok(combo: tuple[Option, ...]) -> bool:
    """A lookup reading the head's packed table needs the head in exactly that format (at any accuracy
    level: the level changes how the head computes, not what it stores)."""
    stored = {dataclasses.replace(o, accuracy_level=0) for o in combo}
    return all(o.kind != "gather-tied" or dataclasses.replace(o, kind="nbits") in stored for o in combo)


def formats_for(target, c: BitAllocationConfig) -> tuple[dict[str, set[str]], list[str]]:
    """Option kinds the target has kernels for, per op family (``MatMul``: MatMul, Gemm and embeddings;
    ``Conv``), and notes on the requested ones it lacks."""
    name = target.name if target is not None else "cpu"
    default = ("fp32", "int8-dynamic", "int4-matmulnbits")
    notes: list[str] = []
    kinds = {}
    for op in ("MatMul", "Conv"):
        fast = set(target.formats_for(op) if target is not None else default)
        k: set[str] = set()
        if "int4-matmulnbits" in fast and op == "MatMul":
            k.add("nbits")
        if "int8-dynamic" in fast and c.dynamic_int8:
            k.add("int8-dynamic")
        if "int8-dynamic" not in fast:  # static QDQ where dynamic int8 is not the fast int8 (NPU targets; Conv on CPU)
            k |= {f"qdq{b}" for b in QDQ_BITS if f"qdq-int{b}" in fast and 8 in c.bit_options}
        kinds[op] = k
    if "nbits" not in kinds["MatMul"] and any(b in (2, 4) for b in c.bit_options):
        notes.append(f"target {name} has no MatMulNBits kernel: 2/4-bit formats not offered")
    for b in c.bit_options:
        if b == 3 or b in (5, 6, 7):
            notes.append(f"{b}-bit: ORT 1.32's MatMulNBitsQuantizer writes only 2, 4 or 8 bits, so {b}-bit is not offered")
        if b == 16:
            fast = set(target.fast_formats) if target is not None else set(default)
            notes.append("fp16 is not emitted by this pass (no ORT tool converts single nodes); float stays fp32"
                         + ("" if "fp16" in fast else f", and target {name} does not run fp16 fast anyway"))
    if not kinds["MatMul"] and not kinds["Conv"]:
        raise BadInputError(
            f"target {name} runs none of the formats this pass emits (MatMulNBits, dynamic int8, static QDQ): "
            "choose --target cpu or cuda, or leave bit allocation out of the recipe."
        )
    return kinds, notes


def _mm_options(c: BitAllocationConfig, kinds: set[str]) -> list[Option]:
    opts = [Option(KEEP)]
    if c.mode == "fast":  # the target's fast int8 only: dynamic int8 on CPU, static QDQ on NPU-style targets
        fast = [Option("int8-dynamic", 8)] if "int8-dynamic" in kinds else [Option("qdq", 8)] if "qdq8" in kinds else []
        return opts + fast
    if "int8-dynamic" in kinds and 8 in c.bit_options:
        opts.append(Option("int8-dynamic", 8))
    opts += [Option("qdq", b) for b in QDQ_BITS if f"qdq{b}" in kinds]
    if "nbits" in kinds:
        # Accuracy level 4 only for 4/8 bits: ORT 1.32's CPU int8-compute kernel covers those widths.
        nbits = [Option("nbits", b, blk, c.symmetric, a, fp16_scales=c.fp16_scales) for a in c.levels for b in c.bit_options
                 if b in NBITS_TOOL_BITS and (a == 0 or b in (4, 8)) for blk in c.blocks]
        # Block offsets, then the searched grids, then ORT's: uniform mode takes the first of its width and block.
        if c.block_offsets:  # K must be a multiple of the block: ``build`` drops the others per node
            opts += [Option("nbits", b, blk, True, a, rounding=r, fp16_scales=c.fp16_scales, offsets=True)
                     for a in c.levels for b in c.bit_options if b in SEARCH_BITS and (a == 0 or b == 4)
                     for blk in c.blocks for r in (c.mse_rounding or ("rtn",))]
        for o in nbits:
            if o.bits in SEARCH_BITS:
                opts += [dataclasses.replace(o, rounding=r) for r in c.mse_rounding or ()]  # normalised by the config
            opts.append(o)
        if c.gptq:
            opts += [Option("gptq", b, blk, c.symmetric, a, fp16_scales=c.fp16_scales) for a in c.levels for b in c.bit_options
                     if b in (2, 4) and (a == 0 or b == 4) for blk in c.blocks]
    return opts


def _offsets_fit(options: list[Option], w: np.ndarray) -> list[Option]:
    """``options`` without the block-offset ones whose block does not divide the weight's K (the block sums
    reshape nothing: a partial last block would need its own)."""
    return [o for o in options if not o.offsets or w.shape[0] % o.block == 0]


def _gather_options(c: BitAllocationConfig, kinds: set[str], table: np.ndarray) -> list[Option]:
    opts, dim = [Option(KEEP)], table.shape[1]
    if c.mode == "fast":  # 4-bit vocabularies: a lookup is no slower, and the table 6-7x smaller
        blk = c.blocks[0]
        ok = "nbits" in kinds and dim % blk == 0 and table.nbytes >= FAST_MIN_TABLE_BYTES
        return opts + ([Option("gather-nbits", 4, blk, c.symmetric, fp16_scales=c.fp16_scales)] if ok else [])
    if "int8-dynamic" in kinds and 8 in c.bit_options:
        opts.append(Option("int8-gather", 8))
    if "nbits" in kinds and 4 in c.bit_options:
        opts += [Option("gather-nbits", 4, blk, c.symmetric, fp16_scales=c.fp16_scales) for blk in c.blocks if dim % blk == 0]
    return opts


def _conv_options(c: BitAllocationConfig, kinds: set[str]) -> list[Option]:
    opts = [Option(KEEP)] + [Option("qdq", b) for b in QDQ_BITS if f"qdq{b}" in kinds]
    if "int8-dynamic" in kinds and 8 in c.bit_options:
        opts.insert(1, Option("int8-dynamic", 8))
    return opts[:2] if c.mode == "fast" else opts


def _weight_array(init, lin) -> np.ndarray | None:
    """[K, N] float32 weight of a linear as the quantizer sees it, or None when it is not float32."""
    if lin.weight not in init or init[lin.weight].const_value is None:
        return None
    w = init[lin.weight].const_value.numpy()
    if w.dtype != np.float32 or w.ndim != 2:
        return None
    return np.ascontiguousarray(w.T) if lin.transposed else w


def build(model: ir.Model, structures, c: BitAllocationConfig, kinds: dict[str, set[str]],
          notes: list[str]) -> tuple[list[Unit], dict]:
    """The units of ``model`` with their options, and counts of the nodes left alone (noted in ``notes``)."""
    if c.mode == "uniform":  # offer exactly the uniform width (plus float for nodes it cannot take)
        c = dataclasses.replace(c, bit_options=(c.bits,))
    if c.block_offsets and model.opset_imports.get("", 13) < 11:
        notes.append(f"block offsets need opset 11 (their block sums use Range); this model has "
                     f"{model.opset_imports.get('', 13)}: not offered")
        c = dataclasses.replace(c, block_offsets=False)
    elif c.block_offsets and not set(c.bit_options) & set(SEARCH_BITS):
        notes.append(f"block offsets apply to {' and '.join(map(str, SEARCH_BITS))}-bit weights, and none are offered")
    units: list[Unit] = []
    conv_kinds, kinds = kinds["Conv"], kinds["MatMul"]
    head_of = {e.tied_with: e for e in structures.embeddings if e.tied}
    init = model.graph.initializers
    lin_by_node = {lin.node: lin for lin in structures.linears}
    first_reader: dict[tuple, Part] = {}  # (op, weight, ...) -> the part of the weight's first reader
    for lin in structures.linears:
        if lin.node in head_of:
            continue
        w = _weight_array(init, lin)
        if w is None:
            continue
        if _join_reader(first_reader, (lin.op_type, lin.weight, lin.transposed), lin.node):
            continue
        part = Part(lin.node, lin.op_type, w, lin.input, _offsets_fit(_mm_options(c, kinds), w), output=lin.output)
        first_reader[(lin.op_type, lin.weight, lin.transposed)] = part
        units.append(Unit([part]))
    for emb in structures.embeddings:
        table = init[emb.table].const_value.numpy()
        if table.dtype != np.float32:
            continue
        part = Part(emb.node, "Gather", table, emb.input, _gather_options(c, kinds, table))
        if emb.tied and emb.tied_with in lin_by_node:
            lin = lin_by_node[emb.tied_with]
            head_w = np.ascontiguousarray(table.T) if lin.transposed else table
            head = Part(lin.node, "MatMul", head_w, lin.input, _offsets_fit(_mm_options(c, kinds), head_w), output=lin.output)
            # wmse and offsets last: uniform mode takes a tied pair's first head option, which the lookup must share.
            head.options.sort(key=lambda o: o.rounding == "wmse" or o.offsets)
            if lin.transposed:  # the head's [dim, vocab] blocks run along dim: the table's rows
                # One lookup per stored format: the head's accuracy level does not change its table.
                # A lookup's error is weighed by token counts, not the head's input: no ``wmse`` table to share.
                part.options += list(dict.fromkeys(dataclasses.replace(o, kind="gather-tied", accuracy_level=0)
                                                   for o in head.options if o.kind == "nbits" and emb.dim % o.block == 0
                                                   and o.rounding != "wmse" and not o.offsets))
            units.append(Unit([part, head], tied_bytes=table.nbytes))
        else:
            units.append(Unit([part]))
    for conv in structures.conv_layers:
        w = init[conv.weight].const_value.numpy() if conv.weight in init else None
        if w is None or w.dtype != np.float32:
            continue
        if _join_reader(first_reader, ("Conv", conv.weight), conv.node):
            continue
        part = Part(conv.node, "Conv", w, conv.input, _conv_options(c, conv_kinds), output=conv.output)
        first_reader[("Conv", conv.weight)] = part
        units.append(Unit([part]))
    for part in first_reader.values():
        if part.readers:  # GPTQ and wmse round for one input's statistics; a shared weight has several
            # (and a block-offset node's correction reads its own input: one per reader is not written yet)
            part.options = [o for o in part.options if o.kind != "gptq" and o.rounding != "wmse" and not o.offsets]
    if c.mode == "auto" and c.joint_siblings:
        units = _join_siblings(units)
    # What is left alone, and why.
    found = {n for u in units for p in u.parts for n in (p.node, *p.readers)}
    quantized = quantized_weights(model)
    no_const = sum(1 for n in model.graph if n.op_type in ("MatMul", "Gemm", "Conv")
                   and node_name(n) not in found and node_name(n) not in quantized)
    total = len(quantized) + sum(len(u.parts) for u in units)
    if quantized:
        ops = ", ".join(sorted(set(quantized.values())))
        notes.append(f"already quantized: {len(quantized)} of {total} weights ({ops}): left as they are")
    if no_const:
        notes.append(f"{no_const} MatMul/Gemm/Conv nodes have no constant float weight (activation x activation, "
                     "or a weight computed at run time): left as they are")
    return units, {"already_quantized": {"weights": len(quantized), "of": total}, "nodes_without_constant_weight": no_const}


#: Quantized ops that hold a weight, and the input it sits at.
_WEIGHT_INPUT = {
    "MatMulNBits": 1, "GatherBlockQuantized": 0, "MatMulInteger": 1, "ConvInteger": 1, "DynamicQuantizeMatMul": 1,
    "MatMulIntegerToFloat": 1, "QLinearMatMul": 3, "QLinearConv": 3, "QGemm": 3,
}  # fmt: skip


def _constant(v: ir.Value | None) -> bool:
    return v is not None and (v.const_value is not None or (v.producer() is not None and v.producer().op_type == "Constant"))


def quantized_weights(model: ir.Model) -> dict[str, str]:
    """Node -> how its weight is quantized, one entry per weight (Q/DQ nodes on activations are not weights).

    A quantized op with a constant weight input (MatMulNBits, MatMulInteger, QLinearConv, ...), a
    MatMul/Gemm/Conv/Gather reading ``DequantizeLinear(constant)`` (static QDQ), or a Gather over an
    integer table whose rows go through DequantizeLinear (quantize_dynamic's embeddings).
    """
    out = {}
    for n in model.graph:
        idx = _WEIGHT_INPUT.get(n.op_type) if n.domain in ("", "com.microsoft", "ai.onnx") else None
        if idx is not None and len(n.inputs) > idx and _constant(n.inputs[idx]):
            out[node_name(n)] = n.op_type
            continue
        w_idx = {"MatMul": 1, "Gemm": 1, "Conv": 1, "Gather": 0}.get(n.op_type) if n.domain in ("", "ai.onnx") else None
        if w_idx is None or len(n.inputs) <= w_idx or n.inputs[w_idx] is None:
            continue
        w = n.inputs[w_idx]
        producer = w.producer()
        if producer is not None and producer.op_type == "DequantizeLinear" and _constant(producer.inputs[0]):
            out[node_name(n)] = f"DequantizeLinear-fed {n.op_type}"
        elif (n.op_type == "Gather" and w.const_value is not None and w.const_value.dtype.is_integer()
              and any(u.node.op_type == "DequantizeLinear" for u in n.outputs[0].uses())):
            out[node_name(n)] = "Gather of an int8 table + DequantizeLinear"
    return out


def records(units: list[Unit], choice: list[int]) -> list[dict]:
    """One JSON-able record per part: the chosen format, its bytes and error, and every option's."""
    recs = []
    for u, i in zip(units, choice):
        combo = u.combos()[i]
        for p, o in zip(u.parts, combo):
            size = p.sizes[o.key] if not (u.tied_bytes and all(x.kind == KEEP for x in combo)) else u.tied_bytes / len(u.parts)
            bits = 8.0 * p.sizes[o.key] / p.weight.size
            if o.kind == "gather-tied":  # stored once, in the head's initializers
                bits = max(8.0 * q.sizes[x.key] / q.weight.size for q, x in zip(u.parts, combo))
            recs.append({
                "layer": p.node, "op": p.op, "shape": list(p.weight.shape), "params": int(p.weight.size),
                "format": o.key, "bits": round(bits, 3), "bytes": int(size),
                "rel_error": p.errors[o.key], "importance": p.importance, "probe": p.probe, "tied_unit": u.name if len(u.parts) > 1 and not u.joint else None,
                "joint_unit": u.name if u.joint else None,
                "shared_with": list(p.readers),
                "options": {k: {"bytes": p.sizes[k], "rel_error": p.errors[k]} for k in p.sizes},
                "outlier_share": sensitivity.outlier_share(p.weight),
            })  # fmt: skip
    return recs


def plan(units: list[Unit], choice: list[int]) -> dict[str, Option]:
    """Node name -> chosen option, the form the emitter takes (a shared weight's readers all take its part's)."""
    return {n: o for u, i in zip(units, choice) for p, o in zip(u.parts, u.combos()[i]) for n in (p.node, *p.readers)}


def _join_siblings(units: list[Unit]) -> list[Unit]:
    """MatMuls reading one input, with weights of one K and the same options (attention's q/k/v, a gated FFN's
    gate/up), become one joint unit at the first one's place: one format for all, so the emitter packs them into
    one MatMulNBits (``edgeprune.passes.bits.pack``).  A weight with several readers stays on its own."""
    groups: dict[tuple, list[Unit]] = {}
    for u in units:
        p = u.parts[0]
        if len(u.parts) == 1 and p.op == "MatMul" and not p.readers:
            groups.setdefault((p.input, p.weight.shape[0], tuple(o.key for o in p.options)), []).append(u)
    joined = {id(g[0]): Unit([u.parts[0] for u in g], joint=True) for g in groups.values() if len(g) > 1}
    absorbed = {id(u) for g in groups.values() if len(g) > 1 for u in g[1:]}
    return [joined.get(id(u), u) for u in units if id(u) not in absorbed]


def _join_reader(first_reader: dict[tuple, Part], key: tuple, node: str) -> bool:
    """Record ``node`` as one more reader of a weight already in a part; False for the weight's first reader."""
    part = first_reader.get(key)
    if part is None:
        return False
    part.readers += (node,)
    return True
