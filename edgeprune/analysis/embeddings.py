"""Embeddings: token and position tables, and whether the LM head reuses the token table.

Bit allocation quantizes a table as its own unit, and a table tied with the LM head must be
changed together with it (one tensor, two uses).  An embedding is a ``Gather`` (axis 0) on a
constant 2-D float table by integer indices, a single node checked directly; it is tied when the
table (or its ``Transpose``) is also a linear's weight.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from edgeprune.analysis.graph import attr, constant, is_std, node_name
from edgeprune.analysis.linears import Linear


@dataclasses.dataclass
class Embedding:
    """A Gather on a constant [vocab, dim] table; ``tied`` when it is also the LM head weight."""

    node: str
    table: str
    vocab: int
    dim: int
    input: str
    tied: bool
    tied_with: str | None = None  # the MatMul/Gemm node that reuses the table

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def find_embeddings(graph: ir.Graph, linears: list[Linear]) -> list[Embedding]:
    """Gathers (axis 0) on constant 2-D float tables by integer indices; tied if a linear reuses the table."""
    head_by_weight = {lin.weight: lin.node for lin in linears}
    found = []
    for node in graph:
        if not is_std(node, "Gather") or attr(node, "axis", 0) != 0:
            continue
        table, idx = node.inputs[0], node.inputs[1]
        tensor = constant(table)
        if tensor is None or len(tensor.shape) != 2 or idx is None:
            continue
        if tensor.dtype is not None and not tensor.dtype.is_floating_point():
            continue
        if idx.dtype is not None and idx.dtype not in (ir.DataType.INT64, ir.DataType.INT32):
            continue
        head = head_by_weight.get(table.name or "")
        found.append(
            Embedding(
                node=node_name(node), table=table.name or "", vocab=int(tensor.shape[0]), dim=int(tensor.shape[1]),
                input=idx.name or "", tied=head is not None, tied_with=head,
            )
        )  # fmt: skip
    return found


