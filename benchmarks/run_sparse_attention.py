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
import gc
import json
import logging
import os
import platform
import re
import sys
import time

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common
import onnxruntime as ort

from edgeprune.passes.sparse_attention import functions
from edgeprune.runtime import kernels
from edgeprune.runtime.latency import measure_side_by_side

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from sparse_attention.models import op_model  # noqa: E402

from bench_md import BENCHMARKS_MD, REPO, update_section  # noqa: E402

logger = logging.getLogger("run_sparse_attention")
HQ, HKV, D, BLOCK = 9, 3, 64, 64
INPUT = "input model (plain dense attention)"
FUSED = "fused dense GQA (fair baseline)"
FUSED_KV = "fused dense GQA (fuse_attention pass)"


def fused_gqa() -> onnx.ModelProto:
    """com.microsoft.GroupQueryAttention over [B, S, H*D] inputs, no past, causal (its only mode)."""
    text = f"""<ir_version: 10, opset_import: ["" : 17, "com.microsoft" : 1]>
    g (float[1, S, {HQ * D}] q, float[1, S, {HKV * D}] k, float[1, S, {HKV * D}] v, int32[1] seqlens_k, int32 total) => (float[1, S, {HQ * D}] y) {{
        y, pk, pv = com.microsoft.GroupQueryAttention <num_heads = {HQ}, kv_num_heads = {HKV}, scale = {D ** -0.5}> (q, k, v, , , seqlens_k, total)
    }}"""
    return onnx.parser.parse_model(text)


def fused_gqa_decode() -> onnx.ModelProto:
    """com.microsoft.GroupQueryAttention for one new token over a cache (past/present not shared)."""
    text = f"""<ir_version: 10, opset_import: ["" : 17, "com.microsoft" : 1]>
    g (float[1, 1, {HQ * D}] q, float[1, 1, {HKV * D}] k, float[1, 1, {HKV * D}] v, float[1, {HKV}, P, {D}] pk, float[1, {HKV}, P, {D}] pv, int32[1] seqlens_k, int32 total) => (float[1, 1, {HQ * D}] y) {{
        y, ok, ov = com.microsoft.GroupQueryAttention <num_heads = {HQ}, kv_num_heads = {HKV}, scale = {D ** -0.5}> (q, k, v, pk, pv, seqlens_k, total)
    }}"""
    return onnx.parser.parse_model(text)


def decode_step(lengths: list[int], runs: int, threads: int) -> dict:
    """One decode step's attention (one query over a cache of T keys): fused dense GQA vs the kernel op (selection included)."""
    out = {}
    for t in lengths:
        rng = np.random.default_rng(0)
        q = rng.standard_normal((1, HQ, 1, D)).astype(np.float32)
        k = rng.standard_normal((1, HKV, t, D)).astype(np.float32)
        v = rng.standard_normal((1, HKV, t, D)).astype(np.float32)
        flat = {"q": q.reshape(1, 1, -1), "k": k[:, :, -1:].transpose(0, 2, 1, 3).reshape(1, 1, -1),
                "v": v[:, :, -1:].transpose(0, 2, 1, 3).reshape(1, 1, -1), "pk": k[:, :, :-1].copy(), "pv": v[:, :, :-1].copy(),
                "seqlens_k": np.array([t - 1], np.int32), "total": np.array(t, np.int32)}  # fmt: skip
        models = {"fused dense GQA": fused_gqa_decode()}
        for keep in (0.125, 0.25, 1.0):
            models[f"kernel {keep:.1%}"] = ir.serde.serialize_model(op_model(HQ, HKV, D, block=BLOCK, keep=keep, min_len=0))
        feeds = {name: flat if name.startswith("fused") else {"q": q, "k": k, "v": v} for name in models}
        timed = measure_side_by_side(models, feeds, warmup=3, runs=runs, threads=threads)
        base = timed["fused dense GQA"].p50_ms
        out[t] = {name: {"p50_ms": r.p50_ms, "ratio_to_fused": r.p50_ms / base} for name, r in timed.items()}
        for name, r in out[t].items():
            logger.info("  [decode step] %5d %-18s %8.3f ms  x%.3f", t, name, r["p50_ms"], r["ratio_to_fused"])
    return out


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
    """The same op with both functions renamed, so no kernel claims them: ORT inlines the function bodies."""
    names = {op: op + "Portable" for op in (functions.BLOCK, functions.DYNAMIC, functions.BLOCK_MASKED, functions.DYNAMIC_MASKED)}
    for fn in list(model.functions.values()):
        if fn.name in names:
            del model.functions[fn.identifier()]
            fn.name = names[fn.name]
            model.functions[fn.identifier()] = fn
    for graph_like in [model.graph, *model.functions.values()]:
        for node in graph_like:
            if node.domain == functions.DOMAIN and node.op_type in names:
                node.op_type = names[node.op_type]
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


def whole_model(length: int, ppl_tokens: int, runs: int, threads: int, budget: float, portable: bool = True,
                with_input: bool = True, forms_wanted: list[str] | None = None) -> dict:
    """SmolLM2 prefill latency / peak memory and perplexity per attention form (see the module doc)."""
    from edgeprune.calibration import CalibrationSet
    from edgeprune.context import CompileContext
    from edgeprune.models import build
    from edgeprune.models.tasks import wikitext_perplexity, wikitext_tokens
    from edgeprune.passes.fused_attention import FusedAttentionConfig, FusedAttentionPass
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
    fused = ir.load(str(artifact.model_path))  # the fair baseline: ORT's fused dense GQA, from the fuse_attention pass
    fused_count = FusedAttentionPass(FusedAttentionConfig())(fused).summary["fused"]
    models, records = ({INPUT: ir.load(str(artifact.model_path))} if with_input else {}), {}
    models[FUSED] = fused
    forms = {"12.5%": SparseAttentionConfig(keep=0.125, min_len=0), "25%": SparseAttentionConfig(keep=0.25, min_len=0),
             "per head 25%": SparseAttentionConfig(keep=0.25, min_len=0, select="head"),
             f"calibrated (mean {budget:.1%})": SparseAttentionConfig(keep=budget, min_len=0, allocation="calibrated"),
             f"per head, calibrated (mean {budget:.1%})": SparseAttentionConfig(keep=budget, min_len=0, allocation="calibrated", select="head")}  # fmt: skip
    for label, cfg in forms.items():
        if forms_wanted and not any(label.startswith(w) for w in forms_wanted):
            continue
        model = ir.load(str(artifact.model_path))
        result = SparseAttentionPass(cfg, context)(model)
        records[label] = [{"layer": r["layer"], "keep": r["keep"], **({"measured": r["measured"]} if "measured" in r else {})} for r in result.records]
        models[f"kernel {label}"] = model
        if portable and cfg.select == "group":
            models[f"portable {label}"] = portable_only(_copy(model))
    feed = {"input_ids": ids[None, :length], "attention_mask": np.ones((1, length), np.int64),
            "position_ids": np.arange(length, dtype=np.int64)[None, :]}  # fmt: skip
    logger.info("whole model: %d layers fused for the baseline; timing %d forms x %d runs at %d tokens", fused_count, len(models), runs, length)
    timed = measure_side_by_side(models, feed, warmup=1, runs=runs, threads=threads)
    fair = timed[FUSED].p50_ms
    base = timed[INPUT].p50_ms if with_input else None
    out = {"length": length, "ppl_tokens": ppl_tokens, "fused_layers": fused_count, "forms": {}, "allocations": records}
    ppls = {}
    for name, model in sorted(models.items(), key=lambda item: item[0] != FUSED):  # dense perplexity first
        # The portable body equals the kernel to 1e-4 (tests), so its perplexity is the kernel's: not re-run.
        twin = name.replace("portable", "kernel", 1)
        if name.startswith("portable") and twin in ppls:
            ppl = ppls[twin]
        else:
            ppl = wikitext_perplexity(model, artifact.tokenizer_path, context=length, max_tokens=ppl_tokens, threads=threads)
        ppls[name] = ppl
        r = timed[name]
        out["forms"][name] = {"p50_ms": r.p50_ms, "speedup_vs_input": base / r.p50_ms if base else None,
                              "speedup_vs_fused": fair / r.p50_ms, "peak_mb": r.peak_memory_mb, "perplexity": ppl,
                              "perplexity_vs_dense": ppl / ppls[FUSED] - 1}  # fmt: skip
        logger.info("  %-45s %9.1f ms  x%.2f fused  peak %.0f MB  ppl %.3f (%+.1f%%)", name, r.p50_ms, fair / r.p50_ms,
                    r.peak_memory_mb, ppl, 100 * (ppl / ppls[FUSED] - 1))  # fmt: skip
    return out


def decode(context: int, new_tokens: int, rounds: int, threads: int, keeps: list[float], cache: str | None = None,
           portable: bool = False, chunk: int = 512) -> dict:
    """SmolLM2 with a KV cache (recipe smollm2_kv): prefill of ``context`` WikiText-2 tokens in ``chunk``-token
    steps, then ``new_tokens`` decoded one at a time with the cache fed back, input vs sparse, interleaved.

    Chunked prefill (``runtime.generation.Generator``'s ``prefill_chunk``) rather than a one-shot prompt: the
    input model's 4k one-shot prefill (plain attention, [9, 4096, 4096] score tensors kept in its arena) took
    this process past 6-12 GB and the OOM killer ended it three times on this shared machine."""
    from edgeprune.models import build
    from edgeprune.models.tasks import wikitext_tokens
    from edgeprune.passes.sparse_attention import SparseAttentionConfig, SparseAttentionPass
    from edgeprune.runtime.generation import Generator

    artifact = build("smollm2_kv", cache=cache, measure=False)
    prompt = np.asarray(wikitext_tokens(artifact.tokenizer_path), np.int64)[:context]
    models = {INPUT: str(artifact.model_path)}
    from edgeprune.passes.fused_attention.fused_attention_pass import FusedAttentionConfig, FusedAttentionPass

    fused = ir.load(str(artifact.model_path))
    if FusedAttentionPass(FusedAttentionConfig())(fused).modified:  # the fair baseline: ORT's GQA reading the cache
        models[FUSED_KV] = fused
    for keep in keeps:
        model = ir.load(str(artifact.model_path))
        result = SparseAttentionPass(SparseAttentionConfig(keep=keep))(model)  # default min_len 1024: the 4k cache is sparse
        if result.summary["sparse_layers"] == 0:
            sys.exit(f"the pass rewrote no attention block of smollm2_kv: {result.records[:1]}")
        models[f"kernel {keep:.1%}"] = model
        if portable:
            models[f"portable {keep:.1%}"] = portable_only(_copy(model))
    logger.info("decode: %d models, prompt %d tokens (chunks of %d), %d new tokens, %d rounds", len(models), len(prompt), chunk,
                new_tokens, rounds)  # fmt: skip
    decoders = {}
    for name in list(models):  # each graph is dropped once its session holds the weights (memory)
        decoders[name] = Generator.open(models.pop(name), threads=threads, prefill_chunk=chunk)
        gc.collect()
    names = list(decoders)
    times = {n: {"prefill": [], "decode": []} for n in names}
    tokens = {}
    for name in names:  # warm-up
        decoders[name].run(prompt, 2)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            tokens[name], p, d = decoders[name].run(prompt, new_tokens)
            times[name]["prefill"].append(p)
            times[name]["decode"].append(d)
    out = {"context": int(len(prompt)), "new_tokens": new_tokens, "rounds": rounds, "chunk": chunk, "forms": {}}
    base = None
    for name in names:
        per_token = float(np.median(times[name]["decode"])) / (new_tokens - 1)
        prefill_ms = float(np.median(times[name]["prefill"])) * 1e3
        base = base or (per_token, prefill_ms)
        same = next((i for i, (a, b) in enumerate(zip(tokens[name], tokens[INPUT])) if a != b), len(tokens[name]))
        fair = (float(np.median(times[FUSED_KV]["decode"])) / (new_tokens - 1)) if FUSED_KV in times else None
        out["forms"][name] = {"prefill_ms": prefill_ms, "decode_ms_per_token": per_token * 1e3, "decode_tokens_per_s": 1 / per_token,
                              "decode_speedup": base[0] / per_token, "prefill_speedup": base[1] / prefill_ms,
                              "decode_speedup_vs_fused": fair / per_token if fair else None, "same_greedy_prefix": same}  # fmt: skip
        logger.info("  %-22s prefill %8.0f ms  decode %6.1f ms/token (%5.1f tok/s, x%.2f)  same prefix %d/%d", name, prefill_ms,
                    per_token * 1e3, 1 / per_token, base[0] / per_token, same, new_tokens)  # fmt: skip
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
    parser.add_argument("--no-portable", action="store_true", help="whole model: kernel rows only")
    parser.add_argument("--no-input", action="store_true", help="whole model: leave the input model out (its 4k prefill is slow and large)")
    parser.add_argument("--forms", default=None, help="whole model: only these sparse forms (comma-separated label prefixes)")
    parser.add_argument("--decode-step", action="store_true", help="also one decode step's attention at --lengths cache lengths")
    parser.add_argument("--decode", action="store_true", help="also SmolLM2 decode tokens/s with a KV cache (recipe smollm2_kv)")
    parser.add_argument("--decode-context", type=int, default=4096)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--decode-rounds", type=int, default=1)
    parser.add_argument("--decode-keeps", default="0.125,0.25")
    parser.add_argument("--decode-chunk", type=int, default=512, help="decode: prefill chunk (tokens per step)")
    parser.add_argument("--decode-portable", action="store_true", help="decode: portable rows too (more memory)")
    parser.add_argument("--decode-model-cache", default=None, help="where smollm2_kv is built (default: edgeprune's model cache)")
    parser.add_argument("--lengths-none", action="store_true", help="skip the attention-only table (keep the last one)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if kernels.sparse_attention_library() is None:
        sys.exit("the kernel is not built: pip install -e . with a C++ compiler first")
    results = {}
    for s in ([] if args.lengths_none else (int(x) for x in args.lengths.split(","))):
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
    step = decode_step([int(x) for x in args.lengths.split(",")], max(args.runs, 20), args.threads) if args.decode_step else None
    before_after = None
    if args.before_library:
        before_after = compare_libraries(args.before_library, [int(x) for x in args.lengths.split(",")], args.runs, args.threads)
    whole = whole_model(args.model_length, args.ppl_tokens, args.model_runs, args.threads, args.budget, not args.no_portable,
                        not args.no_input, args.forms.split(",") if args.forms else None) if args.whole_model else None
    dec = decode(args.decode_context, args.decode_tokens, args.decode_rounds, args.threads,
                 [float(x) for x in args.decode_keeps.split(",")], args.decode_model_cache,
                 args.decode_portable, args.decode_chunk) if args.decode else None  # fmt: skip
    meta = {"command": "python benchmarks/run_sparse_attention.py " + " ".join(sys.argv[1:]),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} ORT threads",
            "onnxruntime": ort.__version__, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "runs": args.runs, "load_average_1m": round(os.getloadavg()[0], 2)}  # fmt: skip
    out = REPO / "benchmarks" / "results" / "sparse_attention.json"
    # Each part keeps the meta of the run that measured it; parts not run this time are kept from the last file.
    previous = json.loads(out.read_text()) if out.exists() else {}
    parts = {}
    for key, value, runs in (("attention", results, args.runs), ("before_after", before_after, args.runs),
                             ("whole_model", whole, args.model_runs), ("decode", dec, args.decode_rounds),
                             ("decode_step", step, max(args.runs, 20))):  # fmt: skip
        old = previous.get(key)
        if key == "attention" and old is None and previous.get("results"):  # the file's older one-meta layout
            old = {"meta": previous["meta"], "data": previous["results"]}
        if key in ("before_after", "whole_model") and old is not None and "data" not in old:
            found = re.search(r"--model-runs (\d+)", previous["meta"]["command"])
            runs_then = int(found.group(1)) if key == "whole_model" and found else previous["meta"]["runs"]
            old = {"meta": {**previous["meta"], "runs": runs_then}, "data": old}
        parts[key] = {"meta": {**meta, "runs": runs}, "data": value} if value else old
        if key == "whole_model" and value and old:  # whole-model runs are few and noisy here: the one before stays beside it
            parts["whole_model_earlier"] = old
        elif key == "whole_model":
            parts["whole_model_earlier"] = previous.get("whole_model_earlier")
    out.write_text(json.dumps(parts, indent=2))
    update_section(BENCHMARKS_MD, "sparse_attention", "\n".join(render(parts)))


def _header(meta: dict, what: str) -> str:
    return (f"`{meta['command']}` — {meta['machine']}, onnxruntime {meta['onnxruntime']}, {meta['date']}, {what}, "
            f"1-minute load average {meta['load_average_1m']} at the end (above the core count means other jobs shared the cores).")


def render(parts: dict) -> list[str]:
    """BENCHMARKS.md's sparse-attention section from the parts, each with the command and date that measured it."""
    lines = ["## Sparse attention: one attention layer at SmolLM2-135M's shapes", ""]
    att = parts.get("attention")
    if att:
        results, meta = att["data"], att["meta"]
        lines += [
            _header(meta, f"p50 of {meta['runs']} interleaved runs") + "  9 query / 3 KV heads, head dim 64, causal, 64-token "
            "blocks, selection per KV group (sink block and diagonal always kept).  Ratio = latency / fused dense "
            "`com.microsoft.GroupQueryAttention` (lower is faster); selection cost included in the sparse rows.",
            "",
            "| form | " + " | ".join(f"{s} tokens: p50 ms (ratio)" for s in results) + " |",
            "|---|" + "---|" * len(results),
        ]
        for name in next(iter(results.values())):
            cells = [f"{results[s][name]['p50_ms']:.1f} ({results[s][name]['ratio_to_fused']:.2f})" for s in results]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ds = parts.get("decode_step")
    if ds:
        steps, meta = ds["data"], ds["meta"]
        lines += ["", "One decode step's attention (one new query over a cache of T keys, SmolLM2's shapes): fused dense "
                  "`com.microsoft.GroupQueryAttention` with past/present (not shared) against the kernel op, whose selection "
                  "(Quest bound over per-block key min/max) is included. " + _header(meta, f"p50 of {meta['runs']} interleaved runs"), "",
                  "| form | " + " | ".join(f"T = {t}: p50 ms (ratio)" for t in steps) + " |", "|---|" + "---|" * len(steps)]
        for name in next(iter(steps.values())):
            lines.append(f"| {name} | " + " | ".join(f"{steps[t][name]['p50_ms']:.2f} ({steps[t][name]['ratio_to_fused']:.2f})" for t in steps) + " |")
    ba = parts.get("before_after")
    if ba:
        before_after, meta = ba["data"], ba["meta"]
        lines += ["", "Kernel before/after (the first kernel, commit ff38cf8's source built by hand, vs this build; its own "
                  "interleaved loop, p50; ratio to fused dense GQA from the same loop). " + _header(meta, f"{meta['runs']} runs"), "",
                  "| form | " + " | ".join(f"{s} tokens: p50 ms (ratio)" for s in before_after) + " |",
                  "|---|" + "---|" * len(before_after)]
        for name in next(iter(before_after.values())):
            cells = [f"{before_after[s][name]['p50_ms']:.1f} ({before_after[s][name]['ratio_to_fused']:.2f})" for s in before_after]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for key, title in (("whole_model", "SmolLM2-135M whole-model prefill"), ("whole_model_earlier", "The run before it")):
        wm = parts.get(key)
        if not wm:
            continue
        whole, meta = wm["data"], wm["meta"]
        fused = FUSED in whole["forms"]
        if key == "whole_model_earlier":
            lines += ["", "Whole-model runs here took 10-70 s per 4k prefill on a machine shared with other jobs: a form's ratio "
                      "in the two runs shows how far the load moved it (the same form's p50 against the same baseline)."]
        has_input = any(r.get("speedup_vs_input") is not None for r in whole["forms"].values())
        lines += ["", f"### {title} at {whole['length']} tokens", "",
                  _header(meta, f"p50 of {meta['runs']} interleaved runs") + f"  WikiText-2 valid perplexity on {whole['length']}-token "
                  f"windows over its first {whole['ppl_tokens']} tokens; calibrated allocations are measured on the window right after "
                  "the scored tokens.  Portable rows reuse the kernel row's perplexity (the two paths agree to 1e-4). "
                  + ("The fair baseline is the same model with each of its attention blocks fused into ORT's dense "
                     f"`com.microsoft.GroupQueryAttention` ({whole.get('fused_layers')} layers; the `fuse_attention` pass)."
                     if fused else "The fused-dense baseline was not built in this run: speed-ups are against the input model."),
                  "",
                  "| form | prefill p50 ms | " + ("speed-up vs input | " if has_input else "") + ("speed-up vs fused dense | " if fused else "")
                  + "peak MB | perplexity | vs dense |", "|---|---|" + ("---|" if has_input else "") + ("---|" if fused else "") + "---|---|---|"]  # fmt: skip
        for name, r in whole["forms"].items():
            ratio = f" {r['speedup_vs_fused']:.2f} |" if fused else ""
            delta = r.get("perplexity_vs_dense", r.get("perplexity_vs_input"))
            vs_input = (" " + ("" if r.get("speedup_vs_input") is None else f"{r['speedup_vs_input']:.2f}") + " |") if has_input else ""
            lines.append(f"| {name} | {r['p50_ms']:.0f} |{vs_input}{ratio} {r['peak_mb']:.0f} | "
                         f"{r['perplexity']:.3f} | {'' if delta is None else f'{delta:+.1%}'} |")  # fmt: skip
        for label, recs in whole["allocations"].items():
            if any("measured" in r for r in recs):
                lines += ["", f"Calibrated keep per layer ({label}): " + ", ".join(f"{r['keep']:g}" for r in recs)]
    dc = parts.get("decode")
    if dc:
        dec, meta = dc["data"], dc["meta"]
        lines += ["", f"### SmolLM2-135M decode with a KV cache at {dec['context']} tokens of context", "",
                  _header(meta, f"median of {meta['runs']} timed round(s) after a warm-up")
                  + f"  Recipe `smollm2_kv` (optimum text-generation-with-past): prefill of the first {dec['context']} WikiText-2 "
                  f"valid tokens in {dec.get('chunk')}-token steps with the cache, then {dec['new_tokens']} greedy tokens decoded one at a "
                  "time with the cache fed back through IOBinding, models interleaved (chunked prefill: the input model's one-shot 4k "
                  "prefill needed more memory than this shared machine had).  Sparse rows: the pass at the default "
                  "min_len 1024 (per KV group, 64-token blocks); a decode step keeps the cache blocks with the largest Quest "
                  "bound.  Same greedy prefix: leading generated tokens equal to the input model's.",
                  "",
                  "| form | chunked prefill ms | decode ms/token | decode tokens/s | decode speed-up vs input | vs fused dense | "
                  "prefill speed-up vs input | same greedy prefix |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, r in dec["forms"].items():
            fused = "" if r.get("decode_speedup_vs_fused") is None else f"{r['decode_speedup_vs_fused']:.2f}"
            lines.append(f"| {name} | {r['prefill_ms']:.0f} | {r['decode_ms_per_token']:.1f} | {r['decode_tokens_per_s']:.1f} | "
                         f"{r['decode_speedup']:.2f} | {fused} | {r['prefill_speedup']:.2f} | {r['same_greedy_prefix']}/{dec['new_tokens']} |")  # fmt: skip
    return lines


if __name__ == "__main__":
    main()
