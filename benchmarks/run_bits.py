"""Measure the bit-allocation pass against ONNX Runtime's own quantizers, side by side in one run.

Per model: compile the fp32 export with ``BitAllocationPass`` at several budgets (average bits,
whole-model size, prefill latency), after the ``smooth`` pass as ``compile --bits`` runs it on the CPU, then measure the task metric, file size and latency of every
variant together with fp32 and ORT's quantizers (latency interleaved in one
``measure_side_by_side`` run).  ORT baselines are re-quantized here with
``benchmarks/run_baselines.quantize`` (same settings); their task metric is re-measured too.

Calibration never touches the evaluation sets: SmolLM2 uses Tiny Shakespeare windows, MiniLM the
bundled calibration sentences.  Writes ``benchmarks/results/bits.json`` and ``bits.md``.

    python benchmarks/run_bits.py --models smollm2,minilm
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_md import BENCHMARKS_MD, update_section

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import run_baselines as rb  # noqa: E402
from run_pruning import prune_options  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results"
logger = logging.getLogger("run_bits")


def smol_calibration(tokenizer: Path, samples: int, seq: int):
    """Tiny Shakespeare windows of ``seq`` tokens (not WikiText: that is the evaluation set)."""
    from tokenizers import Tokenizer

    from edgeprune.calibration import CalibrationSet
    from edgeprune.models.tasks import data_dir

    tok = Tokenizer.from_file(str(tokenizer))
    tok.no_padding()
    tok.no_truncation()
    text = (data_dir() / "tinyshakespeare" / "input.txt").read_text()[:400_000]
    ids = np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)
    starts = np.linspace(0, len(ids) - seq - 1, samples).astype(int)
    rows = []
    for s in starts:
        w = ids[s : s + seq][None, :]
        rows.append({"input_ids": w, "attention_mask": np.ones_like(w), "position_ids": np.arange(seq, dtype=np.int64)[None, :]})
    return CalibrationSet(rows, f"Tiny Shakespeare, {samples} windows of {seq} tokens")


def minilm_calibration(model, tokenizer: Path, samples: int):
    from edgeprune.calibration import load_calibration

    return load_calibration(REPO / "edgeprune" / "data" / "calibration_sentences.txt", model, tokenizer=tokenizer,
                            max_samples=samples, seq_len=128)


def run_pass(fp32_path: Path, ctx, options: dict, dst: Path) -> dict:
    """The bits pass on the fp32 model; with a ``prune`` entry, structured pruning (+ cleanup) first; before bits
    the ``smooth`` pass at the CLI's CPU default strength (an entry ``smooth``: another alpha, 0 for none).

    A pruned model gets its own context: its tensors keep their names but change width, so the
    statistics cached for the unpruned model do not apply.  Each pass gets its own statistics stage, as in a
    compile (bits must not reuse the ranges smoothing measured before it rescaled them).
    """
    import dataclasses

    from edgeprune import model_io
    from edgeprune.passes.bits.bits_pass import BitAllocationPass
    from edgeprune.passes.smooth import SmoothConfig, SmoothPass

    model = model_io.load_model(fp32_path)
    start = time.perf_counter()
    options = dict(options)
    prune = options.pop("prune", None)
    alpha = options.pop("smooth", SmoothConfig().alpha)
    if prune is not None:
        from edgeprune.passes.cleanup import CleanupPass
        from edgeprune.passes.prune.prune_pass import PruneConfig, StructuredPruningPass

        CleanupPass()(model)
        StructuredPruningPass(PruneConfig(**prune), ctx)(model)
        CleanupPass()(model)
        ctx = dataclasses.replace(ctx)
        ctx.invalidate_stats()
    if alpha:
        ctx.stage = 0
        SmoothPass(SmoothConfig(alpha=alpha), ctx)(model)
    ctx.stage = 1
    result = BitAllocationPass.from_options(options, ctx)(model)
    seconds = time.perf_counter() - start
    model_io.save_model(model, dst)
    formats = collections.Counter(r["format"] for r in result.records)
    checks = [{k: r[k] for k in ("layer", "format", "rel_error", "output_rel_error")} for r in result.records if "output_rel_error" in r]
    s = result.summary
    return {
        "options": options, "pass_seconds": round(seconds, 1), "modified": result.modified,
        "formats": dict(formats), "avg_bits": s.get("avg_bits"), "objective": s.get("objective"),
        "solver": s.get("solver"), "budget": s.get("budget"), "floor": s.get("floor"), "notes": s.get("notes"),
        "predicted_latency_ms": s.get("predicted_latency_ms"), "latency_check": s.get("latency_check"),
        "tradeoff": s.get("tradeoff"), "output_checks": checks, "predicted_bytes": s.get("predicted_bytes"),
        "written_bytes": s.get("written_bytes"), "microbenchmarks": (s.get("latency") or {}).get("microbenchmarks"),
        "records": [{k: r[k] for k in ("layer", "format", "bits", "rel_error")} for r in result.records],
    }  # fmt: skip


def bench(name: str, args, work: Path) -> dict:
    from edgeprune import model_io
    from edgeprune.context import CompileContext
    from edgeprune.model_io import file_size as onnx_file_bytes
    from edgeprune.models import build
    from edgeprune.runtime.latency import measure_latency, measure_side_by_side, paired_ratio
    from edgeprune.runtime.targets import get_target
    from edgeprune.verify import run_batches

    art = build(name, measure=False)
    fp32 = art.model_path
    reference = model_io.load_model(fp32)
    if name == "smollm2":
        calib = smol_calibration(art.tokenizer_path, args.calib_samples, 256)
        feeds = rb.text_feeds(fp32, rb.latency_ids(art.tokenizer_path, 128, special=False))
    else:
        calib = minilm_calibration(reference, art.tokenizer_path, args.calib_samples)
        feeds = rb.text_feeds(fp32, rb.latency_ids(art.tokenizer_path, 128, special=True))
    stats_rows, holdout = calib.split(0.25)
    holdout_batches = list(holdout.batches(8))  # as compile does: passes may check candidates end to end
    ctx = CompileContext(target=get_target("cpu"), calibration=stats_rows, holdout=holdout, threads=args.threads,
                         holdout_batches=holdout_batches,
                         reference_outputs=run_batches(reference, holdout_batches, threads=args.threads))
    paths = {"fp32": fp32}
    for v in rb.MODEL_VARIANTS[name][1:]:
        paths[v] = rb.quantize(v, fp32, work / f"{v}.onnx")
    fp32_ms = measure_latency(str(fp32), feeds, "cpu", warmup=2, runs=10, threads=args.threads).p50_ms
    ort_int8 = onnx_file_bytes(paths["ort-dyn-int8-pc"])
    if name == "smollm2":
        # Below about 5.5 bits per weight SmolLM2 needs some 2-bit nodes (K=576 blocks and the
        # scales put 4-bit at 4.5-5.1 bits), so those budgets offer 2-bit too.
        configs = {f"bits-avg{b:g}": {"avg_bits": b, **({"bit_options": [2, 4, 8]} if b < 5.5 else {})}
                   for b in (8, 6, 5, 4.5, 4)}
        # Size budgets bound the written file (graph and external data included): no margin.
        configs["bits-size137MB"] = {"size_budget_bytes": int(ort_int8)}
        # Accuracy level 4 beside 0 with the speed tie-break (slack 0.05), with and without dynamic int8 among the choices.
        configs["bits-size137MB-levels04"] = {"size_budget_bytes": int(ort_int8), "accuracy_levels": [0, 4], "speed_slack": 0.05}
        configs["bits-size137MB-levels04-noint8dyn"] = {"size_budget_bytes": int(ort_int8), "accuracy_levels": [0, 4],
                                                        "speed_slack": 0.05, "dynamic_int8": False}
        configs["bits-size100MB"] = {"size_budget_bytes": int(100e6)}
        configs["bits-size90MB"] = {"size_budget_bytes": int(90e6), "bit_options": [2, 4, 8]}
        # Latency budgets as a fraction of fp32 measured inside the pass: on this shared machine
        # absolute milliseconds drift by 2-3x between measurements.
        configs["bits-lat0.8"] = {"latency_budget_ratio": 0.8}
        configs["bits-lat0.65"] = {"latency_budget_ratio": 0.65}
        configs["bits-lat0.8+size137MB"] = {"latency_budget_ratio": 0.8, "size_budget_bytes": int(ort_int8)}
    else:
        configs = {f"bits-avg{b:g}": {"avg_bits": b} for b in (8, 6, 5, 4)}
        # Block offsets (llama.cpp's Q4_1 form) offered beside the other formats, on weights trained in float
        configs |= {f"bits-avg{b:g}-offsets": {"avg_bits": b, "block_offsets": True} for b in (5, 4.5)}
        # At ORT per-channel int8's written size exactly (budgets bound the file): the defaults (level 4 on CPU,
        # passes/bits/config.CPU_BUDGET_LEVELS, no slower than float) and levels 0 and 4 with the speed tie-break.
        configs["bits-size-ort-int8"] = {"size_budget_bytes": int(ort_int8)}
        configs["bits-size-ort-int8-levels04"] = {"size_budget_bytes": int(ort_int8), "accuracy_levels": [0, 4],
                                                  "speed_slack": 0.05}
        configs["bits-lat0.55"] = {"latency_budget_ratio": 0.55}
        configs["bits-size+lat0.55"] = {"size_budget_bytes": int(ort_int8), "latency_budget_ratio": 0.55}
        configs["bits-size+lat0.55-nosmooth"] = {"size_budget_bytes": int(ort_int8), "latency_budget_ratio": 0.55, "smooth": 0}
        # The issue's bar: ORT per-channel int8's size and latency; its latency ratio measured here first.
        pair = measure_side_by_side({"fp32": str(fp32), "ort": str(paths["ort-dyn-int8-pc"])}, feeds, "cpu",
                                    warmup=2, runs=args.runs, threads=args.threads)
        ort_ratio = paired_ratio(pair["ort"], pair["fp32"])
        configs["bits-size+lat-ort-int8"] = {"size_budget_bytes": int(ort_int8), "latency_budget_ratio": round(ort_ratio, 3)}
        # Combined with structured pruning (FLAP + bias compensation, floor allocation: MiniLM's best
        # in the pruning benchmark), under tighter budgets than int8 alone can meet.
        for r, lat in ((0.1, 0.55), (0.2, 0.6)):  # latency relative to the pruned float model
            configs[f"prune{r:g}+bits-size0.8+lat{lat:g}"] = {
                "prune": {"ratio": r, **prune_options("flap+bias/floor")},
                "size_budget_bytes": int(0.8 * ort_int8), "latency_budget_ratio": lat}
    if args.only:
        configs = {k: v for k, v in configs.items() if k in args.only}
    passes = {}
    for key, opts in configs.items():
        logger.info("%s %s: %s", name, key, opts)
        try:
            passes[key] = run_pass(fp32, ctx, {**opts, "output_checks": args.output_checks}, work / f"{key}.onnx")
            paths[key] = work / f"{key}.onnx"
        except Exception as exc:  # noqa: BLE001 - reported in the results, the run goes on
            logger.exception("%s %s failed", name, key)
            passes[key] = {"options": opts, "error": f"{type(exc).__name__}: {exc}"}
    metrics = {}
    for key, path in paths.items():
        start = time.perf_counter()
        if name == "smollm2":
            from edgeprune.models.tasks import wikitext_perplexity

            metrics[key] = {"perplexity": wikitext_perplexity(str(path), art.tokenizer_path, context=args.ppl_context,
                                                              max_tokens=args.ppl_tokens, threads=args.threads)}
        else:
            from edgeprune.models.tasks import stsb_spearman

            metrics[key] = {"stsb_spearman": stsb_spearman(str(path), art.tokenizer_path, threads=args.threads)}
        metrics[key]["metric_seconds"] = round(time.perf_counter() - start, 1)
        logger.info("%s %s: %s, %.1f MB", name, key, metrics[key], onnx_file_bytes(path) / 1e6)
    load = os.getloadavg()[0]  # the 1-minute load average as the side-by-side latency run starts
    lat = measure_side_by_side({k: str(v) for k, v in paths.items()}, feeds, "cpu", warmup=args.warmup, runs=args.runs,
                               threads=args.threads)
    rows = []
    for key, path in paths.items():
        rows.append({
            "variant": key, **metrics[key], "size_bytes": onnx_file_bytes(path), "latency": lat[key].to_dict(),
            "speedup_p50_vs_fp32": lat["fp32"].p50_ms / lat[key].p50_ms, "quantized_ops": rb.quantized_op_counts(path),
            # the median of each round's paired ratio (runtime.latency.paired_ratio): robust to load drift
            "speed_vs_ort_int8": paired_ratio(lat["ort-dyn-int8-pc"], lat[key]) if "ort-dyn-int8-pc" in lat else None,
            "pass": passes.get(key),
        })  # fmt: skip
    for key, p in passes.items():  # a variant the pass refused still gets its row, saying why
        if "error" in p:
            rows.append({"variant": key, "error": p["error"], "pass": p})
    return {
        "model": name, "command": "python benchmarks/run_bits.py " + " ".join(sys.argv[1:]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": rb.machine(),
        "calibration": calib.source, "calibration_rows": {"statistics": len(stats_rows), "holdout": len(holdout)},
        "fp32_p50_before_ms": fp32_ms, "latency_setup": {"batch": 1, "seq_len": 128, "threads": args.threads,
        "warmup": args.warmup, "runs": args.runs, "method": "measure_side_by_side (interleaved rounds)",
        "load_average_1min": round(load, 2)},
        "protocol": ({"metric": "WikiText-2 valid perplexity", "context": args.ppl_context, "max_tokens": args.ppl_tokens}
                     if name == "smollm2" else {"metric": "STS-B dev Spearman, 1500 pairs"}),
        "rows": rows,
    }  # fmt: skip


def _one_line(text: str) -> str:
    """An error message fit for a table cell."""
    return " ".join(text.split()).replace("|", "/")


def render(results: dict) -> str:
    lines = ["## Bit allocation (`bits` pass) vs ONNX Runtime's quantizers", "",
             "Written by `benchmarks/run_bits.py` from `benchmarks/results/bits.json`; do not edit by hand.", ""]
    for name, e in results["models"].items():
        ls = e["latency_setup"]
        lines += [f"### {name}", "", f"- command: `{e['command']}`; date {e['date']}",
                  f"- machine: {e['machine']['cpu']}, {e['machine']['cpu_count']} cpus (shared with other jobs: latency is noisy)",
                  f"- calibration: {e['calibration']} ({e['calibration_rows']['statistics']} rows for statistics)",
                  f"- metric: {e['protocol']}",
                  f"- latency: batch 1, {ls['seq_len']} tokens, {ls['threads']} threads, {ls['warmup']} warm-up + {ls['runs']} runs, {ls['method']}"
                  + (f"; 1-minute load average {ls['load_average_1min']:g} as it started" if "load_average_1min" in ls else ""),
                  ""]
        metric = "perplexity" if name.startswith("smollm2") else "stsb_spearman"
        lines += [f"| variant | {metric} | size MB | p50 ms | speedup | vs ORT int8 | avg bits | formats |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        ort = next((r for r in e["rows"] if r["variant"] == "ort-dyn-int8-pc" and "latency" in r), None)
        for r in e["rows"]:
            if "error" in r:
                lines.append(f"| {r['variant']} | failed: {_one_line(r['error'])} |  |  |  |  |  |  |")
                continue
            p = r.get("pass") or {}
            fm = ", ".join(f"{k} x{v}" for k, v in sorted((p.get("formats") or {}).items())) or ", ".join(
                f"{k} x{v}" for k, v in sorted(r["quantized_ops"].items()))
            ab = f"{p['avg_bits']:.2f}" if p.get("avg_bits") else ("failed" if p.get("error") else ("no-op" if p and not p.get("modified") else ""))
            vs = r.get("speed_vs_ort_int8") or (ort["latency"]["p50_ms"] / r["latency"]["p50_ms"] if ort else None)
            vs_ort = f"{vs:.2f}x" if vs else ""
            lines.append(f"| {r['variant']} | {r[metric]:.4f} | {r['size_bytes'] / 1e6:.2f} | {r['latency']['p50_ms']:.1f} | "
                         f"{r['speedup_p50_vs_fp32']:.2f}x | {vs_ort} | {ab} | {fm} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2,minilm")
    ap.add_argument("--only", default="", help="comma-separated variant names to run (default all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--output-checks", type=int, default=4)
    ap.add_argument("--ppl-context", type=int, default=512)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--tag", default="", help="store this run as '<model>:<tag>' beside earlier runs (e.g. a partial rerun)")
    args = ap.parse_args(argv)
    args.only = {x for x in args.only.split(",") if x}
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    for ours in ("run_bits", "edgeprune"):
        logging.getLogger(ours).setLevel(logging.INFO)
    logging.getLogger("edgeprune.progress").setLevel(logging.DEBUG)  # stage timings
    for noisy in ("onnxruntime", "onnxruntime.quantization.matmul_nbits_quantizer", "root"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bits.json"
    results = json.loads(path.read_text()) if path.exists() else {"schema": 1, "models": {}}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        with tempfile.TemporaryDirectory(prefix=f"edgeprune_bits_{name}_") as work:
            results["models"][f"{name}:{args.tag}" if args.tag else name] = bench(name, args, Path(work))
        path.write_text(json.dumps(results, indent=1) + "\n")
        (args.out / "bits.md").write_text(render(results) + "\n")
        if args.out.resolve() == (Path(__file__).resolve().parent / "results"):
            update_section(BENCHMARKS_MD, "bits", render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
