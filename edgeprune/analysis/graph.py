"""Small read-only helpers over onnx-ir graphs that every structure finder and pass shares.

Constants behind initializers or Constant nodes, shape tensors read statically, consumers,
attributes, the one way to name a node, and a bounded backward walk.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import onnx_ir as ir

STD_DOMAINS = ("", "ai.onnx")
MS_DOMAIN = "com.microsoft"

def is_std(node: ir.Node, *ops: str) -> bool:
    return node.domain in STD_DOMAINS and node.op_type in ops


def constant(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The tensor behind an initializer or Constant node; None for anything a caller can feed."""
    if value is None or value.is_graph_input():
        return None
    if value.const_value is not None:
        return value.const_value
    producer = value.producer()
    if producer is not None and is_std(producer, "Constant"):
        return constant_node_tensor(producer)
    return None


def constant_node_tensor(node: ir.Node) -> ir.TensorProtocol | None:
    """Read a Constant node's value without touching it (ir.convenience.get_const_tensor names it)."""
    for name, attr in node.attributes.items():
        if name == "value":
            return attr.value
        if name in ("value_float", "value_floats"):
            return ir.tensor(np.asarray(attr.value, dtype=np.float32))
        if name in ("value_int", "value_ints"):
            return ir.tensor(np.asarray(attr.value, dtype=np.int64))
    return None


def const_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    tensor = constant(value)
    if tensor is None:
        return None
    return tuple(int(d) for d in tensor.shape)


def consumers(value: ir.Value) -> list[ir.Node]:
    """Distinct nodes that read ``value`` (a node reading it twice counts once)."""
    seen: dict[int, ir.Node] = {}
    for use in value.uses():
        seen.setdefault(id(use.node), use.node)
    return list(seen.values())


def node_name(node: ir.Node) -> str:
    """The node's name; unnamed nodes (legal ONNX) are called ``<op>:<first output>``, which is unique."""
    if node.name:
        return node.name
    out = node.outputs[0].name if node.outputs else ""
    return f"{node.op_type}:{out}"


def value_name(value: ir.Value | None) -> str | None:
    return None if value is None else value.name


def values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    """Graph inputs, initializers and node outputs of the main graph by name (structures refer to values by name)."""
    values = {v.name: v for v in graph.inputs}
    values.update({name: v for name, v in graph.initializers.items()})
    for node in graph:
        for out in node.outputs:
            if out.name:
                values[out.name] = out
    return values


def node_index(graph: ir.Graph) -> dict[ir.Node, int]:
    """Each node's position in ``graph`` (keyed by the node itself, so the map cannot go stale)."""
    return {node: i for i, node in enumerate(graph)}


def attr(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def static_ints(value: ir.Value | None, depth: int = 0) -> list[int | None] | None:
    """Read a 1-D int shape tensor statically: constants known, dynamic pieces None.

    Exporters build Reshape shapes as Concat(Unsqueeze(Gather(Shape(x))), const, ...); the
    constant pieces are what carries the head count and head size.
    """
    if value is None or depth > 12:
        return None
    tensor = constant(value)
    if tensor is not None:
        arr = tensor.numpy()
        if arr.dtype.kind not in "iu" or arr.ndim > 1:
            return None
        return [int(x) for x in arr.reshape(-1)]
    node = value.producer()
    if node is None or node.domain not in STD_DOMAINS:
        return unknown_ints(value)
    op = node.op_type
    if op == "Concat":
        parts: list[int | None] = []
        for inp in node.inputs:
            piece = static_ints(inp, depth + 1)
            if piece is None:
                return None
            parts.extend(piece)
        return parts
    if op in ("Cast", "Identity", "Unsqueeze", "Squeeze"):
        inner = static_ints(node.inputs[0], depth + 1)
        if inner is None and op == "Unsqueeze":
            return [None]  # a scalar made 1-D: one unknown element
        return inner
    if op == "Shape":
        shape = node.inputs[0].shape if node.inputs[0] is not None else None
        if shape is None:
            return None
        dims = [d if isinstance(d, int) else None for d in shape]
        start, end = attr(node, "start", 0), attr(node, "end", None)
        return dims[start:end]
    if op == "Gather":
        data, idx = static_ints(node.inputs[0], depth + 1), static_ints(node.inputs[1], depth + 1)
        if data is None or idx is None or any(i is None for i in idx):
            return unknown_ints(value)
        try:
            return [data[i] for i in idx]  # type: ignore[index]
        except IndexError:
            return None
    return unknown_ints(value)


def unknown_ints(value: ir.Value) -> list[int | None] | None:
    """A dynamic piece of known length (from its static shape) as Nones."""
    shape = value.shape
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return [None] * int(np.prod(shape, dtype=np.int64))


def walk(
    start: ir.Value,
    step: Callable[[ir.Node], Iterable[ir.Value] | None],
    stop: Callable[[ir.Value], bool],
    max_nodes: int = 64,
    graph_inputs_end: bool = False,
) -> tuple[list[ir.Value], list[ir.Node]] | None:
    """Backward walk from ``start``: values where ``stop`` holds end a branch; ``step(node)``
    gives the inputs to follow (None: the walk hits a node it must not cross, so no match).
    A graph input fails the walk unless ``graph_inputs_end``."""
    ends: list[ir.Value] = []
    nodes: list[ir.Node] = []
    seen_nodes: set[int] = set()
    seen_values: set[int] = set()
    stack = [start]
    while stack:
        value = stack.pop()
        if id(value) in seen_values:
            continue
        seen_values.add(id(value))
        if stop(value):
            ends.append(value)
            continue
        node = value.producer()
        if node is None:
            if graph_inputs_end:
                continue
            return None
        if id(node) in seen_nodes:
            continue
        follow = step(node)
        if follow is None:
            return None
        seen_nodes.add(id(node))
        nodes.append(node)
        if len(nodes) > max_nodes:
            return None
        stack.extend(v for v in follow if v is not None)
    return ends, nodes
