"""Emit a per-node quantization plan through ONNX Runtime's own quantization tools.

The plan maps node names to :class:`edgeprune.passes.bits.sensitivity.Option`.  Emission works on files:

1. a small onnx-ir preparation, for what the tools cannot express (each step says why):
   every node gets a name (both tools select nodes by name); a MatMul whose weight is
   ``Transpose(W)`` (a tied LM head) gets its own constant ``W^T`` when it is quantized (neither
   tool looks through the Transpose); a quantized ``Gemm`` becomes ``MatMul`` (+ ``Add``) since
   neither tool quantizes Gemm; dynamic-int8 MatMuls reading one input become one MatMul + Split
   (``pack.pack_float_siblings``: exact for per-channel weights; the tool quantizes each node apart); the IR version is raised to 10 when a GatherBlockQuantized will
   hold int4 tensors (the opset is left alone: the ops it contains are unchanged);
2. ``quantize_static(QuantFormat.QDQ, nodes_to_quantize=...)`` for the QDQ nodes (Conv on CPU, NPU-style
   targets), one run per activation width, ranges calibrated on ``calibration`` rows of the float
   model, with the Relu/Clip right after each such node (folded into its output range); then ``quantize_dynamic(nodes_to_quantize=...)`` for the dynamic-int8 MatMul/Conv/Gather nodes;
3. one ``MatMulNBitsQuantizer`` run per distinct (bits, block, symmetric, accuracy level) setting
   (an option's own ``accuracy_level`` wins over the ``emit`` argument, which applies to level-0 options), restricted
   with ``nodes_to_exclude`` to that setting's nodes (in ORT 1.32 the DEFAULT algorithm takes
   one setting per run: ``customized_weight_config`` is read only by the RTN/GPTQ algorithms);
   embeddings go through its ``nodes_to_include`` so ``Gather`` is not added to
   ``op_types_to_quantize``, which would force opset 21 onto the whole model;
   a ``gptq`` node goes through the same run as ``nbits`` nodes of its bits and block;
4. load the result back with ``edgeprune.model_io.load_model``; the packed codes of each ``gptq``
   node are replaced by GPTQ's (``edgeprune.passes.bits.gptq``: same grid, so ORT's scales and zero points stay);
   an ``nbits`` node with a searched rounding (``mse``, ``wmse``: ``edgeprune.passes.bits.rounding``) gets
   its codes, scales and zero points in the same initializers, before any tied lookup reads them;
5. a ``gather-tied`` lookup becomes a GatherBlockQuantized over the tied head's MatMulNBits
   initializers (:func:`_tie_lookups`: no tool shares one packed table between the two ops);
   a block-offset node (``edgeprune.passes.bits.offsets``) gets its centred codes and scales the same way;
6. MatMulNBits siblings of one format reading one input become one node + Split (``edgeprune.passes.bits.pack``),
   a GroupQueryAttention reading the packed q/k/v itself where it can (no Split); then each block-offset node (packed
   or not) gets its offsets' MatMul + Add after it, and block scales are stored as float16 where the plan says so.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import pathlib
import tempfile

import numpy as np
import onnx
import onnx_ir as ir

from onnxscript.rewriter.pattern import MatchResult, RewriteRule, RewriteRuleSet

from edgeprune import model_io
from edgeprune.analysis.graph import node_name
from edgeprune.passes.bits import offsets
from edgeprune.passes.bits.pack import fold_into_attention, pack_float_siblings, pack_siblings
from edgeprune.passes.bits.sensitivity import KEEP, Option

logger = logging.getLogger(__name__)

#: Op types the ORT quantizers produce: a node of these types is already quantized.
QUANTIZED_OPS = frozenset(
    {
        "MatMulNBits", "GatherBlockQuantized", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul",
        "QLinearMatMul", "QLinearConv", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
        "MatMulIntegerToFloat", "QGemm",
    }
)  # fmt: skip


def _name_nodes(model: ir.Model) -> None:
    """Give unnamed nodes the analysis' name (``<op>:<first output>``), which the plan's keys use."""
    for node in model.graph:
        if not node.name:
            node.name = node_name(node)


def _untie(model: ir.Model, names: set[str]) -> int:
    """Give each quantized MatMul on ``Transpose(constant)`` its own transposed constant; return the count.

    A hand walk, not a rewrite rule: the Transpose stays while anything else reads it (a rule's
    match would remove it or not match at all), and each new constant is named by a running count.
    """
    done = 0
    for node in list(model.graph):
        if node.name not in names or node.op_type != "MatMul":
            continue
        w = node.inputs[1]
        producer = w.producer() if w is not None else None
        if producer is None or producer.op_type != "Transpose" or producer.inputs[0].const_value is None:
            continue
        src = producer.inputs[0]
        table = src.const_value.numpy()
        perm = producer.attributes.get("perm")
        perm = tuple(perm.value) if perm is not None else tuple(reversed(range(table.ndim)))
        value = ir.Value(name=f"{src.name}_T_{done}", const_value=ir.tensor(np.ascontiguousarray(table.transpose(perm))))
        model.graph.register_initializer(value)
        node.replace_input_with(1, value)
        if not producer.outputs[0].uses():
            model.graph.remove(producer, safe=True)
        done += 1
    return done


def _gemm_pattern(op, x, w, c):
    return op.Gemm(x, w, c, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["y"])


def _gemm_check(context, x, w, c, y, *, names: frozenset[str], **_):
    check = MatchResult()
    gemm = y.producer()
    if gemm.name not in names:
        return check.fail(f"{gemm.name} is not quantized")
    if gemm.attributes.get_int("transA", 0):
        return check.fail("transA=1: the quantizers take x as it is")
    if w.const_value is None:
        return check.fail("the weight is not a constant")
    return check


def _gemm_rewrite(op, x, w, c, y, **_):
    """MatMul(x, alpha * op(W)) (+ Add(beta * C)), named as the Gemm so the plan still finds it."""
    gemm = y.producer()
    alpha = gemm.attributes.get_float("alpha", 1.0)
    beta = gemm.attributes.get_float("beta", 1.0)
    wt = w.const_value.numpy().astype(np.float32)
    if gemm.attributes.get_int("transB", 0):
        wt = wt.T
    wv = op.initializer(ir.tensor(np.ascontiguousarray(wt * np.float32(alpha))), name=f"{w.name}_mm")
    result = mm = op.MatMul(x, wv)
    mm.producer().name, mm.name = gemm.name, f"{y.name}_mm"
    if c is not None:
        if beta != 1.0 and c.const_value is not None:
            c = op.initializer(ir.tensor(c.const_value.numpy() * np.float32(beta)), name=f"{c.name}_beta")
        result = op.Add(mm, c)
        result.producer().name = f"{gemm.name}_bias"
    return result


def _gemm_to_matmul(model: ir.Model, names: set[str]) -> int:
    """Rewrite the quantized Gemm nodes (transA=0) among ``names`` as MatMul(+Add), folding alpha/beta/transB."""
    if not any(n.op_type == "Gemm" and n.name in names for n in model.graph):
        return 0  # the rule set also records inferred value infos: leave a model without quantized Gemm as it is
    rule = RewriteRule(_gemm_pattern, _gemm_rewrite, functools.partial(_gemm_check, names=frozenset(names)),
                       remove_nodes=True)
    return RewriteRuleSet([rule]).apply_to_model(model)


def _tied_heads(model: ir.Model, plan: dict[str, Option]) -> dict[str, str]:
    """Gather node -> output name of the head MatMul whose packed table a ``gather-tied`` lookup reads.

    The head is the MatMul in the same ``nbits`` format whose weight is ``Transpose(table)``.
    """
    nodes = {n.name: n for n in model.graph}
    pairs = {}
    for name, o in plan.items():
        if o.kind != "gather-tied":
            continue
        table = nodes[name].inputs[0]
        for use in table.uses() if table is not None else ():
            tr = use.node
            if tr.op_type != "Transpose":
                continue
            for head_use in tr.outputs[0].uses():
                head = head_use.node
                h = plan.get(head.name)
                if (head.op_type == "MatMul" and head_use.idx == 1 and h is not None
                        and dataclasses.replace(h, accuracy_level=0) == dataclasses.replace(o, kind="nbits")):
                    pairs[name] = head.outputs[0].name
        if name not in pairs:
            raise ValueError(f"{name}: no MatMul on Transpose(table) quantized as nbits{o.bits}-b{o.block} to share")
    return pairs


def _tie_lookups(model: ir.Model, pairs: dict[str, str]) -> int:
    """Replace each paired Gather by GatherBlockQuantized over its head's MatMulNBits initializers.

    MatMulNBits wants B as [N, k_blocks, blob] while GatherBlockQuantized wants [N, K*bits/8]: the
    file holds the 2-D table once and the head reads it through a Reshape, which ORT folds at load.
    """
    produced = {o.name: n for n in model.graph for o in n.outputs}
    nodes = {n.name: n for n in model.graph}
    done = 0
    for gname, head_out in pairs.items():
        gather, mnb = nodes[gname], produced[head_out]
        if mnb.op_type != "MatMulNBits":
            raise RuntimeError(f"{gname}: the tied head became {mnb.op_type}, not MatMulNBits; nothing to share")
        attrs = {k: a.value for k, a in mnb.attributes.items()}
        b = mnb.inputs[1]
        packed = b.const_value.numpy()
        n_rows = packed.shape[0]
        data = ir.Value(name=f"{b.name}_table", const_value=ir.tensor(np.ascontiguousarray(packed.reshape(n_rows, -1))))
        shape = ir.Value(name=f"{b.name}_shape", const_value=ir.tensor(np.array(packed.shape, dtype=np.int64)))
        model.graph.register_initializer(data)
        model.graph.register_initializer(shape)
        b3 = ir.Value(name=f"{b.name}_3d")
        model.graph.insert_before(mnb, ir.Node("", "Reshape", [data, shape], outputs=[b3], name=f"{mnb.name}_table"))
        mnb.replace_input_with(1, b3)
        table = gather.inputs[0]
        inputs = [data, gather.inputs[1], mnb.inputs[2]] + ([mnb.inputs[3]] if len(mnb.inputs) > 3 and mnb.inputs[3] is not None else [])
        gbq = ir.Node("com.microsoft", "GatherBlockQuantized", inputs, name=f"{gname}_tied",
                      attributes=[ir.AttrInt64("bits", int(attrs["bits"])), ir.AttrInt64("block_size", int(attrs["block_size"])),
                                  ir.AttrInt64("quantize_axis", 1), ir.AttrInt64("gather_axis", 0)])
        model.graph.insert_before(gather, gbq)
        out, name = gather.outputs[0], gather.outputs[0].name
        out.replace_all_uses_with(gbq.outputs[0], replace_graph_outputs=True)
        out.name = f"{name}_float"
        gbq.outputs[0].name = name
        model.graph.remove(gather, safe=True)
        for v in (b, table):
            if v is not None and not v.uses() and v.name in model.graph.initializers:
                del model.graph.initializers[v.name]
        done += 1
    return done


def prepare(model: ir.Model, plan: dict[str, Option]) -> tuple[dict[str, int], dict[str, str], dict[str, Option]]:
    """Step 1 on ``model`` in place: names, untied heads, Gemm->MatMul, dynamic-int8 siblings packed, IR version.

    Returns the counts, the tied lookups' heads (:func:`_tied_heads`, found before untying), and the plan with
    each packed group under its packed node's name.
    """
    _name_nodes(model)
    tied = _tied_heads(model, plan)
    quantized = {n for n, o in plan.items() if o.kind != KEEP}
    counts = {"untied": _untie(model, quantized), "gemm_to_matmul": _gemm_to_matmul(model, quantized)}
    packed = pack_float_siblings(model, {n for n, o in plan.items() if o.kind == "int8-dynamic"})
    if packed:
        plan = dict(plan)
        for name, members in packed.items():
            plan[name] = plan[members[0]]
            for m in members:
                del plan[m]
        counts["packed_int8_siblings"] = {"groups": len(packed), "nodes": sum(len(m) for m in packed.values())}
    if any(o.kind == "gather-nbits" for o in plan.values()) and (model.ir_version or 0) < 10:
        model.ir_version = 10
    return counts, tied, plan


def emit(model: ir.Model, plan: dict[str, Option], *, accuracy_level: int | None = None,
         workdir: str | pathlib.Path | None = None, grams: dict[str, np.ndarray] | None = None,
         calibration: list[dict] | None = None) -> tuple[ir.Model, dict]:
    """Quantize ``model`` (not changed) per ``plan`` with ORT's tools; return the new model and a log.

    ``grams`` (node name -> ``X^T X`` of its input) is needed only for the plan's ``gptq`` nodes and
    ``wmse``-rounded ones (for those its diagonal, [K], is enough),
    ``calibration`` (feed dicts) only for its ``qdq`` nodes.
    """
    work = ir.from_proto(model_io.to_proto(model))
    counts, tied, plan = prepare(work, plan)
    log: dict = {"prepare": counts, "steps": []}
    all_names = [n.name for n in work.graph]
    with tempfile.TemporaryDirectory(prefix="edgeprune_bits_", dir=workdir) as tmp:
        path = pathlib.Path(tmp) / "in.onnx"
        model_io.save_model(work, path)
        gptq_weights = {n.name: (n.outputs[0].name, n.inputs[1].const_value.numpy()) for n in work.graph
                        if plan.get(n.name) is not None and plan[n.name].kind == "gptq"}
        searched = {n.name: (n.outputs[0].name, n.inputs[1].const_value.numpy()) for n in work.graph
                    if plan.get(n.name) is not None and plan[n.name].kind == "nbits" and plan[n.name].rounding != "rtn"
                    and not plan[n.name].offsets}
        offset_nodes = {n.name: (n.outputs[0].name, n.inputs[1].const_value.numpy()) for n in work.graph
                        if plan.get(n.name) is not None and plan[n.name].kind == "nbits" and plan[n.name].offsets}
        missing = sorted(set(gptq_weights) - set(grams or {}))
        if missing:
            raise ValueError(f"GPTQ needs the Gram of each node's input; none for {missing[:3]}")
        missing = sorted(n for n in [*searched, *offset_nodes] if plan[n].rounding == "wmse" and n not in (grams or {}))
        if missing:
            raise ValueError(f"wmse rounding needs the Gram (or its diagonal) of each node's input; none for {missing[:3]}")
        for bits in sorted({o.bits for o in plan.values() if o.kind == "qdq"}):
            if not calibration:
                raise ValueError("static QDQ needs calibration rows for its activation ranges")
            names = sorted(n for n, o in plan.items() if o.kind == "qdq" and o.bits == bits)
            acts = _fused_activations(work, set(names))
            path = _quantize_static(path, pathlib.Path(tmp) / f"qdq{bits}.onnx", names + acts, calibration, bits)
            log["steps"].append({"tool": "quantize_static", "activation_bits": bits, "nodes": len(names), "activations": len(acts)})
        dynamic = sorted(n for n, o in plan.items() if o.kind in ("int8-dynamic", "int8-gather"))
        if dynamic:
            path = _quantize_dynamic(path, pathlib.Path(tmp) / "dyn.onnx", dynamic)
            log["steps"].append({"tool": "quantize_dynamic", "nodes": len(dynamic)})
        groups: dict[tuple, list[str]] = collections.defaultdict(list)
        for name, o in plan.items():
            if o.kind in ("nbits", "gather-nbits", "gptq"):
                groups[(o.bits, o.block, o.symmetric, o.accuracy_level)].append(name)
        proto = onnx.load(str(path))
        for (bits, block, sym, level), names in sorted(groups.items()):
            proto = _matmul_nbits(proto, bits, block, sym, names, all_names, plan, level or accuracy_level)
            step = {"tool": "MatMulNBitsQuantizer", "bits": bits, "block": block, "symmetric": sym, "nodes": len(names)}
            if level:
                step["accuracy_level"] = level
            log["steps"].append(step)
        out = pathlib.Path(tmp) / "out.onnx"
        onnx.save(proto, str(out), save_as_external_data=proto.ByteSize() > model_io.EXTERNAL_DATA_THRESHOLD)
        result = model_io.load_model(out)
        if searched:  # before tying: a tied lookup reads the head's (searched) table
            log["searched_grids"] = _searched_grids(result, plan, searched, grams or {})
        offset_table = _offset_grids(result, plan, offset_nodes, grams or {}) if offset_nodes else {}
        if tied:
            log["tied_lookups"] = _tie_lookups(result, tied)
        if gptq_weights:
            log["gptq_nodes"] = _gptq_codes(result, plan, gptq_weights, grams)
        before = {n.name for n in model.graph if n.op_type in _BLOCK_OPS}
        fp16 = any(o.fp16_scales for o in plan.values())
        # after every step writing a node's own codes; the offsets travel with them
        log["packed_siblings"] = pack_siblings(result, before, fp16=fp16, offsets=offset_table)
        log["packed_siblings"]["into_attention"] = fold_into_attention(result)
        if offset_table:  # after packing: one correction per packed node, between it and its Split or attention
            log["block_offsets"] = offsets.add_corrections(result, offset_table, fp16)
        if fp16:  # last: every step above writes float32 scales
            log["fp16_scales"] = _fp16_scales(result, before)
        # Pull every weight into memory before the folder goes away.
        for v in result.graph.initializers.values():
            if v.const_value is not None and not isinstance(v.const_value, ir.Tensor):
                v.const_value = ir.tensor(v.const_value.numpy())
    return result, log


_BLOCK_OPS = ("MatMulNBits", "GatherBlockQuantized")


def _fp16_scales(model: ir.Model, before: set[str]) -> dict[str, int]:
    """Store the block scales of the MatMulNBits / GatherBlockQuantized nodes this emit made as float16 behind a
    Cast (a tied lookup shares its head's, converted once).  ORT constant-folds the Cast at load, so the kernel
    reads the same float32 scales ``sensitivity.stored_scales`` simulates; scales float16 cannot hold stay float32."""
    from edgeprune.passes.bits.sensitivity import fp16_scales

    done = kept = 0
    order = {id(n): i for i, n in enumerate(model.graph)}
    for node in list(model.graph):
        if node.op_type not in _BLOCK_OPS or node.name in before:
            continue
        v = node.inputs[2]
        if v is None or v.const_value is None or v.name not in model.graph.initializers or v.dtype != ir.DataType.FLOAT:
            continue
        f16 = fp16_scales(v.const_value.numpy())
        if f16 is None:
            kept += 1
            continue
        name = v.name
        half = ir.Value(name=f"{name}_fp16", const_value=ir.tensor(f16))
        model.graph.register_initializer(half)
        first = min((u.node for u in v.uses()), key=lambda n: order[id(n)])
        cast = ir.Node("", "Cast", [half], attributes=[ir.AttrInt64("to", ir.DataType.FLOAT)], name=f"{name}_cast")
        model.graph.insert_before(first, cast)
        v.replace_all_uses_with(cast.outputs[0])
        del model.graph.initializers[name]
        cast.outputs[0].name = name
        cast.outputs[0].dtype, cast.outputs[0].shape = ir.DataType.FLOAT, v.shape
        done += 1
    return {"converted": done, "kept_float32": kept}


def _gptq_codes(model: ir.Model, plan: dict[str, Option], weights: dict, grams: dict[str, np.ndarray]) -> int:
    """Replace the packed codes of each ``gptq`` node's MatMulNBits by GPTQ's on the same grid."""
    from edgeprune.passes.bits import gptq, sensitivity

    produced = {o.name: n for n in model.graph for o in n.outputs}
    for name, (out, w) in weights.items():
        o, mnb = plan[name], produced[out]
        if mnb.op_type != "MatMulNBits":
            raise RuntimeError(f"{name}: ORT wrote {mnb.op_type}, not MatMulNBits, under the GPTQ codes")
        b = mnb.inputs[1]
        scales, zeros = sensitivity.nbits_grid(w, o.bits, o.block, o.symmetric)
        stored = mnb.inputs[2].const_value.numpy()
        if not np.array_equal(stored.reshape(scales.shape), scales):
            raise RuntimeError(f"{name}: ORT's grid changed under the GPTQ codes")
        packed = gptq.pack(gptq.gptq_codes(w, grams[name], scales, zeros, o.bits, o.block), o.bits, o.block)
        b.const_value = ir.tensor(packed.reshape(b.const_value.shape.numpy()), name=b.name)
    return len(weights)


def _searched_grids(model: ir.Model, plan: dict[str, Option], weights: dict, grams: dict) -> int:
    """Write each searched node's codes, scales and zero points (``edgeprune.passes.bits.rounding``: ``mse``,
    or ``wmse`` with the diagonal of ``grams[node]``) into the MatMulNBits ORT's tool made for it: same
    shapes, dtypes and packing, so the same bytes."""
    from edgeprune.passes.bits import rounding

    produced = {o.name: n for n in model.graph for o in n.outputs}
    for name, (out, w) in weights.items():
        o, mnb = plan[name], produced[out]
        if mnb.op_type != "MatMulNBits":
            raise RuntimeError(f"{name}: ORT wrote {mnb.op_type}, not MatMulNBits, under the searched grid")
        codes, scales, zeros = rounding.search_grid(w, o.bits, o.block, o.symmetric,
                                                    rounding.row_weights(o.rounding, grams.get(name)))
        _write_codes(name, mnb, codes, scales, o)
        zp = mnb.inputs[3] if len(mnb.inputs) > 3 else None
        if o.symmetric:
            if zp is not None:
                raise RuntimeError(f"{name}: a symmetric MatMulNBits with zero points")
            continue
        packed = rounding.pack_zero_points(zeros, o.bits)
        if zp is None or zp.const_value is None or zp.const_value.size != packed.size:
            raise RuntimeError(f"{name}: ORT's zero points do not have the packed layout [N, ceil(k_blocks * bits / 8)]")
        zp.const_value = ir.tensor(packed.reshape(zp.const_value.shape.numpy()), name=zp.name)
    return len(weights)


def _write_codes(name: str, mnb: ir.Node, codes: np.ndarray, scales: np.ndarray, o: Option) -> None:
    """Replace the packed codes and float32 scales ORT's tool wrote for ``name``'s MatMulNBits (same shapes: same bytes)."""
    from edgeprune.passes.bits import gptq

    b, s = mnb.inputs[1], mnb.inputs[2]
    stored = s.const_value.numpy()
    if stored.size != scales.size or stored.dtype != np.float32:
        raise RuntimeError(f"{name}: ORT's scales are {stored.dtype}{list(stored.shape)}, not float32 x {scales.size}")
    b.const_value = ir.tensor(gptq.pack(codes, o.bits, o.block).reshape(b.const_value.shape.numpy()), name=b.name)
    s.const_value = ir.tensor(scales.reshape(stored.shape), name=s.name)


def _offset_grids(model: ir.Model, plan: dict[str, Option], weights: dict, grams: dict) -> dict[str, tuple[np.ndarray, int]]:
    """Write each block-offset node's centred codes and scales (``edgeprune.passes.bits.offsets``) into the symmetric
    MatMulNBits ORT's tool made for it; return MatMulNBits name -> (its offsets [N, k_blocks], block), which
    ``offsets.add_corrections`` adds beside it once siblings are packed."""
    from edgeprune.passes.bits import rounding

    produced = {o.name: n for n in model.graph for o in n.outputs}
    table = {}
    for name, (out, w) in weights.items():
        o, mnb = plan[name], produced[out]
        if mnb.op_type != "MatMulNBits" or len(mnb.inputs) != 3:
            raise RuntimeError(f"{name}: ORT wrote {mnb.op_type} with {len(mnb.inputs)} inputs, not a symmetric "
                               "MatMulNBits, under the block offsets")
        codes, scales, offs = offsets.offset_grid(w, o.bits, o.block, rounding.row_weights(o.rounding, grams.get(name)),
                                                  o.rounding, o.fp16_scales)
        _write_codes(name, mnb, codes, scales, o)
        table[mnb.name] = (offs, o.block)
    return table


def _fused_activations(model: ir.Model, names: set[str]) -> list[str]:
    """The Relu/Clip nodes that read a QDQ node's output alone (no other node reads it, and it is not a graph output).

    Handed to ``quantize_static`` with it, they are removed and the node's output range becomes
    theirs (ORT's QDQRemovableActivation), so ORT runs QLinearConv straight into the next one; left
    float, each costs a DequantizeLinear -> Clip -> QuantizeLinear round trip (EfficientNet-Lite0's
    33 ReLU6 made its QDQ model 1.4x slower than float).
    """
    out = []
    for node in model.graph:
        src = node.inputs[0].producer() if node.op_type in ("Relu", "Clip") and node.inputs and node.inputs[0] is not None else None
        if (src is not None and src.name in names and len(node.inputs[0].uses()) == 1
                and not node.inputs[0].is_graph_output()):  # a graph output would lose what the activation cuts
            out.append(node.name)
    return sorted(out)


def _quantize_static(src: pathlib.Path, dst: pathlib.Path, names: list[str], rows: list[dict], bits: int) -> pathlib.Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Rows(CalibrationDataReader):
        def __init__(self):
            self._it = iter(rows)

        def get_next(self):
            return next(self._it, None)

    quantize_static(
        src, dst, Rows(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul", "Conv", "Relu", "Clip"],
        nodes_to_quantize=names, per_channel=True, weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt16 if bits == 16 else QuantType.QUInt8,
        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False, "UseQDQContribOps": bits == 16},
    )
    return dst


def _quantize_dynamic(src: pathlib.Path, dst: pathlib.Path, names: list[str]) -> pathlib.Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # A tensor ONNX shape inference cannot type (after a contrib op such as SimplifiedLayerNormalization in an
    # onnxruntime-genai graph) is float: the units quantized here all have float32 weights.
    quantize_dynamic(
        src, dst, op_types_to_quantize=["MatMul", "Gather", "Conv"], nodes_to_quantize=names,
        per_channel=True, weight_type=QuantType.QInt8, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    return dst


@contextlib.contextmanager
def _quiet(name: str):
    """ORT's quantizer logs every node it visits at INFO on its own handler: keep it to warnings."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        log.setLevel(level)


def _matmul_nbits(proto, bits, block, sym, names, all_names, plan, accuracy_level):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    chosen = set(names)
    gathers = [n for n in names if plan[n].kind == "gather-nbits"]
    quant = MatMulNBitsQuantizer(
        proto, bits=bits, block_size=block, is_symmetric=sym, accuracy_level=accuracy_level,
        nodes_to_exclude=[n for n in all_names if n not in chosen], nodes_to_include=gathers or None,
        op_types_to_quantize=("MatMul",), quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    with _quiet("onnxruntime.quantization.matmul_nbits_quantizer"):
        quant.process()
    return quant.model.model
