"""MoE layers: the router, its top-k and normalisation, and each expert with its weights.

Expert-level passes (router statistics, expert scores, expert removal) need to know, per layer,
which graph pieces belong to which expert.  Three forms are recognised:

- ``loop`` (optimum's export with a patched expert loop): router linear -> Softmax -> TopK
  (-> ReduceSum/Div renormalisation) -> OneHot(depth E) -> Transpose gives the expert mask
  [E, k, T]; expert ``e`` starts at ``Gather(mask, e)`` (a constant index), gathers its tokens,
  runs its gate/up/down MatMuls and adds its weighted output through ``ScatterElements`` into a
  running ``Add`` chain.  The expert's nodes are everything reachable from its Gather up to that
  ``Add``; its identity is the Gather's constant (the node names, ``experts.3/w1/MatMul``, agree).
- ``dense`` (optimum's gpt-oss export): router -> TopK -> Softmax of the top-k -> ScatterElements
  into a [T, E] weight matrix; every expert runs on every token through MatMuls with weights
  stacked [E, ...] (the input tiled E times, E read from the weight matrix's shape) and the
  outputs are mask-weighted and summed.  Experts are the axis-0 slices of those stacked constants.
- ``fused``: ``com.microsoft.MoE`` / ``QMoE`` with expert weights stacked on axis 0.
- ``router``: a router linear feeding TopK whose experts were not found (reported, not prunable).

A traced export of transformers' own block (a loop over the experts the tracing input hit)
indexes the mask with a computed value instead of a constant and keeps only the hit experts;
such a layer gets ``problem`` set and no pass may act on it.
"""

from __future__ import annotations

import dataclasses
import re

import onnx_ir as ir

from edgeprune.analysis.ffn import FFNBlock
from edgeprune.analysis.graph import MS_DOMAIN, attr, constant, consumers, is_std, node_name, value_name, values_by_name
from edgeprune.analysis.linears import Linear

#: Forward walks from an expert's Gather stop after this many nodes (a Mixtral expert has ~40).
_MAX_EXPERT_NODES = 400
_EXPERT_NAME = re.compile(r"experts?[._/](\d+)[./]")

DROPPED_EXPERTS = (
    "MoE layer {layer} routes to {experts} experts but its graph {detail}: the exporter traced the model's "
    "loop over the experts the tracing input happened to hit (transformers' expert_hit loop), so the graph "
    "bakes that input's routing and silently drops or misplaces experts on other inputs; re-export it with a "
    "patched expert loop over all experts (edgeprune.models.moe_export.export_mixtral, or optimum's qwen3_moe patch)."
)


@dataclasses.dataclass
class Expert:
    """One expert of a layer: its index in the router's output and the nodes that compute it."""

    index: int
    linears: list[str] = dataclasses.field(default_factory=list)
    """Node names of its constant-weight MatMuls (loop form), gate/up before down."""
    selector: str | None = None
    """Loop form: the Gather that reads this expert's row of the expert mask."""
    accumulate: str | None = None
    """Loop form: the Add that adds its contribution into the layer's output."""
    contribution: str | None = None
    """Loop form: the [tokens, hidden] value holding routing weight x expert output (0 on other tokens)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class MoELayer:
    """A router to ``num_experts`` with top-k selection and, when found, its experts."""

    router: Linear | None
    num_experts: int
    top_k: int | None
    experts: list[Expert]
    node: str | None = None  # the contrib MoE op or the TopK node
    form: str = "router"  # loop | dense | fused | router
    scoring: str | None = None  # softmax | sigmoid | None (raw logits)
    normalize: bool | None = None  # top-k weights renormalised to sum 1
    onehot: str | None = None  # loop form: the OneHot node that builds the mask
    shared_experts: list[FFNBlock] = dataclasses.field(default_factory=list)
    stacked: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    """Dense form: (node, input index) of each constant stacked on axis 0 (one slice per expert)."""
    problem: str | None = None  # why no pass may act on this layer
    layer: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def prunable(self) -> bool:
        return self.problem is None and self.form in ("loop", "dense", "fused") and len(self.experts) == self.num_experts


def find_moe_layers(graph: ir.Graph, linears: list[Linear], ffns: list[FFNBlock]) -> list[MoELayer]:
    """Every router in ``graph``: contrib MoE/QMoE ops, and router linears (maybe via Softmax) feeding TopK."""
    by_output = {lin.output: lin for lin in linears}
    by_node = {lin.node: lin for lin in linears}
    values = values_by_name(graph)
    layers: list[MoELayer] = []
    for node in graph:
        if node.domain == MS_DOMAIN and node.op_type in ("MoE", "QMoE"):
            layers.append(_fused_layer(node, by_output))
    for lin in linears:
        topk, scoring = _topk_after(values.get(lin.output))
        if topk is None:
            continue
        k_tensor = constant(topk.inputs[1]) if len(topk.inputs) > 1 else None
        k = int(k_tensor.numpy().reshape(-1)[0]) if k_tensor is not None else None
        layer = MoELayer(router=lin, num_experts=lin.out_features, top_k=k, experts=[], node=node_name(topk), scoring=scoring)
        layer.normalize = _renormalised(topk)
        _find_loop_experts(layer, topk, by_node)
        if layer.form == "router":
            _find_dense_experts(layer, topk, values.get(lin.input))
        inside = {name for e in layer.experts for name in e.linears}
        layer.shared_experts = [f for f in ffns if (f.gate or f.up).input == lin.input and (f.gate or f.up).node not in inside]
        layers.append(layer)
    for i, layer in enumerate(layers):
        layer.layer = i
        if layer.problem:
            layer.problem = layer.problem.replace("{layer}", str(i))
    return layers


def _fused_layer(node: ir.Node, by_output: dict[str, Linear]) -> MoELayer:
    router = by_output.get(value_name(node.inputs[1]) or "")
    weights = constant(node.inputs[2]) if len(node.inputs) > 2 else None
    n = int(weights.shape[0]) if weights is not None else (router.out_features if router else 0)
    layer = MoELayer(
        router=router, num_experts=n, top_k=attr(node, "k", 1), experts=[Expert(i) for i in range(n)],
        node=node_name(node), form="fused", scoring="softmax", normalize=bool(attr(node, "normalize_routing_weights", 0)),
    )  # fmt: skip
    if weights is None:
        layer.problem = f"the expert weights of {node_name(node)} are not constants, so experts cannot be removed from them."
    return layer


def _topk_after(value: ir.Value | None, depth: int = 3) -> tuple[ir.Node | None, str | None]:
    """The TopK reading ``value`` through at most ``depth`` Softmax/Sigmoid/Cast nodes, and the scoring op passed."""
    if value is None:
        return None, None
    for user in consumers(value):
        if is_std(user, "TopK"):
            return user, None
        if depth > 0 and is_std(user, "Softmax", "Sigmoid", "Cast"):
            topk, scoring = _topk_after(user.outputs[0], depth - 1)
            if topk is not None:
                return topk, scoring or (None if user.op_type == "Cast" else user.op_type.lower())
    return None, None


def _renormalised(topk: ir.Node) -> bool:
    """True when the top-k values are divided by their own sum (ReduceSum -> Div)."""
    for user in consumers(topk.outputs[0]):
        if is_std(user, "ReduceSum"):
            for div in consumers(user.outputs[0]):
                if is_std(div, "Div") and div.inputs[0] is topk.outputs[0]:
                    return True
    return False


def _follow(value: ir.Value, ops: tuple[str, ...], depth: int = 3) -> ir.Node | None:
    """The first consumer of ``value`` of type ``ops[-1]``, through at most ``depth`` nodes of ``ops[:-1]``."""
    for user in consumers(value):
        if is_std(user, ops[-1]):
            return user
        if depth > 0 and is_std(user, *ops[:-1]):
            found = _follow(user.outputs[0], ops, depth - 1)
            if found is not None:
                return found
    return None


def _find_loop_experts(layer: MoELayer, topk: ir.Node, by_node: dict[str, Linear]) -> None:
    """Fill ``layer.experts`` from the expert mask's Gathers; set ``problem`` for a traced hit-only loop."""
    onehot = _follow(topk.outputs[1], ("Cast", "Unsqueeze", "Reshape", "OneHot"))
    if onehot is None:
        return
    layer.onehot = node_name(onehot)
    mask = onehot.outputs[0]
    after = [u for u in consumers(mask) if is_std(u, "Transpose", "Cast")]
    if len(after) == 1:
        mask = after[0].outputs[0]
    selectors = [u for u in consumers(mask) if is_std(u, "Gather") and u.inputs[0] is mask and attr(u, "axis", 0) == 0]
    if not selectors:
        return
    experts = []
    for sel in selectors:
        index = constant(sel.inputs[1])
        if index is None or index.numpy().size != 1:
            layer.form = "loop"
            layer.experts = []
            layer.problem = DROPPED_EXPERTS.format(
                layer="{layer}", experts=layer.num_experts,
                detail=f"picks expert slots with a computed index ({node_name(sel)}) instead of a constant one",
            )  # fmt: skip
            return
        expert = _expert_from(int(index.numpy().reshape(-1)[0]), sel, by_node)
        if expert is None:
            return
        experts.append(expert)
    indices = sorted(e.index for e in experts)
    layer.form = "loop"
    layer.experts = sorted(experts, key=lambda e: e.index)
    if indices != list(range(layer.num_experts)):
        layer.problem = DROPPED_EXPERTS.format(
            layer="{layer}", experts=layer.num_experts, detail=f"computes only experts {indices}"
        )
    for e in layer.experts:
        named = {int(m.group(1)) for name in e.linears if (m := _EXPERT_NAME.search(name))}
        if named and named != {e.index}:
            layer.problem = (
                f"MoE layer {{layer}}: the expert selected by mask row {e.index} runs MatMuls named for expert(s) "
                f"{sorted(named)}, so expert identity is ambiguous; re-export with a patched expert loop over all experts."
            )


def _expert_from(index: int, selector: ir.Node, by_node: dict[str, Linear]) -> Expert | None:
    """Walk forward from an expert's Gather to the Add that accumulates it; None when the shape is not the loop form."""
    reached: list[ir.Node] = []
    seen = {id(selector)}
    frontier = [selector]
    accumulate = contribution = None
    while frontier:
        node = frontier.pop()
        reached.append(node)
        if len(reached) > _MAX_EXPERT_NODES:
            return None
        for out in node.outputs:
            for user in consumers(out):
                if id(user) in seen:
                    continue
                if is_std(user, "Add") and is_std(node, "ScatterElements", "ScatterND"):
                    if accumulate is not None and accumulate is not user:
                        return None
                    accumulate, contribution = user, out
                    continue
                seen.add(id(user))
                frontier.append(user)
    if accumulate is None:
        return None
    order = {id(n): i for i, n in enumerate(accumulate.graph or [])} if accumulate.graph is not None else {}
    mats = sorted((n for n in reached if node_name(n) in by_node), key=lambda n: order.get(id(n), 0))
    return Expert(
        index=index, linears=[node_name(n) for n in mats], selector=node_name(selector),
        accumulate=node_name(accumulate), contribution=value_name(contribution),
    )  # fmt: skip


def _find_dense_experts(layer: MoELayer, topk: ir.Node, router_input: ir.Value | None) -> None:
    """gpt-oss's dense form: top-k values -> Softmax -> ScatterElements into [T, E]; stacked [E, ...] expert MatMuls on the tiled input."""
    soft = _follow(topk.outputs[0], ("Cast", "Softmax"), depth=1)
    if soft is None or router_input is None or layer.router is None:
        return
    scatter = _follow(soft.outputs[0], ("Cast", "ScatterElements"), depth=1)
    if scatter is None or scatter.inputs[1] is not topk.outputs[1]:
        return
    e = layer.num_experts
    stacked: dict[tuple[str, int], int] = {}  # (node, input index) -> rank
    frontier, seen = [router_input], set()
    while frontier and len(seen) < _MAX_EXPERT_NODES:  # forward from the router's input through the expert computation
        value = frontier.pop()
        for user in consumers(value):
            if id(user) in seen or node_name(user) == layer.router.node:
                continue
            seen.add(id(user))
            if is_std(user, "MatMul", "Add"):
                for i, inp in enumerate(user.inputs):
                    t = constant_through_identity(inp)
                    if t is not None and len(t.shape) >= 2 and int(t.shape[0]) == e:
                        stacked.setdefault((node_name(user), i), len(t.shape))
            if not is_std(user, "ReduceSum"):  # the sum over experts ends the layer
                frontier.extend(user.outputs)
    if sum(1 for rank in stacked.values() if rank == 3) < 2:
        return
    layer.form = "dense"
    layer.scoring = "topk_softmax"
    layer.normalize = True  # a softmax over the k selected logits sums to 1 by construction
    layer.stacked = list(stacked)
    layer.experts = [Expert(i) for i in range(e)]


def constant_through_identity(value: ir.Value | None) -> ir.TensorProtocol | None:
    """A constant, also behind Identity nodes (exporters share equal tensors between layers that way)."""
    for _ in range(4):
        t = constant(value)
        if t is not None or value is None:
            return t
        producer = value.producer()
        if producer is None or not is_std(producer, "Identity"):
            return None
        value = producer.inputs[0]
    return None
