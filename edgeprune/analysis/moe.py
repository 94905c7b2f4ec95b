"""MoE layers: routers, their top-k, and the experts they choose between (best effort).

Expert-level passes (the MoE family in the design: router statistics, expert scores, expert
removal) need the router linear and its top-k; today the summary reports them.  A router is a
linear whose output, maybe through Softmax/Sigmoid/Cast, feeds ``TopK``, or the contrib
``MoE``/``QMoE`` op; exported MoE graphs often hide experts in loops, so ``experts`` holds only
the FFN blocks found reading the router's input and may be empty.  The router-to-TopK step is at
most two nodes and is checked directly.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from edgeprune.analysis.ffn import FFNBlock
from edgeprune.analysis.graph import MS_DOMAIN, attr, constant, consumers, is_std, node_name, value_name, values_by_name
from edgeprune.analysis.linears import Linear


@dataclasses.dataclass
class MoELayer:
    """A router to ``num_experts`` with top-k selection; ``experts`` are found FFNs, maybe none."""

    router: Linear | None
    num_experts: int
    top_k: int | None
    experts: list[FFNBlock]
    node: str | None = None  # the contrib MoE op or the TopK node

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def find_moe_layers(graph: ir.Graph, linears: list[Linear], ffns: list[FFNBlock]) -> list[MoELayer]:
    """Best effort: a router linear whose output (maybe via Softmax) feeds TopK, or a contrib MoE op."""
    by_output = {lin.output: lin for lin in linears}
    values = values_by_name(graph)
    layers = []
    for node in graph:
        if node.domain == MS_DOMAIN and node.op_type in ("MoE", "QMoE"):
            router = by_output.get(value_name(node.inputs[1]) or "")
            n = router.out_features if router else None
            layers.append(MoELayer(router=router, num_experts=n or 0, top_k=attr(node, "k"), experts=[], node=node_name(node)))
    for lin in linears:
        topk = _topk_after(values.get(lin.output))
        if topk is None:
            continue
        k_tensor = constant(topk.inputs[1]) if len(topk.inputs) > 1 else None
        k = int(k_tensor.numpy().reshape(-1)[0]) if k_tensor is not None else None
        experts = [f for f in ffns if (f.gate or f.up).input == lin.input]
        layers.append(MoELayer(router=lin, num_experts=lin.out_features, top_k=k, experts=experts, node=node_name(topk)))
    return layers


def _topk_after(value: ir.Value | None) -> ir.Node | None:
    if value is None:
        return None
    for user in consumers(value):
        if is_std(user, "TopK"):
            return user
        if is_std(user, "Softmax", "Sigmoid", "Cast"):
            for nxt in consumers(user.outputs[0]):
                if is_std(nxt, "TopK"):
                    return nxt
    return None
