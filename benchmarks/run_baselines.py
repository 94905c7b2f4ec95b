"""Measure the benchmark models against ONNX Runtime's own quantizers, side by side in one run.

Variants of each fp32 export (from ``edgeprune.models.build``):

- ``ort-dyn-int8-pc``: ``quantize_dynamic(per_channel=True, weight_type=QInt8)`` on MatMul and
  Gather (Gemm is not in ORT's dynamic-quantization registry, so naming it would do nothing);
- ``ort-dyn-int8-pt``: the same per tensor (MiniLM only);
- ``ort-int4-b32``: ``MatMulNBitsQuantizer(bits=4, block_size=32, is_symmetric=True)``, MatMul
  weights only (ORT's default), so embeddings and a tied lm_head stay fp32.

Per model it measures the task metric, file size (incl. external data) and latency (interleaved
rounds via ``edgeprune.runtime.latency.measure_side_by_side``), computes ratios against fp32,
and writes ``<out>/baselines.json`` plus the model sections of BENCHMARKS.md, rendered only from
that JSON.  ``--quick`` uses tiny subsets (for the test) and is marked as such in both outputs.

    python benchmarks/run_baselines.py --models minilm,smollm2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_md import BENCHMARKS_MD, update_section
from edgeprune.models.recipes import PPL_CONTEXT, PPL_MAX_TOKENS

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results"
logger = logging.getLogger("run_baselines")

# name -> (label, quantizer settings); the quantizer functions below read the settings.
VARIANTS = {
    "fp32": ("fp32 export (reference)", {}),
    "ort-dyn-int8-pc": (
        "ORT dynamic int8, per channel",
        {"tool": "quantize_dynamic", "per_channel": True, "weight_type": "QInt8", "op_types": ["MatMul", "Gather"]},
    ),
    "ort-dyn-int8-pt": (
        "ORT dynamic int8, per tensor",
        {"tool": "quantize_dynamic", "per_channel": False, "weight_type": "QInt8", "op_types": ["MatMul", "Gather"]},
    ),
    "ort-int4-b32": (
        "ORT MatMulNBits int4, block 32",
        {"tool": "MatMulNBitsQuantizer", "bits": 4, "block_size": 32, "is_symmetric": True, "accuracy_level": None,
         "op_types": ["MatMul"]},
    ),
}
MODEL_VARIANTS = {
    "minilm": ["fp32", "ort-dyn-int8-pc", "ort-dyn-int8-pt", "ort-int4-b32"],
    "smollm2": ["fp32", "ort-dyn-int8-pc", "ort-int4-b32"],
}


# ------------------------------------------------------------------------------------ quantizers


def quantize(variant: str, src: Path, dst: Path) -> Path:
    """Write ``variant`` of the fp32 model ``src`` to ``dst`` with ORT's own tools."""
    settings = VARIANTS[variant][1]
    if settings.get("tool") == "quantize_dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(
            src, dst, op_types_to_quantize=settings["op_types"], per_channel=settings["per_channel"],
            weight_type=QuantType[settings["weight_type"]],
        )
    elif settings.get("tool") == "MatMulNBitsQuantizer":
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quant = MatMulNBitsQuantizer(
            onnx.load(str(src)), bits=settings["bits"], block_size=settings["block_size"],
            is_symmetric=settings["is_symmetric"], accuracy_level=settings["accuracy_level"],
            op_types_to_quantize=tuple(settings["op_types"]),
        )
        quant.process()
        quant.model.save_model_to_file(str(dst), use_external_data_format=False)
    else:
        raise ValueError(f"no quantizer for {variant}")
    return dst


def quantized_op_counts(path: Path) -> dict[str, int]:
    """Count of the quantized op types in a model: shows what the tool actually converted."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    wanted = {"MatMulInteger", "DynamicQuantizeLinear", "DequantizeLinear", "MatMulNBits", "GatherBlockQuantized",
              "DynamicQuantizeMatMul"}
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        if node.op_type in wanted:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# --------------------------------------------------------------------------------------- feeds


def text_feeds(model_path: Path, ids: list[int]) -> dict[str, np.ndarray]:
    """Batch-1 feeds for the inputs the model declares, from real token ids."""
    import onnx

    arr = np.asarray(ids, dtype=np.int64)[None, :]
    pool = {
        "input_ids": arr,
        "attention_mask": np.ones_like(arr),
        "token_type_ids": np.zeros_like(arr),
        "position_ids": np.arange(arr.shape[1], dtype=np.int64)[None, :],
    }
    names = [i.name for i in onnx.load(str(model_path), load_external_data=False).graph.input]
    return {name: pool[name] for name in names}


def latency_ids(tokenizer_path: Path, length: int, *, special: bool) -> list[int]:
    """``length`` real tokens from WikiText-2 (fixed across variants and runs)."""
    from tokenizers import Tokenizer

    from edgeprune.models.tasks import load_wikitext

    tok = Tokenizer.from_file(str(tokenizer_path))
    tok.no_padding()
    tok.no_truncation()
    text = load_wikitext()[:20000]
    if special:  # encoder: [CLS] ... [SEP] within the length
        tok.enable_truncation(length)
        ids = tok.encode(text).ids
    else:
        ids = tok.encode(text, add_special_tokens=False).ids[:length]
    if len(ids) != length:
        raise RuntimeError(f"could not get {length} tokens for the latency feeds")
    return ids


# ------------------------------------------------------------------------------------- metrics


def minilm_metrics(paths: dict[str, Path], tokenizer: Path, *, limit: int | None, threads: int) -> dict[str, dict]:
    """STS-B dev Spearman per variant, plus mean cosine of each sentence embedding to fp32's."""
    from scipy.stats import spearmanr

    from edgeprune.models.tasks import cosine_rows, load_stsb, sentence_embeddings

    s1, s2, gold = load_stsb()
    if limit is not None:
        s1, s2, gold = s1[:limit], s2[:limit], gold[:limit]
    out, reference = {}, None
    for name, path in paths.items():
        start = time.perf_counter()
        emb = sentence_embeddings(str(path), tokenizer, s1 + s2, threads=threads)
        if reference is None:
            reference = emb
        cos = cosine_rows(emb[: len(s1)], emb[len(s1) :])
        out[name] = {
            "stsb_spearman": float(spearmanr(cos, gold).statistic),
            "cosine_to_fp32": float(cosine_rows(emb, reference).mean()),
            "pairs": len(gold),
            "metric_seconds": round(time.perf_counter() - start, 1),
        }
        logger.info("minilm %s: %s", name, out[name])
    return out


def smollm2_metrics(paths: dict[str, Path], tokenizer: Path, *, context: int, max_tokens: int,
                    threads: int) -> dict[str, dict]:
    from edgeprune.models.tasks import wikitext_perplexity

    out = {}
    for name, path in paths.items():
        start = time.perf_counter()
        ppl = wikitext_perplexity(str(path), tokenizer, context=context, max_tokens=max_tokens, threads=threads)
        out[name] = {"perplexity": ppl, "metric_seconds": round(time.perf_counter() - start, 1)}
        logger.info("smollm2 %s: %s", name, out[name])
    return out


# ------------------------------------------------------------------------------------- one model


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version()}


def bench_model(name: str, args, workdir: Path) -> dict:
    import onnxruntime

    from edgeprune.model_io import file_size as onnx_file_bytes
    from edgeprune.models import build
    from edgeprune.runtime.latency import measure_side_by_side

    artifact = build(name, measure=False)
    paths: dict[str, Path] = {"fp32": artifact.model_path}
    quant_seconds: dict[str, float] = {"fp32": 0.0}
    for variant in MODEL_VARIANTS[name][1:]:
        start = time.perf_counter()
        paths[variant] = quantize(variant, artifact.model_path, workdir / f"{name}-{variant}.onnx")
        quant_seconds[variant] = round(time.perf_counter() - start, 1)
        logger.info("%s %s quantized in %.1f s", name, variant, quant_seconds[variant])

    if name == "minilm":
        metric_key, higher_better = "stsb_spearman", True
        protocol = {
            "metric": "STS-B dev Spearman (mean pooling of token_embeddings, cosine)",
            "pairs": 64 if args.quick else 1500,
        }
        metrics = minilm_metrics(paths, artifact.tokenizer_path, limit=protocol["pairs"] if args.quick else None,
                                 threads=args.metric_threads)
        seq = 128
        feeds = text_feeds(artifact.model_path, latency_ids(artifact.tokenizer_path, seq, special=True))
    else:
        metric_key, higher_better = "perplexity", False
        context, tokens = (128, 256) if args.quick else (args.ppl_context, args.ppl_tokens)
        protocol = {
            "metric": "WikiText-2 valid perplexity (text as is, no special tokens, non-overlapping windows)",
            "context": context,
            "max_tokens": tokens,
            "windows": -(-tokens // context),
        }
        metrics = smollm2_metrics(paths, artifact.tokenizer_path, context=context, max_tokens=tokens,
                                  threads=args.metric_threads)
        seq = 128
        feeds = text_feeds(artifact.model_path, latency_ids(artifact.tokenizer_path, seq, special=False))

    warmup, runs = (1, 5) if args.quick else (args.warmup, args.runs)
    logger.info("%s: latency, %d variants side by side, %d runs", name, len(paths), runs)
    latency = measure_side_by_side({k: str(v) for k, v in paths.items()}, feeds, "cpu", warmup=warmup, runs=runs,
                                   threads=args.threads)
    rows = []
    fp32_size = onnx_file_bytes(paths["fp32"])
    for variant, path in paths.items():
        size = onnx_file_bytes(path)
        lat = latency[variant]
        value = metrics[variant][metric_key]
        ref = metrics["fp32"][metric_key]
        row = {
            "variant": variant,
            "label": VARIANTS[variant][0],
            "settings": VARIANTS[variant][1],
            "quantized_ops": quantized_op_counts(path),
            "quantize_seconds": quant_seconds[variant],
            **metrics[variant],
            "metric_delta_vs_fp32": value - ref,
            "size_bytes": size,
            "size_mb": size / 1e6,
            "size_ratio_vs_fp32": fp32_size / size,
            "latency": lat.to_dict(),
            "speedup_p50_vs_fp32": latency["fp32"].p50_ms / lat.p50_ms,
        }
        if not higher_better:
            row["metric_ratio_vs_fp32"] = value / ref
        rows.append(row)
    return {
        "model": name,
        "fp32_card": artifact.card_json_path.name,
        "command": "python benchmarks/run_baselines.py " + " ".join(sys.argv[1:]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "onnxruntime": onnxruntime.__version__,
        "quick": bool(args.quick),
        "metric": metric_key,
        "protocol": protocol,
        "latency_setup": {"batch": 1, "seq_len": seq, "threads": args.threads, "warmup": warmup, "runs": runs,
                          "inputs": sorted(feeds), "method": "measure_side_by_side (interleaved rounds)"},
        "rows": rows,
    }


# -------------------------------------------------------------------------------------- markdown



def _fmt_row(model: str, row: dict) -> str:
    lat = row["latency"]
    if model == "minilm":
        metric = f"{row['stsb_spearman']:.4f} | {row['metric_delta_vs_fp32']:+.4f} | {row['cosine_to_fp32']:.4f}"
    else:
        metric = f"{row['perplexity']:.2f} | {row['metric_ratio_vs_fp32']:.3f}x"
    return (
        f"| {row['variant']} | {metric} | {row['size_mb']:.1f} | {row['size_ratio_vs_fp32']:.2f}x | "
        f"{lat['p50_ms']:.1f} | {lat['p90_ms']:.1f} | {row['speedup_p50_vs_fp32']:.2f}x | "
        + (f"{lat['peak_memory_mb']:.0f}" if lat.get("peak_memory_mb") is not None else "n/a")
        + " |"
    )


def render_markdown(results: dict) -> str:
    """The baselines section of BENCHMARKS.md, every figure read from ``results``."""
    lines = ["## Baselines: ONNX Runtime's own quantizers", "",
             "Written by `benchmarks/run_baselines.py` from `benchmarks/results/baselines.json`; do not edit by hand.",
             ""]
    for model, entry in results["models"].items():
        m = entry["machine"]
        proto = entry["protocol"]
        ls = entry["latency_setup"]
        lines += [f"### {model}" + (" (QUICK run: tiny subsets, not for quoting)" if entry["quick"] else ""), ""]
        lines += [
            f"- command: `{entry['command']}`",
            f"- date: {entry['date']}; onnxruntime {entry['onnxruntime']}, CPUExecutionProvider",
            f"- machine: {m['cpu']}, {m['cpu_count']} cpus, {m['platform']}",
        ]
        if model == "minilm":
            lines.append(f"- metric: {proto['metric']}, {proto['pairs']} pairs; cosine-to-fp32 = mean cosine of "
                         "each sentence embedding with the fp32 model's")
            header = "| variant | STS-B Spearman | Δ vs fp32 | cosine to fp32 |"
            sep = "|---|---:|---:|---:|"
        else:
            lines.append(f"- metric: {proto['metric']}, first {proto['max_tokens']} tokens, context "
                         f"{proto['context']} ({proto['windows']} windows)")
            header = "| variant | perplexity | vs fp32 |"
            sep = "|---|---:|---:|"
        lines.append(f"- latency: batch {ls['batch']}, {ls['seq_len']} tokens"
                     + (" (prefill, no KV cache)" if model == "smollm2" else "")
                     + f", {ls['threads']} threads, {ls['warmup']} warm-up + {ls['runs']} runs, {ls['method']}")
        lines.append("- size includes external data; size x = fp32 size / size; speedup = fp32 p50 / p50; "
                     "peak MB = process peak growth while creating + warming the session")
        lines += ["", header + " size MB | size x | p50 ms | p90 ms | speedup | peak MB |",
                  sep + "---:|" * 6]
        lines += [_fmt_row(model, row) for row in entry["rows"]]
        lines.append("")
        for row in entry["rows"][1:]:
            ops = ", ".join(f"{k} x{v}" for k, v in sorted(row["quantized_ops"].items())) or "none"
            settings = ", ".join(f"{k}={v}" for k, v in row["settings"].items())
            lines.append(f"- `{row['variant']}`: {settings}; quantized ops: {ops}")
        lines.append("")
    return "\n".join(lines)


def write_markdown(path: Path, results: dict) -> None:
    """Replace the baselines section of ``path`` (create the file if needed), keeping the rest."""
    update_section(path, "baselines", render_markdown(results))


# ------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="minilm,smollm2", help="comma-separated: minilm, smollm2")
    parser.add_argument("--quick", action="store_true", help="tiny subsets and few runs (for tests; marked QUICK)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for baselines.json")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="BENCHMARKS.md to update (default: the repo's when --out is the default, else <out>/BENCHMARKS.md)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for latency")
    parser.add_argument("--metric-threads", type=int, default=None, help="threads for the metric runs (default: ORT's)")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    # Defaults are the protocol of SmolLM2's model card, so the fp32 row can be checked against it.
    parser.add_argument("--ppl-context", type=int, default=PPL_CONTEXT)
    parser.add_argument("--ppl-tokens", type=int, default=PPL_MAX_TOKENS, help="WikiText-2 token budget for SmolLM2")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODEL_VARIANTS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}: choose from {', '.join(MODEL_VARIANTS)}")
    if args.markdown is None:
        default_out = args.out.resolve() == DEFAULT_OUT.resolve()
        args.markdown = BENCHMARKS_MD if default_out else args.out / "BENCHMARKS.md"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    for ours in ("run_baselines", "edgeprune"):
        logging.getLogger(ours).setLevel(logging.INFO)
    # ORT's quantizers log every node they skip at INFO on their own handlers.
    for noisy in ("onnxruntime", "onnxruntime.quantization.matmul_nbits_quantizer"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "baselines.json"
    results = json.loads(json_path.read_text()) if json_path.exists() else {"schema": 1, "models": {}}
    for name in args.models:
        with tempfile.TemporaryDirectory(prefix=f"edgeprune_baselines_{name}_") as workdir:
            results["models"][name] = bench_model(name, args, Path(workdir))
        # Written after each model, so a later failure keeps the finished ones.
        tmp = json_path.with_name(".baselines.json.tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        tmp.replace(json_path)
        write_markdown(args.markdown, results)
    print(render_markdown({"models": {m: results["models"][m] for m in args.models}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
