"""What ``edgeprune inspect`` shows: interface, opset, where the weights are, and the structures found."""

from __future__ import annotations

import collections
import pathlib
from typing import Any

import onnx_ir as ir

from edgeprune import model_io
from edgeprune.analysis import analyze
from edgeprune.passes.prune.dependency import channel_groups, summary as channel_summary
from edgeprune.passes.prune.prune_pass import find_groups


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
    prune_groups, prune_skipped = find_groups(model)
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
        "summary": structures.summary() + (channel_summary(groups)[-1:] if groups else []) + [prune_summary(prune_groups, prune_skipped)],
        "channel_groups": [_group_entry(g) for g in groups],
        "prune_groups": prune_groups,
        "prune_skipped": prune_skipped,
    }


_KIND_NAMES = {"ffn": ("FFN", "neurons"), "heads": ("head", "heads"), "conv": ("conv", "channels")}


def _units_text(units: list[int], noun: str) -> str:
    lo, hi = min(units), max(units)
    return f"{lo} {noun} each" if lo == hi else f"{lo}-{hi} {noun}"


def prune_summary(groups: list[dict], skipped: list[dict]) -> str:
    """One line: what the prune pass would score, per kind, and how many groups it leaves out."""
    parts = []
    for kind, (name, noun) in _KIND_NAMES.items():
        mine = [g for g in groups if g["kind"] == kind]
        if mine:
            parts.append(f"{len(mine)} {name} group{'' if len(mine) == 1 else 's'} ({_units_text([g['units'] for g in mine], noun)})")
    return f"prunable: {', '.join(parts) or 'nothing'}; {len(skipped)} skipped"


def prune_table(groups: list[dict], skipped: list[dict]) -> list[tuple[str, int, str, int, str]]:
    """Rows (kind, groups, units, skipped, reasons) for the CLI: one per unit kind found or skipped."""
    rows = []
    for kind, (_, noun) in _KIND_NAMES.items():
        mine = [g for g in groups if g["kind"] == kind]
        left = [s for s in skipped if s["kind"] == kind]
        if not mine and not left:
            continue
        reasons = collections.Counter(_short_reason(s["reason"]) for s in left)
        text = "; ".join(f"{r} (x{n})" if n > 1 else r for r, n in reasons.most_common(3))
        if len(reasons) > 3:
            text += f"; +{len(reasons) - 3} more"
        units = _units_text([g["units"] for g in mine], noun) if mine else "-"
        rows.append((kind, len(mine), units, len(left), text or "-"))
    return rows


def _short_reason(reason: str) -> str:
    """The reason without its group prefix ("attention 3: ...", "conv group x: ...") so equal reasons count together."""
    head, sep, tail = reason.partition(": ")
    text = tail if sep and len(head.split()) <= 3 else reason
    return text if len(text) <= 90 else text[:87] + "..."


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
