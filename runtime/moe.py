"""Expert retrieval at run time: the bundle (one expert store, a small graph per task) and the session that picks a task per prompt.

``build_bundle`` (Python: a calibration set per task) and ``bundle_from_report`` (a compile's moe pass
entry, as ``compile --moe-tasks`` writes it) write into a folder:

- ``store.bin``: every initializer of the full model once, each at a 4 KiB-aligned offset;
- ``full.onnx`` and ``task_<name>.onnx``: graphs whose unchanged initializers are external references
  (location, offset, length) into the store, so ORT reads only the bytes a graph uses; a task graph
  never references a removed expert's weights.  Initializers the removal changed (the sliced routers)
  are small and stay inside the task graph.  Each task graph is the ``moe`` pass replaying that task's
  expert choice, reached through the pass registry like any pass;
- ``probe.onnx``: the full model cut after the routers of the first ``probe_layers`` layers;
- ``manifest.json`` (schema ``edgeprune.moe_bundle/1``): per task its graph, kept experts per layer and
  its routing on its calibration rows in the probe layers (histogram of selections, and TCESS per expert).

``RetrievalSession`` runs the probe graph on a prompt and picks the task its routing fits best: by default
the task under which the prompt's per-token expert selections are most likely (each expert's selection a
Bernoulli of the task's routing histogram, summed over tokens and probe layers), or the task whose mean
signature (TCESS per expert) is nearest in L1.  It then opens that task's graph (cached), so ORT reads from
the store only the bytes that graph references: the kept experts and the shared weights, never a removed expert.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx_ir.passes.common import RemoveUnusedNodesPass

from edgeprune.analysis import analyze
from edgeprune.errors import BadInputError
from edgeprune.model_io import load_model

logger = logging.getLogger(__name__)

SCHEMA = "edgeprune.moe_bundle/1"
STORE = "store.bin"
_ALIGN = 4096


def _options(threads: int | None, prepacking: bool = True) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if not prepacking:
        # MLAS otherwise copies each MatMul weight into a packed buffer and drops the store's mapped pages; without the copy
        # the weights stay file-backed pages of the store, read only where a token's experts run (slower prefill, BENCHMARKS.md)
        options.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


METHODS = ("tcess-l1", "routing-nb")
#: Selection shares below this (or above 1 - it) are clipped before their logarithm in ``routing-nb``.
NB_FLOOR = 1e-3


def _selection(logits: np.ndarray, k: int, scoring: str | None, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(router probabilities, top-``k`` selection) per token, [tokens, E]; padding rows (``mask`` 0) left out."""
    logits = logits.reshape(-1, logits.shape[-1]).astype(np.float64)
    if mask is not None and mask.size == logits.shape[0]:
        logits = logits[mask.reshape(-1).astype(bool)]
    if scoring == "sigmoid":
        probs = 1.0 / (1.0 + np.exp(-logits))
    else:
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    selected = np.zeros_like(probs, dtype=bool)
    np.put_along_axis(selected, top, True, axis=1)
    return probs, selected


def expected_selection(logits: np.ndarray, k: int, scoring: str | None, mask: np.ndarray | None = None) -> np.ndarray:
    """Per expert, the mean over tokens of its router probability where top-``k`` selects it (PreMoe's TCESS)."""
    probs, selected = _selection(logits, k, scoring, mask)
    return (probs * selected).sum(axis=0) / max(1, probs.shape[0])


def routing_log_likelihood(selected: np.ndarray, frequency: np.ndarray) -> float:
    """log P(the prompt's per-token expert selections | a task), each expert's selection a Bernoulli of the task's share.

    ``selected`` is [tokens, E] (top-k as the router picks), ``frequency`` the task's share of tokens selecting
    each expert (its routing histogram).  Evidence adds up over tokens, where a mean signature averages it away.
    """
    f = np.clip(np.asarray(frequency, dtype=np.float64), NB_FLOOR, 1.0 - NB_FLOOR)
    return float((selected * np.log(f) + (~selected) * np.log1p(-f)).sum())


class RetrievalSession:
    """Choose a task pattern per prompt and run it; sessions are opened on first use and cached.

    ``method``: ``routing-nb`` (default where the bundle stores routing histograms): the task under which the
    prompt's per-token expert selections in the probe layers are most likely; ``tcess-l1``: the task whose mean
    signature (TCESS per expert) is nearest in L1.  ``layers`` uses only the first probe layers.  ``prepacking=False``
    turns off ORT's weight prepacking in the task sessions: less resident memory (the weights stay mapped from the
    store instead of copied), slower prefill; the default keeps ORT's.
    """

    def __init__(
        self, bundle: str | Path, *, threads: int | None = None, method: str | None = None, layers: int | None = None, prepacking: bool = True
    ):
        self.bundle = Path(bundle)
        path = self.bundle / "manifest.json"
        if not path.is_file():
            raise BadInputError(f"{self.bundle} is not an MoE retrieval bundle (no manifest.json): build one with compile --moe-tasks.")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("schema") != SCHEMA:
            raise BadInputError(f"{path} has schema {self.manifest.get('schema')!r}, not {SCHEMA!r}: rebuild the bundle with this edgeprune.")
        has_routing = all("routing" in t for t in self.manifest["tasks"].values())
        self.method = method or ("routing-nb" if has_routing else "tcess-l1")
        if self.method not in METHODS:
            raise BadInputError(f"unknown retrieval method {self.method!r}: choose one of {', '.join(METHODS)}.")
        if self.method == "routing-nb" and not has_routing:
            raise BadInputError(f"{path} stores no routing histograms per task, which routing-nb needs: rebuild the bundle or use tcess-l1.")
        probe_layers = len(self.manifest["probe"]["routers"])
        self.layers = probe_layers if layers is None else max(1, min(int(layers), probe_layers))
        self.threads = threads
        self.prepacking = bool(prepacking)
        self._sessions: dict[str, ort.InferenceSession] = {}
        self.last_choice_seconds: float | None = None
        self.last_scores: dict[str, float] = {}

    @property
    def tasks(self) -> list[str]:
        return list(self.manifest["tasks"])

    def _session(self, filename: str) -> ort.InferenceSession:
        if filename not in self._sessions:
            self._sessions[filename] = ort.InferenceSession(str(self.bundle / filename), _options(self.threads, self.prepacking))
        return self._sessions[filename]

    def _feed(self, session: ort.InferenceSession, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [i.name for i in session.get_inputs()]
        missing = [n for n in names if n not in feed]
        if missing:
            raise BadInputError(f"the prompt feed lacks input(s) {', '.join(missing)} the model needs: pass them with the prompt.")
        return {n: feed[n] for n in names}

    def _routing(self, feed: dict[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(probabilities, selection) per probe layer on this prompt's tokens."""
        probe = self.manifest["probe"]
        session = self._session(probe["graph"])
        logits = session.run(probe["routers"][: self.layers], self._feed(session, feed))
        mask = feed.get("attention_mask")
        return [_selection(np.asarray(x), k, s, mask) for x, k, s in zip(logits, probe["top_k"], probe["scoring"])]

    def signature(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Expected selection scores (TCESS) of the probe layers' experts on this prompt."""
        return [(p * sel).sum(axis=0) / max(1, p.shape[0]) for p, sel in self._routing(feed)]

    def scores(self, feed: dict[str, np.ndarray]) -> dict[str, float]:
        """Per task, how well the prompt's routing fits it (higher is nearer)."""
        routing = self._routing(feed)
        tasks = self.manifest["tasks"]
        if self.method == "routing-nb":
            return {name: sum(routing_log_likelihood(sel, f) for (_, sel), f in zip(routing, t["routing"])) for name, t in tasks.items()}
        mine = [(p * sel).sum(axis=0) / max(1, p.shape[0]) for p, sel in routing]
        return {name: -sum(float(np.abs(np.asarray(ref) - m).sum()) for ref, m in zip(t["signature"], mine)) for name, t in tasks.items()}

    def choose(self, feed: dict[str, np.ndarray]) -> str:
        """The task whose stored routing the prompt's fits best (ties: the first task)."""
        start = time.perf_counter()
        self.last_scores = self.scores(feed)
        choice = max(self.last_scores, key=self.last_scores.get)
        self.last_choice_seconds = time.perf_counter() - start
        logger.debug("moe retrieval (%s): %s (scores %s)", self.method, choice, self.last_scores)
        return choice

    def session(self, task: str) -> ort.InferenceSession:
        """The task's graph, opened once: ORT reads only its experts' bytes from the store."""
        if task not in self.manifest["tasks"]:
            raise BadInputError(f"unknown task {task!r}: the bundle has {', '.join(self.tasks)}.")
        return self._session(self.manifest["tasks"][task]["graph"])

    def run(self, feed: dict[str, np.ndarray], task: str | None = None) -> tuple[str, list[np.ndarray]]:
        """(chosen task, outputs) for one prompt; ``task`` skips the choice."""
        task = task or self.choose(feed)
        session = self.session(task)
        return task, session.run(None, self._feed(session, feed))


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
            f.write(b"\0" * ((-f.tell()) % _ALIGN))
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
            continue  # changed by the removal (a sliced router): stays inside the graph
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


def _moe_pass(options: dict, context=None):
    from edgeprune.passes.registry import get_pass  # the pass family is reached through the registry only

    return get_pass("moe").from_options(options, context)


def write_bundle(
    model_path: str | Path, kept: dict[str, list[list[int]]], signatures: dict[str, list[list[float]]], out_dir: str | Path, *,
    probe_layers: int, routing: dict[str, list[list[float]]] | None = None, meta: dict | None = None,
) -> dict:  # fmt: skip
    """The bundle for task patterns already chosen: ``kept[task]`` lists the experts per MoE layer, ``signatures[task]``
    its TCESS per layer, ``routing[task]`` its routing histogram (selection share per expert) per layer.  Returns the manifest."""
    if not kept:
        raise BadInputError("expert retrieval needs at least one task with calibration rows: e.g. --moe-tasks code=code.npz,chat=chat.npz.")
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
        **(meta or {}), "tasks": {},
    }  # fmt: skip
    graphs: dict[str, ir.Model] = {"full.onnx": full, "probe.onnx": _probe(full, routers)}
    for name, experts in kept.items():
        graphs[f"task_{name}.onnx"] = _moe_pass({"experts": experts})(load_model(model_path)).model
        manifest["tasks"][name] = {"graph": f"task_{name}.onnx", "kept": experts, "signature": signatures[name][:probe_layers]}
        if routing is not None:
            manifest["tasks"][name]["routing"] = routing[name][:probe_layers]
    store = _write_store(full, out / STORE)
    manifest["store_bytes"] = (out / STORE).stat().st_size
    manifest["graphs"] = {}
    for filename, model in graphs.items():
        referenced = _reference_store(model, store, out)
        ir.save(model, out / filename)
        manifest["graphs"][filename] = {"store_bytes_referenced": referenced, "file_bytes": (out / filename).stat().st_size}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    logger.info("moe bundle: %d tasks, store %d bytes", len(kept), manifest["store_bytes"])
    return manifest


def bundle_from_report(model_path: str | Path, moe_entry: dict, out_dir: str | Path, *, probe_layers: int = 2) -> dict:
    """The bundle of a compile whose moe pass ran with tasks: ``moe_entry`` is that pass's entry in the report's ``passes``."""
    records = moe_entry["records"]
    if not records or "kept_by_task" not in records[0]:
        raise BadInputError("the compile's moe pass ran without tasks, so there are no task patterns to bundle: pass --moe-tasks.")
    tasks = list(records[0]["kept_by_task"])
    kept = {t: [r["kept_by_task"][t] for r in records] for t in tasks}
    signatures = {t: [r["tcess_by_task"][t] for r in records] for t in tasks}
    routing = {t: [r["routing_by_task"][t] for r in records] for t in tasks}
    config = moe_entry.get("config", {})
    meta = {"keep": config.get("keep"), "metric": config.get("metric")}
    return write_bundle(model_path, kept, signatures, out_dir, probe_layers=probe_layers, routing=routing, meta=meta)


def build_bundle(
    model_path: str | Path, tasks: dict, out_dir: str | Path, *, keep: float | int = 0.5, metric: str = "tcess", probe_layers: int = 2,
) -> dict:  # fmt: skip
    """Python API: ``tasks`` maps a task name to its ``CalibrationSet``; the moe pass chooses each task's experts on it."""
    from edgeprune.context import CompileContext
    from edgeprune.runtime.targets import get_target

    if not tasks:
        raise BadInputError("expert retrieval needs at least one task with calibration rows: e.g. --moe-tasks code=code.npz,chat=chat.npz.")
    if keep == 1.0 and not isinstance(keep, int):
        raise BadInputError("keep 1.0 keeps every expert, so every task pattern would be the full model: give keep below 1, e.g. 0.5.")
    kept, signatures, routing = {}, {}, {}
    for name, calib in tasks.items():
        result = _moe_pass({"keep": keep, "metric": metric}, CompileContext(get_target("cpu"), calib, calib))(load_model(model_path))
        kept[name] = [r["kept"] for r in result.records]
        signatures[name] = [r["tcess"] for r in result.records]
        routing[name] = [r["frequency"] for r in result.records]
    return write_bundle(model_path, kept, signatures, out_dir, probe_layers=probe_layers, routing=routing, meta={"keep": keep, "metric": metric})
