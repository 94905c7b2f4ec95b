"""Where a per-channel scale can move from an activation into weights without changing the model.

A *group* is one activation ``x`` read only by MatMuls with constant [C, N] weights (q/k/v after a
norm, gate/up after a norm, down after the gated product) and a *producer* that can absorb
``1 / s`` exactly, so that ``x / s`` times ``diag(s) W`` is the same product:

- ``Mul(x', gamma)`` with a constant per-channel ``gamma`` (an RMSNorm or LayerNorm's scale as
  exported: gamma / s),
- ``LayerNormalization`` / ``SimplifiedLayerNormalization`` with a constant scale (and bias): both / s,
- ``Mul(a, b)`` where ``b`` is read only by that Mul and is ``MatMul(y, W_b)`` with a constant
  ``W_b`` [K, C] (the gated FFN's up projection): W_b's columns / s.

Anything else (a weight or gamma another node also reads, a non-MatMul reader of ``x``, a graph
output) is left alone with the reason, so the pass is exact wherever it acts.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from edgeprune.analysis.graph import STD_DOMAINS, constant, consumers, is_std, node_name

_NORMS = ("LayerNormalization", "SimplifiedLayerNormalization")


@dataclasses.dataclass
class Group:
    """One smoothable activation: ``x``, the weights reading it and where ``1 / s`` goes."""

    activation: ir.Value
    consumers: list[ir.Node]
    """MatMul nodes reading ``activation`` as input 0, each with its own constant weight at input 1."""
    producer: ir.Node
    absorb: list[tuple[int, int]]
    """(input index of ``producer``, axis): constants divided by ``s`` along ``axis`` (the channel axis); a
    per-channel scale other nodes also read (cleanup merges equal norm weights) is copied first.  For ``gated``
    the index is the Mul input whose producer's weight is divided."""
    kind: str
    """``gamma`` (a Mul by a constant), ``norm`` (a normalization's scale/bias) or ``gated`` (an up projection's columns)."""


def _own_initializer(value: ir.Value | None, graph: ir.Graph) -> bool:
    """A constant initializer only one node reads (so it can be rewritten in place)."""
    return (value is not None and value.const_value is not None and graph.initializers.get(value.name) is value
            and len(consumers(value)) == 1 and not value.is_graph_output())


def _weight_readers(x: ir.Value, graph: ir.Graph) -> tuple[list[ir.Node], str | None]:
    """The MatMuls reading ``x`` with their own constant [C, N] weights, or the reason ``x`` cannot be smoothed."""
    readers = consumers(x)
    if not readers or x.is_graph_output():
        return [], "a graph output"
    channels = None
    readers = [n for n in readers if not is_std(n, "Shape", "Size")]  # they read the shape only
    for node in readers:
        if not is_std(node, "MatMul") or node.inputs[0] is not x:
            return [], f"also read by {node.op_type} {node_name(node)}"
        w = node.inputs[1]
        tensor = constant(w)
        if tensor is None or len(tensor.shape) != 2 or tensor.dtype not in (ir.DataType.FLOAT,):
            return [], f"{node_name(node)} has no constant float 2-D weight"
        if not _own_initializer(w, graph):
            return [], f"{node_name(node)}'s weight is shared"
        if channels not in (None, int(tensor.shape[0])):
            return [], "readers disagree on the channel count"
        channels = int(tensor.shape[0])
    return readers, None


def _per_channel(value: ir.Value | None, channels: int) -> bool:
    tensor = constant(value)
    return tensor is not None and tensor.dtype == ir.DataType.FLOAT and int(np.prod(tensor.shape)) == channels \
        and (len(tensor.shape) == 0 or int(tensor.shape[-1]) == channels)


def _absorber(x: ir.Value, channels: int, graph: ir.Graph) -> tuple[ir.Node | None, list[tuple[int, int]], str]:
    """(producer, inputs to divide, kind) for ``x``, or (None, [], reason)."""
    node = x.producer()
    if node is None:
        return None, [], "a graph input"
    if is_std(node, "Mul") and len(node.inputs) == 2:
        for index, (scale, other) in enumerate(zip(node.inputs, reversed(node.inputs))):
            if _per_channel(scale, channels) and constant(other) is None:
                return node, [(index, -1)], "gamma"
        for index, (up, other) in enumerate(zip(node.inputs, reversed(node.inputs))):
            producer = up.producer() if up is not None else None
            if producer is not None and is_std(producer, "MatMul") and len(consumers(up)) == 1 and not up.is_graph_output() \
                    and constant(other) is None:
                w = producer.inputs[1]
                tensor = constant(w)
                if tensor is not None and len(tensor.shape) == 2 and int(tensor.shape[1]) == channels \
                        and tensor.dtype == ir.DataType.FLOAT:
                    if not _own_initializer(w, graph):
                        return None, [], f"{node_name(producer)}'s weight is shared"
                    return node, [(index, 1)], "gated"
        return None, [], "a Mul with no per-channel constant or constant-weight MatMul operand"
    if node.op_type in _NORMS and node.domain in (*STD_DOMAINS, "com.microsoft") and node.outputs[0] is x:
        absorb = [(i, -1) for i in (1, 2) if i < len(node.inputs) and node.inputs[i] is not None]
        if absorb and all(_per_channel(node.inputs[i], channels) for i, _ in absorb):
            return node, absorb, "norm"
        return None, [], f"{node.op_type}'s scale/bias is not a per-channel constant"
    return None, [], f"produced by {node.op_type}"


def find_groups(model: ir.Model) -> tuple[list[Group], list[dict]]:
    """Every smoothable activation of the main graph, and a record per MatMul activation left alone."""
    graph = model.graph
    groups, skipped, seen = [], [], set()
    for node in graph:
        if not is_std(node, "MatMul") or node.inputs[0] is None or constant(node.inputs[1]) is None:
            continue
        x = node.inputs[0]
        if id(x) in seen:
            continue
        seen.add(id(x))
        readers, why = _weight_readers(x, graph)
        if why is None:
            channels = int(constant(readers[0].inputs[1]).shape[0])
            producer, absorb, why = _absorber(x, channels, graph)
            if producer is not None:
                groups.append(Group(x, readers, producer, absorb, why))
                continue
        skipped.append({"activation": x.name, "readers": [node_name(n) for n in consumers(x)], "reason": why})
    return groups, skipped
