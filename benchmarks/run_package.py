"""Measure edgeprune package on compiled models: .onnx vs .ort size, session creation, peak memory at load,
latency p50/p90, reduced-config operators vs the full CPU build, mobile-usability partitions, and the
with-preprocessing models' end-to-end latency (string in, embedding out; image bytes in, top-5 out).

    python benchmarks/run_package.py --minilm OUT_MINILM [--minilm-tokenizer DIR] [--effnet OUT_EFFNET] [--runs 30]

OUT_* are edgeprune compile output folders (e.g. ``edgeprune compile --example minilm -o OUT --bits 8``).
Writes benchmarks/results/package.json and the "package" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import tempfile

from bench_md import BENCHMARKS_MD, REPO, update_section


def _full_build_ops() -> int:
    """Distinct (domain, op) pairs with a CPU kernel in this onnxruntime build (a full build's operator count)."""
    from onnxruntime.capi import _pybind_state as C

    return len({(k.domain or "ai.onnx", k.op_name) for k in C.get_all_opkernel_def() if k.provider == "CPUExecutionProvider"})


def _one(name: str, folder: pathlib.Path, runs: int, calib, tokenizer, with_pre: bool) -> dict:
    from edgeprune.runtime.package import PackageOptions, ort_format, package_model

    with tempfile.TemporaryDirectory() as tmp:
        opts = PackageOptions(platform="linux-x64", calib=calib, tokenizer=tokenizer, with_preprocessing=with_pre, runs=runs)
        manifest = package_model(folder, pathlib.Path(tmp) / "bundle", opts).manifest
        model_ops = ort_format.ort_ops(pathlib.Path(tmp) / "bundle" / manifest["models"][0]["file"])
        shared = None
        if with_pre and manifest["verification"]["preprocessing"]["kind"] == "image":
            shared = _shared_top1(folder / "model.onnx", pathlib.Path(tmp) / "bundle" / manifest["models"][1]["file"])
    m = manifest["measured"]
    passes = [p["name"] for p in (manifest["compile"] or {}).get("passes", []) if p.get("modified")]
    return {
        "model": f"{name} (compiled: {' + '.join(passes) or 'no pass changed it'})", "source": str(folder), "compile_passes": [p["name"] for p in (manifest["compile"] or {}).get("passes", [])],
        "bytes": m["bytes"], "session_create_s": m["session_create_s"], "latency": m["latency"],
        "operators": sum(len(v) for v in manifest["operators"].values()),
        "model_operators": sum(len(v) for v in model_ops.values()),
        "operators_by_domain": {d: len(v) for d, v in manifest["operators"].items()},
        "ort_vs_onnx_cosine_min": min(f["cosine_min"] for f in manifest["verification"]["ort_vs_onnx"]),
        "usability": {ep: {k: manifest["mobile_usability"][ep][k] for k in ("supported_share", "partitions", "unsupported_ops", "suitability")}
                      | ({"if_shapes_fixed": {k: manifest["mobile_usability"][ep]["if_shapes_fixed"][k] for k in ("supported_share", "partitions", "suitability")}}
                         if "if_shapes_fixed" in manifest["mobile_usability"][ep] else {})
                      for ep in ("nnapi", "coreml_mlprogram")},
        "preprocessing": manifest["verification"]["preprocessing"],
        "preprocessing_end_to_end": m.get("preprocessing_end_to_end"),
        "preprocessing_shared_images": shared,
    }


def _shared_top1(model: pathlib.Path, ort_path: pathlib.Path) -> dict:
    """The bytes-in bundle on all shared ImageNet images: top-1 vs the Python pipeline on Pillow's and on the extensions' decoded pixels."""
    import numpy as np
    import onnxruntime_extensions
    from PIL import Image

    from edgeprune.models.tasks import image_logits, imagenet_pixels, load_imagenet
    from edgeprune.runtime.package import image_preprocessing
    from edgeprune.runtime.session import make_session

    files, labels = load_imagenet()
    lib = (onnxruntime_extensions.get_library_path(),)
    bundle = make_session(ort_path, "cpu", custom_op_libraries=lib)
    decoder = make_session(image_preprocessing.decode_model(), "cpu", custom_op_libraries=lib)
    got = np.array([bundle.run(None, {"image": np.fromfile(f, dtype=np.uint8)})[0][0, 0] for f in files])
    with tempfile.TemporaryDirectory() as tmp:
        decoded = []
        for i, f in enumerate(files):
            decoded.append(pathlib.Path(tmp) / f"{i}.png")
            Image.fromarray(decoder.run(None, {"image": np.fromfile(f, dtype=np.uint8)})[0]).save(decoded[-1])
        same = image_logits(str(model), imagenet_pixels(decoded), batch_size=1).argmax(axis=1)
    pillow = image_logits(str(model), imagenet_pixels(files), batch_size=1).argmax(axis=1)
    return {"images": len(files), "same_pixels": float(np.mean(got == same)), "pillow_decode": float(np.mean(got == pillow)),
            "decoder_changes_top1": [f.name for f, a, b in zip(files, pillow, got) if a != b],
            "top1_vs_labels": {"bundle": float(np.mean(got == labels)), "python": float(np.mean(pillow == labels))}}


def render(results: dict) -> str:
    lines = ["## Packaging (edgeprune package, linux-x64 bundle measured on this CPU)", "",
             f"`python benchmarks/run_package.py {results['command']}` on {results['machine']}, onnxruntime {results['onnxruntime']}. "
             f"Full CPU build: {results['full_build_ops']} operators (distinct domain/op pairs with a CPU kernel).", "",
             "| model | .onnx MB | .ort MB | session create .onnx → .ort ms | peak MB at load .onnx → .ort | p50 .onnx → .ort ms | p90 .onnx → .ort ms | ops in the model's .ort / in the bundle's reduced config (with preprocessing) | .ort vs .onnx cosine min |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["models"]:
        lat = r["latency"]
        lines.append(
            f"| {r['model']} | {r['bytes']['onnx'] / 1e6:.2f} | {r['bytes']['ort'] / 1e6:.2f} | "
            f"{r['session_create_s']['onnx'] * 1e3:.1f} → {r['session_create_s']['ort'] * 1e3:.1f} | "
            f"{lat['onnx']['peak_memory_mb']:.1f} → {lat['ort']['peak_memory_mb']:.1f} | "
            f"{lat['onnx']['p50_ms']:.2f} → {lat['ort']['p50_ms']:.2f} | {lat['onnx']['p90_ms']:.2f} → {lat['ort']['p90_ms']:.2f} | "
            f"{r['model_operators']} / {r['operators']} of {results['full_build_ops']} | {r['ort_vs_onnx_cosine_min']:.6f} |")
    lines += ["", "Mobile usability (ORT's op-type check; share of nodes the EP would take / partitions; with the model's dynamic shapes, then if they were fixed):", "",
              "| model | NNAPI | NNAPI, shapes fixed | CoreML MLProgram | CoreML, shapes fixed | ops forcing CPU fallback (NNAPI) |", "|---|---|---|---|---|---|"]
    for r in results["models"]:
        u = r["usability"]

        def cell(d):
            return f"{d['supported_share']:.0%} / {d['partitions']} ({d['suitability']})" if d else "n/a"

        lines.append(f"| {r['model']} | {cell(u['nnapi'])} | {cell(u['nnapi'].get('if_shapes_fixed'))} | {cell(u['coreml_mlprogram'])} | "
                     f"{cell(u['coreml_mlprogram'].get('if_shapes_fixed'))} | {', '.join(o.split(':')[-1] for o in u['nnapi']['unsupported_ops'])} |")
    for r in results["models"]:
        if r["preprocessing_end_to_end"]:
            e, p = r["preprocessing_end_to_end"], r["preprocessing"]
            if p["kind"] == "text":
                lines += ["", f"{r['model']} with preprocessing (string in, embedding out, tokenizer as onnxruntime-extensions ops): "
                          f"p50 {e['p50_ms']:.2f} ms, p90 {e['p90_ms']:.2f} ms on one STS-B sentence; embedding cosine vs the Python "
                          f"pipeline min {p['cosine_min']:.6f} over {p['sentences']} sentences."]
            else:
                lines += ["", f"{r['model']} with preprocessing (JPEG bytes in, top-5 out: DecodeImage from onnxruntime-extensions, "
                          f"Pillow-exact resize/crop/normalize in ONNX ops): p50 {e['p50_ms']:.2f} ms, p90 {e['p90_ms']:.2f} ms on {e['input']}; "
                          f"top-1 equal to the Python pipeline's (imagenet_pixels + the model) on the same decoded pixels on all {len(p['images'])} "
                          f"check images, and to Pillow-decoded ones on {p['top1_agreement_pillow_decode']:.0%} "
                          f"({', '.join(p['decoder_changes_top1']) or 'no image'} changed by the JPEG decoder)."]
                sh = r.get("preprocessing_shared_images")
                if sh:
                    lines += ["", f"On all {sh['images']} shared ImageNet images: the bundle's top-1 equals the Python pipeline's on the same decoded "
                              f"pixels on {sh['same_pixels']:.0%}, on Pillow-decoded pixels on {sh['pillow_decode']:.0%} "
                              f"(changed by the decoder: {', '.join(sh['decoder_changes_top1']) or 'none'}); top-1 accuracy against labels.tsv "
                              f"{sh['top1_vs_labels']['bundle']:.2f} (bundle) vs {sh['top1_vs_labels']['python']:.2f} (Python pipeline)."]
    lines += ["", "Peak memory is the growth of the process's peak RSS while each session is created and warmed up, "
              "one after the other in one process (runtime/latency.py)."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minilm", type=pathlib.Path, required=True)
    ap.add_argument("--minilm-tokenizer", type=pathlib.Path, help="default: the cached example's folder")
    ap.add_argument("--effnet", type=pathlib.Path)
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    import onnxruntime

    from edgeprune.models.recipes import cache_dir

    tokenizer = args.minilm_tokenizer or cache_dir() / "minilm"
    sentences = REPO / "edgeprune" / "data" / "calibration_sentences.txt"
    results = {"command": " ".join(sys.argv[1:]), "machine": f"{platform.machine()} CPU", "onnxruntime": onnxruntime.__version__,
               "full_build_ops": _full_build_ops(), "models": []}
    results["models"].append(_one("all-MiniLM-L6-v2", args.minilm, args.runs, sentences, tokenizer, True))
    if args.effnet:
        images = REPO.parent / "shared" / "data" / "imagenet-100"
        results["models"].append(_one("EfficientNet-Lite0", args.effnet, args.runs, images if images.is_dir() else None, None, images.is_dir()))
    out = REPO / "benchmarks" / "results" / "package.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    update_section(BENCHMARKS_MD, "package", render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
