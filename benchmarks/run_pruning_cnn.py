"""Conv channel pruning on EfficientNet-Lite0: metrics x ratio, then pruned + int8 against int8 alone.

Model: ``edgeprune.models.build("efficientnet_lite0")`` (packaged ImageNet weights, torch dynamo
export), cleaned once.  Data: the 100 shared ImageNet images (one per class), split
deterministically in labels.tsv order: images 0..15 calibrate (statistics for wanda/flap and
bias compensation, and the static int8 calibration), images 16..99 (84) evaluate.  Nothing is
evaluated on a calibration image.

For each ratio and variant: prune (units=conv, residual groups kept) + cleanup, then top-1
agreement with the unpruned model and top-1 vs labels on the 84 evaluation images, parameters,
file size; latency at batch 1, 224x224, 2 threads, interleaved with the unpruned model
(``measure_side_by_side``).

int8: ORT's dynamic quantizer turns Conv into ConvInteger, which the CPU EP runs slower than
fp32 Conv, so int8 here is static QDQ (``quantize_static``, per-channel weights, QInt8/QUInt8
activations, MinMax on the 16 calibration images).  One dynamic-int8 row is kept to show why.

    python benchmarks/run_pruning_cnn.py                      # ~10 min on 2 cores
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
from run_pruning import prune_options

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results"
logger = logging.getLogger("run_pruning_cnn")

VARIANTS = {v: prune_options(v) for v in (
    "magnitude", "wanda", "flap", "flap+bias", "wanda+bias", "wanda+bias/floor", "wanda+bias/uniform",
)}  # fmt: skip
CALIB_IMAGES = 16
THREADS = 2


def _session(path: Path):
    from edgeprune.runtime.session import make_session

    return make_session(str(path), "cpu", threads=THREADS)


def _logits(path: Path, pixels: np.ndarray) -> np.ndarray:
    from edgeprune.models import image_logits

    return image_logits(_session(path), pixels)


def _scores(logits: np.ndarray, ref: np.ndarray, labels: np.ndarray) -> dict:
    from edgeprune.models import top1_agreement

    return {"top1_agreement": top1_agreement(ref, logits), "top1": float(np.mean(logits.argmax(1) == labels))}


class _Reader:
    """CalibrationDataReader over the calibration images, one at a time."""

    def __init__(self, pixels: np.ndarray):
        self.rows = iter([{"input": pixels[i : i + 1]} for i in range(len(pixels))])

    def get_next(self):
        return next(self.rows, None)


def quantize_qdq(src: Path, dst: Path, calib_pixels: np.ndarray) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(
        str(src), str(dst), _Reader(calib_pixels), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )  # fmt: skip


def quantize_dyn(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)


def run(args) -> dict:
    import onnx_ir as ir

    from edgeprune.calibration import CalibrationSet
    from edgeprune.context import CompileContext
    from edgeprune.model_io import load_model, param_count, save_model, to_proto
    from edgeprune.model_io import file_size as onnx_file_bytes
    from edgeprune.models import build, imagenet_pixels, load_imagenet
    from edgeprune.passes.cleanup import CleanupPass
    from edgeprune.passes.prune.prune_pass import PruneConfig, StructuredPruningPass
    from edgeprune.runtime.latency import measure_side_by_side
    from edgeprune.runtime.targets import get_target

    work = Path(tempfile.mkdtemp(prefix="pruning_cnn_"))
    artifact = build("efficientnet_lite0", cache=args.cache, measure=False)
    base = load_model(artifact.model_path)
    CleanupPass()(base)
    base_path = work / "fp32.onnx"
    save_model(base, base_path)

    files, labels = load_imagenet()
    pixels = imagenet_pixels(files)
    calib_px, eval_px, eval_labels = pixels[:CALIB_IMAGES], pixels[CALIB_IMAGES:], labels[CALIB_IMAGES:]
    calib = CalibrationSet([{"input": calib_px[i : i + 1]} for i in range(CALIB_IMAGES)], f"imagenet-100 images 0..{CALIB_IMAGES - 1}")
    ctx = CompileContext(target=get_target("cpu"), calibration=calib, holdout=calib, threads=THREADS)
    ref = _logits(base_path, eval_px)
    feeds = {"input": eval_px[:1]}
    result: dict = {
        "model": artifact.name,
        "card": artifact.card(),
        "split": {"calibration": f"images 0..{CALIB_IMAGES - 1} of labels.tsv", "evaluation": f"images {CALIB_IMAGES}..99 ({len(eval_px)})"},
        "reference": {"params": param_count(base), "file_bytes": onnx_file_bytes(base_path), "top1": float(np.mean(ref.argmax(1) == eval_labels))},
        "runs": [],
        "int8": [],
    }
    paths: dict[str, Path] = {}
    for ratio in args.ratios:
        latency_models = {"fp32": base_path}
        for name in args.variants:
            model = ir.from_proto(to_proto(base))
            start = time.perf_counter()
            pass_result = StructuredPruningPass(PruneConfig(ratio=ratio, units="conv", **VARIANTS[name]), ctx)(model)
            CleanupPass()(model)
            seconds = time.perf_counter() - start
            path = work / f"{name.replace('+', '_').replace('/', '_')}_{int(ratio * 100)}.onnx"
            save_model(model, path)
            paths[f"{name}@{ratio}"] = path
            latency_models[name] = path
            s = pass_result.summary
            row = {"ratio": ratio, "variant": name, "params": param_count(model), "file_bytes": onnx_file_bytes(path),
                   "removed_share_of_prunable": s["removed_share"], "removed_share_of_model": s["removed_share_of_model"],
                   "prune_seconds": round(seconds, 2), **_scores(_logits(path, eval_px), ref, eval_labels)}  # fmt: skip
            logger.info("%s", row)
            result["runs"].append(row)
        lat = measure_side_by_side(latency_models, feeds, "cpu", warmup=10, runs=args.runs, threads=THREADS)
        for row in result["runs"]:
            if row["ratio"] == ratio:
                row["p50_ms"] = lat[row["variant"]].p50_ms
                row["fp32_p50_ms"] = lat["fp32"].p50_ms
                row["latency_ratio"] = lat[row["variant"]].p50_ms / lat["fp32"].p50_ms
    # int8: static QDQ of the unpruned and of the pruned models of the best variant
    int8_models = {"fp32": base_path}
    quantize_qdq(base_path, work / "int8.onnx", calib_px)
    int8_models["int8 (QDQ)"] = work / "int8.onnx"
    quantize_dyn(base_path, work / "int8_dynamic.onnx")
    int8_models["int8 dynamic"] = work / "int8_dynamic.onnx"
    for ratio in args.ratios:
        key = f"{args.int8_variant}@{ratio}"
        dst = work / f"pruned_{int(ratio * 100)}_int8.onnx"
        quantize_qdq(paths[key], dst, calib_px)
        int8_models[f"{key} + int8 (QDQ)"] = dst
    lat = measure_side_by_side(int8_models, feeds, "cpu", warmup=10, runs=args.runs, threads=THREADS)
    for name, path in int8_models.items():
        row = {"model": name, "file_bytes": onnx_file_bytes(path), "p50_ms": lat[name].p50_ms,
               "latency_ratio_vs_fp32": lat[name].p50_ms / lat["fp32"].p50_ms, **_scores(_logits(path, eval_px), ref, eval_labels)}  # fmt: skip
        logger.info("%s", row)
        result["int8"].append(row)
    result["machine"] = f"{platform.machine()} {platform.processor() or platform.system()}, {os.cpu_count()} cpus"
    result["date"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    result["settings"] = {"threads": THREADS, "batch": 1, "image": 224, "latency_runs": args.runs, "units": "conv", "allocation": "global unless the variant names floor/uniform",
                          "round_to": 8, "conv_residual": False, "int8_variant": args.int8_variant}  # fmt: skip
    return result


def markdown(r: dict) -> str:
    st = r["settings"]
    lines = [
        "## Conv channel pruning: EfficientNet-Lite0",
        "",
        f"- command: `{r.get('command', 'python benchmarks/run_pruning_cnn.py')}`; date {r['date']}",
        f"- {r['card']['title']}; {r['reference']['params']:,} parameters, unpruned top-1 {r['reference']['top1']:.3f} on the evaluation images",
        f"- split: calibration = {r['split']['calibration']}; evaluation = {r['split']['evaluation']}",
        f"- latency: p50, batch {st['batch']}, {st['image']}x{st['image']}, {st['threads']} threads, interleaved with fp32 "
        f"({st['latency_runs']} runs); {r['machine']}",
        f"- units = {st['units']}, allocation {st['allocation']} (standardized per group), round_to {st['round_to']}, "
        f"residual groups {'pruned' if st['conv_residual'] else 'kept'}",
        "",
        "| ratio | variant | params | top-1 agreement | top-1 | p50 ms | latency ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["runs"]:
        lines.append(
            f"| {row['ratio']:.0%} | {row['variant']} | {row['params']:,} | {row['top1_agreement']:.3f} | {row['top1']:.3f} | "
            f"{row['p50_ms']:.2f} | {row['latency_ratio']:.3f} |"
        )
    lines += ["", f"### with int8 (static QDQ, per-channel, calibration {r['split']['calibration']})", "",
              "| model | MB | top-1 agreement | top-1 | p50 ms | vs fp32 |", "|---|---|---|---|---|---|"]  # fmt: skip
    for row in r["int8"]:
        lines.append(
            f"| {row['model']} | {row['file_bytes'] / 1e6:.2f} | {row['top1_agreement']:.3f} | {row['top1']:.3f} | "
            f"{row['p50_ms']:.2f} | {row['latency_ratio_vs_fp32']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratios", default="0.05,0.1,0.2,0.3")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--int8-variant", default="flap+bias")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--cache", default=None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    args.ratios = [float(x) for x in args.ratios.split(",")]
    args.variants = [v for v in args.variants.split(",") if v]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = run(args)
    result["command"] = "python benchmarks/run_pruning_cnn.py " + " ".join(sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pruning_cnn.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "pruning_cnn.md").write_text(markdown(result))
    if args.out.resolve() == DEFAULT_OUT.resolve():
        update_section(BENCHMARKS_MD, "pruning_cnn", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
