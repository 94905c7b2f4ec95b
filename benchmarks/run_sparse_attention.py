"""Attention-only microbenchmark of dynamic sparse attention at SmolLM2-135M's shapes.

One attention layer (9 query heads, 3 KV heads, head dim 64, causal, 64-token blocks, per-KV-group
selection) at 1k and 4k tokens, side by side in one process: ORT's fused dense
``com.microsoft.GroupQueryAttention`` (the fair baseline), the plain MatMul-Softmax-MatMul form
optimum exports, and edgeprune's op at 12.5 % and 25 % kept, through the portable ONNX function
and through the C++ kernel.  Ratios are latency / fused dense latency (lower is faster).

    python benchmarks/run_sparse_attention.py [--lengths 1024,4096] [--runs 5] [--before-library PATH]

``--whole-model`` adds SmolLM2-135M whole-model prefill at ``--model-length`` tokens (input model
with optimum's plain attention vs the sparse op at 12.5 %, 25 % and calibrated per-layer keep, kernel
and portable) and WikiText-2 perplexity on ``--model-length``-token windows over the first
``--ppl-tokens`` tokens of valid.txt; the calibrated allocation is measured on the window right
after the scored tokens, so it never sees the text it is scored on.

``--before-library`` adds a kernel before/after table: the same op through an older build of the
kernel library and through this one, interleaved with fused dense GQA in one loop (each its own
session), so the ratios share the machine's noise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import sys
import time

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from edgeprune.passes.sparse_attention import functions
from edgeprune.runtime import kernels
from edgeprune.runtime.latency import measure_side_by_side

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from sparse_attention.models import op_model  # noqa: E402

from bench_md import BENCHMARKS_MD, REPO, update_section  # noqa: E402

logger = logging.getLogger("run_sparse_attention")
HQ, HKV, D, BLOCK = 9, 3, 64, 64


def fused_gqa() -> onnx.ModelProto:
    """com.microsoft.GroupQueryAttention over [B, S, H*D] inputs, no past, causal (its only mode)."""
    text = f"""<ir_version: 10, opset_import: ["" : 17, "com.microsoft" : 1]>
    g (float[1, S, {HQ * D}] q, float[1, S, {HKV * D}] k, float[1, S, {HKV * D}] v, int32[1] seqlens_k, int32 total) => (float[1, S, {HQ * D}] y) {{
        y, pk, pv = com.microsoft.GroupQueryAttention <num_heads = {HQ}, kv_num_heads = {HKV}, scale = {D ** -0.5}> (q, k, v, , , seqlens_k, total)
    }}"""
    return onnx.parser.parse_model(text)


def plain() -> onnx.ModelProto:
    """MatMul-Softmax-MatMul with repeat_kv and a causal mask, as optimum exports it."""
    g = HQ // HKV
    text = f"""<ir_version: 10, opset_import: ["" : 17]>
    g (float[1, {HQ}, S, {D}] q, float[1, {HKV}, S, {D}] k, float[1, {HKV}, S, {D}] v) => (float[1, {HQ}, S, {D}] y) {{
        ax2 = Constant <value = int64[1] {{2}}> ()
        reps = Constant <value = int64[5] {{1, 1, {g}, 1, 1}}> ()
        s4 = Constant <value = int64[4] {{1, {HQ}, -1, {D}}}> ()
        zero = Constant <value = float {{0}}> ()
        ninf = Constant <value = float {{-1e30}}> ()
        scale = Constant <value = float {{{D ** -0.5}}}> ()
        i0 = Constant <value = int64 {{0}}> ()
        i1 = Constant <value = int64 {{1}}> ()
        ku = Unsqueeze (k, ax2)
        ke = Tile (ku, reps)
        kr = Reshape (ke, s4)
        vu = Unsqueeze (v, ax2)
        ve = Tile (vu, reps)
        vr = Reshape (ve, s4)
        kt = Transpose <perm = [0, 1, 3, 2]> (kr)
        sc0 = MatMul (q, kt)
        sc = Mul (sc0, scale)
        shp = Shape (q)
        sl = Gather <axis = 0> (shp, ax2)
        sls = Squeeze (sl)
        pos = Range (i0, sls, i1)
        ax0 = Constant <value = int64[1] {{0}}> ()
        ax1 = Constant <value = int64[1] {{1}}> ()
        pi = Unsqueeze (pos, ax1)
        pj = Unsqueeze (pos, ax0)
        ok = LessOrEqual (pj, pi)
        mask = Where (ok, zero, ninf)
        scm = Add (sc, mask)
        p = Softmax <axis = -1> (scm)
        y = MatMul (p, vr)
    }}"""
    return onnx.parser.parse_model(text)


def portable_only(model: ir.Model) -> ir.Model:
    """The same op with BlockSparseAttention renamed, so no kernel claims it: ORT inlines the function."""
    for fn in list(model.functions.values()):
        if fn.name == functions.BLOCK:
            del model.functions[fn.identifier()]
            fn.name = functions.BLOCK + "Portable"
            model.functions[fn.identifier()] = fn
    for fn in model.functions.values():
        for node in fn:
            if node.domain == functions.DOMAIN and node.op_type == functions.BLOCK:
                node.op_type = functions.BLOCK + "Portable"
    return model


def _session(model: onnx.ModelProto, threads: int, library: str | None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    if library:
        so.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), so)


def compare_libraries(before: str, lengths: list[int], runs: int, threads: int) -> dict:
    """Median ms and ratio to fused dense GQA of the op through ``before`` and through this build."""
    after = kernels.sparse_attention_library()
    out = {}
    for s in lengths:
        rng = np.random.default_rng(0)
        q = rng.standard_normal((1, HQ, s, D)).astype(np.float32)
        k = rng.standard_normal((1, HKV, s, D)).astype(np.float32)
        v = rng.standard_normal((1, HKV, s, D)).astype(np.float32)
        flat = {"q": q.transpose(0, 2, 1, 3).reshape(1, s, -1), "k": k.transpose(0, 2, 1, 3).reshape(1, s, -1),
                "v": v.transpose(0, 2, 1, 3).reshape(1, s, -1), "seqlens_k": np.array([s - 1], np.int32),
                "total": np.array(s, np.int32)}  # fmt: skip
        cands = {"fused dense GQA": (_session(fused_gqa(), threads, None), flat)}
        for keep in (0.125, 0.25):
            proto = ir.serde.serialize_model(op_model(HQ, HKV, D, block=BLOCK, keep=keep, min_len=0))
            for label, lib in (("before", before), ("after", after)):
                cands[f"kernel {label} {keep:.1%}"] = (_session(proto, threads, lib), {"q": q, "k": k, "v": v})
        times = {name: [] for name in cands}
        for name, (sess, feed) in cands.items():
            sess.run(None, feed)  # warm-up
        names = list(cands)
        for r in range(runs):
            for name in names[r % len(names):] + names[: r % len(names)]:
                sess, feed = cands[name]
                t0 = time.perf_counter()
                sess.run(None, feed)
                times[name].append((time.perf_counter() - t0) * 1e3)
        base = float(np.median(times["fused dense GQA"]))
        out[s] = {name: {"p50_ms": float(np.median(t)), "ratio_to_fused": float(np.median(t)) / base} for name, t in times.items()}
        for name, r in out[s].items():
            logger.info("  [before/after] %5d %-22s %9.2f ms  x%.3f", s, name, r["p50_ms"], r["ratio_to_fused"])
    return out


def whole_model(length: int, ppl_tokens: int, runs: int, threads: int, budget: float) -> dict:
    """SmolLM2 prefill latency / peak memory and perplexity per attention form (see the module doc)."""
    from edgeprune.calibration import CalibrationSet
    from edgeprune.context import CompileContext
    from edgeprune.models import build
    from edgeprune.models.tasks import wikitext_perplexity, wikitext_tokens
    from edgeprune.passes.sparse_attention import SparseAttentionConfig, SparseAttentionPass
    from edgeprune.runtime.targets import get_target

    artifact = build("smollm2", measure=False)
    ids = np.asarray(wikitext_tokens(artifact.tokenizer_path), np.int64)
    if len(ids) < ppl_tokens + length:
        sys.exit(f"WikiText-2 valid has {len(ids)} tokens: need {ppl_tokens + length} (scored + calibration window)")
    window = ids[ppl_tokens : ppl_tokens + length][None, :]
    calib_feed = {"input_ids": window, "attention_mask": np.ones_like(window), "position_ids": np.arange(length, dtype=np.int64)[None, :]}
    calib = CalibrationSet([calib_feed], "wikitext-2 valid window after the scored tokens")
    context = CompileContext(target=get_target("cpu"), calibration=calib, holdout=calib, threads=threads)
    models, records = {"input model (plain dense attention)": ir.load(str(artifact.model_path))}, {}
    forms = {"12.5%": SparseAttentionConfig(keep=0.125, min_len=0), "25%": SparseAttentionConfig(keep=0.25, min_len=0),
             f"calibrated (mean {budget:.1%})": SparseAttentionConfig(keep=budget, min_len=0, allocation="calibrated")}  # fmt: skip
    for label, cfg in forms.items():
        model = ir.load(str(artifact.model_path))
        result = SparseAttentionPass(cfg, context)(model)
        records[label] = [{"layer": r["layer"], "keep": r["keep"], **({"measured": r["measured"]} if "measured" in r else {})} for r in result.records]
        models[f"kernel {label}"] = model
        models[f"portable {label}"] = portable_only(_copy(model))
    feed = {"input_ids": ids[None, :length], "attention_mask": np.ones((1, length), np.int64),
            "position_ids": np.arange(length, dtype=np.int64)[None, :]}  # fmt: skip
    logger.info("whole model: timing %d forms x %d runs at %d tokens", len(models), runs, length)
    timed = measure_side_by_side(models, feed, warmup=1, runs=runs, threads=threads)
    base = timed["input model (plain dense attention)"].p50_ms
    out = {"length": length, "ppl_tokens": ppl_tokens, "forms": {}, "allocations": records}
    ppls = {}
    for name, model in models.items():
        # The portable body equals the kernel to 1e-4 (tests), so its perplexity is the kernel's: not re-run.
        twin = name.replace("portable", "kernel", 1)
        if name.startswith("portable") and twin in ppls:
            ppl = ppls[twin]
        else:
            ppl = wikitext_perplexity(model, artifact.tokenizer_path, context=length, max_tokens=ppl_tokens, threads=threads)
        ppls[name] = ppl
        r = timed[name]
        out["forms"][name] = {"p50_ms": r.p50_ms, "speedup_vs_input": base / r.p50_ms, "peak_mb": r.peak_memory_mb, "perplexity": ppl}
        logger.info("  %-40s %9.1f ms  x%.2f  peak %.0f MB  ppl %.3f", name, r.p50_ms, base / r.p50_ms, r.peak_memory_mb, ppl)
    return out


def _copy(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,4096")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--before-library", default=None, help="an older build of the kernel library to compare with")
    parser.add_argument("--whole-model", action="store_true", help="also SmolLM2 prefill and perplexity (slow)")
    parser.add_argument("--model-length", type=int, default=4096)
    parser.add_argument("--ppl-tokens", type=int, default=8192)
    parser.add_argument("--model-runs", type=int, default=2)
    parser.add_argument("--budget", type=float, default=0.25, help="mean keep of the calibrated allocation")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if kernels.sparse_attention_library() is None:
        sys.exit("the kernel is not built: pip install -e . with a C++ compiler first")
    results = {}
    for s in (int(x) for x in args.lengths.split(",")):
        rng = np.random.default_rng(0)
        q = rng.standard_normal((1, HQ, s, D)).astype(np.float32)
        k = rng.standard_normal((1, HKV, s, D)).astype(np.float32)
        v = rng.standard_normal((1, HKV, s, D)).astype(np.float32)
        bhsd = {"q": q, "k": k, "v": v}
        flat = {"q": q.transpose(0, 2, 1, 3).reshape(1, s, -1), "k": k.transpose(0, 2, 1, 3).reshape(1, s, -1),
                "v": v.transpose(0, 2, 1, 3).reshape(1, s, -1), "seqlens_k": np.array([s - 1], np.int32),
                "total": np.array(s, np.int32)}  # fmt: skip
        models, feeds = {"fused dense GQA": fused_gqa(), "plain dense (optimum form)": plain()}, {}
        for keep in (0.125, 0.25):
            models[f"portable {keep:.1%}"] = ir.serde.serialize_model(
                portable_only(op_model(HQ, HKV, D, block=BLOCK, keep=keep, min_len=0)))
            models[f"kernel {keep:.1%}"] = ir.serde.serialize_model(op_model(HQ, HKV, D, block=BLOCK, keep=keep, min_len=0))
        feeds = {name: flat if name.startswith("fused") else bhsd for name in models}
        logger.info("length %d: timing %d models x %d runs", s, len(models), args.runs)
        timed = measure_side_by_side(models, feeds, warmup=1, runs=args.runs, threads=args.threads)
        base = timed["fused dense GQA"].p50_ms
        results[s] = {name: {"p50_ms": r.p50_ms, "ratio_to_fused": r.p50_ms / base, "peak_mb": r.peak_memory_mb}
                      for name, r in timed.items()}  # fmt: skip
        for name, r in results[s].items():
            logger.info("  %-28s %9.2f ms  x%.3f", name, r["p50_ms"], r["ratio_to_fused"])
    before_after = None
    if args.before_library:
        before_after = compare_libraries(args.before_library, [int(x) for x in args.lengths.split(",")], args.runs, args.threads)
    whole = whole_model(args.model_length, args.ppl_tokens, args.model_runs, args.threads, args.budget) if args.whole_model else None
    meta = {"command": "python benchmarks/run_sparse_attention.py " + " ".join(sys.argv[1:]),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} ORT threads",
            "onnxruntime": ort.__version__, "date": dt.date.today().isoformat(), "runs": args.runs,
            "load_average_1m": round(os.getloadavg()[0], 2)}  # fmt: skip
    out = REPO / "benchmarks" / "results" / "sparse_attention.json"
    out.write_text(json.dumps({"meta": meta, "results": results, "before_after": before_after, "whole_model": whole}, indent=2))
    names = list(next(iter(results.values())))
    lines = [
        "## Sparse attention: one attention layer at SmolLM2-135M's shapes",
        "",
        f"`{meta['command']}` — {meta['machine']}, onnxruntime {meta['onnxruntime']}, {meta['date']}, "
        f"p50 of {args.runs} interleaved runs, 1-minute load average {meta['load_average_1m']} at the end "
        "(above the core count means other jobs shared the cores).  9 query / 3 KV heads, head dim 64, causal, 64-token blocks, "
        "selection per KV group (sink block and diagonal always kept).  Ratio = latency / fused dense "
        "`com.microsoft.GroupQueryAttention` (lower is faster); selection cost included in the sparse rows.",
        "",
        "| form | " + " | ".join(f"{s} tokens: p50 ms (ratio)" for s in results) + " |",
        "|---|" + "---|" * len(results),
    ]
    for name in names:
        cells = [f"{results[s][name]['p50_ms']:.1f} ({results[s][name]['ratio_to_fused']:.2f})" for s in results]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if before_after:
        lines += ["", f"Kernel before/after (`--before-library {os.path.basename(args.before_library)}`, its own interleaved loop, "
                  "p50; ratio to fused dense GQA from the same loop):", "",
                  "| form | " + " | ".join(f"{s} tokens: p50 ms (ratio)" for s in before_after) + " |",
                  "|---|" + "---|" * len(before_after)]
        for name in next(iter(before_after.values())):
            cells = [f"{before_after[s][name]['p50_ms']:.1f} ({before_after[s][name]['ratio_to_fused']:.2f})" for s in before_after]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if whole:
        lines += ["", f"SmolLM2-135M whole-model prefill at {whole['length']} tokens (p50 of {args.model_runs} interleaved runs) and "
                  f"WikiText-2 valid perplexity on {whole['length']}-token windows over its first {whole['ppl_tokens']} tokens. "
                  "The fair fused-dense whole-model baseline (the export with ORT's GroupQueryAttention) is not built here: "
                  "speed-ups are against the input model's plain attention.  Portable rows reuse the kernel row's perplexity "
                  "(the two paths agree to 1e-4).", "",
                  "| form | prefill p50 ms | speed-up vs input | peak MB | perplexity |", "|---|---|---|---|---|"]
        for name, r in whole["forms"].items():
            lines.append(f"| {name} | {r['p50_ms']:.0f} | {r['speedup_vs_input']:.2f} | {r['peak_mb']:.0f} | {r['perplexity']:.3f} |")
        for label, recs in whole["allocations"].items():
            if any("measured" in r for r in recs):
                lines += ["", f"Calibrated keep per layer ({label}): " + ", ".join(f"{r['keep']:g}" for r in recs)]
    update_section(BENCHMARKS_MD, "sparse_attention", "\n".join(lines))


if __name__ == "__main__":
    main()
