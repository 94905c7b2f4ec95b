"""Conv layers and the chains whose output channels are coupled.

Channel pruning of CNNs needs each ``Conv`` with a constant weight together with the
BatchNormalization and activation that follow it (they are sliced with it), and the chains of
convs joined only by element-wise/BN/activation ops: channels removed from one conv of a chain
constrain the others.  The follow-up ops are one or two nodes checked directly; chains have any
length and branch, so they are found by a hand-written bounded forward walk.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from edgeprune.analysis.ffn import NONLINEAR_OPS, activation_name
from edgeprune.analysis.graph import STD_DOMAINS, attr, const_shape, constant, consumers, is_std, node_name, value_name, values_by_name


@dataclasses.dataclass
class ConvLayer:
    """A Conv with a constant weight; output channels are the prunable unit."""

    node: str
    weight: str
    bias: str | None
    out_channels: int
    in_channels: int
    groups: int
    kernel: tuple[int, ...]
    depthwise: bool
    input: str
    output: str  # after BN and activation when they follow
    batchnorm: str | None = None
    activation: str | None = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["kernel"] = list(self.kernel)
        return d


@dataclasses.dataclass
class ConvChain:
    """Convs joined only through element-wise/BN/activation ops: their channels are coupled."""

    convs: list[str]

    def to_dict(self) -> dict:
        return {"convs": list(self.convs)}



_CONV_FOLLOW_ACTS = {"Relu", "Clip", "Sigmoid", "HardSwish", "HardSigmoid", "LeakyRelu", "Tanh", "Elu", "Selu", "PRelu"}
_CHAIN_OPS = {"BatchNormalization", "Add", "Sub", "Mul", "Div", "Cast", "Identity"} | _CONV_FOLLOW_ACTS | NONLINEAR_OPS


def find_conv_layers(graph: ir.Graph) -> list[ConvLayer]:
    """Conv nodes with constant weights, with the BatchNormalization/activation right after them."""
    layers = []
    for node in graph:
        if not is_std(node, "Conv"):
            continue
        shape = const_shape(node.inputs[1])
        if shape is None or len(shape) < 3 or node.inputs[0] is None:
            continue
        groups = int(attr(node, "group", 1))
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        out = node.outputs[0]
        bn, act = None, None
        users = consumers(out)
        if len(users) == 1 and is_std(users[0], "BatchNormalization"):
            bn, out = node_name(users[0]), users[0].outputs[0]
            users = consumers(out)
        if len(users) == 1 and is_std(users[0], *_CONV_FOLLOW_ACTS):
            act_node = users[0]
            act = _swish_or(act_node, out)
            out = _swish_output(act_node, out)
        elif len(users) == 2 and _swish_output(None, out) is not None:
            act, out = "silu", _swish_output(None, out)
        layers.append(
            ConvLayer(
                node=node_name(node), weight=node.inputs[1].name or "", bias=value_name(bias) if constant(bias) is not None else None,
                out_channels=shape[0], in_channels=shape[1] * groups, groups=groups, kernel=tuple(shape[2:]),
                depthwise=groups > 1 and shape[1] == 1, input=node.inputs[0].name or "", output=out.name or "",
                batchnorm=bn, activation=act,
            )
        )  # fmt: skip
    return layers


def _swish_output(act_node: ir.Node | None, x: ir.Value) -> ir.Value | None:
    """For x * Sigmoid(x) the Mul's output; otherwise the activation's own output."""
    sig = act_node
    if sig is None:
        sigs = [n for n in consumers(x) if is_std(n, "Sigmoid")]
        if not sigs:
            return None
        sig = sigs[0]
    if is_std(sig, "Sigmoid"):
        for mul in consumers(sig.outputs[0]):
            if is_std(mul, "Mul") and x in mul.inputs:
                return mul.outputs[0]
        if act_node is None:
            return None
    return sig.outputs[0]


def _swish_or(act_node: ir.Node, x: ir.Value) -> str:
    if is_std(act_node, "Sigmoid") and _swish_output(act_node, x) is not act_node.outputs[0]:
        return "silu"
    return activation_name(act_node.op_type)


def find_conv_chains(convs: list[ConvLayer], graph: ir.Graph) -> list[ConvChain]:
    """Group convs reachable from one another through element-wise/BN/activation ops only."""
    # A hand-written forward walk: chains have any length and branch, so no fixed pattern fits.
    by_input: dict[str, list[str]] = {}
    for c in convs:
        by_input.setdefault(c.input, []).append(c.node)
    values = values_by_name(graph)
    parent = {c.node: c.node for c in convs}

    def root(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for c in convs:
        start = values.get(c.output)
        frontier, seen = [start] if start is not None else [], set()
        while frontier:
            value = frontier.pop()
            if value in seen or len(seen) > 64:
                continue
            seen.add(value)
            for nxt in by_input.get(value.name or "", []):
                parent[root(nxt)] = root(c.node)
            for user in consumers(value):
                if user.domain in STD_DOMAINS and user.op_type in _CHAIN_OPS:
                    frontier.extend(user.outputs)
    chains: dict[str, list[str]] = {}
    for c in convs:
        chains.setdefault(root(c.node), []).append(c.node)
    return [ConvChain(convs=names) for names in chains.values()]


