"""What the attention fusion reads around an exported block: rotary embedding, head split and merge.

- ``rotary(x_rot, head_dim)``: transformers' rotate_half rotary embedding,

      x_rot = x * Unsqueeze(cos, 1) + Concat(-x[..., h:], x[..., :h], axis=-1) * Unsqueeze(sin, 1),  h = head_dim / 2

  (Mul/Add operands in either order), where ``cos``/``sin`` [B, S, D] are elementwise functions (Cos, Sin,
  Cast, Mul/Div by a constant: the exporter's attention scaling) of ``Concat(freqs, freqs, axis=-1)``, so
  their two halves are equal, and depend on one rank-2 integer graph input (``position_ids``) and constants
  only.  Then ``x_rot[j] = x[j] cos[p, j] - x[j+h] sin[p, j]`` and ``x_rot[j+h] = x[j+h] cos[p, j] + x[j] sin[p, j]``
  for j < h: GroupQueryAttention's ``do_rotary`` (not interleaved) with ``cos_cache[p] = cos[p, :h]``.
- ``position_tables``: those caches, computed by a copy of the model's own cos/sin subgraph fed positions
  0..N-1 instead of ``position_ids`` (the same ops on the same positions, so the same values); the copy
  depends on constants only, so ONNX Runtime folds it when the session loads and the file stays small.
- ``split_heads_source(x4, heads, head_dim)``: ``x4 = Transpose(Reshape(p, [B, S, -1|H, D]), [0, 2, 1, 3])``
  with ``p`` [B, S, H*D] -> ``p``, which is already the [B, S, H*D] layout GQA reads (no Reshape/Transpose).
- ``merged_heads(y4)``: the exporter's merge after attention, ``Reshape(Transpose(y4, [0, 2, 1, 3]), [B, S, -1])``,
  whose output equals GQA's own [B, S, H*D] output when ``y4`` is that output split into heads.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

_PERM = (0, 2, 1, 3)
_PASS_THROUGH = {"Cast", "Unsqueeze", "Squeeze", "Identity", "Reshape"}
_ARITH = {"Div": lambda a, b: a // b if b and a % b == 0 else None, "Mul": lambda a, b: a * b,
          "Add": lambda a, b: a + b, "Sub": lambda a, b: a - b}  # fmt: skip
_ELEMENTWISE_TAIL = {"Cos", "Sin", "Cast", "Identity"}
_INT_TYPES = {ir.DataType.INT64, ir.DataType.INT32}


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None


def _ints(value: ir.Value | None) -> list[int] | None:
    const = ir.convenience.get_const_tensor(value) if value is not None else None
    if const is None or const.dtype not in _INT_TYPES:
        return None
    return [int(x) for x in const.numpy().reshape(-1)]


def _scalar(value: ir.Value | None, sources: tuple[ir.Value, ...], known: dict[int, int] | None = None) -> int | tuple[str, int] | None:
    """A one-element int value: its constant; for ``Shape(s)[axis]`` with ``s`` in ``sources``, ``known[axis]``
    or else ``("dim", axis)``; integer arithmetic of constants (Cast/Unsqueeze/Squeeze pass through); else None."""
    known = known or {}
    for _ in range(8):
        if value is None:
            return None
        ints = _ints(value)
        if ints is not None:
            return ints[0] if len(ints) == 1 else None
        node = value.producer()
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type in _PASS_THROUGH:
            value = node.inputs[0]
            continue
        if node.op_type == "Gather":
            shape = _producer(node.inputs[0], "Shape")
            index = _ints(node.inputs[1])
            if shape is None or index is None or len(index) != 1 or shape.inputs[0] not in sources \
                    or "start" in shape.attributes or "end" in shape.attributes:
                return None
            rank = len(shape.inputs[0].shape) if shape.inputs[0].shape is not None else None
            axis = index[0] + rank if index[0] < 0 and rank is not None else index[0]
            if axis < 0:
                return None
            return known.get(axis, ("dim", axis))
        if node.op_type in _ARITH and len(node.inputs) == 2:
            a, b = (_scalar(v, sources, known) for v in node.inputs)
            return _ARITH[node.op_type](a, b) if isinstance(a, int) and isinstance(b, int) else None
        return None
    return None


def _slice_last(node: ir.Node | None, x: ir.Value, head_dim: int) -> tuple[int, int] | None:
    """(start, end) of ``Slice(x, start, end, axes=[3|-1], steps=[1])``, else None."""
    if node is None or node.op_type != "Slice" or node.inputs[0] is not x or len(node.inputs) < 4:
        return None
    axes = _ints(node.inputs[3])
    steps = _ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else [1]
    if axes not in ([3], [-1]) or steps != [1]:
        return None
    start, end = (_scalar(v, (x,), {3: head_dim}) for v in node.inputs[1:3])
    return (start, end) if isinstance(start, int) and isinstance(end, int) else None


def _rotate_half_of(value: ir.Value | None, head_dim: int) -> ir.Value | None:
    """x when ``value = Concat(Neg(x[..., h:]), x[..., :h], axis=-1)``."""
    concat = _producer(value, "Concat")
    if concat is None or len(concat.inputs) != 2 or concat.attributes.get_int("axis", 0) not in (-1, 3):
        return None
    neg = _producer(concat.inputs[0], "Neg")
    if neg is None:
        return None
    second, first = neg.inputs[0].producer() if neg.inputs[0] is not None else None, concat.inputs[1].producer()
    if second is None or first is None or second.op_type != "Slice" or not second.inputs:
        return None
    x = second.inputs[0]
    half = head_dim // 2
    upper, lower = _slice_last(second, x, head_dim), _slice_last(first, x, head_dim)
    if head_dim % 2 or upper is None or lower is None or lower != (0, half) or upper[0] != half or upper[1] < head_dim:
        return None
    return x


def _table(value: ir.Value | None) -> ir.Value | None:
    """``t`` when ``value = Unsqueeze(t, [1])``, ``t`` [B, S, D] a function of equal halves (see the module doc)."""
    unsqueeze = _producer(value, "Unsqueeze")
    if unsqueeze is None or len(unsqueeze.inputs) < 2 or _ints(unsqueeze.inputs[1]) != [1]:
        return None
    table = node_value = unsqueeze.inputs[0]
    for _ in range(6):
        node = node_value.producer() if node_value is not None else None
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "Concat" and len(node.inputs) == 2 and node.inputs[0] is node.inputs[1] \
                and node.attributes.get_int("axis", 0) in (-1, 2):
            return table
        scale = ir.convenience.get_const_tensor(node.inputs[1]) if node.op_type in ("Mul", "Div") and len(node.inputs) == 2 else None
        if node.op_type not in _ELEMENTWISE_TAIL and (scale is None or scale.size != 1):  # Mul/Div by a constant scalar pass
            return None
        node_value = node.inputs[0]
    return None


def rotary(x_rot: ir.Value, head_dim: int) -> tuple[ir.Value, ir.Value, ir.Value] | None:
    """(x, cos, sin) when ``x_rot`` is the rotate_half rotary embedding of ``x`` (module doc), else None."""
    add = _producer(x_rot, "Add")
    if add is None or len(add.inputs) != 2:
        return None
    muls = [_producer(v, "Mul") for v in add.inputs]
    if any(m is None for m in muls):
        return None
    for cos_mul, sin_mul in (muls, muls[::-1]):
        for i in (0, 1):
            x = _rotate_half_of(sin_mul.inputs[i], head_dim)
            if x is None:
                continue
            sin = _table(sin_mul.inputs[1 - i])
            if x not in cos_mul.inputs or sin is None:
                continue
            cos = _table(cos_mul.inputs[1 - list(cos_mul.inputs).index(x)])
            if cos is not None:
                return x, cos, sin
    return None


def table_inputs(tables: tuple[ir.Value, ...], limit: int = 300) -> tuple[list[ir.Node], ir.Value | None]:
    """The nodes computing ``tables`` (in topological order) and the one graph input they read; ([], None) when
    they read another graph input or a non-constant value from nowhere, hold a subgraph, or exceed ``limit`` nodes."""
    order: list[ir.Node] = []
    done: set[int] = set()
    source = None
    stack = [(t, False) for t in reversed(tables)]
    while stack:
        value, expanded = stack.pop()
        node = value.producer()
        if node is None:
            if value.is_graph_input():
                if source is not None and source is not value:
                    return [], None
                source = value
            elif value.const_value is None:
                return [], None
            continue
        if id(node) in done:
            continue
        if expanded:
            done.add(id(node))
            order.append(node)
            continue
        if len(order) > limit or any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            return [], None
        stack.append((value, True))
        stack.extend((v, False) for v in reversed(node.inputs) if v is not None)
    ok = source is not None and source.shape is not None and len(source.shape) == 2 and source.dtype in _INT_TYPES
    return (order, source) if ok else ([], None)


def position_tables(op, tables: tuple[ir.Value, ir.Value], positions: int, head_dim: int) -> tuple[ir.Value, ir.Value, ir.Value]:
    """(cos_cache, sin_cache, position input): [positions, head_dim / 2] rows of the model's own cos/sin tables,
    from a copy of their subgraph that reads positions 0..positions-1 instead of the position input."""
    nodes, source = table_inputs(tables)
    def int64(value):
        return op.Constant(value=ir.tensor(np.array(value, dtype=np.int64)))

    arange = op.Unsqueeze(op.Range(int64(0), int64(positions), int64(1)), int64([0]))
    if source.dtype != ir.DataType.INT64:
        arange = op.Cast(arange, to=source.dtype)
    mapped: dict[ir.Value, ir.Value] = {source: arange}
    for node in nodes:
        inputs = [mapped.get(v, v) if v is not None else None for v in node.inputs]
        outputs = op.op(node.op_type, *inputs, _domain=node.domain, _outputs=len(node.outputs), **dict(node.attributes))
        for old, new in zip(node.outputs, outputs if isinstance(outputs, (list, tuple)) else [outputs]):
            mapped[old] = new
    zero, half, last = int64([0]), int64([head_dim // 2]), int64([-1])
    cos, sin = (op.Squeeze(op.Slice(mapped[t], zero, half, last), zero) for t in tables)
    return cos, sin, source


def split_heads_source(x4: ir.Value, heads: int, head_dim: int) -> ir.Value | None:
    """``p`` [B, S, heads*head_dim] when ``x4 = Transpose(Reshape(p, [B|0, S|0, -1|heads, head_dim]), [0, 2, 1, 3])``."""
    transpose = _producer(x4, "Transpose")
    if transpose is None or tuple(transpose.attributes.get_ints("perm", ())) != _PERM:
        return None
    reshape = _producer(transpose.inputs[0], "Reshape")
    if reshape is None or reshape.attributes.get_int("allowzero", 0) != 0:
        return None
    p = reshape.inputs[0]
    if p is None or p.shape is None or len(p.shape) != 3:
        return None
    elements = _shape_elements(reshape.inputs[1], rows_source(p))
    if elements is None or len(elements) != 4:
        return None
    if elements[0] not in (0, ("dim", 0)) or elements[1] not in (0, ("dim", 1)) or elements[3] != head_dim:
        return None
    width = p.shape[2]
    if elements[2] == heads and (not isinstance(width, int) or width == heads * head_dim):
        return p
    if elements[2] == -1 and width == heads * head_dim:
        return p
    return None


def _shape_elements(shape: ir.Value | None, sources: tuple[ir.Value, ...]) -> list | None:
    ints = _ints(shape)
    if ints is not None:
        return list(ints)
    concat = _producer(shape, "Concat")
    if concat is None or concat.attributes.get_int("axis", 0) != 0:
        return None
    out = []
    for v in concat.inputs:
        ints = _ints(v)
        if ints is not None:
            out += ints
            continue
        got = _scalar(v, sources)
        if got is None:
            return None
        out.append(got)
    return out


def merged_heads(y4: ir.Value, sources: tuple[ir.Value, ...], heads: int, head_dim: int) -> ir.Value | None:
    """The exporter's merge of ``y4`` [B, H, S, D]: ``Reshape(Transpose(y4, [0, 2, 1, 3]), [B|0, S|0, -1|H*D])``
    with B, S read off ``sources`` (values [B, S, ...]), when it is ``y4``'s only use; else None."""
    uses = list(y4.uses())
    if len(uses) != 1:
        return None
    transpose = uses[0].node
    if transpose.op_type != "Transpose" or transpose.domain not in ("", "ai.onnx") or tuple(transpose.attributes.get_ints("perm", ())) != _PERM:
        return None
    uses = list(transpose.outputs[0].uses())
    if len(uses) != 1 or uses[0].node.op_type != "Reshape" or uses[0].idx != 0:
        return None
    reshape = uses[0].node
    if reshape.attributes.get_int("allowzero", 0) != 0:
        return None
    elements = _shape_elements(reshape.inputs[1], sources)
    if elements is None or len(elements) != 3:
        return None
    if elements[0] not in (0, ("dim", 0)) or elements[1] not in (0, ("dim", 1)) or elements[2] not in (-1, heads * head_dim):
        return None
    return reshape.outputs[0]


def rows_source(p: ir.Value) -> tuple[ir.Value, ...]:
    """Values with the same leading [B, S] dims as ``p``: ``p`` and, through a MatMul (and a bias Add), its input."""
    out = [p]
    node = p.producer()
    if node is not None and node.op_type == "Add" and len(node.inputs) == 2 and ir.convenience.get_const_tensor(node.inputs[1]) is not None:
        out.append(node.inputs[0])
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
    if node is not None and node.op_type == "MatMul" and node.inputs[0] is not None:
        out.append(node.inputs[0])
    return tuple(out)
