"""Graph edits for structured pruning: slice linears, shrink a consumer (with bias compensation or
ridge refit), and rewrite the head-split shapes that carry a head count.

Private to the prune pass; ``groups`` builds on these.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from edgeprune.analysis import Linear
from edgeprune.analysis.graph import consumers, node_name

_STD = ("", "ai.onnx")


class _Skip(Exception):
    """A group cannot be pruned safely; the message is recorded."""


# --------------------------------------------------------------------------- graph helpers


class _Graph:
    """Lookups on the main graph, plus the few edits pruning needs (new constants, cloned shapes)."""

    def __init__(self, model: ir.Model):
        self.model = model
        self.graph = model.graph
        self.values: dict[str, ir.Value] = {v.name: v for v in self.graph.inputs}
        self.values.update(self.graph.initializers)
        self.nodes: dict[str, ir.Node] = {}
        for node in self.graph:
            self.nodes[node_name(node)] = node
            for out in node.outputs:
                if out.name:
                    self.values[out.name] = out
        self._names = set(self.values)
        self.opset = int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 21)))
        self._removed: dict[tuple[str, int], list[tuple[int, int]]] = {}  # (node, input) -> [(original offset, positions removed)]

    def note_removed(self, member: Any, count: int) -> None:
        """``count`` positions of ``member``'s piece (at its original offset) are gone from its tensor."""
        self._removed.setdefault((member.node, member.index), []).append((member.offset, count))

    def current_offset_of(self, node: str, index: int, offset: int) -> int:
        """Where original position ``offset`` of input ``index`` of ``node`` is now, after earlier groups' edits."""
        return offset - sum(n for o, n in self._removed.get((node, index), []) if o < offset)

    def current_offset(self, member: Any) -> int:
        return self.current_offset_of(member.node, member.index, member.offset)

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def new_const(self, array: np.ndarray, base: str) -> ir.Value:
        tensor = ir.tensor(np.ascontiguousarray(array), name=self.fresh(base))
        value = ir.Value(name=tensor.name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
        self.graph.register_initializer(value)
        return value

    def set_input(self, node: ir.Node, index: int, array: np.ndarray) -> None:
        """Give ``node`` input ``index`` the constant ``array``, in place when nobody else reads it."""
        old = node.inputs[index]
        dtype = _const(old).numpy().dtype if _const(old) is not None else array.dtype
        array = np.ascontiguousarray(array.astype(dtype, copy=False))
        if old is not None and old.name in self.graph.initializers and self.graph.initializers[old.name] is old and len(old.uses()) == 1:
            old.const_value = ir.tensor(array, name=old.name)
            old.shape = ir.Shape(array.shape)
            return
        node.replace_input_with(index, self.new_const(array, (old.name if old is not None else "c") + "_pruned"))
        self.drop_if_unused(old)

    def drop_if_unused(self, value: ir.Value | None) -> None:
        """Remove an initializer nothing reads any more (a replaced weight or shape constant)."""
        if value is None or value.uses() or value.is_graph_input() or value.is_graph_output():
            return
        if self.graph.initializers.get(value.name) is value:
            del self.graph.initializers[value.name]

    def node_of(self, lin: Linear) -> ir.Node:
        return self.nodes[lin.node]


def _is_std(node: ir.Node | None, *ops: str) -> bool:
    return node is not None and node.domain in _STD and node.op_type in ops


def _const(value: ir.Value | None) -> ir.TensorProtocol | None:
    if value is None or value.is_graph_input():
        return None
    return ir.convenience.get_const_tensor(value)


def _const_array(value: ir.Value | None) -> np.ndarray | None:
    tensor = _const(value)
    return None if tensor is None else tensor.numpy()


# --------------------------------------------------------------------------- linears


def _weight_slot(g: _Graph, lin: Linear) -> tuple[ir.Node, int]:
    node = g.node_of(lin)
    if lin.weight_transpose:
        return g.nodes[lin.weight_transpose], 0
    return node, 1


def _bias_slot(g: _Graph, lin: Linear) -> tuple[ir.Node, int] | None:
    if lin.bias is None:
        return None
    node = g.nodes[lin.bias_node] if lin.bias_node else g.node_of(lin)
    for i, v in enumerate(node.inputs):
        if v is not None and v.name == lin.bias:
            return node, i
    return None


def _weight(g: _Graph, lin: Linear) -> np.ndarray:
    node, i = _weight_slot(g, lin)
    return _const_array(node.inputs[i])


def _in_major(lin: Linear, w: np.ndarray) -> np.ndarray:
    """[in, out] view of a weight stored as the linear stores it."""
    return w.T if lin.transposed else w


def _out_major(lin: Linear, w: np.ndarray) -> np.ndarray:
    return w if lin.transposed else w.T


def _linear_params(lin: Linear, per_out: bool) -> int:
    """Parameters one output channel (per_out) or one input channel of ``lin`` carries."""
    return lin.in_features + (1 if lin.bias else 0) if per_out else lin.out_features


def _slice_outputs(g: _Graph, lin: Linear, keep: np.ndarray) -> None:
    node, i = _weight_slot(g, lin)
    w = _const_array(node.inputs[i])
    g.set_input(node, i, w[keep, :] if lin.transposed else w[:, keep])
    slot = _bias_slot(g, lin)
    if slot is not None:
        g.set_input(slot[0], slot[1], _const_array(slot[0].inputs[slot[1]])[keep])


def _check_linears(lins: list[Linear | None], what: str) -> list[Linear]:
    for lin in lins:
        if lin is None:
            raise _Skip(f"{what}: a projection was not found")
        if lin.shared:
            raise _Skip(f"{what}: weight {lin.weight} is shared by several nodes, so it is not pruned")
    return lins  # type: ignore[return-value]


def _shrink_consumer(g: _Graph, lin: Linear, keep: np.ndarray, stats, compensate: bool, refit: bool, ridge: float) -> dict:
    """Drop input channels of ``lin`` not in ``keep``; refit and compensate from ``stats`` if asked."""
    node, i = _weight_slot(g, lin)
    w = _in_major(lin, _const_array(node.inputs[i]).astype(np.float64))
    done: dict[str, Any] = {}
    if refit and stats is not None and stats.gram is not None:
        gram = stats.gram
        lam = ridge * float(np.mean(np.diag(gram)))
        gkk = gram[np.ix_(keep, keep)] + lam * np.eye(len(keep))
        w_new = np.linalg.solve(gkk, gram[keep, :] @ w)
        done["refit"] = True
    else:
        w_new = w[keep, :]
    if compensate and stats is not None:
        delta = stats.mean @ w - stats.mean[keep] @ w_new
        _add_to_bias(g, lin, delta)
        done["compensated"] = True
    g.set_input(node, i, w_new.T if lin.transposed else w_new)
    return done


def _add_to_bias(g: _Graph, lin: Linear, delta: np.ndarray) -> None:
    slot = _bias_slot(g, lin)
    if slot is not None:
        bias = _const_array(slot[0].inputs[slot[1]])
        g.set_input(slot[0], slot[1], (bias.astype(np.float64) + delta).astype(bias.dtype))
        return
    node = g.node_of(lin)
    out = node.outputs[0]
    dtype = _const(_weight_slot(g, lin)[0].inputs[_weight_slot(g, lin)[1]]).numpy().dtype
    bias = g.new_const(delta.astype(dtype), f"{lin.weight}_bias")
    uses = list(out.uses())
    add = ir.node("Add", [out, bias], name=g.fresh(f"{node_name(node)}/bias_compensation"))
    add.outputs[0].name = g.fresh(f"{out.name}_compensated")
    add.outputs[0].type = out.type
    g.graph.insert_after(node, add)
    for use in uses:
        use.node.replace_input_with(use.idx, add.outputs[0])
    if out.is_graph_output():
        outputs = g.graph.outputs
        idx = [k for k, v in enumerate(outputs) if v is out]
        new_out = add.outputs[0]
        old_name = out.name
        out.name = g.fresh(f"{old_name}_uncompensated")
        new_out.name = old_name
        for k in idx:
            outputs[k] = new_out


# --------------------------------------------------------------------------- shapes


def _shape_pieces(value: ir.Value) -> list[tuple[ir.Value | None, list[int | None]]] | None:
    """A 1-D int shape as pieces (constant value, its ints) or (None, [None...]) for dynamic ones."""
    arr = _const_array(value)
    if arr is not None:
        return [(value, [int(x) for x in arr.reshape(-1)])] if arr.dtype.kind in "iu" and arr.ndim <= 1 else None
    node = value.producer()
    if not _is_std(node, "Concat"):
        return None
    pieces: list[tuple[ir.Value | None, list[int | None]]] = []
    for inp in node.inputs:
        arr = _const_array(inp)
        if arr is not None:
            pieces.append((inp, [int(x) for x in arr.reshape(-1)]))
            continue
        length = None
        if inp is not None and inp.shape is not None and len(inp.shape) == 1 and isinstance(inp.shape[0], int):
            length = inp.shape[0]
        elif _is_std(inp.producer(), "Unsqueeze") and (inp.producer().inputs[0].shape is None or len(inp.producer().inputs[0].shape) == 0):
            length = 1
        if length is None:
            return None
        pieces.append((None, [None] * length))
    return pieces


def _shape_entries(value: ir.Value) -> list[int | None] | None:
    pieces = _shape_pieces(value)
    return None if pieces is None else [x for _, ints in pieces for x in ints]


@dataclasses.dataclass
class _ShapeEdit:
    """Set entry ``position`` of Reshape ``node``'s shape input to a new number at apply time."""

    node: ir.Node
    position: int


def _plan_shape_edit(reshape: ir.Node, from_end: int, expected: int, what: str) -> _ShapeEdit | None:
    """Check the entry ``from_end`` places from the end is ``expected`` (edit) or -1 (nothing to do)."""
    entries = _shape_entries(reshape.inputs[1])
    if entries is None or len(entries) < from_end:
        raise _Skip(f"{what}: the shape of {node_name(reshape)} cannot be read statically")
    pos = len(entries) - from_end
    entry = entries[pos]
    if entry == -1:
        return None
    if entry != expected:
        raise _Skip(f"{what}: {node_name(reshape)} has {entry!r} where the head count {expected} was expected")
    pieces = _shape_pieces(reshape.inputs[1])
    offset = 0
    for value, ints in pieces:
        if offset <= pos < offset + len(ints):
            if value is None:
                raise _Skip(f"{what}: the head count in {node_name(reshape)} is computed at run time")
            break
        offset += len(ints)
    return _ShapeEdit(reshape, pos)


def _apply_shape_edit(g: _Graph, edit: _ShapeEdit, new: int) -> None:
    shape = edit.node.inputs[1]
    arr = _const_array(shape)
    if arr is not None:
        arr = arr.copy().reshape(-1)
        arr[edit.position] = new
        edit.node.replace_input_with(1, g.new_const(arr, f"{shape.name}_pruned"))
        g.drop_if_unused(shape)
        return
    concat = shape.producer()
    inputs, offset = list(concat.inputs), 0
    for k, inp in enumerate(concat.inputs):
        n = len(_shape_pieces_one(inp))
        if offset <= edit.position < offset + n:
            piece = _const_array(inp).copy().reshape(-1)
            piece[edit.position - offset] = new
            inputs[k] = g.new_const(piece, f"{inp.name}_pruned")
            break
        offset += n
    clone = ir.node("Concat", inputs, {"axis": 0}, name=g.fresh(f"{node_name(concat)}_pruned"))
    clone.outputs[0].name = g.fresh(f"{shape.name}_pruned")
    clone.outputs[0].type = shape.type
    g.graph.insert_before(edit.node, clone)
    edit.node.replace_input_with(1, clone.outputs[0])


def _shape_pieces_one(value: ir.Value) -> list[int | None]:
    arr = _const_array(value)
    if arr is not None:
        return [int(x) for x in arr.reshape(-1)]
    if value.shape is not None and len(value.shape) == 1 and isinstance(value.shape[0], int):
        return [None] * value.shape[0]
    return [None]


def _split_reshape(g: _Graph, lin: Linear, what: str) -> ir.Node:
    """The Reshape that splits ``lin``'s output into heads (through Cast/Identity)."""
    value = g.values[lin.output]
    for _ in range(4):
        users = [n for n in consumers(value) if not _is_std(n, "Shape")]
        if len(users) != 1:
            raise _Skip(f"{what}: {lin.output} is read by {len(users)} nodes, not only by a head-split Reshape")
        if _is_std(users[0], "Reshape") and users[0].inputs[0] is value:
            return users[0]
        if not _is_std(users[0], "Cast", "Identity"):
            break
        value = users[0].outputs[0]
    raise _Skip(f"{what}: no head-split Reshape after {lin.node}")


