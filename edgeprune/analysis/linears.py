"""Linears: matrix multiplies by a constant weight, the unit every other structure is built from.

FFN and attention blocks are found as patterns over linears, pruning slices their weights and
quantization rewrites them, so one ``Linear`` record (built by ``Linear.at`` only) describes them
all.  Recognised forms: ``MatMul(x, W)`` with a constant 2-D ``W`` ([in, out]),
``MatMul(x, Transpose(W))`` and ``Gemm`` (``transB=1`` means ``W`` is [out, in]); an optional bias
is Gemm's ``C`` or an ``Add`` consumer with a constant 1-D operand of size ``out``.  Each form is
one node (plus an optional Transpose before it and Add after it), so it is checked directly on
the node rather than through a rewriter pattern.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from edgeprune.analysis.graph import attr, const_shape, constant, consumers, is_std, node_name, value_name


@dataclasses.dataclass
class Linear:
    """A matrix multiply by a constant weight: the unit of FFN/head pruning and of quantization."""

    node: str
    weight: str
    in_features: int
    out_features: int
    bias: str | None
    transposed: bool  # weight stored [out, in] (Gemm transB, or MatMul on Transpose(W))
    input: str
    output: str  # after the bias Add when there is one
    shared: bool  # the weight initializer is used by more than one node
    op_type: str = "MatMul"
    bias_node: str | None = None  # the Add that applies the bias, if separate
    weight_transpose: str | None = None  # the Transpose node between W and the MatMul

    @classmethod
    def at(
        cls,
        node: ir.Node,
        x: ir.Value | None,
        weight: ir.Value,
        shape: tuple[int, ...],
        *,
        transposed: bool,
        output: str,
        bias: str | None = None,
        bias_node: str | None = None,
        weight_transpose: ir.Node | None = None,
    ) -> Linear:
        """The one constructor: ``node`` multiplies ``x`` by the 2-D constant ``weight`` of ``shape``."""
        in_f, out_f = (shape[1], shape[0]) if transposed else shape
        return cls(
            node=node_name(node),
            weight=weight.name or "",
            in_features=in_f,
            out_features=out_f,
            bias=bias,
            transposed=transposed,
            input=value_name(x) or "",
            output=output,
            shared=len(consumers(weight)) > 1,
            op_type=node.op_type,
            bias_node=bias_node,
            weight_transpose=None if weight_transpose is None else node_name(weight_transpose),
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def find_linears(graph: ir.Graph) -> list[Linear]:
    """Every MatMul/Gemm by a constant 2-D weight, with its bias when it has one."""
    found = []
    for node in graph:
        lin = None
        if is_std(node, "MatMul"):
            lin = _matmul_linear(node)
        elif is_std(node, "Gemm"):
            lin = _gemm_linear(node)
        if lin is not None:
            found.append(lin)
    return found


def _matmul_linear(node: ir.Node) -> Linear | None:
    x, w = node.inputs[0], node.inputs[1]
    if x is None or constant(x) is not None:
        return None
    transposed, transpose_node = False, None
    shape = const_shape(w)
    if shape is None and w is not None and w.producer() is not None and is_std(w.producer(), "Transpose"):
        tnode = w.producer()
        perm = attr(tnode, "perm")
        src_shape = const_shape(tnode.inputs[0])
        if src_shape is not None and len(src_shape) == 2 and perm in (None, (1, 0), [1, 0]):
            transposed, transpose_node, w = True, tnode, tnode.inputs[0]
            shape = src_shape
    if shape is None or len(shape) != 2:
        return None
    out_f = shape[0] if transposed else shape[1]
    bias, bias_node, output = _bias_add(node.outputs[0], out_f)
    return Linear.at(
        node, x, w, shape, transposed=transposed, output=output, bias=bias, bias_node=bias_node, weight_transpose=transpose_node
    )


def _gemm_linear(node: ir.Node) -> Linear | None:
    x, w = node.inputs[0], node.inputs[1]
    shape = const_shape(w)
    if x is None or shape is None or len(shape) != 2 or attr(node, "transA", 0):
        return None
    transposed = bool(attr(node, "transB", 0))
    out_f = shape[0] if transposed else shape[1]
    c = node.inputs[2] if len(node.inputs) > 2 else None
    bias = c.name if c is not None and constant(c) is not None else None
    output = node.outputs[0]
    bias_node = None
    if bias is None:
        bias, bias_node, out_name = _bias_add(output, out_f)
    else:
        out_name = output.name or ""
    return Linear.at(node, x, w, shape, transposed=transposed, output=out_name, bias=bias, bias_node=bias_node)


def _bias_add(out: ir.Value, out_features: int) -> tuple[str | None, str | None, str]:
    """(bias name, Add node name, value after bias) when ``out``'s only consumer adds a 1-D constant."""
    users = consumers(out)
    if len(users) == 1 and is_std(users[0], "Add") and not out.is_graph_output():
        add = users[0]
        other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
        shape = const_shape(other)
        if shape is not None and len(shape) == 1 and shape[0] == out_features:
            return other.name, node_name(add), add.outputs[0].name or ""
    return None, None, out.name or ""
