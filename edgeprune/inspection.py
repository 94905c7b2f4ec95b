"""What ``edgeprune inspect`` shows: interface, opset, where the weights are, and the structures found."""

from __future__ import annotations

import collections
import pathlib
from typing import Any

import onnx_ir as ir

from edgeprune import model_io
from edgeprune.analysis import analyze
from edgeprune.dependency import channel_groups, summary as channel_summary


def weights_by_op_type(model: ir.Model) -> dict[str, dict[str, int]]:
    """Parameters and bytes of initializers, attributed to the op type of their first consumer."""
    table: dict[str, dict[str, int]] = collections.defaultdict(lambda: {"params": 0, "bytes": 0, "tensors": 0})
    for value in model.graph.initializers.values():
        if value.const_value is None:
            continue
        users = [node.op_type for node, _ in value.uses()]
        op = users[0] if users else "(unused)"
        table[op]["params"] += value.const_value.size
        table[op]["bytes"] += value.const_value.nbytes
        table[op]["tensors"] += 1
    return dict(sorted(table.items(), key=lambda kv: -kv[1]["bytes"]))


def inspect_model(path: str | pathlib.Path) -> dict[str, Any]:
    model = model_io.load_model(path)
    structures = analyze(model)
    groups = channel_groups(model) if structures.conv_layers else []
    return {
        "path": str(path),
        "file_bytes": model_io.file_size(path),
        "ir_version": model.ir_version,
        "opsets": dict(model.opset_imports),
        "producer": f"{model.producer_name or ''} {model.producer_version or ''}".strip(),
        "inputs": [{"name": v.name, "dtype": str(v.dtype), "shape": [str(d) for d in (v.shape or [])]} for v in model.graph.inputs],
        "outputs": [{"name": v.name, "dtype": str(v.dtype), "shape": [str(d) for d in (v.shape or [])]} for v in model.graph.outputs],
        "nodes": len(list(model.graph)),
        "op_counts": dict(collections.Counter(n.op_type for n in model.graph).most_common()),
        "params": model_io.param_count(model),
        "weight_bytes": model_io.model_bytes(model),
        "weights_by_op_type": weights_by_op_type(model),
        "structures": structures.to_dict(),
        "summary": structures.summary() + (channel_summary(groups)[-1:] if groups else []),
        "channel_groups": [_group_entry(g) for g in groups],
    }


def _group_entry(group) -> dict:
    """A channel group without its member list (which can be long): what is coupled, and why it is kept."""
    return {
        "name": group.name,
        "channels": group.channels,
        "producers": group.producers,
        "depthwise": group.lockstep,
        "consumers": group.consumers,
        "tensors": len(group.members),
        "residual": group.residual,
        "prunable": group.prunable,
        "reason": group.reason,
    }
