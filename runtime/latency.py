"""Latency, throughput, peak memory and file size of a model in the target's own ORT session.

Timings are wall-clock ``time.perf_counter`` around ``session.run`` after warm-up runs, so
they include ORT's per-run overhead, as an application would see it.

Peak memory (Linux only) is the growth of the process's peak resident set while the session
is created and run: we reset the kernel's high-water mark (``5`` into /proc/self/clear_refs),
read VmRSS just before creating the session and VmHWM after the runs, and report the
difference.  Free heap pages are handed back first (glibc ``malloc_trim``), since a session
that reuses already-resident freed memory would otherwise look smaller than it is.  It is process-wide, so it is meaningful only while nothing else in the process
allocates at the same time.  Elsewhere (or when /proc is read-only) it is ``None``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from edgeprune.errors import BadInputError
from edgeprune.runtime.session import ModelSource, check_feeds, make_session, prepare_model, run_outputs
from edgeprune.runtime.targets import resolve_target

logger = logging.getLogger(__name__)

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


@dataclass
class LatencyResult:
    """Latency figures of one model on one target; times in milliseconds per run."""

    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    throughput_per_s: float
    runs: int
    warmup: int
    threads: int | None  # None: ORT's default pool (one thread per physical core)
    peak_memory_mb: float | None
    file_size_bytes: int | None
    times_ms: tuple[float, ...] = dataclasses.field(default=(), repr=False)
    """Every timed run in order (run i of each model in :func:`measure_side_by_side` shares round i)."""

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "times_ms"}


def round_ratios(candidate: LatencyResult, reference: LatencyResult) -> list[float]:
    """Candidate / reference time of each round of :func:`measure_side_by_side`, its two runs side by side.

    On a shared machine the load drifts during a measurement; a ratio of medians lets a slow
    stretch that hit one model's fast runs and the other's slow runs move the result, while each
    round's two runs see nearly the same load, so their ratio cancels it.  Results without
    recorded rounds (or with different counts) give the ratio of medians alone.
    """
    a, b = candidate.times_ms, reference.times_ms
    if not a or len(a) != len(b):
        return [candidate.p50_ms / reference.p50_ms]
    return [x / y for x, y in zip(a, b)]


def paired_ratio(candidate: LatencyResult, reference: LatencyResult) -> float:
    """The median of :func:`round_ratios`: how much slower the candidate runs, robust to load drift."""
    return float(np.median(round_ratios(candidate, reference)))


# --- peak memory -------------------------------------------------------------------------

def _status_kb(field: str) -> int | None:
    try:
        with open(_STATUS, encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _release_free_heap() -> None:
    """Return freed heap pages to the OS, so a new session cannot hide in already-resident pages."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the reading is only less tight
        pass


def _reset_peak() -> int | None:
    """Reset VmHWM to the current RSS; return the RSS in kB, or None when not possible here."""
    _release_free_heap()
    try:
        with open(_CLEAR_REFS, "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        return None
    return _status_kb("VmRSS")


def _peak_since(rss_before_kb: int | None) -> float | None:
    """MB the process peak grew since :func:`_reset_peak` returned ``rss_before_kb``."""
    if rss_before_kb is None:
        return None
    hwm = _status_kb("VmHWM")
    if hwm is None:
        return None
    return max(hwm - rss_before_kb, 0) / 1024.0


# --- helpers -------------------------------------------------------------------------------

def _check_counts(warmup: int, runs: int) -> None:
    if not isinstance(runs, int) or runs < 1:
        raise BadInputError(f"runs must be a positive integer, got {runs!r}: pass e.g. runs=30.")
    if not isinstance(warmup, int) or warmup < 0:
        raise BadInputError(f"warmup must be zero or a positive integer, got {warmup!r}: pass e.g. warmup=5.")


def _batch_size(session, feeds: Mapping[str, np.ndarray]) -> int:
    """Leading dimension of the session's first input (1 for scalars)."""
    first = np.asarray(feeds[session.get_inputs()[0].name])
    return int(first.shape[0]) if first.ndim else 1


def _timed_run(session, feeds) -> float:
    """One run in milliseconds; ORT errors from bad feeds become CalibrationDataError."""
    start = time.perf_counter()
    run_outputs(session, None, feeds)
    return (time.perf_counter() - start) * 1000.0


def _result(times_ms: list[float], batch: int, warmup: int, threads: int | None,
            peak_mb: float | None, size: int | None) -> LatencyResult:
    arr = np.asarray(times_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    mean = float(arr.mean())
    return LatencyResult(
        p50_ms=float(p50), p90_ms=float(p90), p99_ms=float(p99), mean_ms=mean, min_ms=float(arr.min()),
        throughput_per_s=batch * 1000.0 / mean if mean > 0 else float("inf"),
        runs=len(times_ms), warmup=warmup, threads=threads, peak_memory_mb=peak_mb, file_size_bytes=size,
        times_ms=tuple(float(t) for t in times_ms),
    )


def _prepare_file(model) -> ModelSource:
    """Prepare ``model`` so ORT loads it from a file, as a deployed app does.

    ORT's peak while creating a session from bytes is higher than from a file (about a third
    of the weights more for MiniLM), so in-memory candidates are written to a temporary file;
    that keeps their peak memory comparable with a baseline given as a path.
    """
    source = prepare_model(model)
    if not isinstance(source.ort_input, bytes):
        return source
    tmpdir = tempfile.mkdtemp(prefix="edgeprune_model_")
    path = os.path.join(tmpdir, "model.onnx")
    with open(path, "wb") as fh:
        fh.write(source.ort_input)
    return ModelSource(path, source.size_bytes, tmpdir, source.label)


def _open(source: ModelSource, feeds, target, threads, warmup: int):
    """Create a session and warm it up, measuring the peak memory this takes.

    At least one run happens before the memory reading even with ``warmup=0``, since ORT's
    arena grows on the first run; that run is then not counted as a warm-up.
    """
    rss_before = _reset_peak()
    session = make_session(source, target, threads=threads)
    check_feeds(session, feeds)
    for _ in range(max(warmup, 1)):
        _timed_run(session, feeds)
    return session, rss_before


_PROCESS_WARM = False


def _warm_process(target, threads) -> None:
    """Pay ORT's one-time process costs (environment, kernel registries) on a tiny model.

    Without this the first model measured in a process carries them in its peak memory, and a
    side-by-side comparison would be biased against whichever model comes first.
    """
    global _PROCESS_WARM
    if _PROCESS_WARM:
        return
    import onnx

    tiny = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]> g (float[N, 8] x) => (float[N, 8] y) { y = Relu(x) }'
    )
    session = make_session(tiny, target, threads=threads)
    session.run(None, {"x": np.ones((1, 8), np.float32)})
    del session
    gc.collect()
    _PROCESS_WARM = True


def _cleanup(source: ModelSource, model) -> None:
    if source.tmpdir and source is not model:
        shutil.rmtree(source.tmpdir, ignore_errors=True)


# --- public --------------------------------------------------------------------------------

def measure_latency(model, feeds: Mapping[str, np.ndarray], target="cpu", *, warmup: int = 5,
                    runs: int = 30, threads: int | None = None) -> LatencyResult:
    """Warm up, then time ``runs`` runs of ``model`` on ``target`` with ``feeds``."""
    _check_counts(warmup, runs)
    target = resolve_target(target)
    source = _prepare_file(model)
    _warm_process(target, threads)
    try:
        session, rss_before = _open(source, feeds, target, threads, warmup)
        times = [_timed_run(session, feeds) for _ in range(runs)]
        peak = _peak_since(rss_before)
        batch = _batch_size(session, feeds)
        del session
        gc.collect()
    finally:
        _cleanup(source, model)
    return _result(times, batch, warmup, threads, peak, source.size_bytes)


def _feeds_per_model(models: Mapping, feeds: Mapping) -> dict[str, Mapping[str, np.ndarray]]:
    """One feed dict shared by all models, or a dict of feed dicts keyed like ``models``."""
    if feeds and set(feeds) == set(models) and all(isinstance(v, Mapping) for v in feeds.values()):
        return {name: feeds[name] for name in models}
    return {name: feeds for name in models}


def measure_side_by_side(models: Mapping[str, object], feeds, target="cpu", *, warmup: int = 5,
                         runs: int = 30, threads: int | None = None) -> dict[str, LatencyResult]:
    """Time several models in interleaved rounds so machine noise hits every candidate alike.

    All sessions are created (and warmed up) first; then each round runs every model once,
    rotating the order each round so no model always runs first or last.  ``feeds`` is one
    feed dict for all models, or a dict mapping each model's key to its own feed dict.

    Peak memory per model is read while that model's session is created and warmed up, one
    model at a time with the high-water mark reset before each: it is the growth caused by
    that model (weights, arena, first-run buffers) on top of the sessions already open, which
    costs no extra session creation.  Timed rounds are not included in it; ORT's arena
    reaches its size in the first run, which the warm-up covers.
    """
    _check_counts(warmup, runs)
    if not models:
        raise BadInputError("no models to compare: pass a dict of at least one name -> model.")
    target = resolve_target(target)
    per_feeds = _feeds_per_model(models, feeds)
    names = list(models)
    sources: dict[str, ModelSource] = {}
    sessions, peaks, times = {}, {}, {name: [] for name in names}
    _warm_process(target, threads)
    try:
        for name in names:
            sources[name] = _prepare_file(models[name])
            sessions[name], rss_before = _open(sources[name], per_feeds[name], target, threads, warmup)
            peaks[name] = _peak_since(rss_before)
        for r in range(runs):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                times[name].append(_timed_run(sessions[name], per_feeds[name]))
        batches = {name: _batch_size(sessions[name], per_feeds[name]) for name in names}
    finally:
        sessions.clear()
        gc.collect()
        for name, source in sources.items():
            _cleanup(source, models[name])
    return {
        name: _result(times[name], batches[name], warmup, threads, peaks[name], sources[name].size_bytes)
        for name in names
    }
