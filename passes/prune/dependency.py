"""Channel dependency groups of conv nets: which (tensor, axis) pairs must be pruned together.

Each Conv (``group == 1``) with a constant weight starts a group at its output channel axis.
The channels are followed forward through a table of per-op rules (one small handler per op
type, as onnxscript registers per-op handlers); a rule either

- passes the channels through (BatchNormalization, activations, Clip/ReLU6, pooling, Pad with
  no channel padding, Mul/Add/Sub/Div with a scalar or per-channel constant, which is sliced),
- moves them in lockstep (a depthwise Conv, ``group == channels``: its filters, bias and
  ``group`` attribute shrink with the group, and its output carries the same channels),
- maps them onto a consumer's input axis (Conv weight axis 1; Gemm/MatMul rows after
  GlobalAveragePool + Flatten/Reshape/Squeeze, where channel c becomes feature c),
- joins groups (an element-wise op of two computed tensors: both sides carry the same
  channels; a residual Add/Sub couples the two branches and is marked ``residual``,
  excluded by default because it fixes the width of the whole residual stream),
- maps them to other positions (index maps): Concat on the channel axis puts each input's
  channels at an offset of the output, whose consumers then see a merged index space (one
  member per input piece); Split with constant (or equal) sizes and Slice with constant
  bounds and step 1 hand each output the part of the input range it covers,
- or stops: the group is marked unprunable with a reason naming the op (anything the table
  does not know, a graph output, a grouped Conv, Gather or a Split/Slice with computed sizes).

A group reaches a tensor as a ``Span``: its channels ``start .. start+length`` sit at positions
``offset .. offset+length`` of the tensor's channel axis, which is ``width`` wide.  Every member
records that span, so pruning keeps the other positions of a shared tensor (a Concat's consumer)
and Split sizes / Slice bounds are rewritten from the removed positions they cover.
The channel axis is kept as a position counted from the end (-3 for NCHW images), so it stays
right through broadcasting and through the rank change of Flatten.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import onnx_ir as ir

from edgeprune.analysis.graph import attr, constant, is_std, node_name, static_ints

#: One-input ops that keep the channel axis where it is (data input 0, extra inputs must be scalars).
_PASS_THROUGH = {
    "Relu", "Sigmoid", "HardSwish", "HardSigmoid", "LeakyRelu", "Tanh", "Identity", "Cast", "Elu", "Selu",
    "Celu", "Softplus", "Softsign", "Gelu", "Erf", "Abs", "Neg", "Exp", "Sqrt", "Mish", "Dropout",
    "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "Clip", "ThresholdedRelu",
}  # fmt: skip
_BINARY = {"Add", "Sub", "Mul", "Div", "Min", "Max", "PRelu"}
_RESIDUAL = {"Add", "Sub"}
_SPATIAL_POOLS = {"GlobalAveragePool", "GlobalMaxPool"}


@dataclasses.dataclass(frozen=True)
class Member:
    """One (tensor, axis) pair of a group: ``io``/``index`` say which slot of ``node`` holds ``tensor``."""

    node: str
    io: str  # "input" or "output"
    index: int
    axis: int  # the channel axis within ``tensor`` (weights: non-negative; activations: from the end)
    role: str  # producer | lockstep | param | consumer | consumer_input | activation | shape | split | slice (see ``Span``)
    tensor: str
    offset: int = 0  # first position of the group's piece on ``axis`` of ``tensor``
    length: int = 0  # how many positions the piece covers
    start: int = 0  # the group channel at ``offset``
    width: int = 0  # size of ``axis`` in the unpruned tensor
    # shape: entry ``axis`` of the shape constant is the width; split: ``index`` is the Split
    # output the piece lands in; slice: ``axis`` is the entry of starts/ends (the piece is on the input).

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ChannelGroup:
    """Channels that must be pruned together: their producers' outputs and every tensor they reach."""

    name: str
    channels: int
    members: list[Member]
    producers: list[str]  # convs whose output channels these are
    consumers: list[str]  # convs / Gemm / MatMul that read them as input channels
    lockstep: list[str]  # depthwise convs that move with them
    prunable: bool
    reason: str  # why not prunable ("" when prunable)
    residual: bool = False

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["members"] = [m.to_dict() for m in self.members]
        return d

    def summary(self) -> str:
        state = "prunable" if self.prunable else f"kept: {self.reason}"
        return (
            f"{self.name}: {self.channels} channels, {len(self.producers)} producer(s), "
            f"{len(self.lockstep)} depthwise, {len(self.consumers)} consumer(s); {state}"
        )


# --------------------------------------------------------------------------- propagation state


@dataclasses.dataclass(frozen=True)
class Span:
    """Where a group's channels sit on a tensor: group channels ``start..start+length`` at ``offset..``; axis ``width`` wide."""

    start: int
    offset: int
    length: int
    width: int
    rank: int  # rank of the tensor (to read non-negative axis attributes)

    def moved(self, **changes) -> Span:
        return dataclasses.replace(self, **changes)

    def member(self, node: ir.Node, io: str, index: int, axis: int, role: str, tensor: ir.Value | None, width: int | None = None) -> Member:
        name = tensor.name if tensor is not None else ""
        return Member(node_name(node), io, index, axis, role, name or "", self.offset, self.length, self.start, self.width if width is None else width)


class _State:
    """Union-find over group ids, with what each id collected on its way."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.channels: list[int] = []
        self.members: list[list[Member]] = []
        self.blocks: list[list[str]] = []
        self.residual: list[list[str]] = []
        self.pieces: dict[int, list[tuple[int, int, Span]]] = {}  # id(value) -> [(group id, axis from end, span)]
        self.queue: list[tuple[ir.Value, int, int, Span]] = []
        self.joins: list[tuple[ir.Node, int]] = []
        self.concats: dict[int, ir.Node] = {}  # waiting until every input's pieces are known

    def new(self, channels: int) -> int:
        gid = len(self.parent)
        self.parent.append(gid)
        self.channels.append(channels)
        self.members.append([])
        self.blocks.append([])
        self.residual.append([])
        return gid

    def find(self, gid: int) -> int:
        while self.parent[gid] != gid:
            self.parent[gid] = self.parent[self.parent[gid]]
            gid = self.parent[gid]
        return gid

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
        return ra

    def add(self, gid: int, member: Member) -> None:
        self.members[gid].append(member)

    def block(self, gid: int, reason: str) -> None:
        self.blocks[gid].append(reason)

    def reach(self, value: ir.Value, gid: int, axis: int, node: ir.Node | None, index: int, span: Span) -> None:
        """``value`` carries group ``gid``'s channels at ``axis`` (from the end), placed as ``span``; follow it later."""
        pieces = self.pieces.setdefault(id(value), [])
        for g, a, old in pieces:
            if a != axis:
                self.block(gid, f"tensor {value.name} carries the channels on two different axes")
                self.union(g, gid)
                return
            if (old.offset, old.length) == (span.offset, span.length):
                if old.start != span.start:
                    self.block(gid, f"tensor {value.name} joins channels from different positions of one group")
                self.union(g, gid)
                return
            if old.offset < span.offset + span.length and span.offset < old.offset + old.length:
                self.block(gid, f"tensor {value.name} carries overlapping channel ranges")
                self.union(g, gid)
                return
        pieces.append((gid, axis, span))
        if node is not None:
            self.add(gid, span.member(node, "output", index, axis, "activation", value))
        self.queue.append((value, gid, axis, span))


_Handler = Callable[[_State, ir.Node, int, int, int, Span], None]
"""(state, consuming node, input index the channels arrive at, group id, axis from end, where they sit)."""


# --------------------------------------------------------------------------- helpers


def _weight(node: ir.Node, index: int) -> np.ndarray | None:
    value = node.inputs[index] if len(node.inputs) > index else None
    tensor = constant(value)
    return None if tensor is None else tensor.numpy()


def _conv_groups_attr(node: ir.Node) -> int:
    return int(attr(node, "group", 1))


def _weight_members(node: ir.Node, role: str, span: Span, with_bias: bool) -> list[Member]:
    out = [span.member(node, "input", 1, 0, role, node.inputs[1])]
    if with_bias and len(node.inputs) > 2 and node.inputs[2] is not None:
        out.append(span.member(node, "input", 2, 0, role, node.inputs[2]))
    return out


def _const_channel_axis(shape: tuple[int, ...], axis: int, channels: int) -> int | None | str:
    """Where a broadcast constant of ``shape`` meets channel axis ``axis`` (from the end).

    None: it does not reach the channel axis or has size 1 there (nothing to slice);
    an int: slice that axis; "bad": it has a size other than 1 or ``channels`` there.
    """
    if len(shape) < -axis:
        return None
    pos = len(shape) + axis
    if shape[pos] == 1:
        return None
    return pos if shape[pos] == channels else "bad"


def _spatially_one(value: ir.Value, axis: int) -> bool:
    """True when every axis after the channel axis has size 1 (e.g. after GlobalAveragePool)."""
    if value.shape is not None and len(value.shape) >= -axis:
        tail = list(value.shape)[len(value.shape) + axis + 1 :]
        if all(d == 1 for d in tail):
            return True
    node = value.producer()
    while node is not None and node.op_type in _PASS_THROUGH - _SPATIAL_POOLS and node.domain in ("", "ai.onnx"):
        node = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
    if node is not None and is_std(node, "ReduceMean", "ReduceMax") and value.shape is None:
        return True  # _reduce only lets spatial reductions through
    return node is not None and is_std(node, *_SPATIAL_POOLS)


def _on_channel_axis(node: ir.Node, axis: int, span: Span, default: int = 0) -> bool:
    """Whether ``node``'s ``axis`` attribute names the channel axis (``axis`` counted from the end)."""
    a = int(attr(node, "axis", default))
    return a == axis or a == span.rank + axis


def split_sizes(node: ir.Node, width: int | None) -> list[int] | None:
    """A Split's sizes: its constant ``split`` input or attribute, else equal parts of ``width``; None if unknown."""
    sizes = _weight(node, 1) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if sizes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        return None  # computed sizes
    if sizes is None and "split" in node.attributes:
        sizes = np.asarray(attr(node, "split"))
    if sizes is not None:
        return [int(x) for x in np.asarray(sizes).reshape(-1)]
    parts = len(node.outputs)
    if width is None or width % parts:
        return None
    return [width // parts] * parts


def slice_bounds(node: ir.Node, axis: int, rank: int) -> tuple[int, int, int] | str:
    """(entry, start, end) of a Slice on channel axis ``axis`` (from the end), or why it cannot be read.

    ``entry`` indexes starts/ends; ``end`` may exceed the width (a clamp such as INT64_MAX).
    """
    arrays = [_weight(node, k) if len(node.inputs) > k and node.inputs[k] is not None else None for k in range(1, 5)]
    starts, ends, axes, steps = arrays
    if starts is None or ends is None or any(
        len(node.inputs) > k and node.inputs[k] is not None and a is None for k, a in zip((3, 4), (axes, steps))
    ):
        return "computed starts, ends, axes or steps"
    axes = np.arange(len(starts)) if axes is None else axes.reshape(-1)
    hits = [k for k, a in enumerate(axes) if int(a) == axis or int(a) == rank + axis]
    if not hits:
        return ""  # does not slice the channel axis
    k = hits[0]
    if steps is not None and int(steps.reshape(-1)[k]) != 1:
        return "a step other than 1 on the channel axis"
    start, end = int(starts.reshape(-1)[k]), int(ends.reshape(-1)[k])
    if start < 0 or end < 0:
        return "negative bounds on the channel axis"
    return k, start, end


# --------------------------------------------------------------------------- per-op handlers


def _pass_through(st: _State, node: ir.Node, index: int, gid: int, axis: int, span: Span) -> None:
    if index != 0:
        st.block(gid, f"{node.op_type} node {node_name(node)} reads the channels as a parameter")
        return
    for k, extra in enumerate(node.inputs[1:], start=1):
        arr = _weight(node, k)
        if extra is not None and (arr is None or arr.size != 1):
            st.block(gid, f"{node.op_type} node {node_name(node)} has a non-scalar or computed input {extra.name}")
            return
    st.reach(node.outputs[0], gid, axis, node, 0, span)


def _batchnorm(st: _State, node: ir.Node, index: int, gid: int, axis: int, span: Span) -> None:
    if index != 0:
        st.block(gid, f"BatchNormalization node {node_name(node)} reads the channels as a parameter")
        return
    name = node_name(node)
    for k in range(1, 5):
        if _weight(node, k) is None:
            st.block(gid, f"BatchNormalization node {name} has computed statistics ({node.inputs[k].name})")
            return
        st.add(gid, span.member(node, "input", k, 0, "param", node.inputs[k]))
    st.reach(node.outputs[0], gid, axis, node, 0, span)


def _binary(st: _State, node: ir.Node, index: int, gid: int, axis: int, span: Span) -> None:
    name = node_name(node)
    rank = span.rank
    for k, other in enumerate(node.inputs):
        if k == index or other is None:
            continue
        arr = _weight(node, k)
        if arr is None:
            st.joins.append((node, gid))  # resolved once every group has been followed
            continue
        rank = max(rank, arr.ndim)
        pos = _const_channel_axis(arr.shape, axis, span.width)
        if pos == "bad":
            st.block(gid, f"constant {other.name} of shape {list(arr.shape)} in {node.op_type} node {name} does not broadcast per channel")
            return
        if pos is not None:
            st.add(gid, span.member(node, "input", k, int(pos), "param", other))
    st.reach(node.outputs[0], gid, axis, node, 0, span.moved(rank=rank))


def _conv(st: _State, node: ir.Node, index: int, gid: int, axis: int, span: Span) -> None:
    name = node_name(node)
    w = _weight(node, 1)
    if index != 0 or w is None:
        st.block(gid, f"Conv node {name} reads the channels as its weight or has a computed weight")
        return
    groups = _conv_groups_attr(node)
    if groups == 1:
        st.add(gid, span.member(node, "input", 1, 1, "consumer", node.inputs[1]))
        st.add(gid, span.member(node, "input", 0, 1, "consumer_input", node.inputs[0]))
        return
    if groups == span.width and w.shape[0] == span.width and w.shape[1] == 1:
        for m in _weight_members(node, "lockstep", span, True):
            st.add(gid, m)
        st.reach(node.outputs[0], gid, axis, node, 0, span)
        return
    st.block(gid, f"grouped Conv node {name} (group={groups}, {w.shape[0]} filters) mixes channels in groups")


def _linear(st: _State, node: ir.Node, index: int, gid: int, axis: int, span: Span) -> None:
    name = node_name(node)
    w = _weight(node, 1)
    if index != 0 or w is None or w.ndim != 2 or axis != -1:
        st.block(gid, f"{node.op_type} node {name} does not read the channels as the rows of a constant weight")
        return
    if node.op_type == "Gemm" and int(attr(node, "transA", 0)):
        st.block(gid, f"Gemm node {name} transposes its input (transA)")
        return
    w_axis = 1 if node.op_type == "Gemm" and int(attr(node, "transB", 0)) else 0
    st.add(gid, span.member(node, "input", 1, w_axis, "consumer", node.inputs[1]))
    st.add(gid, span.member(node, "input", 0, 1, "consumer_input", node.inputs[0]))


def _pad(st: _State, node: ir.Node, index: int, gid: int, axis: int, span: Span) -> None:
    name = node_name(node)
    pads = _weight(node, 1) if len(node.inputs) > 1 else None
    if pads is None and "pads" in node.attributes:
        pads = np.asarray(attr(node, "pads"))
    if index != 0 or pads is None or len(node.inputs) > 3 and node.inputs[3] is not None:
        st.block(gid, f"Pad node {name} has computed pads or axes (run cleanup/constant folding first)")
        return
    rank = len(pads) // 2
    pos = rank + axis
    if pos < 0 or pads[pos] != 0 or pads[rank + pos] != 0:
        st.block(gid, f"Pad node {name} pads the channel axis")
        return
    st.reach(node.outputs[0], gid, axis, node, 0, span)


def _to_features(st: _State, node: ir.Node, index: int, gid: int, axis: int, span: Span) -> None:
    """Flatten / Reshape / Squeeze of a [N, C, 1, 1] tensor into [N, C]: channel c becomes feature c."""
    name, value = node_name(node), node.inputs[0]
    if index != 0 or not _spatially_one(value, axis):
        st.block(gid, f"{node.op_type} node {name} reshapes channels that still have a spatial extent")
        return
    ok = False
    if node.op_type == "Flatten":
        ok = int(attr(node, "axis", 1)) == 1  # conv tensors are [N, C, spatial...]: C lands at feature axis 1
    elif node.op_type == "Reshape":
        entries = static_ints(node.inputs[1])
        ok = entries is not None and len(entries) == 2 and entries[1] in (-1, span.width)
        if ok and entries[1] != -1:
            if _weight(node, 1) is None:
                st.block(gid, f"Reshape node {name} spells the channel count inside a computed shape")
                return
            st.add(gid, span.member(node, "input", 1, 1, "shape", node.inputs[1]))  # entry 1 := new width
    elif node.op_type == "Squeeze":
        axes = _weight(node, 1) if len(node.inputs) > 1 else None
        rank = len(value.shape) if value.shape is not None else None
        ok = axes is not None and rank is not None and all(int(a) % rank > rank + axis for a in axes.reshape(-1))
        ok = ok and len(axes.reshape(-1)) == -axis - 1
    if not ok:
        st.block(gid, f"{node.op_type} node {name} does not map the channels onto features one to one")
        return
    st.reach(node.outputs[0], gid, -1, node, 0, span.moved(rank=2))


def _reduce(st: _State, node: ir.Node, index: int, gid: int, axis: int, span: Span) -> None:
    """ReduceMean/ReduceMax over spatial axes only (global pooling written as a reduction)."""
    name, value = node_name(node), node.inputs[0]
    axes = _weight(node, 1) if len(node.inputs) > 1 else None
    if axes is None and "axes" in node.attributes:
        axes = np.asarray(attr(node, "axes"))
    rank = len(value.shape) if value.shape is not None else None
    if index != 0 or axes is None or rank is None:
        st.block(gid, f"{node.op_type} node {name} reduces over axes that cannot be read statically")
        return
    axes = sorted(int(a) % rank for a in axes.reshape(-1))
    channel = rank + axis
    if any(a <= channel for a in axes):
        st.block(gid, f"{node.op_type} node {name} reduces over the channel or batch axis")
        return
    keep = int(attr(node, "keepdims", 1))
    out_axis = axis if keep else axis + len(axes)
    st.reach(node.outputs[0], gid, out_axis, node, 0, span.moved(rank=rank if keep else rank - len(axes)))


def _shape_only(st: _State, node: ir.Node, index: int, gid: int, axis: int, span: Span) -> None:
    """Shape reads sizes only; whatever it computes sees the new width at run time."""


def _concat(st: _State, node: ir.Node, index: int, gid: int, axis: int, span: Span) -> None:
    """Wait for every input: the output's offsets need all the widths before this input (``_resolve_concats``)."""
    if not _on_channel_axis(node, axis, span):
        st.block(gid, f"Concat node {node_name(node)} joins tensors on an axis other than the channels")
        return
    st.concats.setdefault(id(node), node)


def _split(st: _State, node: ir.Node, index: int, gid: int, axis: int, span: Span) -> None:
    """Output i carries the input positions ``s_i .. s_i + n_i``: the group's part there moves along; sizes are rewritten."""
    name = node_name(node)
    if index != 0 or not _on_channel_axis(node, axis, span):
        st.block(gid, f"Split node {name} splits an axis other than the channels or reads them as its sizes")
        return
    sizes = split_sizes(node, span.width)
    if sizes is None or sum(sizes) != span.width or len(sizes) != len(node.outputs):
        st.block(gid, f"Split node {name} has computed sizes or sizes that do not add up to {span.width} channels")
        return
    lo_out = 0
    for i, (n, out) in enumerate(zip(sizes, node.outputs)):
        lo, hi = max(span.offset, lo_out), min(span.offset + span.length, lo_out + n)
        if lo < hi:
            piece = span.moved(start=span.start + lo - span.offset, offset=lo - lo_out, length=hi - lo, width=n)
            st.add(gid, piece.member(node, "output", i, axis, "split", out))
            st.reach(out, gid, axis, node, i, piece)
        lo_out += n


def _slice(st: _State, node: ir.Node, index: int, gid: int, axis: int, span: Span) -> None:
    """The output keeps input positions ``start .. end``; the bounds move by the pruned channels before them."""
    name = node_name(node)
    if index != 0:
        st.block(gid, f"Slice node {name} reads the channels as its bounds")
        return
    bounds = slice_bounds(node, axis, span.rank)
    if isinstance(bounds, str) and bounds:
        st.block(gid, f"Slice node {name} has {bounds}")
        return
    if bounds == "":
        st.reach(node.outputs[0], gid, axis, node, 0, span)  # slices other axes only
        return
    entry, begin, end = bounds
    end = min(end, span.width)
    if begin < span.offset + span.length:
        st.add(gid, span.member(node, "input", 0, entry, "slice", node.inputs[0]))  # bounds after the piece move
    lo, hi = max(span.offset, begin), min(span.offset + span.length, end)
    if lo < hi:
        piece = span.moved(start=span.start + lo - span.offset, offset=lo - begin, length=hi - lo, width=max(end - begin, 0))
        st.reach(node.outputs[0], gid, axis, node, 0, piece)


def _gather(st: _State, node: ir.Node, index: int, gid: int, axis: int, span: Span) -> None:
    name = node_name(node)
    if index == 0 and _on_channel_axis(node, axis, span):
        st.block(gid, f"Gather node {name} selects channels by index (channel permutations are not supported yet)")
        return
    st.block(gid, f"Gather node {name} reads the channels and has no pruning rule for that use")


HANDLERS: dict[str, _Handler] = {
    **{op: _pass_through for op in _PASS_THROUGH},
    **{op: _binary for op in _BINARY},
    "BatchNormalization": _batchnorm,
    "Conv": _conv,
    "Gemm": _linear,
    "MatMul": _linear,
    "Pad": _pad,
    "Flatten": _to_features,
    "Reshape": _to_features,
    "Squeeze": _to_features,
    "Shape": _shape_only,
    "ReduceMean": _reduce,
    "ReduceMax": _reduce,
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Gather": _gather,
}
"""The rule table: op type (default ONNX domain) -> how the channels cross it."""


# --------------------------------------------------------------------------- driver


def _start(st: _State, node: ir.Node) -> None:
    w = _weight(node, 1)
    if w is None or w.ndim < 3 or node.inputs[0] is None:
        return
    groups = _conv_groups_attr(node)
    if groups > 1 and w.shape[1] == 1 and w.shape[0] == groups:
        return  # depthwise: moves in lockstep with its input's group
    channels = int(w.shape[0])
    gid = st.new(channels)
    span = Span(start=0, offset=0, length=channels, width=channels, rank=w.ndim)  # output rank = weight rank
    for m in _weight_members(node, "producer", span, True):
        st.add(gid, m)
    if groups > 1:
        st.block(gid, f"grouped Conv node {node_name(node)} (group={groups}) produces channels in groups")
    st.reach(node.outputs[0], gid, -(w.ndim - 1), node, 0, span)


def _follow(st: _State) -> None:
    while st.queue:
        value, gid, axis, span = st.queue.pop()
        if value.is_graph_output():
            st.block(gid, f"tensor {value.name} is a graph output")
        for use in value.uses():
            node = use.node
            handler = HANDLERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            if handler is None:
                st.block(gid, f"{node.op_type} node {node_name(node)} reads the channels and has no pruning rule")
                continue
            handler(st, node, use.idx, gid, axis, span)


def _static_width(value: ir.Value, axis: int) -> int | None:
    """The channel count of a tensor no group reaches (a graph input or a constant), from its shape."""
    arr = constant(value)
    shape = list(arr.shape) if arr is not None else (list(value.shape) if value.shape is not None else None)
    if shape is None or len(shape) < -axis or not isinstance(shape[axis], int):
        return None
    return int(shape[axis])


def _resolve_concats(st: _State, final: bool) -> bool:
    """Give each waiting Concat's output its inputs' pieces, shifted by the widths before them.

    A Concat runs once every input's width is known: from the pieces that reached it, or (``final``)
    from the static shape of an input no group reaches.  Returns whether any ran.
    """
    ran = False
    for key, node in list(st.concats.items()):
        name, layout, missing = node_name(node), [], False
        for inp in node.inputs:
            pieces = st.pieces.get(id(inp), [])
            axis = pieces[0][1] if pieces else next(a for v in node.inputs for _, a, _ in st.pieces.get(id(v), []))
            width = pieces[0][2].width if pieces else _static_width(inp, axis)
            if width is None or (not pieces and not final and _produced_by_conv_path(inp)):
                missing = True
                break
            layout.append((pieces, width))
        if missing and not final:
            continue
        del st.concats[key]
        ran = True
        gids = [g for v in node.inputs for g, _, _ in st.pieces.get(id(v), [])]
        if missing:
            for g in gids:
                st.block(g, f"Concat node {name} joins a tensor whose channel count is unknown (run shape inference first)")
            continue
        total, base = sum(w for _, w in layout), 0
        for pieces, width in layout:
            for g, a, span in pieces:
                st.reach(node.outputs[0], g, a, node, 0, span.moved(offset=span.offset + base, width=total))
            base += width
    return ran


def _produced_by_conv_path(value: ir.Value) -> bool:
    """Whether a group may still reach ``value`` (it is computed, not a graph input or constant)."""
    return value.producer() is not None and constant(value) is None


def _resolve_joins(st: _State) -> None:
    """Element-wise ops of two computed tensors: both sides must carry channels at the same positions, and they merge."""
    for node, gid in st.joins:
        sides = []
        for k, inp in enumerate(node.inputs):
            if inp is None or _weight(node, k) is not None:
                continue
            pieces = st.pieces.get(id(inp))
            if not pieces:
                st.block(gid, f"{node.op_type} node {node_name(node)} combines the channels with {inp.name}, which no conv produces")
                break
            sides.append({(s.offset, s.length, s.start, a): g for g, a, s in pieces})
        else:
            if any(side.keys() != sides[0].keys() for side in sides):
                st.block(gid, f"{node.op_type} node {node_name(node)} combines tensors whose channels sit at different positions or axes")
            # Different start ids = different producer convs (roots may already have merged where
            # the output was reached from both sides).
            for key in sides[0]:
                ids = {side[key] for side in sides if key in side}
                if len(ids) > 1 and node.op_type in _RESIDUAL:
                    st.residual[gid].append(node_name(node))
                for g in ids:
                    st.union(gid, g)


def channel_groups(model: ir.Model, *, allow_residual: bool = False) -> list[ChannelGroup]:
    """Channel dependency groups of ``model``'s main graph, in graph order of their first producer.

    ``allow_residual`` makes groups joined by a residual Add/Sub prunable (they are still marked
    ``residual``); otherwise they are listed with the reason they are kept.
    """
    st = _State()
    for node in model.graph:
        if is_std(node, "Conv"):
            _start(st, node)
    while True:
        _follow(st)
        if not st.concats:
            break
        if not _resolve_concats(st, final=False):
            _resolve_concats(st, final=True)
    _resolve_joins(st)
    return _collect(st, allow_residual)


def _collect(st: _State, allow_residual: bool) -> list[ChannelGroup]:
    by_root: dict[int, list[int]] = {}
    for gid in range(len(st.parent)):
        by_root.setdefault(st.find(gid), []).append(gid)
    groups = []
    for gids in by_root.values():
        members = list(dict.fromkeys(m for g in gids for m in st.members[g]))
        blocks = list(dict.fromkeys(r for g in gids for r in st.blocks[g]))
        residual_nodes = list(dict.fromkeys(r for g in gids for r in st.residual[g]))
        channels = {st.channels[g] for g in gids}
        if len(channels) > 1:
            blocks.append(f"joined tensors have different channel counts {sorted(channels)}")
        producers = list(dict.fromkeys(m.node for m in members if m.role == "producer"))
        consumers = list(dict.fromkeys(m.node for m in members if m.role == "consumer"))
        lockstep = list(dict.fromkeys(m.node for m in members if m.role == "lockstep"))
        if not blocks and not consumers:
            blocks.append("no Conv, Gemm or MatMul reads these channels")
        reason = "; ".join(blocks)
        if not reason and residual_nodes and not allow_residual:
            reason = (
                f"residual: {', '.join(residual_nodes[:3])}{' ...' if len(residual_nodes) > 3 else ''} couple "
                f"{len(producers)} convs on one residual stream, whose width is kept by default"
            )
        groups.append(
            ChannelGroup(
                name=_group_name(members, producers, gids[0]), channels=max(channels), members=members,
                producers=producers, consumers=consumers, lockstep=lockstep, prunable=not reason, reason=reason,
                residual=bool(residual_nodes),
            )
        )  # fmt: skip
    return groups


def _group_name(members: list[Member], producers: list[str], gid: int) -> str:
    """The first producer's weight name without ``.weight`` (exporters name weights after modules), else its node."""
    for m in members:
        if m.role == "producer" and m.index == 1 and m.tensor:
            return m.tensor[: -len(".weight")] if m.tensor.endswith(".weight") else m.tensor
    return producers[0] if producers else f"group{gid}"


def summary(groups: list[ChannelGroup]) -> list[str]:
    """One line per group, then a count of prunable channels."""
    lines = [g.summary() for g in groups]
    ok = [g for g in groups if g.prunable]
    lines.append(f"{len(ok)} of {len(groups)} channel groups prunable ({sum(g.channels for g in ok)} channels)")
    return lines
