"""MoE expert pruning on the project's trained MoE: per-domain perplexity at 75/50/25 % experts kept.

Three ways to choose the experts, at the same count: task-specific (TCESS on the domain's own
training windows), task-agnostic (TCESS on windows of all domains) and the frequency baseline
(selection frequency on the domain's windows).  Perplexity (bytes) is measured in ONNX Runtime on
each domain's held-out windows, for the pruned loop-form ONNX graph; in-domain is the domain the
experts were chosen for, out-of-domain the mean over the other domains.

    python benchmarks/run_moe.py [WEIGHTS_DIR] [--out benchmarks/results/moe.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgeprune.calibration import CalibrationSet
from edgeprune.context import CompileContext
from edgeprune.model_io import load_model, to_proto
from edgeprune.models import moe_train
from edgeprune.models.moe_export import export_moe
from edgeprune.passes.moe import MoEConfig, MoEExpertPruningPass
from edgeprune.runtime.moe import build_bundle
from edgeprune.runtime.moe import RetrievalSession
from edgeprune.runtime.targets import get_target

logger = logging.getLogger(__name__)

KEEPS = (0.75, 0.5, 0.25)
CALIB_WINDOWS = 24
EVAL_WINDOWS = 32


def _feeds(windows: np.ndarray) -> list[dict[str, np.ndarray]]:
    n, s = windows.shape
    return [{"input_ids": w[None], "attention_mask": np.ones((1, s), np.int64), "position_ids": np.arange(s, dtype=np.int64)[None]} for w in windows]


def _perplexity(session: ort.InferenceSession, windows: np.ndarray) -> float:
    n, s = windows.shape
    feed = {"input_ids": windows, "attention_mask": np.ones_like(windows), "position_ids": np.tile(np.arange(s, dtype=np.int64), (n, 1))}
    logits = session.run(None, feed)[0].astype(np.float64)[:, :-1]
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, windows[:, 1:, None], axis=-1)
    return float(np.exp(nll.mean()))


def _session(model) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(to_proto(model).SerializeToString(), options)


def _prune(path: Path, calib: list[dict], keep: float, metric: str):
    calibration = CalibrationSet(calib, "bench")
    context = CompileContext(get_target("cpu"), calibration, calibration)
    result = MoEExpertPruningPass(MoEConfig(keep=keep, metric=metric), context)(load_model(path))
    return result.model, [r["kept"] for r in result.records]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", nargs="?", default=str(Path(__file__).resolve().parents[1] / "models" / "weights" / "moe_mix"))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "moe.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    model = moe_train.load(args.weights)
    splits = {d: moe_train.split(t) for d, t in moe_train.domain_texts().items()}
    rng = np.random.default_rng(0)
    calib = {}
    for d, (train, _) in splits.items():
        starts = rng.integers(0, len(train) - moe_train.SEQ_LEN - 1, CALIB_WINDOWS)
        calib[d] = np.stack([train[s : s + moe_train.SEQ_LEN] for s in starts])
    held = {d: moe_train.held_out_windows(h, EVAL_WINDOWS) for d, (_, h) in splits.items()}
    mixed = np.concatenate([c[: CALIB_WINDOWS // len(calib) + 1] for c in calib.values()])
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_moe(model, Path(tmp) / "onnx")
        full = _session(load_model(path))
        base = {d: _perplexity(full, w) for d, w in held.items()}
        rows = []
        agnostic_cache = {}
        for keep in KEEPS:
            t = time.time()
            agnostic_cache[keep] = _prune(path, _feeds(mixed), keep, "tcess")
            for domain in held:
                for method, (pruned, kept) in {
                    "task-specific (tcess)": _prune(path, _feeds(calib[domain]), keep, "tcess"),
                    "task-agnostic (tcess, all domains)": agnostic_cache[keep],
                    "frequency (domain)": _prune(path, _feeds(calib[domain]), keep, "frequency"),
                }.items():
                    session = _session(pruned)
                    ppl = {d: _perplexity(session, w) for d, w in held.items()}
                    other = [ppl[d] / base[d] for d in held if d != domain]
                    rows.append({
                        "keep": keep, "domain": domain, "method": method, "kept_per_layer": [len(k) for k in kept],
                        "in_domain_ppl": ppl[domain], "full_ppl": base[domain], "in_domain_ratio": ppl[domain] / base[domain],
                        "out_of_domain_ratio_mean": float(np.mean(other)),
                    })  # fmt: skip
            logger.info("keep %.2f done in %.0f s", keep, time.time() - t)
        retrieval = _retrieval(path, calib, splits, Path(tmp) / "bundle")
    result = {"weights": args.weights, "full_perplexity": base, "rows": rows, "retrieval": retrieval}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for keep in KEEPS:
        for method in ("task-specific (tcess)", "task-agnostic (tcess, all domains)", "frequency (domain)"):
            sel = [r for r in rows if r["keep"] == keep and r["method"] == method]
            logger.info("keep %.2f %-36s in-domain ppl ratio mean %.3f (max %.3f), out-of-domain %.3f", keep, method,
                        np.mean([r["in_domain_ratio"] for r in sel]), max(r["in_domain_ratio"] for r in sel),
                        np.mean([r["out_of_domain_ratio_mean"] for r in sel]))  # fmt: skip
    logger.info("retrieval: %s", {k: v for k, v in retrieval.items() if k != "confusion"})
    return result


_RSS = """
import sys, time, numpy as np, onnxruntime as ort
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:"))
base = rss()
options = ort.SessionOptions(); options.intra_op_num_threads = 2
t = time.perf_counter(); s = ort.InferenceSession(sys.argv[1], options); load = time.perf_counter() - t
ids = np.zeros((1, 1), np.int64)
feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": ids}
s.run(None, feed)
t = time.perf_counter()
for _ in range(20):
    s.run(None, feed)
per_token = (time.perf_counter() - t) / 20
print(base, rss(), load, per_token)
"""


def _footprint(path: Path) -> dict:
    """Resident memory (KiB, VmRSS) a fresh process gains by loading ``path`` and running one token; load time; 1-token latency."""
    runs = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", _RSS, str(path)], capture_output=True, text=True, check=True).stdout.split()
        runs.append((int(out[1]) - int(out[0]), float(out[2]), float(out[3])))
    rss, load, token = (sorted(x)[1] for x in zip(*runs))  # medians of 3
    return {"rss_delta_kib": rss, "load_seconds": load, "one_token_seconds": token, "decode_tokens_per_s_no_cache": 1.0 / token}


def _retrieval(path: Path, calib: dict, splits: dict, out: Path, prompts: int = 20, prompt_tokens: int = 32) -> dict:
    """Bundle at 50 % experts per task; held-out prompts (first ``prompt_tokens`` bytes of held-out windows) pick a task."""
    tasks = {d: CalibrationSet(_feeds(c), d) for d, c in calib.items()}
    manifest = build_bundle(path, tasks, out, keep=0.5, metric="tcess", probe_layers=2)
    session = RetrievalSession(out, threads=2)
    confusion, seconds = {}, []
    for d, (_, held) in splits.items():
        windows = moe_train.held_out_windows(held, prompts, prompt_tokens)
        picks = []
        for feed in _feeds(windows):
            picks.append(session.choose(feed))
            seconds.append(session.last_choice_seconds)
        confusion[d] = {t: picks.count(t) for t in tasks}
    correct = sum(confusion[d][d] for d in confusion)
    full = _footprint(out / "full.onnx")
    per_task = {d: _footprint(out / f"task_{d}.onnx") for d in list(tasks)[:2]}
    return {
        "accuracy": correct / (prompts * len(confusion)), "confusion": confusion, "prompt_tokens": prompt_tokens,
        "choice_ms_median": 1000 * float(np.median(seconds)), "store_bytes": manifest["store_bytes"],
        "weights_bytes": {g: v["store_bytes_referenced"] + v["file_bytes"] for g, v in manifest["graphs"].items()},
        "full": full, "tasks": per_task,
    }  # fmt: skip


if __name__ == "__main__":
    main()
