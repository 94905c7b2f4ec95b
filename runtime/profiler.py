"""Per-op and per-node time from ONNX Runtime's own profiler.

ORT writes one JSON trace per session.  Kernel times are the events with ``cat == "Node"``
whose name ends in ``_kernel_time`` (``args.op_name`` is the op type, ``dur`` is in
microseconds); each ``session.run`` is one ``cat == "Session"``, ``name == "model_run"``
event spanning its kernels.

Warm-up runs cannot be kept out of the trace, since profiling is switched on for the whole
session.  We run warm-up and timed runs in the same session and drop the kernels of the
first ``warmup`` ``model_run`` intervals by timestamp: a kernel belongs to the run whose
interval contains its start.  This keeps the measured runs in the exact session state that
was warmed up (a separate plain session would warm a different arena and thread pool).

Times are those of the graph ORT actually executes, i.e. after its graph optimizations
(fused ops such as ``FusedMatMul`` or ``SkipLayerNormalization`` appear under their own
names).  ``total_ms`` is the sum of kernel times per run, and shares are fractions of it,
so framework overhead between kernels is not part of either.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from edgeprune.errors import BadInputError
from edgeprune.runtime.session import check_feeds, make_session, run
from edgeprune.runtime.targets import resolve_target

logger = logging.getLogger(__name__)

_KERNEL_SUFFIX = "_kernel_time"


@dataclass
class OpTypeTime:
    """Time of all nodes of one op type, per run."""

    op_type: str
    total_ms: float
    share: float
    calls: int  # kernel invocations per run


@dataclass
class NodeTime:
    """Time of one node, per run."""

    node: str
    op_type: str
    ms: float
    share: float


@dataclass
class OpProfile:
    """Where a run's kernel time goes, averaged over ``runs`` timed runs."""

    total_ms: float
    runs: int
    by_op_type: list[OpTypeTime] = field(default_factory=list)
    by_node: list[NodeTime] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _run_intervals(events: list[dict]) -> list[tuple[float, float]]:
    runs = [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)))
            for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    return sorted(runs)


def _timed_kernels(events: list[dict], warmup: int) -> tuple[list[dict], int]:
    """Kernel events of the runs after the first ``warmup`` ones, and how many runs those are."""
    intervals = _run_intervals(events)
    timed = intervals[warmup:]
    if not timed:
        return [], 0
    starts = [start for start, _ in timed]
    kernels = []
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith(_KERNEL_SUFFIX):
            continue
        ts = float(e["ts"])
        i = bisect.bisect_right(starts, ts) - 1
        if i >= 0 and ts <= timed[i][1]:
            kernels.append(e)
    return kernels, len(timed)


def parse_profile(events: list[dict], warmup: int = 0) -> OpProfile:
    """Aggregate an ORT profiler trace into per-op-type and per-node times per run."""
    kernels, runs = _timed_kernels(events, warmup)
    if runs == 0:
        return OpProfile(total_ms=0.0, runs=0)
    op_us: dict[str, float] = defaultdict(float)
    op_calls: dict[str, int] = defaultdict(int)
    node_us: dict[tuple[str, str], float] = defaultdict(float)
    for e in kernels:
        op = str(e.get("args", {}).get("op_name", "?"))
        node = str(e["name"])[: -len(_KERNEL_SUFFIX)]
        dur = float(e.get("dur", 0))
        op_us[op] += dur
        op_calls[op] += 1
        node_us[(node, op)] += dur
    total_us = sum(op_us.values())

    def share(us: float) -> float:
        return us / total_us if total_us > 0 else 0.0

    by_op = [OpTypeTime(op, us / runs / 1000.0, share(us), int(round(op_calls[op] / runs)))
             for op, us in op_us.items()]
    by_node = [NodeTime(node, op, us / runs / 1000.0, share(us)) for (node, op), us in node_us.items()]
    by_op.sort(key=lambda t: (-t.total_ms, t.op_type))
    by_node.sort(key=lambda t: (-t.ms, t.node))
    return OpProfile(total_ms=total_us / runs / 1000.0, runs=runs, by_op_type=by_op, by_node=by_node)


def _read_and_delete(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    finally:
        try:
            os.remove(path)
        except OSError:
            logger.debug("could not remove profile %s", path)
    return data.get("traceEvents", []) if isinstance(data, dict) else data


def profile_model(model, feeds: Mapping[str, np.ndarray], target="cpu", *, runs: int = 20,
                  warmup: int = 3, threads: int | None = None) -> OpProfile:
    """Run ``model`` with ORT's profiler and return per-op time over the ``runs`` timed runs."""
    if not isinstance(runs, int) or runs < 1:
        raise BadInputError(f"runs must be a positive integer, got {runs!r}: pass e.g. runs=20.")
    if not isinstance(warmup, int) or warmup < 0:
        raise BadInputError(f"warmup must be zero or a positive integer, got {warmup!r}: pass e.g. warmup=3.")
    target = resolve_target(target)
    session = make_session(model, target, threads=threads, profile=True)
    check_feeds(session, feeds)
    try:
        for _ in range(warmup + runs):
            run(session, feeds)
    finally:
        path = session.end_profiling()
    events = _read_and_delete(path) if path else []
    profile = parse_profile(events, warmup)
    if profile.runs != runs:
        # ORT stops recording past its event cap; say so rather than report a silent subset.
        logger.warning("ORT's profile holds %d of %d timed runs; per-run figures use %d",
                       profile.runs, runs, profile.runs)
    return profile


def compare_profiles(a: OpProfile, b: OpProfile) -> list[dict]:
    """Per op type: time in ``a`` and ``b`` (ms per run), delta (b - a) and ratio (b / a), by |delta|."""
    a_ops = {t.op_type: t for t in a.by_op_type}
    b_ops = {t.op_type: t for t in b.by_op_type}
    rows = []
    for op in sorted(set(a_ops) | set(b_ops)):
        a_ms = a_ops[op].total_ms if op in a_ops else 0.0
        b_ms = b_ops[op].total_ms if op in b_ops else 0.0
        rows.append({
            "op_type": op,
            "a_ms": a_ms,
            "b_ms": b_ms,
            "delta_ms": b_ms - a_ms,
            "ratio": b_ms / a_ms if a_ms > 0 else None,
            "a_calls": a_ops[op].calls if op in a_ops else 0,
            "b_calls": b_ops[op].calls if op in b_ops else 0,
        })
    rows.sort(key=lambda r: (-abs(r["delta_ms"]), r["op_type"]))
    return rows
