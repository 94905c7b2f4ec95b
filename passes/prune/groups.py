"""The prunable groups of the prune pass: FFN neurons, attention heads, conv channel groups.

Each group knows its coupled weights, hands them to the importance metrics (``scoring``) and
removes the units allocation did not keep (``apply``).  Private to the prune pass (``prune_pass``).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from edgeprune import kv_cache
from edgeprune.passes.prune import scoring
from edgeprune.analysis import AttentionBlock, FFNBlock, Linear
from edgeprune.analysis.ffn import elementwise_op
from edgeprune.analysis.graph import consumers, node_name
from edgeprune.context import StatsRequest
from edgeprune.passes.prune.dependency import ChannelGroup, channel_groups, split_sizes
from edgeprune.passes.prune.edits import (
    _apply_shape_edit,
    _bias_slot,
    _check_linears,
    _const,
    _const_array,
    _Graph,
    _in_major,
    _is_std,
    _linear_params,
    _out_major,
    _plan_shape_edit,
    _shrink_consumer,
    _Skip,
    _slice_outputs,
    _split_reshape,
    _weight,
    _weight_slot,
)

if TYPE_CHECKING:
    from edgeprune.passes.prune.prune_pass import PruneConfig

_HEAD_PATH_OPS = {"Reshape", "Unsqueeze", "Squeeze", "Expand", "Slice", "Transpose", "Mul", "Div", "Add", "Sub",
                  "Neg", "Concat", "Cast", "Identity"}  # fmt: skip
_DATA_ONLY = {"Reshape", "Unsqueeze", "Squeeze", "Expand", "Slice"}


# --------------------------------------------------------------------------- groups


@dataclasses.dataclass
class Footprint:
    """Where a group's channels sit in one parameter tensor: ``positions[c]`` on ``axis`` (-1: not in it)."""

    value: ir.Value
    axis: int
    positions: np.ndarray


def distinct_params(parts: list[Footprint]) -> int:
    """Parameters the footprints cover, each counted once: a tensor shared by groups (or by nodes), or cut on two
    axes by two groups (a conv weight is one group's consumer and the next group's producer), counts each element once."""
    covered: dict[int, tuple[tuple[int, ...], dict[int, set[int]]]] = {}
    for part in parts:
        arr = _const(part.value)
        if arr is None:
            continue
        shape = tuple(int(d) for d in arr.shape)
        entry = covered.setdefault(id(part.value), (shape, {}))
        entry[1].setdefault(part.axis % len(shape), set()).update(int(x) for x in part.positions if x >= 0)
    total = 0
    for shape, axes in covered.values():
        kept = np.prod([n - len(axes[a]) if a in axes else n for a, n in enumerate(shape)], dtype=np.int64)
        total += int(np.prod(shape, dtype=np.int64) - kept)
    return total


class _Group:
    """Units whose channels are the input channels of ``consumer``; subclasses know their producers."""

    kind = ""
    channel_params: np.ndarray | None = None  # per-unit parameters where units differ (conv groups through a Split)

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
        if scoring.METRICS[cfg.metric].producer_stats:
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
        """Scores per unit (per channel with ``unit_size=1``), by the metric registered as ``metric``."""
        size = self.unit_size if unit_size is None else unit_size
        return scoring.METRICS[metric].score(self.metric_channels(g, stats), size)

    def metric_channels(self, g: _Graph, stats: dict) -> scoring.Channels:
        """The units' weights and statistics as every metric reads them: one consumer, its producers."""
        everything = slice(None)
        return scoring.Channels(
            self.units * self.unit_size,
            weights=lambda: self.channel_weights(g),
            consumers=lambda: [(_in_major(self.consumer, _weight(g, self.consumer)), stats[self.consumer.input], everything, everything)],
            producers=lambda: [(m, stats[name]) for m, name in self.producer_terms(g)],
        )

    def apply(self, g: _Graph, keep_units: np.ndarray, stats, cfg: PruneConfig) -> dict:
        raise NotImplementedError

    def removed_params(self, keep_units: np.ndarray) -> int:
        """Parameters the pruned units carry (allocation's estimate; the summary counts exactly with ``footprint``)."""
        return (self.units - len(keep_units)) * self.unit_params

    def channels_of(self, units: np.ndarray) -> np.ndarray:
        """The channels that ``units`` span."""
        units = np.asarray(units, dtype=np.int64)
        return (units[:, None] * self.unit_size + np.arange(self.unit_size)).reshape(-1)

    def footprint(self, g: _Graph) -> list[Footprint]:
        """Every parameter tensor the units own, and where each group channel sits in it (read before any edit)."""
        channels = np.arange(self.units * self.unit_size)
        out = []
        for lin in self.producer_linears():
            node, i = _weight_slot(g, lin)
            out.append(Footprint(node.inputs[i], 0 if lin.transposed else 1, channels))
            slot = _bias_slot(g, lin)
            if slot is not None:
                out.append(Footprint(slot[0].inputs[slot[1]], 0, channels))
        node, i = _weight_slot(g, self.consumer)
        out.append(Footprint(node.inputs[i], 1 if self.consumer.transposed else 0, channels))
        return out


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

    def footprint(self, g):
        channels = np.arange(self.units)
        return super().footprint(g) + [Footprint(node.inputs[idx], -1, channels) for node, idx in self.region_consts]

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
        for node in consumers(value):
            if node is down_node and node.inputs[0] is value:
                continue
            if elementwise_op(node) is None:  # analysis' table of ops allowed inside an FFN
                raise _Skip(f"{what}: {node.op_type} node {node_name(node)} reads the FFN intermediate")
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
        if (self.mha or self.kv_groups) and kv_cache.model_cache(g.model):
            raise _Skip(f"{what}: the model has a KV cache and removing heads here removes KV heads, which would change "
                        "the cache tensors its generation loop feeds (only query heads of grouped-query attention can go)")
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

    def footprint(self, g):
        out = super().footprint(g)
        if self.kv_groups:  # k/v lose whole KV heads: a k/v channel serves the ``rep`` query heads of its group
            channels = np.arange(self.units * self.unit_size)
            positions = channels // (self.rep * self.head_dim) * self.head_dim + channels % self.head_dim
            for lin in (self.k, self.v):
                node, i = _weight_slot(g, lin)
                out.append(Footprint(node.inputs[i], 0 if lin.transposed else 1, positions))
                slot = _bias_slot(g, lin)
                if slot is not None:
                    out.append(Footprint(slot[0].inputs[slot[1]], 0, positions))
        return out

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


def _repeat_kv(op, source, expand_shape, reshape_shape):
    """The exporters' repeat_kv: [B, kv, S, D] -> [B, kv, rep, S, D] -> [B, kv * rep, S, D] (axes an input or, before opset 13, an attribute)."""
    unsqueezed = op.Unsqueeze(source, _allow_other_inputs=True, _outputs=["unsqueezed"])
    return op.Reshape(op.Expand(unsqueezed, expand_shape), reshape_shape)


_REPEAT_KV = pattern.Pattern(_repeat_kv, name="repeat_kv")


def _find_repeat(g: _Graph, block: AttentionBlock, which: str, what: str) -> _Repeat:
    """The repeat_kv Unsqueeze -> Expand -> Reshape on the K (or V) path of a GQA block."""
    lin = block.k if which == "k" else block.v
    matmul = g.nodes[block.score_matmul if which == "k" else block.context_matmul]
    # Hand-walked: the path back from the MatMul (Transpose, rotary, Cast...) has no fixed length,
    # which a pattern cannot express; the fixed repeat itself is matched by ``_REPEAT_KV``.
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
    users = consumers(expands[0].outputs[0])
    match = _REPEAT_KV.match(g.model, g.graph, users[0], check_nodes_are_removable=False) if len(users) == 1 else None
    if not match:
        raise _Skip(f"{what}: GQA repeat of {which} heads is not Unsqueeze -> Expand -> Reshape")
    unsq = match.bindings["unsqueezed"].producer()
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
    gather = ir.node("Gather", [repeat.source, idx], {"axis": repeat.axis}, name=g.fresh(f"{node_name(repeat.reshape)}/kept_heads"))
    out = repeat.reshape.outputs[0]
    gather.outputs[0].name = g.fresh(f"{out.name}_kept_heads")
    gather.outputs[0].type = out.type
    g.graph.insert_before(repeat.reshape, gather)
    ir.convenience.replace_all_uses_with(out, gather.outputs[0])


# --------------------------------------------------------------------------- conv channel groups

_SLICED_ROLES = ("producer", "lockstep", "param", "consumer")


class _ConvGroup(_Group):
    """One channel dependency group: every tensor in it loses the same channels.

    Members carry a span (``Member.offset/length/start/width``): the group's channels
    ``start..start+length`` sit at ``offset..`` of that tensor's channel axis.  A tensor shared by
    several groups (the consumer of a Concat) loses each group's positions in turn; the
    ``_Graph`` remembers how many positions each earlier edit removed before an offset.
    Scores: magnitude over the producers' output filters, depthwise filters and consumers' input
    slices; wanda = sum |W_cons[:, c]| x ||x_c|| and flap = Var(x_c) x ||W_cons[:, c]||^2 over the
    consumers, with x the consumer's input per channel (axis 1, over batch and pixels).
    Bias compensation adds ``sum_{c pruned} mean(x_c) x sum_kernel W[:, c]`` to each consumer's
    bias.  That is exact for 1x1 convs and Gemm/MatMul after pooling; for a k x k consumer with
    zero padding it is approximate at the borders, where some taps read padding, not mean(x_c).
    Split sizes and Slice bounds lose the pruned positions they cover; Concat needs nothing.
    Refit is not done for conv groups.
    """

    kind = "conv"

    def __init__(self, g: _Graph, cg: ChannelGroup, index: int):
        self.cg = cg
        self.sliced = [m for m in cg.members if m.role in _SLICED_ROLES]
        self.inputs = list(dict.fromkeys((m.node, m.tensor, m.offset, m.length, m.start) for m in cg.members if m.role == "consumer_input"))
        self.channel_params = np.zeros(cg.channels, dtype=np.int64)  # differs per channel when Split branches differ
        for m in self.sliced:
            value = g.nodes[m.node].inputs[m.index]
            arr = _const_array(value)
            if arr is None:
                raise _Skip(f"conv group {cg.name}: {m.tensor} is not a constant")
            if len({id(use.node) for use in value.uses()}) > 1:  # slicing it for one reader would copy it for the others
                raise _Skip(f"conv group {cg.name}: weight {m.tensor} is shared by several nodes, so it is not pruned")
            if arr.shape[m.axis] != m.width:
                raise _Skip(f"conv group {cg.name}: {m.tensor} has {arr.shape[m.axis]} channels on axis {m.axis}, not {m.width}")
            self.channel_params[m.start : m.start + m.length] += arr.size // m.width
        self.splits = [(m, split_sizes(g.nodes[m.node], None) or [m.width] * len(g.nodes[m.node].outputs)) for m in cg.members if m.role == "split"]
        self.slices = []
        for m in cg.members:
            if m.role == "slice":
                node = g.nodes[m.node]
                begin, end = _slice_entry(node, m.axis)
                self.slices.append((m, begin, end))
        total = int(self.channel_params.sum())
        mean = total // cg.channels if total % cg.channels == 0 else total / cg.channels  # allocation's per-unit cost
        self.units, self.unit_size, self.unit_params, self.layer = cg.channels, 1, mean, index
        self.consumer = None

    @property
    def label(self) -> str:
        return self.cg.name

    def removed_params(self, keep_units: np.ndarray) -> int:
        return int(self.channel_params.sum() - self.channel_params[np.asarray(keep_units, dtype=np.int64)].sum())

    def footprint(self, g):
        out = []
        for m in self.sliced:
            positions = np.full(self.cg.channels, -1, dtype=np.int64)
            positions[m.start : m.start + m.length] = m.offset + np.arange(m.length)
            out.append(Footprint(g.nodes[m.node].inputs[m.index], m.axis, positions))
        return out

    @property
    def consumer_name(self) -> str:
        return ", ".join(self.cg.consumers)

    def producer_linears(self):
        return []

    def stat_requests(self, cfg):
        return [StatsRequest(tensor, axis=1, gram=False) for tensor in dict.fromkeys(t for _, t, *_ in self.inputs)]

    def stats_for_apply(self, stats):
        return {t: stats[t] for _, t, *_ in self.inputs if t in stats} if stats else {}

    def _matrix(self, g: _Graph, m) -> np.ndarray:
        """The member's weight as [group channels, everything else]; rows of channels it does not hold are 0."""
        arr = _const_array(g.nodes[m.node].inputs[m.index])
        rows = np.moveaxis(arr, m.axis, 0)[m.offset : m.offset + m.length].reshape(m.length, -1)
        full = np.zeros((self.cg.channels, rows.shape[1]), dtype=np.float64)
        full[m.start : m.start + m.length] = rows
        return full

    def _consumer_terms(self, g: _Graph) -> list[tuple[np.ndarray, str, slice, slice]]:
        """(consumer weight rows of the piece, tensor it reads, its positions there, the group channels) per consumer piece."""
        out = []
        for node, tensor, offset, length, start in self.inputs:
            m = next(x for x in self.sliced if x.role == "consumer" and x.node == node and x.offset == offset and x.start == start)
            w = self._matrix(g, m)[start : start + length]
            out.append((w, tensor, slice(offset, offset + length), slice(start, start + length)))
        return out

    def metric_channels(self, g, stats):
        """Producers', depthwise and consumers' filters; consumer pieces with the statistics of what they read (no producer terms)."""
        return scoring.Channels(
            self.cg.channels,
            weights=lambda: [self._matrix(g, m) for m in self.sliced if m.role != "param" and m.index == 1],
            consumers=lambda: [(w, stats[tensor], at, channels) for w, tensor, at, channels in self._consumer_terms(g)],
        )

    def apply(self, g, keep_units, stats, cfg):
        keep = np.asarray(keep_units, dtype=np.int64)
        pruned = np.setdiff1d(np.arange(self.cg.channels), keep)
        done: dict[str, Any] = {}
        if cfg.compensate and stats:
            done["compensated"] = [
                node for node, tensor, offset, length, start in self.inputs
                if tensor in stats and _compensate_piece(g, node, pruned, stats[tensor].mean, offset, length, start)
            ]  # fmt: skip
        for m in self.sliced:
            node = g.nodes[m.node]
            arr = _const_array(node.inputs[m.index])
            g.set_input(node, m.index, np.take(arr, _kept_positions(g, m, keep, arr.shape[m.axis]), axis=m.axis))
            g.note_removed(m, _removed_in(m, pruned))
        for m in self.cg.members:
            if m.role == "shape":
                node = g.nodes[m.node]
                shape = _const_array(node.inputs[m.index]).copy()
                shape[m.axis] -= _removed_in(m, pruned)
                g.set_input(node, m.index, shape)
        for m, sizes in self.splits:
            _set_split_sizes(g, g.nodes[m.node], m.index, _removed_in(m, pruned), sizes)
        for m, begin, end in self.slices:
            removed = pruned[(pruned >= m.start) & (pruned < m.start + m.length)] - m.start + m.offset
            _move_slice_bounds(g, g.nodes[m.node], m.axis, int((removed < begin).sum()), int((removed < end).sum()) if end < m.width else 0)
        for name in self.cg.lockstep:
            node = g.nodes[name]
            node.attributes["group"] = ir.AttrInt64("group", int(_const_array(node.inputs[1]).shape[0]))
        done["channels_kept"] = len(keep)
        return done


def _removed_in(m, pruned: np.ndarray) -> int:
    """How many of the pruned group channels lie in member ``m``'s piece."""
    return int(((pruned >= m.start) & (pruned < m.start + m.length)).sum())


def _kept_positions(g: _Graph, m, keep: np.ndarray, size: int) -> np.ndarray:
    """Positions of ``m``'s tensor axis to keep now: everything outside the piece, and the kept channels inside it."""
    offset = g.current_offset(m)
    local = keep[(keep >= m.start) & (keep < m.start + m.length)] - m.start
    return np.concatenate([np.arange(offset), offset + local, np.arange(offset + m.length, size)]).astype(np.int64)


def _slice_entry(node: ir.Node, entry: int) -> tuple[int, int]:
    """The unpruned (start, end) of entry ``entry`` of a Slice's constant starts/ends."""
    starts, ends = _const_array(node.inputs[1]).reshape(-1), _const_array(node.inputs[2]).reshape(-1)
    return int(starts[entry]), int(ends[entry])


def _set_split_sizes(g: _Graph, node: ir.Node, output: int, removed: int, original: list[int]) -> None:
    """Output ``output`` of Split ``node`` loses ``removed`` positions; sizes become explicit if they were implied."""
    has_input = len(node.inputs) > 1 and node.inputs[1] is not None
    if has_input:
        sizes = _const_array(node.inputs[1]).copy().reshape(-1)
    elif "split" in node.attributes:
        sizes = np.asarray(node.attributes["split"].value, dtype=np.int64)
    else:
        sizes = np.asarray(original, dtype=np.int64)
    sizes[output] -= removed
    if has_input:
        g.set_input(node, 1, sizes)
    elif "split" in node.attributes or g.opset < 13:
        node.attributes["split"] = ir.AttrInt64s("split", [int(x) for x in sizes])
    else:
        node.attributes.pop("num_outputs", None)
        node.resize_inputs(2)
        node.replace_input_with(1, g.new_const(sizes.astype(np.int64), f"{node_name(node)}_split"))


def _move_slice_bounds(g: _Graph, node: ir.Node, entry: int, before_start: int, before_end: int) -> None:
    for k, shift in ((1, before_start), (2, before_end)):
        if shift:
            arr = _const_array(node.inputs[k]).copy().reshape(-1)
            arr[entry] -= shift
            g.set_input(node, k, arr)


def _compensate_piece(g: _Graph, name: str, pruned: np.ndarray, mean: np.ndarray, offset: int, length: int, start: int) -> bool:
    """Bias compensation for the pruned channels of one consumer piece (positions in the consumer's current weight)."""
    local = pruned[(pruned >= start) & (pruned < start + length)] - start
    if not len(local):
        return False
    cur = g.current_offset_of(name, 1, offset)
    return _compensate(g, name, cur + local, mean[offset + local])


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
        skipped.append({"layer": cg.name, "index": index, "kind": "conv", "skipped": why, "kept_fraction": 1.0})
    return groups, skipped


