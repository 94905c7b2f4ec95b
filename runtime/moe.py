"""Expert retrieval at run time: pick the task pattern a prompt routes like, and run only its experts.

A bundle (written by the moe pass family's ``build_bundle``) holds one expert store and one small
graph per task whose weights are references into the store.  ``RetrievalSession`` runs the probe
graph (the model up to the first layers' routers) on the prompt, turns its router logits into
expected selection scores per expert (TCESS), and picks the task whose stored signature is nearest (L1 distance
over the probe layers).  It then opens that task's graph (cached), so ORT reads from the store only
the bytes that graph references: the kept experts and the shared weights, never a removed expert.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgeprune.errors import BadInputError

logger = logging.getLogger(__name__)

SCHEMA = "edgeprune.moe_bundle/1"


def _options(threads: int | None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def expected_selection(logits: np.ndarray, k: int, scoring: str | None) -> np.ndarray:
    """Per expert, the mean over tokens of its router probability where top-``k`` selects it (PreMoe's TCESS).

    Smoother than a selection count on a short prompt; the bundle stores the same quantity per task.
    """
    logits = logits.reshape(-1, logits.shape[-1]).astype(np.float64)
    if scoring == "sigmoid":
        probs = 1.0 / (1.0 + np.exp(-logits))
    else:
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    selected = np.zeros_like(probs, dtype=bool)
    np.put_along_axis(selected, top, True, axis=1)
    return (probs * selected).sum(axis=0) / max(1, probs.shape[0])


class RetrievalSession:
    """Choose a task pattern per prompt and run it; sessions are opened on first use and cached."""

    def __init__(self, bundle: str | Path, *, threads: int | None = None):
        self.bundle = Path(bundle)
        path = self.bundle / "manifest.json"
        if not path.is_file():
            raise BadInputError(f"{self.bundle} is not an MoE retrieval bundle (no manifest.json): build one with compile --moe-tasks.")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("schema") != SCHEMA:
            raise BadInputError(f"{path} has schema {self.manifest.get('schema')!r}, not {SCHEMA!r}: rebuild the bundle with this edgeprune.")
        self.threads = threads
        self._sessions: dict[str, ort.InferenceSession] = {}
        self.last_choice_seconds: float | None = None

    @property
    def tasks(self) -> list[str]:
        return list(self.manifest["tasks"])

    def _session(self, filename: str) -> ort.InferenceSession:
        if filename not in self._sessions:
            self._sessions[filename] = ort.InferenceSession(str(self.bundle / filename), _options(self.threads))
        return self._sessions[filename]

    def _feed(self, session: ort.InferenceSession, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [i.name for i in session.get_inputs()]
        missing = [n for n in names if n not in feed]
        if missing:
            raise BadInputError(f"the prompt feed lacks input(s) {', '.join(missing)} the model needs: pass them with the prompt.")
        return {n: feed[n] for n in names}

    def signature(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Expected selection scores (TCESS) of the probe layers' experts on this prompt."""
        probe = self.manifest["probe"]
        session = self._session(probe["graph"])
        logits = session.run(probe["routers"], self._feed(session, feed))
        return [expected_selection(np.asarray(x), k, s) for x, k, s in zip(logits, probe["top_k"], probe["scoring"])]

    def choose(self, feed: dict[str, np.ndarray]) -> str:
        """The task whose stored routing signature is nearest to the prompt's."""
        start = time.perf_counter()
        mine = self.signature(feed)
        distance = {
            name: sum(float(np.abs(np.asarray(ref) - m).sum()) for ref, m in zip(task["signature"], mine))
            for name, task in self.manifest["tasks"].items()
        }
        choice = min(distance, key=distance.get)
        self.last_choice_seconds = time.perf_counter() - start
        logger.debug("moe retrieval: %s (distances %s)", choice, distance)
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
