"""Structured pruning side by side: metrics x compensation x ratio, on MiniLM (STS-B) and SmolLM2 (WikiText-2).

For each model: export (``edgeprune.models.build``), run the cleanup pass once, collect
calibration statistics once (one ``CompileContext`` shared by all variants, so every metric sees
the same activations), then for each ratio and variant run ``prune`` + ``cleanup`` on a fresh
copy, save it, and measure the task metric, parameters, file size, and latency against fp32 in
interleaved rounds (``measure_side_by_side``, one call per ratio, batch 1, 128 tokens).

Calibration never touches the evaluation data:
- MiniLM: 128 WikiText-2 *valid* lines (> 40 chars, no headings); STS-B dev is the eval set.
- SmolLM2: 32 windows of 128 tokens from Tiny Shakespeare; WikiText-2 valid is the eval set
  (the first 4096 tokens, 8 non-overlapping windows of 512, as in the baseline benchmark).

Writes ``<out>/pruning.json`` and ``<out>/pruning.md`` (rendered from the JSON).

    python benchmarks/run_pruning.py --models minilm            # ~10 min on 2 cores
    python benchmarks/run_pruning.py --models smollm2 --smollm2-variants magnitude,flap,flap+bias
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_md import BENCHMARKS_MD, update_section

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results"
logger = logging.getLogger("run_pruning")

def prune_options(variant: str) -> dict:
    """Prune options of a variant name ``<metric>[+bias][+refit][/<allocation>]`` (ratio added per run).

    The grammar every benchmark's variant names follow (run_pruning_cnn, run_bits too).
    """
    name, _, allocation = variant.partition("/")
    metric, *flags = name.split("+")
    unknown = set(flags) - {"bias", "refit"}
    if unknown:
        raise ValueError(f"unknown flag(s) {sorted(unknown)} in variant {variant!r}")
    options = {"metric": metric, "compensate": "bias" in flags}
    if "refit" in flags:
        options["refit"] = True
    if allocation:
        options["allocation"] = allocation
    return options


VARIANTS = {v: prune_options(v) for v in (
    "magnitude", "magnitude+bias", "wanda", "wanda+bias", "flap", "flap+bias", "flap+bias+refit",
    "flap+bias/floor", "flap+bias/uniform",
)}  # fmt: skip
DEFAULTS = {
    "minilm": ("0.1,0.2,0.3,0.4", "magnitude,wanda,flap,flap+bias,flap+bias+refit,flap+bias/floor,flap+bias/uniform"),
    "smollm2": ("0.1,0.2", "magnitude,magnitude+bias,wanda,wanda+bias,flap,flap+bias,flap+bias+refit"),
}
PPL_CONTEXT, PPL_TOKENS = 512, 4096
#: The ORT baseline that pruning is combined with (same settings as run_baselines.py).
INT8 = "ort-dyn-int8-pc"


# ----------------------------------------------------------------------------------- calibration


def minilm_calibration(model, tokenizer: Path, workdir: Path):
    from edgeprune.calibration import load_calibration
    from edgeprune.models import data_dir

    lines = [
        line.strip()
        for line in (data_dir() / "wikitext-2" / "valid.txt").read_text(encoding="utf-8").splitlines()
        if len(line.strip()) > 40 and not line.strip().startswith("=")
    ][:128]
    path = workdir / "minilm_calibration.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    calib = load_calibration(path, model, tokenizer=tokenizer, max_samples=128, seq_len=128)
    calib.source = "128 WikiText-2 valid lines (> 40 chars, headings skipped), <= 128 tokens each"
    return calib


def smollm2_calibration(tokenizer: Path, samples: int = 32, length: int = 128, seed: int = 0):
    from tokenizers import Tokenizer

    from edgeprune.calibration import CalibrationSet
    from edgeprune.models import data_dir

    tok = Tokenizer.from_file(str(tokenizer))
    tok.no_padding()
    tok.no_truncation()
    ids = tok.encode((data_dir() / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8"), add_special_tokens=False).ids
    starts = np.random.default_rng(seed).choice(len(ids) - length, size=samples, replace=False)
    rows = []
    for s in sorted(int(x) for x in starts):
        arr = np.asarray(ids[s : s + length], dtype=np.int64)[None, :]
        rows.append({"input_ids": arr, "attention_mask": np.ones_like(arr), "position_ids": np.arange(length, dtype=np.int64)[None, :]})
    return CalibrationSet(rows, f"{samples} random {length}-token windows of Tiny Shakespeare (seed {seed})")


# --------------------------------------------------------------------------------------- metrics


def metric(name: str, path: Path, tokenizer: Path, threads: int) -> float:
    from edgeprune.models import stsb_spearman, wikitext_perplexity

    if name == "minilm":
        return stsb_spearman(str(path), tokenizer, threads=threads)
    return wikitext_perplexity(str(path), tokenizer, context=PPL_CONTEXT, max_tokens=PPL_TOKENS, threads=threads)


def feeds_for(name: str, tokenizer: Path, seq: int = 128) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer

    from edgeprune.models.tasks import load_wikitext

    tok = Tokenizer.from_file(str(tokenizer))
    tok.no_padding()
    tok.no_truncation()
    ids = np.asarray(tok.encode(load_wikitext()[:20000], add_special_tokens=False).ids[:seq], dtype=np.int64)[None, :]
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if name == "smollm2":
        feeds["position_ids"] = np.arange(seq, dtype=np.int64)[None, :]
    return feeds


# ------------------------------------------------------------------------------------------ run


def bench(name: str, ratios: list[float], variants: list[str], args, workdir: Path) -> dict:
    import onnx_ir as ir

    from edgeprune.context import CompileContext
    from edgeprune.model_io import load_model, param_count, save_model, to_proto
    from edgeprune.model_io import file_size as onnx_file_bytes
    from edgeprune.models import build
    from edgeprune.passes.cleanup import CleanupPass
    from edgeprune.passes.prune.prune_pass import PruneConfig, StructuredPruningPass
    from edgeprune.runtime.targets import get_target

    from run_baselines import quantize  # the ORT baseline's exact settings, from its own script

    artifact = build(name, measure=False)
    base = load_model(artifact.model_path)
    CleanupPass()(base)
    clean_path = workdir / f"{name}-fp32.onnx"
    save_model(base, clean_path)
    clean_proto = to_proto(base)
    calib = minilm_calibration(base, artifact.tokenizer_path, workdir) if name == "minilm" else smollm2_calibration(artifact.tokenizer_path)
    ctx = CompileContext(target=get_target("cpu"), calibration=calib, holdout=calib, threads=args.threads)
    fp32_params, fp32_bytes = param_count(base), onnx_file_bytes(artifact.model_path)
    start = time.perf_counter()
    fp32_metric = metric(name, artifact.model_path, artifact.tokenizer_path, args.threads)
    logger.info("%s fp32: %.4f (%.0f s)", name, fp32_metric, time.perf_counter() - start)
    feeds = feeds_for(name, artifact.tokenizer_path)
    rows = [{"variant": "fp32", "ratio": 0.0, "metric": fp32_metric, "params": fp32_params, "file_bytes": fp32_bytes}]
    int8_alone = None
    if args.int8:  # ORT dynamic int8 of the unpruned model: the trade-off pruning+int8 must beat
        int8_alone = quantize(INT8, artifact.model_path, workdir / f"{name}-{INT8}.onnx")
        rows.append({"variant": INT8, "ratio": 0.0, "metric": metric(name, int8_alone, artifact.tokenizer_path, args.threads),
                     "params": fp32_params, "file_bytes": onnx_file_bytes(int8_alone)})  # fmt: skip
    for ratio in ratios:
        paths = {"fp32": str(artifact.model_path)}
        if int8_alone is not None:
            paths[INT8] = str(int8_alone)
        for variant in variants:
            options = {**VARIANTS[variant], "ratio": ratio}
            model = ir.from_proto(clean_proto)
            t0 = time.perf_counter()
            result = StructuredPruningPass(PruneConfig(**options), ctx)(model)
            CleanupPass()(model)
            prune_s = time.perf_counter() - t0
            path = workdir / f"{name}-{variant.replace('/', '_')}-{ratio}.onnx"
            save_model(model, path)
            t0 = time.perf_counter()
            value = metric(name, path, artifact.tokenizer_path, args.threads)
            s = result.summary
            row = {
                "variant": variant, "ratio": ratio, "options": options, "metric": value,
                "params": param_count(model), "file_bytes": onnx_file_bytes(path),
                "removed_share_of_prunable": s["removed_share"], "prunable_params": s["prunable_params"],
                "prune_seconds": round(prune_s, 1), "eval_seconds": round(time.perf_counter() - t0, 1),
                "kept": {r["layer"]: r["units_after"] for r in result.records},
            }  # fmt: skip
            rows.append(row)
            paths[variant] = str(path)
            logger.info("%s %s @%.2f: %.4f, params %d, prune %.0f s", name, variant, ratio, value, row["params"], prune_s)
            if variant in args.int8.split(","):
                qpath = quantize(INT8, path, path.with_name(path.stem + "-int8.onnx"))
                rows.append({**row, "variant": f"{variant}+{INT8}", "metric": metric(name, qpath, artifact.tokenizer_path, args.threads),
                             "file_bytes": onnx_file_bytes(qpath)})  # fmt: skip
                paths[f"{variant}+{INT8}"] = str(qpath)
        latency = _latency_in_chunks(paths, feeds, args)
        for row in rows:
            if row["ratio"] == ratio or (row["variant"] == INT8 and row["variant"] in latency):
                row["latency_p50_ms"] = latency[row["variant"]].p50_ms
                row["latency_ratio"] = latency[row["variant"]].ratio
        rows[0].setdefault("latency_p50_ms_by_round", []).append(latency["fp32"].p50_ms)
        for p in paths.values():
            if p not in (str(artifact.model_path), str(int8_alone)):
                Path(p).unlink(missing_ok=True)
    protocol = {
        "metric": "STS-B dev Spearman, all 1500 pairs (mean-pooled token_embeddings, cosine)"
        if name == "minilm"
        else f"WikiText-2 valid perplexity, first {PPL_TOKENS} tokens, {PPL_TOKENS // PPL_CONTEXT} non-overlapping windows of {PPL_CONTEXT}",
        "higher_is_better": name == "minilm",
        "calibration": calib.source,
        "latency": f"batch 1, {feeds['input_ids'].shape[1]} tokens, {args.threads} threads, p50 of {args.runs} interleaved runs "
        "(fp32 measured in the same call as each group of at most 4 variants)",
        "pipeline": "cleanup -> prune -> cleanup; default allocation global (FLAP standardized) unless the variant says floor/uniform; round_to 8",
    }
    return {"model": name, "protocol": protocol, "rows": rows}


def _latency_in_chunks(paths: dict[str, str], feeds, args, chunk: int = 4) -> dict:
    """Side-by-side latency, at most ``chunk`` candidates per call, fp32 in every call.

    Opening every SmolLM2 variant at once would hold a dozen 0.5 GB sessions; the ratio to fp32
    is taken within each call, so chunks measured at different moments stay comparable.
    """
    from edgeprune.runtime.latency import measure_side_by_side

    names = [n for n in paths if n != "fp32"]
    out = {}
    for i in range(0, len(names), chunk):
        part = {"fp32": paths["fp32"], **{n: paths[n] for n in names[i : i + chunk]}}
        measured = measure_side_by_side(part, feeds, "cpu", warmup=args.warmup, runs=args.runs, threads=args.threads)
        scale = measured["fp32"].p50_ms
        for name, result in measured.items():
            if name != "fp32":
                out[name] = _Scaled(result.p50_ms, result.p50_ms / scale)
        out.setdefault("fp32", _Scaled(scale, 1.0))
    return out


class _Scaled:
    """p50 of one candidate and its ratio to the fp32 run measured beside it."""

    def __init__(self, p50_ms: float, ratio: float):
        self.p50_ms, self.ratio = p50_ms, ratio


# ---------------------------------------------------------------------------------------- output


def render(results: dict) -> str:
    lines = ["## Structured pruning", ""]
    for model in results["models"]:
        p, m = model["protocol"], model.get("machine", results["machine"])
        lines += [f"### {model['model']}", "",
                  f"- Run {model.get('created', results['created'])} on {m['platform']} ({m['cpu_count']} CPUs visible). "
                  f"Command: `{model.get('command', results['command'])}`.", f"- Metric: {p['metric']}.", f"- Calibration: {p['calibration']}.",
                  f"- Latency: {p['latency']}.", f"- Pipeline: {p['pipeline']}.", ""]  # fmt: skip
        lines += ["| ratio | variant | metric | Δ vs fp32 | params (M) | size MB | removed of prunable | latency ratio |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        ref = model["rows"][0]["metric"]
        for r in model["rows"]:
            lat = f"{r['latency_ratio']:.3f}" if "latency_ratio" in r else "1.000"
            removed = f"{r['removed_share_of_prunable']:.3f}" if "removed_share_of_prunable" in r else "-"
            lines.append(
                f"| {r['ratio']:.2f} | {r['variant']} | {r['metric']:.4f} | {r['metric'] - ref:+.4f} | "
                f"{r['params'] / 1e6:.2f} | {r['file_bytes'] / 1e6:.1f} | {removed} | {lat} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,smollm2")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--int8", default="", help="Comma-separated variants to also quantize with ORT dynamic int8, compared with int8 alone.")
    for name in DEFAULTS:
        parser.add_argument(f"--{name}-ratios", default=DEFAULTS[name][0])
        parser.add_argument(f"--{name}-variants", default=DEFAULTS[name][1])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("edgeprune", "onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    results = {
        "schema": "edgeprune.bench.pruning/1",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/run_pruning.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "models": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    previous = args.out / "pruning.json"
    run_names = [m.strip() for m in args.models.split(",") if m.strip()]
    if previous.exists():  # keep the other models' last results; each model block says its own command and date
        old = json.loads(previous.read_text())
        results["models"] = [m for m in old.get("models", []) if m["model"] not in run_names]
    with tempfile.TemporaryDirectory() as tmp:
        for name in run_names:
            ratios = [float(x) for x in getattr(args, f"{name}_ratios").split(",")]
            variants = [v.strip() for v in getattr(args, f"{name}_variants").split(",")]
            block = bench(name, ratios, variants, args, Path(tmp))
            block.update(command=results["command"], created=results["created"], machine=results["machine"])
            results["models"].append(block)
            (args.out / "pruning.json").write_text(json.dumps(results, indent=1))
            (args.out / "pruning.md").write_text(render(results) + "\n")
            if args.out.resolve() == DEFAULT_OUT.resolve():
                update_section(BENCHMARKS_MD, "pruning", render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
