"""Pack sibling MatMulNBits (one input, one format: attention's q/k/v, a gated FFN's gate/up) into one node + Split.

MatMulNBits quantizes each output column on its own (its blocks run along K), so the siblings' codes, scales and zero
points concatenated along N compute exactly what the siblings computed apart.  One node reads the activation once
(at accuracy level 4 it also quantizes it to int8 once instead of per sibling) and is one dispatch instead of
several: what onnxruntime-genai's builder does for q/k/v.  The bits pass offers siblings one joint format
(``BitAllocationConfig.joint_siblings``) so that they can be packed here.  Where the Split's three outputs are a
GroupQueryAttention's query, key and value, the attention reads the packed output itself (its packed-QKV form, as
genai's models do) and the Split goes: one node less per layer (SmolLM2 decode: 30 Splits of ~5 us per step).
"""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir

from edgeprune.passes.bits.offsets import fits_fp16
from edgeprune.passes.bits.sensitivity import fp16_scales

_ATTRS = ("K", "bits", "block_size", "accuracy_level")


def pack_siblings(model: ir.Model, exclude: set[str] = frozenset(), *, fp16: bool = False,
                  offsets: dict[str, tuple[np.ndarray, int]] | None = None) -> dict[str, int]:
    """Pack, in place, every group of two or more MatMulNBits (not named in ``exclude``) that read the same
    input with the same K, bits, block size, accuracy level and scale/zero-point types, and whose initializers
    nothing else reads; with ``fp16`` (scales to be stored as float16 next) only siblings whose scales float16
    holds alike.  ``offsets`` (node name -> (block offsets [N, k_blocks], block): ``edgeprune.passes.bits.offsets``,
    added after packing) packs nodes with offsets only together, and is updated in place to the packed nodes'
    (concatenated along N like the codes).  Returns how many groups and nodes were packed."""
    if model.opset_imports.get("", 13) < 11:  # Split takes a negative axis from opset 11 on
        return {"groups": 0, "nodes": 0}
    offsets = {} if offsets is None else offsets
    groups: dict[tuple, list[ir.Node]] = collections.defaultdict(list)
    for node in model.graph:
        if node.op_type == "MatMulNBits" and node.name not in exclude and _packable(model, node):
            # with offsets: only siblings whose offsets float16 holds alike (add_corrections stores a node's all or none)
            off = offsets.get(node.name)
            groups[(*_key(node, fp16), off is not None, off is not None and fp16 and not fits_fp16(off[0]))].append(node)
    packed = [nodes for nodes in groups.values() if len(nodes) > 1]
    for nodes in packed:
        name = _pack(model, nodes)
        if nodes[0].name in offsets:
            parts = [offsets.pop(n.name) for n in nodes]
            offsets[name] = (np.concatenate([p[0] for p in parts], axis=0), parts[0][1])
    return {"groups": len(packed), "nodes": sum(len(n) for n in packed)}


def fold_into_attention(model: ir.Model) -> int:
    """Drop, in place, every Split whose three outputs are exactly the query, key and value of one
    com.microsoft.GroupQueryAttention, in the widths its heads give (q: num_heads x head size, k and v:
    kv_num_heads x head size, along the last axis): the attention reads the packed tensor as its query and
    leaves key and value empty, which ORT defines as the same computation.  Returns how many were folded."""
    folded = 0
    for split in [n for n in model.graph if n.op_type == "Split" and n.domain == ""]:
        attention = _attention_reading(split)
        if attention is None:
            continue
        attention.replace_input_with(0, split.inputs[0])
        attention.replace_input_with(1, None)
        attention.replace_input_with(2, None)
        sizes = split.inputs[1] if len(split.inputs) > 1 else None
        model.graph.remove(split, safe=True)
        if sizes is not None and sizes.name in model.graph.initializers and not sizes.uses():
            del model.graph.initializers[sizes.name]
        folded += 1
    return folded


def _attention_reading(split: ir.Node) -> ir.Node | None:
    """The GroupQueryAttention that reads ``split``'s three outputs, and nothing else does, as its query, key and
    value in that order, split along the last axis in its heads' widths; None otherwise."""
    if len(split.outputs) != 3 or split.attributes.get_int("axis", 0) not in (-1, 2):
        return None
    uses = [list(v.uses()) for v in split.outputs]
    if any(len(u) != 1 or v.is_graph_output() for u, v in zip(uses, split.outputs)):
        return None
    node = uses[0][0].node
    if (node.op_type, node.domain) != ("GroupQueryAttention", "com.microsoft"):
        return None
    if [(u[0].node, u[0].idx) for u in uses] != [(node, 0), (node, 1), (node, 2)]:
        return None
    if len(split.inputs) > 1 and split.inputs[1] is not None:
        if split.inputs[1].const_value is None:
            return None
        widths = [int(w) for w in split.inputs[1].const_value.numpy().reshape(-1)]
    else:
        widths = list(split.attributes.get_ints("split", []))
    heads, kv = node.attributes.get_int("num_heads", 0), node.attributes.get_int("kv_num_heads", 0)
    if len(widths) != 3 or heads <= 0 or kv <= 0 or widths[0] % heads:
        return None
    head = widths[0] // heads
    return node if widths[1:] == [kv * head, kv * head] else None


def _packable(model: ir.Model, node: ir.Node) -> bool:
    """Codes, scales and (optional) zero points only, each an initializer this node alone reads (a tied lookup
    sharing the head's table keeps it apart); a float32 output with a known rank."""
    if len(node.inputs) not in (3, 4) or node.inputs[0] is None:
        return False
    inits = model.graph.initializers
    for v in node.inputs[1:]:
        if v is None or v.name not in inits or v.const_value is None or len(v.uses()) != 1:
            return False
    return all(a in node.attributes for a in ("K", "N", "bits", "block_size"))


def _key(node: ir.Node, fp16: bool) -> tuple:
    scales = node.inputs[2].const_value.numpy()
    zp = node.inputs[3] if len(node.inputs) == 4 else None
    # Where the emitter stores scales as float16, a node whose scales float16 cannot hold keeps float32 ones
    # (emit._fp16_scales decides per node): only siblings that decide alike are packed, so the packed node's
    # scales are stored as each sibling's would have been.
    return (id(node.inputs[0]), node.domain, *(node.attributes.get_int(a, 0) for a in _ATTRS), scales.dtype.str,
            scales.ndim, fp16 and fp16_scales(scales) is None,
            None if zp is None else (zp.const_value.dtype, zp.const_value.shape[1:]))


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A typed initializer (a Value made from a tensor alone has no dtype or shape, which later steps read)."""
    t = ir.tensor(array)
    v = ir.Value(name=name, const_value=t, type=ir.TensorType(t.dtype), shape=ir.Shape(t.shape))
    graph.register_initializer(v)
    return v


def pack_float_siblings(model: ir.Model, names: set[str]) -> dict[str, list[str]]:
    """Pack, in place, every group of two or more float MatMuls named in ``names`` that read the same input, each
    with its own constant [K, N] weight, into one MatMul + Split; returns packed name -> the siblings' names.

    For dynamic int8 (``quantize_dynamic``, per-channel weights: a scale per output column, the activation quantized
    once per tensor) the packed node computes exactly what the siblings computed apart, so the emitter packs them
    before quantizing: one MatMulInteger (fused by ORT with the input's DynamicQuantizeLinear, which the tool already
    shares per input) instead of one per sibling, and a q/k/v that can then feed GroupQueryAttention's packed query."""
    if model.opset_imports.get("", 13) < 11:
        return {}
    groups: dict[int, list[ir.Node]] = collections.defaultdict(list)
    inits = model.graph.initializers
    for node in model.graph:
        w = node.inputs[1] if node.op_type == "MatMul" and len(node.inputs) == 2 else None
        if (node.name in names and node.domain == "" and node.inputs[0] is not None and w is not None
                and w.name in inits and w.const_value is not None and len(w.const_value.shape) == 2 and len(w.uses()) == 1):
            groups[id(node.inputs[0])].append(node)
    packed = {}
    for nodes in (g for g in groups.values() if len(g) > 1):
        weights = [n.inputs[1].const_value.numpy() for n in nodes]
        if len({(w.shape[0], w.dtype) for w in weights}) != 1:
            continue
        name = "+".join(n.name for n in nodes) + "_packed"
        w = _initializer(model.graph, f"{nodes[0].inputs[1].name}_packed", np.concatenate(weights, axis=1))
        _replace_with_split(model, nodes, ir.Node("", "MatMul", [nodes[0].inputs[0], w], name=name),
                            [x.shape[1] for x in weights])
        packed[name] = [n.name for n in nodes]
    return packed


def _pack(model: ir.Model, nodes: list[ir.Node]) -> str:
    """Replace ``nodes`` by one MatMulNBits + Split; returns the packed node's name."""
    graph = model.graph
    first = nodes[0]
    ns = [n.attributes.get_int("N") for n in nodes]
    inputs = [first.inputs[0]]
    for i in range(1, len(first.inputs)):
        joined = np.concatenate([n.inputs[i].const_value.numpy() for n in nodes], axis=0)
        inputs.append(_initializer(graph, f"{first.inputs[i].name}_packed", joined))
    attrs = [ir.AttrInt64("N", sum(ns))] + [a for name, a in first.attributes.items() if name != "N"]
    name = "+".join(n.name for n in nodes)
    _replace_with_split(model, nodes, ir.Node(first.domain, "MatMulNBits", inputs, attributes=attrs, name=f"{name}_packed"), ns)
    return f"{name}_packed"


def _replace_with_split(model: ir.Model, nodes: list[ir.Node], joined: ir.Node, ns: list[int]) -> None:
    """Put ``joined`` (the siblings' node, its output ``sum(ns)`` wide) and a Split of its output along the last axis
    where the first sibling was; each sibling's readers (and name) move to its piece, and the siblings go with the
    initializers only they read."""
    graph = model.graph
    name = joined.name.removesuffix("_packed")
    if model.opset_imports.get("", 13) >= 13:  # the sizes are an input from opset 13 on, an attribute before
        sizes = _initializer(graph, f"{name}_split", np.asarray(ns, dtype=np.int64))
        split_in, split_attrs = [joined.outputs[0], sizes], [ir.AttrInt64("axis", -1)]
    else:
        split_in, split_attrs = [joined.outputs[0]], [ir.AttrInt64("axis", -1), ir.AttrInt64s("split", ns)]
    split = ir.Node("", "Split", split_in, attributes=split_attrs, num_outputs=len(nodes), name=f"{name}_split")
    graph.insert_before(nodes[0], [joined, split])
    joined.outputs[0].name = f"{joined.name}_output"
    out = nodes[0].outputs[0]
    if out.dtype is not None:  # an untyped output (no value_info, as ORT's quantizer leaves them) stays untyped
        joined.outputs[0].dtype = out.dtype
    if out.shape is not None:
        joined.outputs[0].shape = ir.Shape([*out.shape[:-1], sum(ns)])
    for node, value in zip(nodes, split.outputs):
        old = node.outputs[0]
        if old.dtype is not None:
            value.dtype = old.dtype
        value.shape = old.shape
        old.replace_all_uses_with(value, replace_graph_outputs=True)
        weights = [v.name for v in node.inputs[1:]]
        graph.remove(node, safe=True)
        for w in weights:
            del graph.initializers[w]
        value.name = old.name
