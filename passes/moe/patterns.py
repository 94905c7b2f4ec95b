"""Task patterns: one expert store and one small graph per task that reads only its experts from it.

``build_bundle`` prunes the model once per task (the moe pass on that task's calibration rows),
then writes:

- ``store.bin``: every initializer of the full model once, each at a 4 KiB-aligned offset;
- ``full.onnx``, ``probe.onnx`` and ``task_<name>.onnx``: graphs whose unchanged initializers are
  external references (location, offset, length) into the store, so ORT reads only the bytes a
  graph uses; a task graph never references a removed expert's weights.  Initializers the pass
  changed (the sliced routers, renumbered indices) are small and stay inside the task graph;
- ``probe.onnx``: the full model cut after the routers of the first ``probe_layers`` layers, which
  the runtime runs on a prompt to pick a task;
- ``manifest.json`` (schema ``edgeprune.moe_bundle/1``): per task its graph, kept experts per layer,
  and its routing signature (TCESS of the probe layers' experts on its calibration rows).

``edgeprune.runtime.moe.RetrievalSession`` reads the bundle.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from edgeprune.analysis import analyze
from edgeprune.calibration import CalibrationSet
from edgeprune.context import CompileContext
from edgeprune.errors import BadInputError
from edgeprune.model_io import load_model
from edgeprune.passes.moe.moe_pass import MoEConfig, MoEExpertPruningPass
from edgeprune.passes.moe.scores import collect_router_stats
from edgeprune.runtime.targets import get_target

logger = logging.getLogger(__name__)

SCHEMA = "edgeprune.moe_bundle/1"
STORE = "store.bin"
_ALIGN = 4096


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_store(model: ir.Model, path: Path) -> dict[str, dict]:
    """Every initializer of ``model`` into ``path``, aligned; name -> {offset, length, sha256}."""
    entries = {}
    with path.open("wb") as f:
        for name, value in model.graph.initializers.items():
            if value.const_value is None:
                continue
            data = value.const_value.tobytes()
            pad = (-f.tell()) % _ALIGN
            f.write(b"\0" * pad)
            entries[name] = {"offset": f.tell(), "length": len(data), "sha256": _digest(data)}
            f.write(data)
    return entries


def _reference_store(model: ir.Model, store: dict[str, dict], bundle: Path) -> int:
    """Point every initializer whose bytes are in the store at it; returns the store bytes the graph references."""
    referenced = 0
    for name, value in model.graph.initializers.items():
        entry = store.get(name)
        tensor = value.const_value
        if entry is None or tensor is None:
            continue
        data = tensor.tobytes()
        if len(data) != entry["length"] or _digest(data) != entry["sha256"]:
            continue  # changed by the pass (a sliced router): stays inside the graph
        value.const_value = ir.ExternalTensor(
            STORE, entry["offset"], entry["length"], tensor.dtype, shape=ir.Shape(tensor.shape), name=name, base_dir=bundle
        )
        referenced += entry["length"]
    return referenced


def _probe(model: ir.Model, routers: list[str]) -> ir.Model:
    """The model cut after ``routers`` (their logits are its only outputs)."""
    probe = ir.from_proto(ir.serde.serialize_model(model))
    produced = {v.name: v for node in probe.graph for v in node.outputs}
    probe.graph.outputs.clear()
    for name in routers:
        value = produced[name]
        value.shape = None
        probe.graph.outputs.append(value)
    RemoveUnusedNodesPass()(probe)
    for name in [n for n, v in probe.graph.initializers.items() if not v.uses()]:
        probe.graph.initializers.pop(name)
    return probe


def build_bundle(
    model_path: str | Path, tasks: dict[str, CalibrationSet], out_dir: str | Path, *,
    keep: float | int = 0.5, metric: str = "tcess", probe_layers: int = 1,
) -> dict:  # fmt: skip
    """Write the expert store, the full/probe/per-task graphs and the manifest into ``out_dir``; returns the manifest."""
    if not tasks:
        raise BadInputError("expert retrieval needs at least one task with calibration rows: e.g. --moe-tasks code=code.txt,chat=chat.txt.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    full = load_model(model_path)
    layers = analyze(full).moe_layers
    if not layers:
        raise BadInputError(f"{model_path} has no MoE layer: expert retrieval needs a mixture-of-experts model.")
    probe_layers = max(1, min(probe_layers, len(layers)))
    routers = [m.router.output for m in layers[:probe_layers]]
    manifest: dict = {
        "schema": SCHEMA, "store": STORE, "probe": {"graph": "probe.onnx", "routers": routers,
        "top_k": [m.top_k for m in layers[:probe_layers]], "scoring": [m.scoring for m in layers[:probe_layers]]},
        "keep": keep, "metric": metric, "tasks": {},
    }  # fmt: skip
    graphs: dict[str, ir.Model] = {"full.onnx": full, "probe.onnx": _probe(full, routers)}
    for name, calib in tasks.items():
        stats = collect_router_stats(full, layers[:probe_layers], calib)
        context = CompileContext(get_target("cpu"), calib, calib)
        result = MoEExpertPruningPass(MoEConfig(keep=keep, metric=metric), context)(load_model(model_path))
        graphs[f"task_{name}.onnx"] = result.model
        manifest["tasks"][name] = {
            "graph": f"task_{name}.onnx", "kept": [r["kept"] for r in result.records],
            "signature": [s.tcess.tolist() for s in stats], "calibration_tokens": stats[0].tokens,
        }  # fmt: skip
    store = _write_store(full, out / STORE)
    manifest["store_bytes"] = (out / STORE).stat().st_size
    manifest["graphs"] = {}
    for filename, model in graphs.items():
        referenced = _reference_store(model, store, out)
        ir.save(model, out / filename)
        manifest["graphs"][filename] = {"store_bytes_referenced": referenced, "file_bytes": (out / filename).stat().st_size}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    logger.info("moe bundle: %d tasks, store %d bytes", len(tasks), manifest["store_bytes"])
    return manifest


