"""Pack sibling MatMulNBits (one input, one format: attention's q/k/v, a gated FFN's gate/up) into one node + Split.

MatMulNBits quantizes each output column on its own (its blocks run along K), so the siblings' codes, scales and zero
points concatenated along N compute exactly what the siblings computed apart.  One node reads the activation once
(at accuracy level 4 it also quantizes it to int8 once instead of per sibling) and is one dispatch instead of
several: what onnxruntime-genai's builder does for q/k/v.  The bits pass offers siblings one joint format
(``BitAllocationConfig.joint_siblings``) so that they can be packed here.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir

from edgeprune.passes.bits.sensitivity import fp16_scales

_ATTRS = ("K", "bits", "block_size", "accuracy_level")


def pack_siblings(model: ir.Model, exclude: set[str] = frozenset(), *, fp16: bool = False) -> dict[str, int]:
    """Pack, in place, every group of two or more MatMulNBits (not named in ``exclude``) that read the same
    input with the same K, bits, block size, accuracy level and scale/zero-point types, and whose initializers
    nothing else reads; with ``fp16`` (scales to be stored as float16 next) only siblings whose scales float16
    holds alike.  Returns how many groups and nodes were packed."""
    if model.opset_imports.get("", 13) < 11:  # Split takes a negative axis from opset 11 on
        return {"groups": 0, "nodes": 0}
    groups: dict[tuple, list[ir.Node]] = collections.defaultdict(list)
    for node in model.graph:
        if node.op_type == "MatMulNBits" and node.name not in exclude and _packable(model, node):
            groups[_key(node, fp16)].append(node)
    packed = [nodes for nodes in groups.values() if len(nodes) > 1]
    for nodes in packed:
        _pack(model, nodes)
    return {"groups": len(packed), "nodes": sum(len(n) for n in packed)}


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


def _pack(model: ir.Model, nodes: list[ir.Node]) -> None:
    graph = model.graph
    first = nodes[0]
    ns = [n.attributes.get_int("N") for n in nodes]
    inputs = [first.inputs[0]]
    for i in range(1, len(first.inputs)):
        joined = np.concatenate([n.inputs[i].const_value.numpy() for n in nodes], axis=0)
        inputs.append(_initializer(graph, f"{first.inputs[i].name}_packed", joined))
    attrs = [ir.AttrInt64("N", sum(ns))] + [a for name, a in first.attributes.items() if name != "N"]
    name = "+".join(n.name for n in nodes)
    matmul = ir.Node(first.domain, "MatMulNBits", inputs, attributes=attrs, name=f"{name}_packed")
    if model.opset_imports.get("", 13) >= 13:  # the sizes are an input from opset 13 on, an attribute before
        sizes = _initializer(graph, f"{name}_split", np.asarray(ns, dtype=np.int64))
        split_in, split_attrs = [matmul.outputs[0], sizes], [ir.AttrInt64("axis", -1)]
    else:
        split_in, split_attrs = [matmul.outputs[0]], [ir.AttrInt64("axis", -1), ir.AttrInt64s("split", ns)]
    split = ir.Node("", "Split", split_in, attributes=split_attrs, num_outputs=len(nodes), name=f"{name}_split")
    graph.insert_before(first, [matmul, split])
    out = nodes[0].outputs[0]
    if out.dtype is not None:  # an untyped output (no value_info, as ORT's quantizer leaves them) stays untyped
        matmul.outputs[0].dtype = out.dtype
    if out.shape is not None:
        matmul.outputs[0].shape = ir.Shape([*out.shape[:-1], sum(ns)])
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
