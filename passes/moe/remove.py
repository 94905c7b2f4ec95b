"""Physical expert removal, one function per graph form.

Every form keeps the routing exact for the kept experts: the router's output columns (and bias)
of removed experts are sliced away, so the softmax and top-k run over the kept experts only and
the renormalised top-k weights ``exp(l_i) / sum_{j in S} exp(l_j)`` of a token whose top-k set
``S`` lies among the kept experts do not change.  ``k`` becomes ``min(k, kept)``.

- loop form: a removed expert's accumulating ``Add`` is bypassed (its output replaced by the
  running sum it added to), which leaves its Gather/NonZero/MatMul chain dead for dead-code
  removal; kept experts' mask rows are renumbered (``Gather(mask, old)`` -> ``Gather(mask, new)``)
  and the OneHot depth becomes the kept count.
- fused form (``com.microsoft.MoE``/``QMoE``): every constant expert-stacked input (leading axis E:
  weights, biases, scales) is sliced on axis 0 and the ``k`` attribute clamped.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgeprune.analysis.graph import constant, node_name
from edgeprune.analysis.moe import MoELayer
from edgeprune.errors import UnsupportedModelError


def _nodes(graph: ir.Graph) -> dict[str, ir.Node]:
    return {node_name(n): n for n in graph}


def _register(graph: ir.Graph, array: np.ndarray, dtype: ir.DataType, base: str) -> ir.Value:
    """A fresh initializer holding ``array``, named ``base`` or ``base_<n>`` (the first free name)."""
    name, i = base, 0
    while name in graph.initializers:
        i += 1
        name = f"{base}_{i}"
    v = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(dtype), const_value=ir.tensor(array, name=name))
    graph.register_initializer(v)
    return v


def _new_constant(graph: ir.Graph, like: ir.TensorProtocol, value, name: str) -> ir.Value:
    """A fresh initializer holding ``value`` in ``like``'s dtype and shape."""
    array = np.asarray(value, dtype=like.dtype.numpy()).reshape(tuple(int(d) for d in like.shape))
    return _register(graph, array, like.dtype, name)


def _set_input_constant(graph: ir.Graph, node: ir.Node, index: int, value, name: str) -> None:
    old = constant(node.inputs[index])
    node.replace_input_with(index, _new_constant(graph, old, value, name))


def _slice_initializer(value: ir.Value, keep: np.ndarray, axis: int) -> None:
    """Replace an initializer's tensor by its ``keep`` slice along ``axis`` (the value is shared by name)."""
    array = np.take(value.const_value.numpy(), keep, axis=axis)
    value.const_value = ir.tensor(np.ascontiguousarray(array), name=value.name)
    value.shape = ir.Shape(array.shape)


def _slice_router(graph: ir.Graph, layer: MoELayer, keep: np.ndarray) -> None:
    router = layer.router
    if router is None:
        raise UnsupportedModelError(f"MoE layer {layer.layer} has no router linear to slice.")
    if router.shared:
        raise UnsupportedModelError(f"the router weight {router.weight!r} of MoE layer {layer.layer} is shared with another node, so its rows cannot be removed.")
    weight = graph.initializers.get(router.weight)
    if weight is None or weight.const_value is None:
        raise UnsupportedModelError(f"the router weight {router.weight!r} of MoE layer {layer.layer} is not an initializer.")
    _slice_initializer(weight, keep, axis=0 if router.transposed else weight.const_value.numpy().ndim - 1)
    if router.bias is not None:
        bias = graph.initializers.get(router.bias)
        if bias is None or bias.const_value is None:
            raise UnsupportedModelError(f"the router bias {router.bias!r} of MoE layer {layer.layer} is not an initializer.")
        _slice_initializer(bias, keep, axis=-1)


def remove_loop(graph: ir.Graph, layer: MoELayer, keep: np.ndarray) -> int:
    """Remove the experts not in ``keep`` from a loop-form layer; returns the new k."""
    nodes = _nodes(graph)
    renumber = {int(old): new for new, old in enumerate(keep)}
    for expert in layer.experts:
        if expert.index in renumber:
            selector = nodes[expert.selector]
            _set_input_constant(graph, selector, 1, renumber[expert.index], f"{selector.name or 'moe'}_expert_index")
            continue
        add = nodes[expert.accumulate]
        contribution = next(i for i, v in enumerate(add.inputs) if v is not None and v.name == expert.contribution)
        running = add.inputs[1 - contribution]
        add.outputs[0].replace_all_uses_with(running, replace_graph_outputs=True)
        graph.remove(add, safe=True)
    onehot = nodes[layer.onehot]
    _set_input_constant(graph, onehot, 1, len(keep), f"{onehot.name or 'moe'}_depth")
    return _clamp_k_and_slice_router(graph, nodes, layer, keep)


def _clamp_k_and_slice_router(graph: ir.Graph, nodes: dict, layer: MoELayer, keep: np.ndarray) -> int:
    """The router side of a removal, shared by the loop and dense forms: k clamps to the kept count, rows follow ``keep``."""
    k = min(layer.top_k, len(keep))
    topk = nodes[layer.node]
    if k != layer.top_k:
        _set_input_constant(graph, topk, 1, k, f"{topk.name or 'moe'}_k")
    _slice_router(graph, layer, keep)
    return k


def _own_slice(graph: ir.Graph, node: ir.Node, index: int, tensor: ir.TensorProtocol, keep: np.ndarray, tag: str) -> None:
    """Give ``node`` its own initializer holding the ``keep`` slice (axis 0) of ``tensor``; shared originals stay intact."""
    array = np.ascontiguousarray(np.take(tensor.numpy(), keep, axis=0))
    node.replace_input_with(index, _register(graph, array, tensor.dtype, f"{node.inputs[index].name}_{tag}"))


def remove_dense(graph: ir.Graph, layer: MoELayer, keep: np.ndarray) -> int:
    """Remove the experts not in ``keep`` from a dense-form layer (gpt-oss): stacked weights and biases, router rows, k."""
    from edgeprune.analysis.moe import constant_through_identity

    nodes = _nodes(graph)
    for node_key, index in layer.stacked:
        node = nodes[node_key]
        tensor = constant_through_identity(node.inputs[index])
        if tensor is None:
            raise UnsupportedModelError(f"input {index} of {node_key} is no longer a constant, so its experts cannot be removed.")
        _own_slice(graph, node, index, tensor, keep, f"experts{layer.layer}")
    return _clamp_k_and_slice_router(graph, nodes, layer, keep)


def remove_fused(graph: ir.Graph, layer: MoELayer, keep: np.ndarray) -> int:
    """Remove the experts not in ``keep`` from a com.microsoft.MoE/QMoE node; returns the new k."""
    node = _nodes(graph)[layer.node]
    for i, value in enumerate(node.inputs):
        if i < 2 or value is None:
            continue
        tensor = constant(value)
        if tensor is None:
            raise UnsupportedModelError(f"input {i} of {layer.node} is not a constant, so its experts cannot be removed.")
        if tensor.shape[0] != layer.num_experts:
            continue
        if value.const_value is None or len(value.uses()) > 1:  # a Constant node's output, or shared: give this node its own copy
            array = np.take(tensor.numpy(), keep, axis=0)
            name = f"{value.name}_kept"
            fresh = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=ir.tensor(np.ascontiguousarray(array), name=name))
            graph.register_initializer(fresh)
            node.replace_input_with(i, fresh)
        else:
            _slice_initializer(value, keep, axis=0)
    k = min(layer.top_k or 1, len(keep))
    node.attributes["k"] = ir.AttrInt64("k", k)
    _slice_router(graph, layer, keep)
    return k
