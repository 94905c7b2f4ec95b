"""Structured pruning: score FFN neurons and attention heads, allocate a parameter budget, remove them physically.

Three concerns are kept apart (Torch-Pruning's split): *groups* (what is coupled; this module),
*importance* (``edgeprune.scoring``, pure) and *allocation* (``edgeprune.allocation``).  A group
is one layer's units of one kind whose channels are the input channels of one consuming linear:

- ``_FFNGroup``: neurons of up (and gate) outputs / down inputs.  The element-wise region
  between them is checked to be closed; per-channel constants in it are sliced too.
- ``_HeadGroup``: query heads.  Multi-head attention (KV heads = heads) removes a head's q, k
  and v columns and its o rows.  With GQA only q and o shrink (KV heads and head_dim stay);
  the exporter's repeat_kv (Unsqueeze -> Expand -> Reshape) is replaced by one ``Gather`` of
  the KV heads the kept query heads read, which is exact for any batch and length and works
  even when groups keep different numbers of heads.  ``kv_groups=True`` prunes whole KV groups
  (a KV head and its query heads) instead.  Head-split Reshape shapes (constant or a Concat of
  constants and dynamic pieces) get the new head count; -1 entries need nothing.

- ``_ConvGroup``: a conv channel dependency group (``edgeprune.dependency``): the producers'
  output filters and biases, BatchNormalization parameters, per-channel constants, depthwise
  convs in lockstep (filters, bias, ``group`` attribute) and the consumers' input slices (Conv
  weight axis 1, Gemm/MatMul rows after global pooling).  Residual-coupled groups are left out
  unless ``conv_residual``.

Transforms of the linear groups, in order: slice producers' output columns and
biases, rewrite shapes, then shrink the consumer's input rows with optional least-squares refit
``(G_KK + lambda I) W' = G_K: W`` on the calibration Gram and bias compensation
``b += mu^T W - mu_K^T W'`` (FLAP's ``W[pruned]^T mu[pruned]`` when there is no refit), which
keeps the mean output of the consumer exact.  Intermediate value shapes are cleared afterwards;
the following cleanup pass infers them again.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import numpy as np
import onnx_ir as ir

from edgeprune import allocation as alloc
from edgeprune import scoring
from edgeprune.analysis import AttentionBlock, FFNBlock, Linear, analyze
from edgeprune.context import StatsRequest
from edgeprune.dependency import ChannelGroup, channel_groups
from edgeprune.errors import BadInputError, UnsupportedModelError
from edgeprune.model_io import param_count
from edgeprune.passes.base import EdgePass, EdgePassResult

logger = logging.getLogger(__name__)

_STD = ("", "ai.onnx")
_ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Neg", "Cast", "Identity", "Erf", "Tanh", "Sigmoid", "Relu", "LeakyRelu",
    "Gelu", "Silu", "Swish", "HardSigmoid", "HardSwish", "Clip", "Softplus", "Mish", "Elu", "Selu", "Celu",
    "Exp", "Pow", "Sqrt", "Abs", "PRelu", "Softsign", "Min", "Max", "ThresholdedRelu",
}  # fmt: skip
_HEAD_PATH_OPS = {"Reshape", "Unsqueeze", "Squeeze", "Expand", "Slice", "Transpose", "Mul", "Div", "Add", "Sub",
                  "Neg", "Concat", "Cast", "Identity"}  # fmt: skip
_DATA_ONLY = {"Reshape", "Unsqueeze", "Squeeze", "Expand", "Slice"}
UNIT_KINDS = ("ffn", "heads", "conv")


@dataclasses.dataclass
class PruneConfig:
    ratio: float = 0.2
    """Share of the prunable parameters (FFN weights, attention q/o, and k/v where removed with a head) to remove, in [0, 1)."""
    metric: str = "flap"
    """magnitude (L2), magnitude_l1, wanda (Wanda-sp) or flap (fluctuation)."""
    allocation: str = "global"
    """global (per-layer standardized, one ranking), floor (global with min_keep_fraction), uniform."""
    round_to: int = 8
    """Keep FFN and conv widths multiples of this (1 disables); head counts are not rounded."""
    units: str = "ffn,heads,conv"
    """Comma-separated unit kinds to prune: ffn, heads, conv (conv output channel groups)."""
    compensate: bool = True
    """FLAP bias compensation of the consumer (needs calibration data)."""
    refit: bool = False
    """Least-squares refit of the consumer on the calibration Gram (needs calibration data)."""
    ridge: float = 1e-2
    """Refit ridge, relative to mean(diag G)."""
    min_keep_fraction: float = 0.1
    """Per-layer floor for allocation='floor'."""
    kv_groups: bool = False
    """With GQA, prune whole KV groups (KV head + its query heads) instead of query heads."""
    conv_residual: bool = False
    """Also prune conv channel groups coupled by residual Adds (narrows the whole residual stream)."""

    def __post_init__(self) -> None:
        if not isinstance(self.ratio, (int, float)) or not 0 <= self.ratio < 1:
            raise BadInputError(f"prune ratio must be in [0, 1), got {self.ratio!r}: e.g. ratio = 0.2 removes 20% of the prunable parameters.")
        if self.metric not in scoring.METRICS:
            raise BadInputError(f"unknown prune metric {self.metric!r}: choose one of {', '.join(scoring.METRICS)}.")
        if self.allocation not in alloc.METHODS:
            raise BadInputError(f"unknown prune allocation {self.allocation!r}: choose one of {', '.join(alloc.METHODS)}.")
        if int(self.round_to) < 1:
            raise BadInputError(f"prune round_to must be >= 1 (1 disables rounding), got {self.round_to}.")
        kinds = [k.strip() for k in str(self.units).split(",") if k.strip()]
        if not kinds or any(k not in UNIT_KINDS for k in kinds):
            raise BadInputError(f"prune units {self.units!r} must be a comma-separated subset of {', '.join(UNIT_KINDS)}.")
        if not 0 <= self.min_keep_fraction <= 1 or self.ridge < 0:
            raise BadInputError("prune min_keep_fraction must be in [0, 1] and ridge >= 0.")

    @property
    def unit_kinds(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in self.units.split(",") if k.strip())


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
            self.nodes[_node_key(node)] = node
            for out in node.outputs:
                if out.name:
                    self.values[out.name] = out
        self._names = set(self.values)

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


def _node_key(node: ir.Node) -> str:
    """analysis names nodes this way: the node's name, else ``<op>:<first output>``."""
    if node.name:
        return node.name
    return f"{node.op_type}:{node.outputs[0].name if node.outputs else ''}"


def _is_std(node: ir.Node | None, *ops: str) -> bool:
    return node is not None and node.domain in _STD and node.op_type in ops


def _const(value: ir.Value | None) -> ir.TensorProtocol | None:
    if value is None or value.is_graph_input():
        return None
    return ir.convenience.get_const_tensor(value)


def _const_array(value: ir.Value | None) -> np.ndarray | None:
    tensor = _const(value)
    return None if tensor is None else tensor.numpy()


def _consumers(value: ir.Value) -> list[ir.Node]:
    seen: dict[int, ir.Node] = {}
    for use in value.uses():
        seen.setdefault(id(use.node), use.node)
    return list(seen.values())


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
    add = ir.node("Add", [out, bias], name=g.fresh(f"{_node_key(node)}/bias_compensation"))
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
    old: int


def _plan_shape_edit(reshape: ir.Node, from_end: int, expected: int, what: str) -> _ShapeEdit | None:
    """Check the entry ``from_end`` places from the end is ``expected`` (edit) or -1 (nothing to do)."""
    entries = _shape_entries(reshape.inputs[1])
    if entries is None or len(entries) < from_end:
        raise _Skip(f"{what}: the shape of {_node_key(reshape)} cannot be read statically")
    pos = len(entries) - from_end
    entry = entries[pos]
    if entry == -1:
        return None
    if entry != expected:
        raise _Skip(f"{what}: {_node_key(reshape)} has {entry!r} where the head count {expected} was expected")
    pieces = _shape_pieces(reshape.inputs[1])
    offset = 0
    for value, ints in pieces:
        if offset <= pos < offset + len(ints):
            if value is None:
                raise _Skip(f"{what}: the head count in {_node_key(reshape)} is computed at run time")
            break
        offset += len(ints)
    return _ShapeEdit(reshape, pos, expected)


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
    clone = ir.node("Concat", inputs, {"axis": 0}, name=g.fresh(f"{_node_key(concat)}_pruned"))
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
        users = [n for n in _consumers(value) if not _is_std(n, "Shape")]
        if len(users) != 1:
            raise _Skip(f"{what}: {lin.output} is read by {len(users)} nodes, not only by a head-split Reshape")
        if _is_std(users[0], "Reshape") and users[0].inputs[0] is value:
            return users[0]
        if not _is_std(users[0], "Cast", "Identity"):
            break
        value = users[0].outputs[0]
    raise _Skip(f"{what}: no head-split Reshape after {lin.node}")


# --------------------------------------------------------------------------- groups


class _Group:
    """Units whose channels are the input channels of ``consumer``; subclasses know their producers."""

    kind = ""

    def __init__(self, layer: int, consumer: Linear, units: int, unit_size: int, unit_params: int):
        self.layer, self.consumer = layer, consumer
        self.units, self.unit_size, self.unit_params = units, unit_size, unit_params

    @property
    def label(self) -> str:
        return f"{self.layer}.{self.kind}"

    @property
    def consumer_name(self) -> str:
        return self.consumer.node

    def stat_requests(self, cfg: PruneConfig) -> list[StatsRequest]:
        """Calibration statistics the metric and the compensation need."""
        out = [StatsRequest(self.consumer.input, axis=-1, gram=cfg.refit)]
        if cfg.metric == "wanda":
            out += [StatsRequest(lin.input, axis=-1, gram=False) for lin in self.producer_linears()]
        return out

    def stats_for_apply(self, stats: dict):
        """What ``apply`` gets: the consumer input's statistics (None without calibration)."""
        return stats.get(self.consumer.input) if stats else None

    def channel_weights(self, g: _Graph) -> list[np.ndarray]:
        """Every weight the units own, channel-major [channels, fan]."""
        return [_in_major(self.consumer, _weight(g, self.consumer))] + [m for m, _ in self.producer_terms(g)]

    def producer_linears(self) -> list[Linear]:
        """Linears whose output channels are the units' channels (scored, and sliced by ``apply``)."""
        raise NotImplementedError

    def producer_terms(self, g: _Graph) -> list[tuple[np.ndarray, str]]:
        """(producer weight channel-major, name of the tensor it multiplies) pairs."""
        return [(_out_major(p, _weight(g, p)), p.input) for p in self.producer_linears()]

    def score(self, metric: str, g: _Graph, stats: dict, unit_size: int | None = None) -> np.ndarray:
        """Scores per unit (per channel with ``unit_size=1``)."""
        size = self.unit_size if unit_size is None else unit_size
        if metric in ("magnitude", "magnitude_l1"):
            return scoring.magnitude(self.channel_weights(g), size, p=1 if metric == "magnitude_l1" else 2)
        cons = _in_major(self.consumer, _weight(g, self.consumer))
        st = stats[self.consumer.input]
        if metric == "flap":
            return scoring.flap(cons, st.var, size)
        producers = [(m, np.sqrt(stats[name].sq_norm)) for m, name in self.producer_terms(g)]
        return scoring.wanda_sp((cons, np.sqrt(st.sq_norm)), producers, size)

    def apply(self, g: _Graph, keep_units: np.ndarray, stats, cfg: PruneConfig) -> dict:
        raise NotImplementedError

    def channels(self, keep_units: np.ndarray) -> np.ndarray:
        return (keep_units[:, None] * self.unit_size + np.arange(self.unit_size)).reshape(-1)


class _FFNGroup(_Group):
    kind = "ffn"

    def __init__(self, g: _Graph, block: FFNBlock):
        what = f"FFN {block.layer}"
        self.producers = _check_linears([block.up] + ([block.gate] if block.gate else []), what)
        _check_linears([block.down], what)
        hidden = block.hidden
        if any(p.out_features != hidden for p in self.producers) or block.down.in_features != hidden:
            raise _Skip(f"{what}: widths of up/gate/down disagree")
        self.region_consts = _ffn_region(g, self.producers, block.down, hidden, what)
        params = sum(_linear_params(p, True) for p in self.producers) + _linear_params(block.down, False)
        super().__init__(block.layer, block.down, hidden, 1, params)

    def producer_linears(self):
        return list(self.producers)

    def apply(self, g, keep_units, stats, cfg):
        for p in self.producers:
            _slice_outputs(g, p, keep_units)
        for node, idx in self.region_consts:
            arr = _const_array(node.inputs[idx])
            g.set_input(node, idx, arr[..., keep_units])
        return _shrink_consumer(g, self.consumer, keep_units, stats, cfg.compensate, cfg.refit, cfg.ridge)


def _ffn_region(g: _Graph, producers: list[Linear], down: Linear, hidden: int, what: str) -> list[tuple[ir.Node, int]]:
    """Check only element-wise ops lie between producers and down; return per-channel constants to slice."""
    down_node = g.node_of(down)
    stack = [g.values[p.output] for p in producers]
    seen: set[int] = set()
    consts: list[tuple[ir.Node, int]] = []
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if value.is_graph_output():
            raise _Skip(f"{what}: the intermediate {value.name} is a graph output")
        for node in _consumers(value):
            if node is down_node and node.inputs[0] is value:
                continue
            if not (node.domain in _STD and node.op_type in _ELEMENTWISE):
                raise _Skip(f"{what}: {node.op_type} node {_node_key(node)} reads the FFN intermediate")
            if id(node) in seen:
                continue
            seen.add(id(node))
            for k, inp in enumerate(node.inputs):
                arr = _const_array(inp)
                if arr is None:
                    continue
                if arr.size > 1 and arr.ndim >= 1 and arr.shape[-1] == hidden:
                    consts.append((node, k))
                elif arr.size > 1 and arr.shape[-1] != 1:
                    raise _Skip(f"{what}: constant {inp.name} of shape {list(arr.shape)} in the activation does not broadcast per channel")
            stack.extend(node.outputs)
    return consts


class _HeadGroup(_Group):
    kind = "heads"

    def __init__(self, g: _Graph, block: AttentionBlock, kv_groups: bool):
        what = f"attention {block.layer}"
        if block.op_type != "subgraph":
            raise _Skip(f"{what}: fused {block.op_type} ops are not pruned")
        q, k, v, o = _check_linears([block.q, block.k, block.v, block.o], what)
        heads, kv, hd = block.num_heads, block.num_kv_heads, block.head_dim
        if not heads or not kv or not hd or heads % kv or q.out_features != heads * hd or o.in_features != heads * hd:
            raise _Skip(f"{what}: head counts ({heads} heads, {kv} KV heads, head dim {hd}) do not match the projections")
        if k.out_features != kv * hd or v.out_features != kv * hd:
            raise _Skip(f"{what}: k/v widths do not match {kv} KV heads of {hd}")
        self.q, self.k, self.v, self.o = q, k, v, o
        self.heads, self.kv_heads, self.head_dim, self.rep = heads, kv, hd, heads // kv
        self.mha = kv == heads
        self.kv_groups = kv_groups and not self.mha
        self.edits = {"q": _plan_shape_edit(_split_reshape(g, q, what), 2, heads, what)}
        if self.mha or self.kv_groups:
            for name, lin in (("k", k), ("v", v)):
                self.edits[name] = _plan_shape_edit(_split_reshape(g, lin, what), 2, kv, what)
        merge = g.values[o.input].producer()
        if not _is_std(merge, "Reshape"):
            raise _Skip(f"{what}: the heads are not merged by a Reshape before {o.node}")
        self.edits["o"] = _plan_shape_edit(merge, 1, heads * hd, what)
        self.repeats = [] if self.mha else [_find_repeat(g, block, name, what) for name in ("k", "v")]
        per_head = hd * (_linear_params(q, True) + _linear_params(o, False))
        if self.mha:
            per_head += hd * (_linear_params(k, True) + _linear_params(v, True))
        if self.kv_groups:
            units, size = kv, self.rep * hd
            per_unit = self.rep * per_head + hd * (_linear_params(k, True) + _linear_params(v, True))
        else:
            units, size, per_unit = heads, hd, per_head
        super().__init__(block.layer, o, units, size, per_unit)

    def producer_linears(self):
        return [self.q] + ([self.k, self.v] if self.mha else [])

    def score(self, metric, g, stats, unit_size=None):
        if not self.kv_groups or unit_size == 1:
            return super().score(metric, g, stats, unit_size)
        # Group score = sum of its query heads' scores (q and o weights; k/v are not scored).
        per_head = super().score(metric, g, stats, self.head_dim)
        return per_head.reshape(self.kv_heads, self.rep).sum(axis=1)

    def apply(self, g, keep_units, stats, cfg):
        hd = self.head_dim
        if self.kv_groups:
            kv_keep = keep_units
            heads_keep = (kv_keep[:, None] * self.rep + np.arange(self.rep)).reshape(-1)
        else:
            heads_keep, kv_keep = keep_units, np.arange(self.kv_heads)
        q_ch = (heads_keep[:, None] * hd + np.arange(hd)).reshape(-1)
        _slice_outputs(g, self.q, q_ch)
        if self.mha:
            _slice_outputs(g, self.k, q_ch)
            _slice_outputs(g, self.v, q_ch)
        elif self.kv_groups:
            kv_ch = (kv_keep[:, None] * hd + np.arange(hd)).reshape(-1)
            _slice_outputs(g, self.k, kv_ch)
            _slice_outputs(g, self.v, kv_ch)
        new_heads = len(heads_keep)
        for name, edit in self.edits.items():
            if edit is None:
                continue
            new = new_heads * hd if name == "o" else (new_heads if name == "q" or self.mha else len(kv_keep))
            _apply_shape_edit(g, edit, new)
        new_kv = {int(old): i for i, old in enumerate(kv_keep)}
        indices = np.asarray([new_kv[int(h) // self.rep] for h in heads_keep], dtype=np.int64)
        for repeat in self.repeats:
            _replace_repeat(g, repeat, indices)
        done = _shrink_consumer(g, self.consumer, q_ch, stats, cfg.compensate, cfg.refit, cfg.ridge)
        done["heads_kept"] = [int(h) for h in heads_keep]
        return done


@dataclasses.dataclass
class _Repeat:
    source: ir.Value  # [B, kv_heads, S, D] before Unsqueeze
    axis: int  # the KV-head axis of ``source``
    reshape: ir.Node  # its output is [B, heads, S, D]


def _find_repeat(g: _Graph, block: AttentionBlock, which: str, what: str) -> _Repeat:
    """The repeat_kv Unsqueeze -> Expand -> Reshape on the K (or V) path of a GQA block."""
    lin = block.k if which == "k" else block.v
    matmul = g.nodes[block.score_matmul if which == "k" else block.context_matmul]
    stack, seen, expands = [matmul.inputs[1]], set(), []
    while stack and len(seen) < 80:
        value = stack.pop()
        if value is None or id(value) in seen or value.name == lin.output:
            continue
        seen.add(id(value))
        node = value.producer()
        if node is None or not _is_std(node, *_HEAD_PATH_OPS):
            continue
        if _is_std(node, "Expand"):
            expands.append(node)
        inputs = node.inputs[:1] if node.op_type in _DATA_ONLY else node.inputs
        stack.extend(v for v in inputs if v is not None and _const(v) is None)
    if len(expands) != 1:
        raise _Skip(f"{what}: GQA repeat of {which} heads is not one Unsqueeze -> Expand -> Reshape ({len(expands)} Expand ops found)")
    expand = expands[0]
    unsq = expand.inputs[0].producer()
    users = _consumers(expand.outputs[0])
    if not _is_std(unsq, "Unsqueeze") or len(users) != 1 or not _is_std(users[0], "Reshape"):
        raise _Skip(f"{what}: GQA repeat of {which} heads is not Unsqueeze -> Expand -> Reshape")
    axes = _const_array(unsq.inputs[1]) if len(unsq.inputs) > 1 else None
    if axes is None and "axes" in unsq.attributes:
        axes = np.asarray(unsq.attributes["axes"].value)
    if axes is None or axes.size != 1:
        raise _Skip(f"{what}: GQA repeat Unsqueeze has no single constant axis")
    axis = int(axes.reshape(-1)[0])
    rank = len(unsq.inputs[0].shape) if unsq.inputs[0].shape is not None else 4
    axis = axis + rank + 1 if axis < 0 else axis
    if axis < 1:
        raise _Skip(f"{what}: GQA repeat inserts its axis at position {axis}")
    return _Repeat(unsq.inputs[0], axis - 1, users[0])


def _replace_repeat(g: _Graph, repeat: _Repeat, indices: np.ndarray) -> None:
    """KV heads repeated and selected for the kept query heads in one Gather (old repeat ops become dead)."""
    idx = g.new_const(indices, "kv_heads_for_kept_query_heads")
    gather = ir.node("Gather", [repeat.source, idx], {"axis": repeat.axis}, name=g.fresh(f"{_node_key(repeat.reshape)}/kept_heads"))
    out = repeat.reshape.outputs[0]
    gather.outputs[0].name = g.fresh(f"{out.name}_kept_heads")
    gather.outputs[0].type = out.type
    g.graph.insert_before(repeat.reshape, gather)
    ir.convenience.replace_all_uses_with(out, gather.outputs[0])


# --------------------------------------------------------------------------- conv channel groups

_SLICED_ROLES = ("producer", "lockstep", "param", "consumer")


class _ConvGroup(_Group):
    """One channel dependency group: every tensor in it loses the same channels.

    Scores: magnitude over the producers' output filters, depthwise filters and consumers' input
    slices; wanda = sum |W_cons[:, c]| x ||x_c|| and flap = Var(x_c) x ||W_cons[:, c]||^2 over the
    consumers, with x the consumer's input per channel (axis 1, over batch and pixels).
    Bias compensation adds ``sum_{c pruned} mean(x_c) x sum_kernel W[:, c]`` to each consumer's
    bias.  That is exact for 1x1 convs and Gemm/MatMul after pooling; for a k x k consumer with
    zero padding it is approximate at the borders, where some taps read padding, not mean(x_c).
    Refit is not done for conv groups.
    """

    kind = "conv"

    def __init__(self, g: _Graph, cg: ChannelGroup, index: int):
        self.cg = cg
        self.sliced = [m for m in cg.members if m.role in _SLICED_ROLES]
        self.inputs = list(dict.fromkeys((m.node, m.tensor) for m in cg.members if m.role == "consumer_input"))
        params = 0
        for m in self.sliced:
            arr = _const_array(g.nodes[m.node].inputs[m.index])
            if arr is None:
                raise _Skip(f"conv group {cg.name}: {m.tensor} is not a constant")
            if arr.shape[m.axis] != cg.channels:
                raise _Skip(f"conv group {cg.name}: {m.tensor} has {arr.shape[m.axis]} channels on axis {m.axis}, not {cg.channels}")
            params += arr.size // cg.channels
        self.units, self.unit_size, self.unit_params, self.layer = cg.channels, 1, params, index
        self.consumer = None

    @property
    def label(self) -> str:
        return self.cg.name

    @property
    def consumer_name(self) -> str:
        return ", ".join(self.cg.consumers)

    def producer_linears(self):
        return []

    def stat_requests(self, cfg):
        return [StatsRequest(tensor, axis=1, gram=False) for _, tensor in self.inputs]

    def stats_for_apply(self, stats):
        return {t: stats[t] for _, t in self.inputs if t in stats} if stats else {}

    def _matrix(self, g: _Graph, m) -> np.ndarray:
        """The member's weight channel-major: [channels, everything else]."""
        arr = _const_array(g.nodes[m.node].inputs[m.index])
        return np.moveaxis(arr, m.axis, 0).reshape(self.cg.channels, -1)

    def _consumer_terms(self, g: _Graph) -> list[tuple[np.ndarray, str]]:
        """(consumer weight channel-major, the tensor it reads) for every consumer."""
        tensors = dict(self.inputs)
        return [(self._matrix(g, m), tensors[m.node]) for m in self.sliced if m.role == "consumer"]

    def score(self, metric, g, stats, unit_size=None):
        if metric in ("magnitude", "magnitude_l1"):
            weights = [self._matrix(g, m) for m in self.sliced if m.role != "param" and m.index == 1]
            return scoring.magnitude(weights, 1, p=1 if metric == "magnitude_l1" else 2)
        total = np.zeros(self.cg.channels)
        for w, tensor in self._consumer_terms(g):
            st = stats[tensor]
            if metric == "flap":
                total += scoring.flap(w, st.var)
            else:
                total += scoring.wanda_sp((w, np.sqrt(st.sq_norm)))
        return total

    def apply(self, g, keep_units, stats, cfg):
        keep = np.asarray(keep_units, dtype=np.int64)
        pruned = np.setdiff1d(np.arange(self.cg.channels), keep)
        done: dict[str, Any] = {}
        if cfg.compensate and stats:
            done["compensated"] = [name for name, tensor in self.inputs if tensor in stats and _compensate(g, name, pruned, stats[tensor].mean[pruned])]
        for m in self.sliced:
            node = g.nodes[m.node]
            g.set_input(node, m.index, np.take(_const_array(node.inputs[m.index]), keep, axis=m.axis))
        for m in self.cg.members:
            if m.role == "shape":
                node = g.nodes[m.node]
                shape = _const_array(node.inputs[m.index]).copy()
                shape[m.axis] = len(keep)
                g.set_input(node, m.index, shape)
        for name in self.cg.lockstep:
            g.nodes[name].attributes["group"] = ir.AttrInt64("group", len(keep))
        done["channels_kept"] = len(keep)
        return done


def _compensate(g: _Graph, name: str, pruned: np.ndarray, mean: np.ndarray) -> bool:
    """Fold the pruned channels' mean contribution into consumer ``name``'s bias; False if it has no bias slot."""
    node = g.nodes[name]
    w = _const_array(node.inputs[1]).astype(np.float64)
    if node.op_type == "Conv":
        delta = w[:, pruned].reshape(w.shape[0], len(pruned), -1).sum(axis=2) @ mean
        slot, scale = 2, 1.0
    elif node.op_type == "Gemm":
        rows = w[:, pruned].T if node.attributes.get("transB") and node.attributes["transB"].value else w[pruned]
        alpha = node.attributes["alpha"].value if "alpha" in node.attributes else 1.0
        beta = node.attributes["beta"].value if "beta" in node.attributes else 1.0
        delta, slot, scale = alpha * (mean @ rows), 2, 1.0 / beta
    else:
        return False  # MatMul: no bias input to fold into
    dtype = _const_array(node.inputs[1]).dtype
    bias_value = node.inputs[slot] if len(node.inputs) > slot else None
    bias = _const_array(bias_value)
    if bias_value is not None and bias is None:
        return False
    new = (np.zeros(delta.shape) if bias is None else bias.astype(np.float64)) + delta * scale
    if bias is None:
        while len(node.inputs) < slot:
            node.resize_inputs(len(node.inputs) + 1)
        node.resize_inputs(slot + 1)
        node.replace_input_with(slot, g.new_const(new.astype(dtype), f"{node.inputs[1].name}_bias"))
    else:
        g.set_input(node, slot, new.astype(bias.dtype))
    return True


def _conv_groups(g: _Graph, allow_residual: bool, first_index: int) -> tuple[list[_Group], list[dict]]:
    """Prunable conv channel groups as ``_ConvGroup``s, and a record for each group left out."""
    groups: list[_Group] = []
    skipped: list[dict] = []
    for i, cg in enumerate(channel_groups(g.model, allow_residual=allow_residual)):
        index = first_index + i
        why = cg.reason
        if cg.prunable:
            try:
                groups.append(_ConvGroup(g, cg, index))
                continue
            except _Skip as exc:
                why = str(exc)
        (logger.info if cg.residual else logger.warning)("prune: keeping conv group %s: %s", cg.name, why)
        skipped.append({"layer": cg.name, "index": index, "kind": "conv", "skipped": why, "kept_fraction": 1.0})
    return groups, skipped


# --------------------------------------------------------------------------- the pass


@dataclasses.dataclass
class _Decision:
    group: _Group
    scores: np.ndarray
    keep: np.ndarray


class StructuredPruningPass(EdgePass):
    """Remove the least important FFN neurons, attention heads and conv channels until ``ratio`` of their parameters is gone."""

    name = "prune"
    Config = PruneConfig

    def relaxed(self) -> StructuredPruningPass | None:
        ratio = round(self.config.ratio * 0.75, 4)
        if ratio < 0.01:
            return None
        return StructuredPruningPass(dataclasses.replace(self.config, ratio=ratio), self.context)

    def call(self, model: ir.Model) -> EdgePassResult:
        cfg = self.config
        if cfg.ratio == 0:
            return EdgePassResult(model, modified=False, summary={"ratio": 0.0, "note": "ratio 0: nothing pruned"})
        g = _Graph(model)
        groups, records = self._groups(g, analyze(model))
        if not groups:
            if not records:
                raise UnsupportedModelError(_nothing_prunable(model, cfg))
            return EdgePassResult(model, modified=False, records=records, summary=self._summary(model, model, [], records, "none"))
        stats, compensation = self._stats(model, groups)
        decisions = []
        scored = []
        for group in groups:
            scores = group.score(cfg.metric, g, stats)
            channels = group.score(cfg.metric, g, stats, unit_size=1) if group.unit_size > 1 else None
            rounding = cfg.round_to if group.kind in ("ffn", "conv") else 1
            scored.append(alloc.GroupScores(group.label, group.kind, scores, group.unit_params, rounding, channels))
        keeps = alloc.allocate(scored, cfg.ratio, cfg.allocation, min_keep_fraction=cfg.min_keep_fraction)
        params_before = param_count(model)
        for group, gs, keep in zip(groups, scored, keeps):
            decisions.append(_Decision(group, gs.scores, keep))
        modified = False
        for d in decisions:
            record = _record(d)
            if len(d.keep) < d.group.units:
                done = d.group.apply(g, d.keep, d.group.stats_for_apply(stats), cfg)
                record.update({k: v for k, v in done.items()})
                modified = True
            records.append(record)
        if modified:
            _clear_intermediate_shapes(model)
        records.sort(key=lambda r: (r.get("index", -1), r["kind"]))
        summary = self._summary(model, None, decisions, records, compensation, params_before)
        logger.info("prune: %s -> %s params (%.1f%% of prunable removed)", summary["params_before"], summary["params_after"], 100 * summary["removed_share"])
        return EdgePassResult(model, modified=modified, records=records, summary=summary)

    # ---- pieces

    def _groups(self, g: _Graph, structures) -> tuple[list[_Group], list[dict]]:
        groups: list[_Group] = []
        skipped: list[dict] = []
        kinds = self.config.unit_kinds
        candidates: list[tuple[str, int, Any]] = []
        if "ffn" in kinds:
            candidates += [("ffn", b.layer, lambda b=b: _FFNGroup(g, b)) for b in structures.ffn_blocks]
        if "heads" in kinds:
            candidates += [("heads", b.layer, lambda b=b: _HeadGroup(g, b, self.config.kv_groups)) for b in structures.attention_blocks]
        for kind, layer, make in candidates:
            try:
                groups.append(make())
            except _Skip as why:
                logger.warning("prune: skipping %s", why)
                skipped.append({"layer": f"{layer}.{kind}", "index": layer, "kind": kind, "skipped": str(why), "kept_fraction": 1.0})
        if "conv" in kinds:
            conv_groups, conv_skipped = _conv_groups(g, self.config.conv_residual, first_index=len(structures.ffn_blocks) + len(structures.attention_blocks))
            groups += conv_groups
            skipped += conv_skipped
        return groups, skipped

    def _stats(self, model: ir.Model, groups: list[_Group]) -> tuple[dict, str]:
        cfg = self.config
        needs = cfg.metric in scoring.NEEDS_STATS
        wants = cfg.compensate or cfg.refit
        if self.context is None:
            if needs:
                raise BadInputError(
                    f"prune metric {cfg.metric!r} needs calibration data: pass calibration samples (--calib) or use metric = 'magnitude'."
                )
            return {}, "skipped: no calibration data" if wants else "none"
        if not needs and not wants:
            return {}, "none"
        requests: dict[str, StatsRequest] = {}
        for group in groups:
            for request in group.stat_requests(cfg):
                old = requests.get(request.tensor)
                if old is None or (request.gram and not old.gram):
                    requests[request.tensor] = request
        stats = self.context.stats(model, list(requests.values()))
        parts = (["bias"] if cfg.compensate else []) + (["refit"] if cfg.refit else [])
        return stats, "+".join(parts) or "none"

    def _summary(self, model, same, decisions, records, compensation, params_before=None) -> dict:
        cfg = self.config
        prunable = sum(d.group.units * d.group.unit_params for d in decisions)
        removed = sum((d.group.units - len(d.keep)) * d.group.unit_params for d in decisions)
        after = param_count(model)
        before = params_before if params_before is not None else after
        return {
            "ratio": cfg.ratio,
            "metric": cfg.metric,
            "allocation": cfg.allocation,
            "units": list(cfg.unit_kinds),
            "round_to": cfg.round_to,
            "compensation": compensation,
            "params_before": before,
            "params_after": after,
            "prunable_params": prunable,
            "removed_params": removed,
            "removed_share": removed / prunable if prunable else 0.0,
            "removed_share_of_model": (before - after) / before if before else 0.0,
            "groups": len(decisions),
            "skipped": [r for r in records if "skipped" in r],
            "per_layer_chart": {"y": "kept_fraction", "ylabel": "kept fraction"},
        }


def _record(d: _Decision) -> dict:
    s = np.asarray(d.scores, dtype=np.float64)
    g = d.group
    return {
        "layer": g.label,
        "index": g.layer,
        "kind": g.kind,
        "units_before": g.units,
        "units_after": int(len(d.keep)),
        "removed": int(g.units - len(d.keep)),
        "kept_fraction": len(d.keep) / g.units,
        "unit_params": g.unit_params,
        "score_mean": float(s.mean()),
        "score_min": float(s.min()),
        "score_max": float(s.max()),
        "consumer": g.consumer_name,
    }


def _nothing_prunable(model: ir.Model, cfg: PruneConfig) -> str:
    ops = sorted({n.op_type for n in model.graph})
    return (
        f"prune found no {' or '.join(cfg.unit_kinds)} to prune (no FFN block of constant-weight MatMul/Gemm "
        f"around an activation, no Softmax attention with q/k/v/o projections, no Conv with a constant weight; the model's ops are "
        f"{', '.join(ops[:20])}{'...' if len(ops) > 20 else ''}): remove the prune pass from the recipe for this model."
    )


def _clear_intermediate_shapes(model: ir.Model) -> None:
    """Widths changed: drop inferred shapes of intermediate values (types stay); cleanup infers them again."""
    for node in model.graph:
        for out in node.outputs:
            if not out.is_graph_output():
                out.shape = None
