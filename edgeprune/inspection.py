"""What ``edgeprune inspect`` shows: interface, opset, where the weights are, the structures found, and
what each registered pass would act on (``EdgePass.describe``; the spine imports no pass itself)."""

from __future__ import annotations

import collections
import logging
import pathlib
from typing import Any

import onnx_ir as ir

from edgeprune import model_io
from edgeprune.analysis import analyze
from edgeprune.errors import BadInputError
from edgeprune.passes.registry import available_passes, get_pass

logger = logging.getLogger(__name__)


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
    """Everything ``inspect --json`` prints."""
    return inspect_with_tables(path)[0]


def inspect_with_tables(path: str | pathlib.Path) -> tuple[dict[str, Any], list[tuple[str, list[str], list[tuple]]]]:
    """``inspect_model``'s answer, and the passes' tables ((title, columns, rows)) for the text view."""
    model = model_io.load_model(path)
    structures = analyze(model)
    described = _describe_passes(model)
    info: dict[str, Any] = {
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
        "summary": structures.summary() + [line for d in described for line in d.get("summary", [])],
    }
    tables = []
    for d in described:
        info.update(d.get("fields", {}))
        tables += d.get("tables", [])
    return info, tables


def _describe_passes(model: ir.Model) -> list[dict[str, Any]]:
    """Each registered pass's ``describe`` answer, in registry order (built-ins first); a pass that fails to load is skipped."""
    answers = []
    for name in available_passes():
        try:
            cls = get_pass(name)
        except (ImportError, AttributeError, BadInputError) as exc:
            logger.warning("inspect: pass %r does not load (%s); it is left out", name, exc)
            continue
        answer = cls.describe(model)
        if answer:
            answers.append(answer)
    return answers
