"""Find the structures later passes act on: linears, FFN and attention blocks, convs, embeddings, MoE.

``analyze(model)`` reads an ``ir.Model`` and never changes it; ``Structures`` holds what it found,
in graph order.  Each structure kind has one module with its record and its finder, which walks
producers and consumers on the main graph: ``linears`` (the constant-weight MatMul/Gemm every
other structure is built from), ``ffn`` (FFN blocks and the table of ops allowed inside them),
``attention``, ``conv``, ``embeddings`` and ``moe``; ``graph`` holds the read-only helpers they
share.  ``attention_patterns`` holds the rewriter patterns of exported causal attention that the
attention-replacing passes (sparse_attention, fuse_attention) match on the same blocks.  Only the main graph is analysed; structures inside subgraphs and functions are not reported.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter

import onnx_ir as ir

from edgeprune.analysis.attention import AttentionBlock, find_attention_blocks
from edgeprune.analysis.conv import ConvChain, ConvLayer, find_conv_chains, find_conv_layers
from edgeprune.analysis.embeddings import Embedding, find_embeddings
from edgeprune.analysis.ffn import FFNBlock, find_ffn_blocks
from edgeprune.analysis.linears import Linear, find_linears
from edgeprune.analysis.moe import MoELayer, find_moe_layers

__all__ = [
    "AttentionBlock", "ConvChain", "ConvLayer", "Embedding", "FFNBlock", "Linear", "MoELayer", "Structures", "analyze",
]  # fmt: skip

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Structures:
    """Everything ``analyze`` found, in graph order."""

    linears: list[Linear] = dataclasses.field(default_factory=list)
    ffn_blocks: list[FFNBlock] = dataclasses.field(default_factory=list)
    attention_blocks: list[AttentionBlock] = dataclasses.field(default_factory=list)
    conv_layers: list[ConvLayer] = dataclasses.field(default_factory=list)
    conv_chains: list[ConvChain] = dataclasses.field(default_factory=list)
    embeddings: list[Embedding] = dataclasses.field(default_factory=list)
    moe_layers: list[MoELayer] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "linears": [x.to_dict() for x in self.linears],
            "ffn_blocks": [x.to_dict() for x in self.ffn_blocks],
            "attention_blocks": [x.to_dict() for x in self.attention_blocks],
            "conv_layers": [x.to_dict() for x in self.conv_layers],
            "conv_chains": [x.to_dict() for x in self.conv_chains],
            "embeddings": [x.to_dict() for x in self.embeddings],
            "moe_layers": [x.to_dict() for x in self.moe_layers],
        }

    def summary(self) -> list[str]:
        """One human line per structure kind found (groups of equal shape share a line)."""
        lines = [f"{len(self.linears)} linear layers ({sum(x.shared for x in self.linears)} with shared weights)"]
        groups = Counter(
            (b.num_heads, b.num_kv_heads, b.head_dim, b.rotary, b.op_type) for b in self.attention_blocks
        )
        for (h, kv, d, rot, op), n in groups.items():
            via = "" if op == "subgraph" else f" ({op} op)"
            rope = ", rotary" if rot else ""
            lines.append(
                f"{n} attention block{_s(n)}{via}: {_q(h)} query heads, {_q(kv)} KV heads, head dim {_q(d)}{rope}"
            )
        ffn = Counter((b.hidden, b.gated, b.activation) for b in self.ffn_blocks)
        for (hidden, gated, act), n in ffn.items():
            kind = "gated" if gated else "not gated"
            lines.append(f"{n} FFN block{_s(n)}: width {hidden}, {kind}, activation {act}")
        if self.conv_layers:
            dw = sum(c.depthwise for c in self.conv_layers)
            lines.append(
                f"{len(self.conv_layers)} conv layers ({dw} depthwise) in {len(self.conv_chains)} chain{_s(len(self.conv_chains))}"
            )
        for e in self.embeddings:
            tied = f", tied with {e.tied_with}" if e.tied else ""
            lines.append(f"embedding {e.table}: vocab {e.vocab}, dim {e.dim}{tied}")
        if self.moe_layers:
            m = self.moe_layers[0]
            lines.append(
                f"{len(self.moe_layers)} MoE layer{_s(len(self.moe_layers))}: {m.num_experts} experts, top-{_q(m.top_k)}"
            )
        else:
            lines.append("no MoE layers")
        return lines


def _s(n: int) -> str:
    return "" if n == 1 else "s"


def _q(x) -> str:
    return "?" if x is None else str(x)


def analyze(model: ir.Model) -> Structures:
    """Find linears, FFN/attention blocks, convs, embeddings and MoE routers in ``model`` (read-only)."""
    graph = model.graph
    linears = find_linears(graph)
    by_output = {lin.output: lin for lin in linears}
    ffns = find_ffn_blocks(model, linears, by_output)
    attention = find_attention_blocks(graph, linears, by_output)
    convs = find_conv_layers(graph)
    structures = Structures(
        linears=linears,
        ffn_blocks=ffns,
        attention_blocks=attention,
        conv_layers=convs,
        conv_chains=find_conv_chains(convs, graph),
        embeddings=find_embeddings(graph, linears),
        moe_layers=find_moe_layers(graph, linears, ffns),
    )
    for line in structures.summary():
        logger.info("analysis: %s", line)
    return structures
