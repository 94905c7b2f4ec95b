"""``edgeprune package``: turn a model (or a compile folder) into a bundle an app runs as it is.

Steps, each through ORT's own tools where one exists: fix shapes the EP needs static
(``onnx_model_utils``), convert to ORT format and write the reduced-build config
(``convert_onnx_models_to_ort``), load each .ort back and compare it with the .onnx on held-back
rows (a mismatch refuses the bundle), run the mobile-usability check, time .onnx against .ort
side by side, then write manifest.json (hashes, I/O, operators, libraries, figures), verify.npz
(the rows and the expected outputs ``--verify`` re-runs) and README.md (usage snippets).
Nothing is written unless every step passed; the input is only read.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import gc
import json
import logging
import pathlib
import statistics
import tempfile
import time
from importlib import metadata

import numpy as np
import onnx
import onnx_ir as ir

from edgeprune import model_io
from edgeprune.errors import BadInputError, UnsupportedModelError, VerificationError
from edgeprune.fidelity import compare_outputs
from edgeprune.runtime.package import manifest as manifest_mod
from edgeprune.runtime.package import ort_format, shapes, snippets
from edgeprune.runtime.package.platforms import DEFAULT_PLATFORM, Platform, get_platform

logger = logging.getLogger(__name__)

VERIFY_FILE = "verify.npz"
#: A .ort must reproduce its .onnx to this cosine on every verification row (fixed-style
#: optimizations reorder float sums; anything further off is a conversion fault).
MIN_COSINE = 0.9999
VERIFY_ROWS = 4
_EP_NAMES = {"nnapi": "NNAPI", "coreml": "CoreML", "qnn": "QNN", "xnnpack": "XNNPACK"}


@dataclasses.dataclass
class PackageOptions:
    platform: str = DEFAULT_PLATFORM
    fix_shapes: str | None = None
    with_preprocessing: bool = False
    optimization: str | None = None  # None: the platform's style
    calib: pathlib.Path | None = None
    tokenizer: pathlib.Path | None = None
    labels: pathlib.Path | None = None  # image classifiers: one class name per line (default: labels.txt beside the model)
    custom_op_library: pathlib.Path | None = None
    force: bool = False
    threads: int | None = None
    runs: int = 20
    seed: int = 0


@dataclasses.dataclass
class PackageResult:
    out_dir: pathlib.Path
    manifest: dict


def _resolve_source(source: pathlib.Path) -> tuple[pathlib.Path, dict | None]:
    """(model path, compile report or None) from a .onnx file or an edgeprune compile folder."""
    source = pathlib.Path(source)
    if source.is_dir():
        model = source / "model.onnx"
        if not model.is_file():
            raise BadInputError(f"{source} is a folder without model.onnx: pass an edgeprune compile output folder or an .onnx file.")
        report_path = source / "report.json"
        report = None
        if report_path.is_file():
            try:
                report = json.loads(report_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                logger.warning("%s is not valid JSON: the manifest will not say what the compile did", report_path)
        return model, report
    return source, None


def _compile_summary(report: dict | None) -> dict | None:
    if not report:
        return None
    verification = report.get("verification") or {}
    return {
        "passes": [{"name": p.get("name"), "modified": p.get("modified"), "config": p.get("config")} for p in report.get("passes", [])],
        "recipe": report.get("recipe"),
        "budgets": {k: v for k, v in (report.get("backoff") or [{}])[-1].items()} if report.get("backoff") else None,
        "fidelity_vs_input": {"drop": verification.get("drop"), "samples": verification.get("samples"),
                              "outputs": [{k: o.get(k) for k in ("name", "cosine_mean", "cosine_min", "top1_agreement")} for o in verification.get("outputs", [])]},
        "size": report.get("size"),
    }


def _libraries(proto: onnx.ModelProto, given: pathlib.Path | None) -> list[dict]:
    """Custom-op libraries the model needs, by domain; a domain no known library covers needs --custom-op-library."""
    needed = ort_format.custom_domains(proto)
    libs: dict[str, dict] = {}
    for domain, ops in needed.items():
        if domain == "ai.onnx.contrib":
            import onnxruntime_extensions

            lib = libs.setdefault("onnxruntime-extensions", {"name": "onnxruntime-extensions", "version": onnxruntime_extensions.__version__,
                                                               "path": onnxruntime_extensions.get_library_path(), "domains": []})
        elif given is not None:
            if not pathlib.Path(given).is_file():
                raise BadInputError(f"--custom-op-library {given} does not exist: give the path to the shared library that implements {domain}.")
            lib = libs.setdefault(str(given), {"name": pathlib.Path(given).name, "version": None, "path": str(given), "domains": []})
        else:
            raise UnsupportedModelError(
                f"the model uses {', '.join(f'{domain}::{op}' for op in ops)}, a custom op no library edgeprune knows implements, "
                "so neither ORT format nor the app can run it: pass --custom-op-library PATH to the library that does, or replace the op."
            )
        lib["domains"].append(domain)
    return list(libs.values())


def _verification_rows(model_path: pathlib.Path, opts: PackageOptions) -> tuple[list[dict[str, np.ndarray]], str]:
    """Up to VERIFY_ROWS held-back rows (one feed each) for the model as packaged (shapes fixed)."""
    from edgeprune.calibration import load_calibration
    from edgeprune.validation import find_tokenizer

    ir_model = model_io.load_model(model_path)
    seq_len = _static_len(ir_model) or 128
    calib = load_calibration(opts.calib, ir_model, tokenizer=find_tokenizer(model_path, opts.tokenizer),
                             max_samples=4 * VERIFY_ROWS, seq_len=seq_len, seed=opts.seed)
    _, holdout = calib.split(0.25, seed=opts.seed)
    rows = _fit_rows(holdout.samples or calib.samples, ir_model)[:VERIFY_ROWS]
    return rows, calib.source + (" (synthetic)" if calib.synthetic else "")


def _fit_rows(rows: list[dict[str, np.ndarray]], model) -> list[dict[str, np.ndarray]]:
    """Rows shaped for fixed [batch, sequence] token inputs: batches split to the fixed batch, sequences padded (0) or cut.

    The calibration loader batches sentences to their longest; a model whose shapes were fixed
    for an EP takes exactly its sizes.  Other inputs pass as they are.
    """
    fixed = {v.name: list(v.shape) for v in model.graph.inputs if v.shape is not None and len(v.shape) == 2
             and v.dtype in (ir.DataType.INT64, ir.DataType.INT32) and all(isinstance(d, int) for d in v.shape)}
    if not fixed:
        return rows
    batch = next(iter(fixed.values()))[0]
    out = []
    for row in rows:
        size = len(next(row[n] for n in fixed if n in row))
        for start in range(0, size - batch + 1, batch):  # whole batches only
            piece = dict(row)
            for name, (_, length) in fixed.items():
                if name in row:
                    part = row[name][start:start + batch, :length]
                    piece[name] = np.pad(part, ((0, 0), (0, length - part.shape[1])))
            out.append(piece)
    if not out:
        raise BadInputError(
            f"the model's token inputs are fixed at batch {batch}, and no calibration batch has that many rows: "
            "pass --calib with more sentences, or fix the batch to 1."
        )
    return out


def _static_len(model) -> int | None:
    for value in model.graph.inputs:
        shape = value.shape
        if shape is not None and len(shape) == 2 and isinstance(shape[1], int):
            return shape[1]
    return None


def _run(session, rows: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    from edgeprune.runtime.session import run

    return [run(session, feed) for feed in rows]


def _compare(expected, got, rows, label: str) -> list[dict]:
    """Fidelity of the float outputs (cosine >= MIN_COSINE); integer and string outputs (class indices, labels) must be equal."""
    exact = [name for name, value in expected[0].items() if not np.issubdtype(np.asarray(value).dtype, np.floating)]
    for name in exact:
        for want, have in zip(expected, got):
            if np.asarray(want[name]).astype(str).tolist() != np.asarray(have[name]).astype(str).tolist():
                raise VerificationError(
                    f"{label} does not reproduce the .onnx (output {name}: {np.asarray(have[name]).tolist()} instead of "
                    f"{np.asarray(want[name]).tolist()}): the bundle was refused; try --optimization runtime, and report this with --debug output."
                )
    floats = [{k: v for k, v in row.items() if k not in exact} for row in expected]
    if not floats[0]:
        return []
    fidelity = compare_outputs(floats, [{k: v for k, v in row.items() if k not in exact} for row in got], rows)
    worst = min(fidelity, key=lambda f: f.cosine_min)
    if worst.cosine_min < MIN_COSINE:
        raise VerificationError(
            f"{label} does not reproduce the .onnx (output {worst.name}: cosine {worst.cosine_min:.6f} < {MIN_COSINE}): "
            "the bundle was refused; try --optimization runtime, and report this with --debug output."
        )
    return [f.to_dict() for f in fidelity]


def _load_seconds(path: pathlib.Path, libraries: tuple, tries: int = 3) -> float:
    """Median session-creation time of ``path`` (what an app pays at start-up)."""
    times = []
    for _ in range(tries):
        start = time.perf_counter()
        session = ort_format.open_session(path, libraries=libraries, threads=1)
        times.append(time.perf_counter() - start)
        del session
        gc.collect()
    return statistics.median(times)


def _edgeprune_version() -> str:
    try:
        return metadata.version("edgeprune")
    except metadata.PackageNotFoundError:
        return "unknown"


def package_model(source: str | pathlib.Path, out: str | pathlib.Path, opts: PackageOptions | None = None, *, progress=None) -> PackageResult:
    """Package ``source`` (a .onnx or a compile folder) for ``opts.platform`` into the bundle folder ``out``."""
    from edgeprune.progress import Progress

    opts = opts or PackageOptions()
    progress = progress or Progress()
    platform = get_platform(opts.platform)
    style = opts.optimization or platform.optimization
    if style not in ("fixed", "runtime"):
        raise BadInputError(f"--optimization takes fixed or runtime, got {style!r}.")
    source = pathlib.Path(source)
    model_io.check_output_dir(out, force=opts.force, inputs=(source,))
    model_path, report = _resolve_source(source)
    model_io.load_model(model_path)  # one clear sentence for a file that is not ONNX
    size = model_io.file_size(model_path)
    ort_format.check_size(model_path, size)
    proto = onnx.load(str(model_path))
    libraries = _libraries(proto, opts.custom_op_library)
    fixes = shapes.parse_fix_shapes(opts.fix_shapes)
    fixed = shapes.fix_shapes(copy.deepcopy(proto), fixes)
    if platform.ep.static_shapes:
        shapes.require_static(fixed, _EP_NAMES.get(platform.target, platform.target))
    with tempfile.TemporaryDirectory(prefix="edgeprune_package_") as tmp, \
            model_io.atomic_output_dir(out, force=opts.force, inputs=(source,)) as stage:
        work = pathlib.Path(tmp)
        onnx_path = work / "model.onnx"
        model_io.save_model(model_io.ir.serde.deserialize_model(fixed), onnx_path)
        to_convert = [onnx_path]
        pre = None
        if opts.with_preprocessing:
            from edgeprune.runtime.package import preprocessing

            with progress.stage("build the pre/post-processing model (onnxruntime-extensions)"):
                pre = preprocessing.build(onnx_path, work, tokenizer=opts.tokenizer or _beside(model_path, "tokenizer.json"),
                                          calib=opts.calib, labels=opts.labels or _beside(model_path, "labels.txt"), reference=model_path)
            to_convert.append(pre.path)
        library_paths = tuple(pathlib.Path(lib["path"]) for lib in libraries)
        ext_lib = None
        if pre is not None or library_paths:
            ext_lib = pre.library if pre is not None else library_paths[0]
        with progress.stage(f"convert to ORT format ({style} optimization, {platform.ort_platform})"):
            ort_files, config = ort_format.convert(to_convert, stage, style=style, ort_platform=platform.ort_platform, library=ext_lib)
        main_ort = ort_files[0]
        replay = style == "runtime"
        with progress.stage("load the .ort back and compare it with the .onnx on held-back rows"):
            rows, rows_source = _verification_rows(onnx_path, opts)
            from edgeprune.runtime.session import make_session

            expected = _run(make_session(onnx_path, "cpu", threads=opts.threads), rows)
            got = _run(ort_format.open_session(main_ort, libraries=library_paths, threads=opts.threads, replay_runtime_optimizations=replay), rows)
            fidelity = _compare(expected, got, rows, main_ort.name)
        verify_arrays = {f"in{i}/{k}": v for i, row in enumerate(rows) for k, v in row.items()}
        verify_arrays.update({f"out{i}/{k}": v for i, row in enumerate(expected) for k, v in row.items()})
        models = [_model_entry(main_ort, library_paths, replay, libraries, rows_count=len(rows))]
        pre_check = None
        if pre is not None:
            with progress.stage("check the pre/post-processing model against the Python pipeline"):
                pre_check = pre.check(stage / pre.path.with_suffix(".ort").name, replay)
            verify_arrays.update(pre.verify_arrays(prefix="pre"))
            pre_libs = [{"name": "onnxruntime-extensions", "version": pre.library_version, "path": str(pre.library), "domains": list(pre.domains)}]
            models.append(_model_entry(stage / pre.path.with_suffix(".ort").name, (pre.library,), replay, pre_libs, rows_count=pre.rows))
        np.savez(stage / VERIFY_FILE, **verify_arrays)
        with progress.stage("mobile-usability check (NNAPI / CoreML partitions)"):
            usability = shapes.mobile_usability(onnx_path)
        with progress.stage(f"time .onnx against .ort side by side ({opts.runs} runs)"):
            measured = _measure(onnx_path, main_ort, rows[0], library_paths, opts)
            if pre is not None:
                measured["preprocessing_end_to_end"] = _time_pre(stage / pre.path.with_suffix(".ort").name, pre, replay, opts)
        manifest = _manifest(platform, style, source, model_path, report, stage, ort_files, config, libraries, pre_libs if pre else [],
                             models, fidelity, rows_source, usability, measured, pre_check, fixes, size)
        manifest_mod.write(stage, manifest)
        (stage / "README.md").write_text(snippets.readme(manifest), encoding="utf-8")
    return PackageResult(pathlib.Path(out), manifest)


def _beside(model_path: pathlib.Path, name: str) -> pathlib.Path | None:
    path = model_path.parent / name
    return path if path.is_file() else None


def _model_entry(ort_path: pathlib.Path, library_paths: tuple, replay: bool, libraries: list[dict], rows_count: int) -> dict:
    session = ort_format.open_session(ort_path, libraries=library_paths, replay_runtime_optimizations=replay)
    return {"file": ort_path.name, **manifest_mod.io_spec(session), "custom_op_libraries": [lib["name"] for lib in libraries],
            "verify_rows": rows_count}


def _measure(onnx_path: pathlib.Path, ort_path: pathlib.Path, feed: dict, library_paths: tuple, opts: PackageOptions) -> dict:
    from edgeprune.runtime.latency import measure_side_by_side

    figures: dict = {"machine": "this machine's CPU (CPUExecutionProvider)", "threads": opts.threads}
    if library_paths:
        figures["latency"] = "not measured: the model needs a custom-op library the latency harness cannot register yet"
    else:
        lat = measure_side_by_side({"onnx": onnx_path, "ort": ort_path}, feed, "cpu", runs=opts.runs, threads=opts.threads)
        figures["latency"] = {k: {"p50_ms": v.p50_ms, "p90_ms": v.p90_ms, "peak_memory_mb": v.peak_memory_mb, "runs": v.runs} for k, v in lat.items()}
        figures["latency"]["input_shapes"] = {k: list(np.shape(v)) for k, v in feed.items()}
    figures["session_create_s"] = {"onnx": _load_seconds(onnx_path, library_paths), "ort": _load_seconds(ort_path, library_paths)}
    figures["bytes"] = {"onnx": model_io.file_size(onnx_path), "ort": ort_path.stat().st_size}
    return figures


def _time_pre(ort_path: pathlib.Path, pre, replay: bool, opts: PackageOptions) -> dict:
    """String (or image bytes) in, embedding (or top-k) out: the with-preprocessing .ort timed on one input, preprocessing included."""
    session = ort_format.open_session(ort_path, libraries=(pre.library,), threads=opts.threads, replay_runtime_optimizations=replay)
    feed, what = pre.sample()
    for _ in range(3):
        session.run(None, feed)
    times = []
    for _ in range(opts.runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    p50, p90 = np.percentile(times, [50, 90])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "runs": opts.runs, "input": what}


def _manifest(platform: Platform, style, source, model_path, report, stage, ort_files, config, libraries, pre_libs, models,
              fidelity, rows_source, usability, measured, pre_check, fixes, size) -> dict:
    files = [manifest_mod.file_entry(p, "model (ORT format)") for p in ort_files]
    files.append(manifest_mod.file_entry(config, "reduced-build operators and types (ORT --include_ops_by_config)"))
    files.append(manifest_mod.file_entry(stage / VERIFY_FILE, "verification rows and expected outputs (--verify)"))
    all_libs = {lib["name"]: {k: lib[k] for k in ("name", "version", "domains")} for lib in libraries + pre_libs}
    return {
        "schema": manifest_mod.SCHEMA,
        "name": model_path.parent.name if model_path.name == "model.onnx" else model_path.stem,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "edgeprune_version": _edgeprune_version(),
        "source": {"path": str(source), "model": str(model_path), "bytes": size, "sha256": model_io.sha256(model_path)},
        "target": {"name": platform.name, "ep": platform.ep.provider, "ep_target": platform.target,
                   "static_shapes": platform.ep.static_shapes, "ort_platform": platform.ort_platform, "language": platform.language},
        "optimization": style,
        "fixed_shapes": fixes,
        "files": files,
        "models": models,
        "required_operators": config.name,
        "operators": ort_format.read_config(config),
        "custom_op_libraries": list(all_libs.values()),
        "onnxruntime": manifest_mod.ort_version_range(),
        "compile": _compile_summary(report),
        "verification": {"rows": rows_source, "min_cosine": MIN_COSINE, "ort_vs_onnx": fidelity, "preprocessing": pre_check},
        "mobile_usability": usability,
        "measured": measured,
    }


def verify_bundle(bundle: str | pathlib.Path, *, threads: int | None = None) -> dict:
    """Re-check every file's hash, then re-run each model on the stored rows against the stored outputs."""
    bundle = pathlib.Path(bundle)
    manifest = manifest_mod.read(bundle)
    checked = manifest_mod.verify_files(bundle, manifest)
    data = np.load(bundle / VERIFY_FILE, allow_pickle=False)
    replay = manifest["optimization"] == "runtime"
    results = {}
    for index, model in enumerate(manifest["models"]):
        prefix = "" if index == 0 else "pre"
        libs = ()
        if model["custom_op_libraries"]:
            import onnxruntime_extensions

            libs = (pathlib.Path(onnxruntime_extensions.get_library_path()),)
        session = ort_format.open_session(bundle / model["file"], libraries=libs, threads=threads, replay_runtime_optimizations=replay)
        rows, expected = _stored(data, prefix, model["verify_rows"])
        got = _run(session, rows)
        results[model["file"]] = _compare(expected, got, rows, f"{model['file']} in {bundle}")
    return {"bundle": str(bundle), "files_checked": checked, "models": results}


def _stored(data, prefix: str, count: int) -> tuple[list[dict], list[dict]]:
    rows = [{} for _ in range(count)]
    outs = [{} for _ in range(count)]
    for key in data.files:
        head, _, name = key.partition("/")
        kind = head[len(prefix):] if head.startswith(prefix) else None
        if kind is None or (prefix == "" and head.startswith("pre")):
            continue
        if kind.startswith("in") and kind[2:].isdigit():
            rows[int(kind[2:])][name] = data[key]
        elif kind.startswith("out") and kind[3:].isdigit():
            outs[int(kind[3:])][name] = data[key]
    return rows, outs
