"""One compile, end to end: load, analyze, calibrate, run passes, verify, validate, write.

The data flow is DESIGN.md's. Everything that can refuse the input (model, target, recipe,
calibration data, output folder) is checked before any heavy work, and the output folder is
written atomically at the very end, so a failure never leaves a partial result and never
touches the input model.

Verification always holds a floor: ``--max-drop`` when given, else the default floor of each
output's kind (``fidelity.default_floor``), so no budget still means no silent wreck. Under it,
the last pass that can relax backs off (``EdgePass.relaxed``) until the floor holds; if none can,
the compile exits 1 with one sentence and writes nothing.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import pathlib
import time
from typing import Any

import onnx
import onnx_ir as ir

import edgeprune
from edgeprune import kv_cache, model_io
from edgeprune.analysis import analyze
from edgeprune.calibration import load_calibration
from edgeprune.context import CompileContext
from edgeprune.errors import BadInputError, BudgetError, CalibrationDataError
from edgeprune.fidelity import below_default_floor, floors
from edgeprune.passes.base import EdgePass, EdgePassResult
from edgeprune.progress import Progress
from edgeprune.recipe import Recipe, build_passes, default_recipe, load_recipe
from edgeprune.runtime.targets import get_target
from edgeprune.validation import DECODE_TOKENS, LATENCY_SEQ_LEN, find_tokenizer, latency_feed, measure_generation_pair, measure_pair
from edgeprune.verify import Verification, checker_error, run_batches, verify

logger = logging.getLogger(__name__)

REPORT_SCHEMA = "edgeprune.report/1"


@dataclasses.dataclass
class CompileOptions:
    target: str = "cpu"
    recipe: Recipe | str | pathlib.Path | None = None
    calib: str | pathlib.Path | None = None
    tokenizer: str | pathlib.Path | None = None
    max_drop: float | None = None
    force: bool = False
    threads: int | None = None
    seed: int = 0
    max_samples: int = 64
    seq_len: int = LATENCY_SEQ_LEN
    holdout: float = 0.25
    batch_size: int = 8
    latency_runs: int = 30
    profile: bool = True


@dataclasses.dataclass
class CompileResult:
    out_dir: pathlib.Path
    report: dict[str, Any]


def _resolve_recipe(recipe: Recipe | str | pathlib.Path | None, target: str = "cpu") -> Recipe:
    if recipe is None:
        return default_recipe(target)
    if isinstance(recipe, Recipe):
        return recipe
    return load_recipe(recipe)


#: Calibration rows a compile needs: statistics come from some, fidelity is checked on others.
MIN_CALIBRATION_ROWS = 2
TOO_FEW_ROWS = (
    "compile needs at least 2 calibration rows, some to collect statistics on and at least one held back "
    "to verify the result, but got {n}: pass --calib with 2 or more rows and --max-samples 2 or more."
)


def _model_facts(model: ir.Model, path: pathlib.Path | None = None) -> dict[str, Any]:
    facts = {
        "opset": model.opset_imports.get("", None),
        "ir_version": model.ir_version,
        "params": model_io.param_count(model),
        "weight_bytes": model_io.model_bytes(model),
        "nodes": len(list(model.graph)),
        "inputs": [{"name": v.name, "dtype": str(v.dtype), "shape": [str(d) for d in (v.shape or [])]} for v in model.graph.inputs],
        "outputs": [{"name": v.name, "dtype": str(v.dtype), "shape": [str(d) for d in (v.shape or [])]} for v in model.graph.outputs],
    }
    if path is not None:
        facts.update(path=str(path), file_bytes=model_io.file_size(path), sha256=model_io.sha256(path))
    return facts


def _run_passes(model: ir.Model, passes: list[EdgePass], ctx: CompileContext, start: int = 0,
                snapshots: dict[int, onnx.ModelProto] | None = None) -> tuple[list[dict[str, Any]], list[EdgePassResult]]:
    """Run ``passes[start:]`` in order on ``model``: (a report record per pass, each pass's result for back-off).

    ``snapshots`` receives the model as it enters each later pass that can back off, so a back-off that relaxes pass i
    restarts from there instead of re-running the unchanged passes before it (cleanup alone takes
    90 s on SmolLM2)."""
    records, results = [], []
    for stage in range(start, len(passes)):
        p = passes[stage]
        if snapshots is not None and stage > start and type(p).relaxed is not EdgePass.relaxed:
            snapshots[stage] = model_io.to_proto(model)  # only a pass that can back off restarts a run
        ctx.stage = stage
        began = time.perf_counter()
        with ctx.progress.stage(f"pass {p.name}"):
            result = p(model)
        if not isinstance(result, EdgePassResult):
            result = EdgePassResult(result.model, result.modified)
        results.append(result)
        records.append(
            {
                "name": p.name,
                "config": p.config_dict(),
                "modified": result.modified,
                "seconds": round(time.perf_counter() - began, 3),
                "summary": result.summary,
                "records": result.records,
            }
        )
    return records, results


def _relax(passes: list[EdgePass], results: list[EdgePassResult]) -> tuple[list[EdgePass], int, str] | None:
    """Back off the last pass that can be made less aggressive, given its last result: (passes, its index, what changed)."""
    for i in reversed(range(len(passes))):
        relaxed = passes[i].relaxed(results[i])
        if relaxed is not None:
            old, new = passes[i].config_dict(), relaxed.config_dict()
            changes = ", ".join(f"{k} {old[k]} -> {new[k]}" for k in new if old.get(k) != new[k])
            return passes[:i] + [relaxed] + passes[i + 1 :], i, f"{passes[i].name}: {changes}"
    return None


#: What to ask for less of when a pass's result misses the floor, by pass name.
_ASK_LESS = {"prune": "prune less", "bits": "allow more bits", "sparse_attention": "keep more attention blocks"}


def _floor_failure(verification: Verification, missed: list, attempts: int, max_drop: float | None, passes: list[EdgePass]) -> BudgetError:
    """The one sentence for a compile whose fidelity stays under the floor after every back-off."""
    report = {"verification": verification.to_dict()}
    if max_drop is not None:
        return BudgetError(
            f"accuracy budget not met: fidelity drop {verification.drop:.4f} > --max-drop {max_drop} "
            f"after {attempts} attempt(s), and no pass can back off further; nothing was written.",
            report=report,
        )
    floor, fid = missed[0]
    more = f" (and {len(missed) - 1} more output(s))" if len(missed) > 1 else ""
    asks = list(dict.fromkeys(_ASK_LESS.get(p.name, "ask the passes for less") for p in passes if p.name != "cleanup")) or ["ask the passes for less"]
    return BudgetError(
        f"fidelity below the default floor: output {fid.name!r} {floor.describe(fid).split(' ', 1)[1]}{more} after {attempts} attempt(s), "
        f"and no pass can back off further; nothing was written ({' or '.join(asks)}, or pass --max-drop to accept a larger drop).",
        report=report,
    )


def compile_model(
    model_path: str | pathlib.Path,
    out_dir: str | pathlib.Path,
    options: CompileOptions | None = None,
    *,
    progress: Progress | None = None,
) -> CompileResult:
    """Compile ``model_path`` into ``out_dir`` (model.onnx + report.json/.md/.html); see DESIGN.md."""
    from edgeprune.report import write_reports

    opts = options or CompileOptions()
    progress = progress or Progress()
    model_path, out_dir = pathlib.Path(model_path), pathlib.Path(out_dir)
    started = time.perf_counter()

    # Everything that can refuse the input, cheapest first.
    target = get_target(opts.target)
    recipe = _resolve_recipe(opts.recipe, target.name)
    passes = build_passes(recipe)  # every option checked; the context is attached once it exists
    if opts.max_drop is not None and not 0 <= opts.max_drop:
        raise BadInputError(f"--max-drop must be >= 0, got {opts.max_drop}.")
    if opts.max_samples < MIN_CALIBRATION_ROWS:
        raise CalibrationDataError(TOO_FEW_ROWS.format(n=opts.max_samples))
    model_io.check_output_dir(out_dir, force=opts.force, inputs=(model_path,))  # early; the writer checks again
    with progress.stage(f"load {model_path.name}"):
        reference = model_io.load_model(model_path)
    calib = load_calibration(
        opts.calib,
        reference,
        tokenizer=find_tokenizer(model_path, opts.tokenizer),
        max_samples=opts.max_samples,
        seq_len=opts.seq_len,
        seed=opts.seed,
    )
    if len(calib) < MIN_CALIBRATION_ROWS:
        raise CalibrationDataError(TOO_FEW_ROWS.format(n=len(calib)))
    stats_rows, holdout = calib.split(opts.holdout, seed=opts.seed)
    holdout_batches = list(holdout.batches(opts.batch_size))

    with progress.stage("analyze structures"):
        structures = analyze(reference)
    reference_cache = kv_cache.model_cache(reference)  # the interface every candidate must keep
    input_checker_error = checker_error(reference)  # an input the checker already refuses is held to ORT instead
    with progress.stage(f"reference outputs on {len(holdout)} held-back samples"):
        reference_outputs = run_batches(model_io.to_proto(reference), holdout_batches, threads=opts.threads)

    ctx = CompileContext(
        target=target,
        calibration=stats_rows,
        holdout=holdout,
        threads=opts.threads,
        progress=progress,
        holdout_batches=holdout_batches,
        reference_outputs=reference_outputs,
    )
    for p in passes:
        p.context = ctx

    backoff: list[dict[str, Any]] = []
    snapshots: dict[int, onnx.ModelProto] = {}  # the model entering pass i, for back-offs that relax pass i
    start, pass_records, pass_results = 0, [], []
    while True:
        with progress.stage("copy the model for the passes"):
            candidate = model_io.load_model(model_path) if start == 0 else ir.from_proto(snapshots[start])
        records, results = _run_passes(candidate, passes, ctx, start, snapshots)
        pass_records, pass_results = pass_records[:start] + records, pass_results[:start] + results
        kv_cache.check_kept(reference_cache, kv_cache.model_cache(candidate))
        with progress.stage("verify: checker, ORT load, fidelity on held-back rows"):
            verification: Verification = verify(candidate, holdout_batches, reference_outputs, threads=opts.threads,
                                                input_checker_error=input_checker_error)
        # Without --max-drop the default floor of each output's kind holds instead (fidelity.default_floor).
        floor = floors(verification.fidelity, opts.max_drop)
        missed = [(fl, f) for fl, f in zip(floor, verification.fidelity) if not fl.holds(f)]
        if not missed:
            break
        backoff.append({"drop": verification.drop, "passes": [r["config"] for r in pass_records]})
        relaxed = _relax(passes, pass_results)
        if relaxed is None:
            error = _floor_failure(verification, missed, len(backoff), opts.max_drop, passes)
            error.report["backoff"] = backoff
            raise error
        passes, relaxed_stage, what = relaxed
        ctx.invalidate_stats(after_stage=relaxed_stage)  # passes before it see the same model again
        start = relaxed_stage if relaxed_stage in snapshots else 0  # the passes before it are unchanged
        snapshots = {i: m for i, m in snapshots.items() if i <= start}
        backoff[-1]["relaxed"] = what
        logger.warning("fidelity under the %s (%s); backing off %s", "--max-drop budget" if opts.max_drop is not None else "default floor",
                       "; ".join(fl.describe(f) for fl, f in missed), what)

    feed = latency_feed(holdout.samples[0], reference, opts.seq_len)
    with progress.stage(f"latency on {target.name}, side by side with the input"):
        latency = measure_pair(reference, candidate, feed, target, threads=opts.threads, runs=opts.latency_runs)
    generation = None
    if reference_cache and latency.get("measured"):
        with progress.stage(f"greedy generation ({DECODE_TOKENS} new tokens) on {target.name}, side by side with the input"):
            generation = measure_generation_pair(reference, candidate, feed, target, threads=opts.threads)
    profiles = None
    if opts.profile and latency.get("measured"):
        from edgeprune.runtime.profiler import compare_profiles, profile_model

        with progress.stage("per-op profile of both models"):
            ref_prof = profile_model(reference, feed, target, threads=opts.threads, runs=10)
            cand_prof = profile_model(candidate, feed, target, threads=opts.threads, runs=10)
        profiles = {"reference": ref_prof.to_dict(), "candidate": cand_prof.to_dict(), "moved": compare_profiles(ref_prof, cand_prof)}

    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "edgeprune_version": edgeprune.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "input": _model_facts(reference, model_path),
        "target": target.to_dict(),
        "recipe": recipe.to_dict(),
        "calibration": {
            "source": calib.source,
            "synthetic": calib.synthetic,
            "samples": len(calib),
            "statistics_rows": len(stats_rows),
            "holdout_rows": len(holdout),
        },
        "structures": structures.to_dict(),
        "structures_summary": structures.summary(),
        "passes": pass_records,
        "verification": {
            **verification.to_dict(),
            "max_drop": opts.max_drop,
            "budget_ok": True,
            "floor": {"source": "default" if opts.max_drop is None else "--max-drop", "max_drop": opts.max_drop,
                      "outputs": [fl.to_dict(f) for fl, f in zip(floor, verification.fidelity)]},
            "below_default_floor": [{k: v for k, v in fl.to_dict(f).items() if k != "ok"} for fl, f in below_default_floor(verification.fidelity)],
        },
        "backoff": backoff,
        "latency": latency,
        "generation": generation,
        "profile": profiles,
    }
    with model_io.atomic_output_dir(out_dir, force=opts.force, inputs=(model_path,)) as stage:
        with progress.stage("write model and reports"):
            written = model_io.save_model(candidate, stage / "model.onnx")
            report["output"] = _model_facts(candidate, stage / "model.onnx")
            report["output"]["path"] = str(out_dir / "model.onnx")
            report["output"]["files"] = [p.name for p in written]
            report["size"] = {
                "reference_bytes": report["input"]["file_bytes"],
                "candidate_bytes": report["output"]["file_bytes"],
                "ratio": report["output"]["file_bytes"] / report["input"]["file_bytes"],
            }
            report["seconds"] = round(time.perf_counter() - started, 2)
            write_reports(report, stage)
    return CompileResult(out_dir=out_dir, report=report)
