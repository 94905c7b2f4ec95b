"""Per-shape latency microbenchmarks of each quantization format on the target, cached on disk.

For latency-budget bit allocation: each distinct (K, N) MatMul shape is built as a one-node
model with input [1, T, K], emitted in each format through the same ORT tools the pass uses
(``emit.emit``), and timed in the target's session.  A dynamic-int8 node's time excludes
its DynamicQuantizeLinear, which is timed on its own and charged once per distinct input (the
knapsack's shared cost).  A no-op model's time (ORT's per-run overhead) is subtracted, so the
sum over a model's units is not inflated by one overhead per unit.  Embedding lookups and Conv
are charged 0 ms (lookups are negligible at prefill; Conv formats are not benchmarked yet).

The cache (JSON, ``$EDGEPRUNE_CACHE`` or ``~/.cache/edgeprune/microbench.json``) is keyed by
ORT version, CPU, target, threads, tokens, shape and format, so a rerun costs nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import platform

import numpy as np
import onnx_ir as ir

logger = logging.getLogger(__name__)

_WARMUP, _RUNS = 3, 15


def cache_path() -> pathlib.Path:
    root = os.environ.get("EDGEPRUNE_CACHE")
    base = pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "edgeprune"
    return base / "microbench.json"


def _cpu() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _load_cache() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _save_cache(cache: dict) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as exc:  # a read-only home only costs re-measuring next time
        logger.warning("could not write the microbenchmark cache %s: %s", path, exc)


def _matmul_model(k: int, n: int, tokens: int) -> ir.Model:
    rng = np.random.default_rng(0)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, tokens, k]))
    w = ir.Value(name="w", const_value=ir.tensor((rng.standard_normal((k, n)) * 0.05).astype(np.float32)))
    y = ir.Value(name="y", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, tokens, n]))
    node = ir.Node("", "MatMul", [x, w], outputs=[y], name="mm")
    graph = ir.Graph([x], [y], nodes=[node], initializers=[w], opset_imports={"": 17})
    return ir.Model(graph, ir_version=8)


def _single_op_model(op: str, k: int, tokens: int) -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, tokens, k]))
    outs = [ir.Value(name="y")] + ([ir.Value(name="s"), ir.Value(name="z")] if op == "DynamicQuantizeLinear" else [])
    node = ir.Node("", op, [x], outputs=outs, name="op")
    graph = ir.Graph([x], outs, nodes=[node], opset_imports={"": 17})
    return ir.Model(graph, ir_version=8)


def _time(model: ir.Model, k: int, tokens: int, target, threads) -> float:
    from edgeprune.runtime.latency import measure_latency

    feed = {"x": np.random.default_rng(1).standard_normal((1, tokens, k)).astype(np.float32)}
    return measure_latency(model, feed, target, warmup=_WARMUP, runs=_RUNS, threads=threads).p50_ms


def unit_latencies(units, target, *, tokens: int = 128, threads: int | None = None,
                   accuracy_level: int | None = None) -> dict[tuple[str, str], float]:
    """(node, option key) -> ms for every part/option of ``units``; ("dql", input) -> ms per input."""
    from edgeprune.passes.bits.emit import emit
    from edgeprune.runtime.targets import resolve_target
    from edgeprune.passes.bits.sensitivity import KEEP

    import onnxruntime

    target = resolve_target(target)
    cache = _load_cache()
    prefix = f"ort{onnxruntime.__version__}|{_cpu()}|{target.name}|t{threads}|T{tokens}|acc{accuracy_level}|nospin"
    dirty = False

    def cached(key: str, make) -> float:
        nonlocal dirty
        full = f"{prefix}|{key}"
        if full not in cache:
            cache[full] = make()
            dirty = True
        return float(cache[full])

    overhead = cached("overhead", lambda: _time(_single_op_model("Identity", 8, tokens), 8, tokens, target, threads))
    out: dict[tuple[str, str], float] = {}
    for u in units:
        for p in u.parts:
            if p.op not in ("MatMul", "Gemm"):
                for o in p.options:
                    out[(p.node, o.key)] = 0.0
                continue
            k, n = p.weight.shape
            dql = cached(f"dql|{k}", lambda k=k: _time(_single_op_model("DynamicQuantizeLinear", k, tokens), k, tokens, target, threads))
            out[("dql", p.input)] = max(dql - overhead, 0.0)
            for o in p.options:
                key = o.key
                if o.kind == "gptq":  # GPTQ changes the codes, not the format: time it as MatMulNBits
                    o = dataclasses.replace(o, kind="nbits")

                def make(o=o, k=k, n=n):
                    base = _matmul_model(k, n, tokens)
                    model = base if o.kind == KEEP else emit(base, {"mm": o}, accuracy_level=accuracy_level)[0]
                    return _time(model, k, tokens, target, threads)

                ms = cached(f"matmul|{k}x{n}|{o.key}", make) - overhead
                if o.kind == "int8-dynamic":
                    ms -= dql - overhead
                out[(p.node, key)] = max(ms, 0.0)
    if dirty:
        _save_cache(cache)
    return out


def model_latency(model: ir.Model, context, units, table, tokens: int) -> tuple[float, float]:
    """(p50 ms of the whole float model at ``tokens``, sum of its units' float microbenchmarks)."""
    from edgeprune.runtime.latency import measure_latency
    from edgeprune.validation import latency_feed

    feed = latency_feed(context.calibration.samples[0], model, tokens)
    full = measure_latency(model, feed, context.target, warmup=3, runs=10, threads=context.threads).p50_ms
    units_ms = sum(table[(p.node, "float")] for u in units for p in u.parts)
    return full, units_ms
