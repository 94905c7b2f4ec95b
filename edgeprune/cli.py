"""The edgeprune command line: compile, validate, profile, inspect.

Exit codes (DESIGN.md): 0 ok; 1 ran but a budget failed; 2 bad input or usage; 3 internal
error. User errors print one sentence, never a traceback (``--debug`` shows it).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import sys
from typing import Any

import click
from rich.markup import escape
from rich.console import Console
from rich.table import Table
from rich.text import Text

from edgeprune.errors import BudgetError, EdgepruneError
from edgeprune.passes.prune.scoring import METRICS as PRUNE_METRICS  # names only: the pass loads on first use
from edgeprune.passes.moe.scores import METRICS as MOE_METRICS  # names only

out_console = Console()
err_console = Console(stderr=True, soft_wrap=True)

EXAMPLES = ("minilm", "smollm2")


def _progress(quiet: bool):
    from edgeprune.progress import Progress, RichProgress

    return Progress() if quiet else RichProgress(err_console)


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _table(title: str, columns: list[str], rows: list[tuple]) -> Table:
    table = Table(title=title, title_justify="left")
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:  # cells are text, not rich markup: a shape like [batch_size, 128] would vanish as a tag
        table.add_row(*[c if isinstance(c, Text) else Text(str(c)) for c in row])
    return table


def _own_records(record: logging.LogRecord) -> bool:
    """Keep edgeprune's own log records, and anyone's errors."""
    return record.name == "edgeprune" or record.name.startswith("edgeprune.") or record.levelno >= logging.ERROR


def _summary_table(title: str, rows: list) -> Table:
    """The compile summary: figures under the default fidelity floor in red, with the reason beside them."""
    from rich.text import Text

    table = Table(title=title, title_justify="left")
    for i, col in enumerate(["", "input", "output", "ratio"]):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        alert, at = getattr(row, "alert", ""), getattr(row, "alert_cell", 2)
        table.add_row(*[Text(f"{c} ({alert})", style="bold red") if alert and i == at else Text(str(c)) for i, c in enumerate(row)])
    return table


common_target = click.option("--target", default="cpu", show_default=True, help="Target profile: cpu, cuda, openvino, qnn, coreml, nnapi, xnnpack.")
common_threads = click.option("--threads", type=int, default=None, help="ORT intra-op threads (default: ORT's choice).")
common_json = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgeprune")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Make exported ONNX models smaller and faster for edge targets, and check the result."""
    ctx.obj = {"debug": debug}
    root = logging.getLogger()
    ours = not root.handlers  # an embedding application (or pytest) keeps its own logging set-up
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if ours and not debug:
        # Libraries we call log advice meant for their own users (ORT's quantizer: "consider pre-processing",
        # on the root logger; onnxscript and onnx-ir through logging and warnings): --debug shows it.
        for handler in root.handlers:
            handler.addFilter(_own_records)
        logging.captureWarnings(True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@cli.command("compile")
@click.argument("model", required=False, type=click.Path(path_type=pathlib.Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=pathlib.Path), help="Output folder (must be empty unless --force).")
@common_target
@click.option("--recipe", type=click.Path(path_type=pathlib.Path), help="Recipe file (TOML or YAML) naming the passes.")
@click.option("--calib", type=click.Path(path_type=pathlib.Path), help=".npz, folder of .npz, .txt/.jsonl text, or an image folder.")
@click.option("--tokenizer", type=click.Path(path_type=pathlib.Path), help="tokenizer.json or a folder holding one (default: beside the model).")
@click.option("--max-drop", type=float, help="Largest fidelity drop allowed: the worst of 1 - cosine, 1 - top-1 agreement and perplexity ratio - 1; replaces the default floor (cosine 0.99, top-1 agreement 0.95, perplexity ratio 1.05 by output kind).")
@click.option("--example", type=click.Choice(EXAMPLES), help="Compile a bundled example model built from an installed weights package.")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--max-samples", type=int, default=64, show_default=True, help="Calibration rows to use.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--prune", "prune_ratio", type=float, help="Structured pruning: share of the prunable parameters (FFN neurons, attention heads, conv channels) to remove, in [0, 1).")
@click.option("--prune-metric", type=click.Choice(list(PRUNE_METRICS)), default="flap", show_default=True, help="Importance metric for --prune.")
@click.option("--allocation", type=click.Choice(["global", "floor", "uniform"]), default="global", show_default=True, help="How --prune spreads the budget over layers.")
@click.option("--round-to", type=int, default=8, show_default=True, help="Keep pruned FFN widths multiples of N (1 disables).")
@click.option("--refit", is_flag=True, help="Least-squares refit of each pruned layer's consumer on calibration data.")
@click.option("--no-compensate", is_flag=True, help="Skip FLAP bias compensation of pruned channels.")
@click.option("--prune-units", default="ffn,heads,conv", show_default=True, help="Unit kinds to prune: ffn, heads, conv (conv channel groups).")
@click.option("--bits", "bits_mode", help="Bit allocation: 'auto' (needs --size-budget, --avg-bits, --latency-budget or --decode-budget) or 8 / 4 / 2 for uniform.")
@click.option("--size-budget", help="With --bits auto: weight size of the output, e.g. 137MB.")
@click.option("--avg-bits", type=float, help="With --bits auto: average bits per weight, e.g. 4.5.")
@click.option("--latency-budget", help="With --bits auto: prefill latency on the target, in ms (e.g. 150) or relative to the float model (e.g. 0.8x).")
@click.option("--decode-budget", help="With --bits auto, a model with a KV cache: one decode step (a new token after 128 cached ones) on the target, in ms (e.g. 8) or relative to the float model's (e.g. 0.3x); formats are microbenchmarked at one token too and the emitted step is measured.")
@click.option("--allow-slower", is_flag=True, help="With --bits auto and a size budget alone: take the least-error mix within it even where it runs slower than the float model (on the cpu target a size budget also bounds prefill latency to the float model's unless this is given).")
@click.option("--pack-siblings", is_flag=True, help="With --bits auto: MatMuls reading one input (attention's q/k/v, a gated FFN's gate/up) take one format, so each group is packed into one MatMulNBits (one activation pass and dispatch instead of several; the solver has less freedom). Siblings that choose one format on their own are packed either way.")
@click.option("--block-offsets", is_flag=True, help="With --bits: also offer 4/2-bit weights with a float16 offset per block (llama.cpp's Q4_1 form, 5 bits per weight at block 32; exact where the weights came from such a grid), added by one small MatMul + Add beside each MatMulNBits: more accurate than an integer zero point, slower at decode.")
@click.option("--bit-options", default="4,8", show_default=True, help="Bit widths to choose from besides float (2 and 16 also exist).")
@click.option("--block-size", default="32,64,128", show_default=True, help="Block size(s) of 4/2-bit blocked formats.")
@click.option("--gptq", is_flag=True, help="Also offer GPTQ rounding for 4/2-bit weights: better when --calib is the deployment data, worse off-domain.")
@click.option("--rounding", type=click.Choice(["mse", "wmse"]), help="Also offer 4/2-bit weights on a searched grid (same format and bytes): mse (data-free) or wmse (weighted by --calib's input energy; SmolLM2 all 4-bit: perplexity 21.9 vs ORT's rounding 25.8).")
@click.option("--smooth", type=float, help="With --bits: strength in (0, 1) of moving activation outliers into the weights first (SmoothQuant, exact in float; on the cpu target 0.7 unless given, 0 turns it off): dynamic int8 and accuracy-level-4 MatMulNBits quantize activations (SmolLM2 all dynamic int8: WikiText-2 perplexity 28.9 -> 19.9, fp32 18.5).")
@click.option("--sparse-attention", "sparse_keep", type=float, help="Dynamic block-sparse attention for causal self-attention: share of key blocks each query block keeps, in (0, 1].")
@click.option("--sparse-block", type=int, default=64, show_default=True, help="With --sparse-attention: block size in tokens.")
@click.option("--sparse-select", type=click.Choice(["group", "head"]), default="head", show_default=True, help="With --sparse-attention: choose blocks per query head (the default: +1.4 % perplexity calibrated at 25 % on SmolLM2) or once per KV group (about 15 % faster, +3.0 %).")
@click.option("--sparse-min-len", type=int, default=1024, show_default=True, help="With --sparse-attention: shorter sequences take the dense path inside the op.")
@click.option("--sparse-allocation", type=click.Choice(["uniform", "calibrated"]), default="uniform", show_default=True, help="With --sparse-attention: every layer keeps KEEP, or KEEP is the mean and each layer's share comes from calibration measurements (weak layers stay denser).")
@click.option("--fuse-attention", is_flag=True, help="Causal self-attention (optimum's form, with or without a KV cache) becomes ONNX Runtime's fused com.microsoft.GroupQueryAttention (before --bits); --sparse-attention then makes the blocks it can carry sparse.")
@click.option("--moe-keep", help="MoE expert pruning: share of all experts to keep, in (0, 1] (e.g. 0.5), or a whole number of experts per layer (e.g. 4); scored on --calib routing.")
@click.option("--moe-metric", type=click.Choice(list(MOE_METRICS)), default="tcess", show_default=True, help="With --moe-keep: expert score (tcess: PreMoe expected selection score; easy: gate weight x expert-output norm; frequency; loss: drop the experts whose removal costs the calibration loss least, searched round by round).")
@click.option("--moe-tasks", help="With --moe-keep: NAME=FILE,... calibration data per task (as --calib takes it); each task keeps its own experts, model.onnx keeps their union, and OUT/moe_bundle holds one expert store and a graph per task (edgeprune.runtime.moe.RetrievalSession).")
@click.option("--package", "package_target", is_flag=False, flag_value="linux-x64", default=None, help="Also package the output into OUT/bundle for a platform (see edgeprune package --target; bare --package: linux-x64).")
@click.option("--fix-shapes", help="With --package: fix dynamic dimensions, NAME=N,... (see edgeprune package).")
@common_threads
@common_json
def compile_cmd(model, out, target, recipe, calib, tokenizer, max_drop, example, force, max_samples, seed,
                prune_ratio, prune_metric, allocation, round_to, refit, no_compensate, prune_units,
                bits_mode, size_budget, avg_bits, latency_budget, decode_budget, allow_slower, pack_siblings, block_offsets, bit_options, block_size, gptq, rounding, smooth,
                sparse_keep, sparse_block, sparse_select, sparse_min_len, sparse_allocation, fuse_attention, moe_keep, moe_metric, moe_tasks, package_target, fix_shapes, threads, as_json):
    """Compile MODEL into OUT: model.onnx plus report.json, report.md and report.html."""
    from edgeprune.pipeline import CompileOptions, compile_model
    from edgeprune.recipe import recipe_from_flags

    prune = bits = None
    if prune_ratio is not None:
        prune = {"ratio": prune_ratio, "metric": prune_metric, "allocation": allocation, "round_to": round_to,
                 "refit": refit, "compensate": not no_compensate, "units": prune_units}  # fmt: skip
    if bits_mode is not None:
        bits = _bits_options(bits_mode, size_budget, avg_bits, latency_budget, bit_options, block_size, decode_budget)
        if allow_slower:
            if bits["mode"] != "auto" or latency_budget is not None or (size_budget is None and avg_bits is None):
                raise click.UsageError("--allow-slower lifts the speed bound a size budget implies: it goes with --bits auto "
                                       "and --size-budget or --avg-bits, without --latency-budget.")
            bits["no_slower"] = False
        if pack_siblings:
            if bits["mode"] != "auto":
                raise click.UsageError("--pack-siblings chooses one format per group of siblings: it goes with --bits auto.")
            bits["joint_siblings"] = True
        if block_offsets:
            bits["block_offsets"] = True
        if gptq:
            bits["gptq"] = True
        if rounding is not None:
            bits["mse_rounding"] = rounding
    elif any(v is not None for v in (size_budget, avg_bits, latency_budget, decode_budget, rounding, smooth)) or gptq or allow_slower or pack_siblings or block_offsets:
        raise click.UsageError("--size-budget, --avg-bits, --latency-budget, --decode-budget, --allow-slower, --pack-siblings, --block-offsets, "
                               "--gptq, --rounding and --smooth go with --bits.")
    sparse = None
    if sparse_keep is not None:
        sparse = {"keep": sparse_keep, "block": sparse_block, "select": sparse_select, "min_len": sparse_min_len,
                  "allocation": sparse_allocation}
    moe = None
    if moe_keep is not None:
        moe = {"keep": _moe_keep(moe_keep), "metric": moe_metric}
    if moe_tasks is not None:
        moe = _moe_tasks(moe_tasks, moe, model, tokenizer, other_passes=prune is not None or bits is not None or sparse is not None)
    if prune is not None or bits is not None or sparse is not None or moe is not None or fuse_attention:
        if recipe is not None:
            raise click.UsageError("give either --recipe or --prune/--bits, not both: put the passes in the recipe.")
        recipe = recipe_from_flags(prune=prune, bits=bits, sparse_attention=sparse, moe=moe, fuse_attention=fuse_attention,
                                   smooth=None if smooth is None else {"alpha": smooth}, target=target)

    if example:
        if model is not None:
            raise click.UsageError("give either MODEL or --example, not both.")
        from edgeprune import models

        with _progress(as_json).stage(f"build example {example} from its weights package"):
            artifact = models.build(example)
        model = artifact.model_path
        tokenizer = tokenizer or artifact.tokenizer_path
        from edgeprune.calibration import BUNDLED_SENTENCES

        calib = calib or BUNDLED_SENTENCES
    elif model is None:
        raise click.UsageError("give a MODEL path, or --example minilm.")
    options = CompileOptions(
        target=target, recipe=recipe, calib=calib, tokenizer=tokenizer, max_drop=max_drop,
        force=force, threads=threads, seed=seed, max_samples=max_samples,
    )
    if package_target is not None and package_target not in PACKAGE_TARGETS:
        raise click.UsageError(f"--package takes one of {', '.join(PACKAGE_TARGETS)}, got {package_target!r}.")
    if fix_shapes is not None and package_target is None:
        raise click.UsageError("--fix-shapes goes with --package.")
    result = compile_model(model, out, options, progress=_progress(as_json))
    moe_bundle = _moe_bundle(model, result, as_json) if moe_tasks is not None else None
    bundle = None
    if package_target is not None:  # the compile folder is complete; the bundle goes inside it
        bundle = _package(result.out_dir, result.out_dir / "bundle", package_target, fix_shapes, False, None, calib, tokenizer, None, False, 20, threads, as_json)
    if as_json:
        extra = ({"bundle": bundle.manifest} if bundle is not None else {}) | ({"moe_bundle": moe_bundle} if moe_bundle is not None else {})
        _emit_json({**result.report, **extra})
        return
    from edgeprune.report import summary_rows, verdicts

    out_console.print(_summary_table(f"edgeprune compile → {result.out_dir}", summary_rows(result.report)))
    for line in verdicts(result.report):  # a slower output, fidelity under the default floor: one line each, right under the table
        out_console.print(line, style="bold red", markup=False, highlight=False, soft_wrap=True)
    for line in result.report["structures_summary"]:
        out_console.print(f"  • {line}", markup=False, highlight=False)
    for p in result.report["passes"]:  # what each pass did, in one sentence where it has one (bits: the default's formats)
        if (p.get("summary") or {}).get("headline"):
            out_console.print(f"  • {p['summary']['headline']}", markup=False, highlight=False, soft_wrap=True)
    out_console.print(f"Report: {result.out_dir / 'report.html'} (also report.md, report.json)")
    if moe_bundle is not None:
        out_console.print(f"MoE retrieval bundle: {result.out_dir / 'moe_bundle'} (tasks {', '.join(moe_bundle['tasks'])}; "
                          f"expert store {moe_bundle['store_bytes']:,} bytes)", markup=False, highlight=False, soft_wrap=True)
    if bundle is not None:
        _print_bundle(bundle)


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.UsageError(f"{flag} takes comma-separated integers, got {text!r}.") from None


def _moe_keep(text: str) -> float | int:
    """--moe-keep: '0.5' is a fraction of all experts, '4' a count per layer."""
    try:
        return int(text) if text.strip().isdigit() else float(text)
    except ValueError:
        raise click.UsageError(f"--moe-keep {text!r} is not a number: give a fraction such as 0.5 or a count per layer such as 4.") from None


def _moe_tasks(text: str, moe: dict | None, model, tokenizer, *, other_passes: bool) -> dict:
    """--moe-tasks NAME=FILE,...: the moe pass's tasks, every file checked before any work (the pass's config checks the names)."""
    if moe is None:
        raise click.UsageError("--moe-tasks goes with --moe-keep: give the share of experts each task keeps, e.g. --moe-keep 0.5.")
    if other_passes:
        raise click.UsageError("--moe-tasks builds its bundle from the input's weights, so it does not combine with --prune, --bits or "
                               "--sparse-attention: compile those separately.")  # fmt: skip
    from edgeprune.validation import find_tokenizer

    tasks: dict[str, str] = {}
    for item in (x.strip() for x in text.split(",")):
        name, sep, path = (x.strip() for x in item.partition("="))
        if not sep or not name or not path:
            raise click.UsageError(f"--moe-tasks takes NAME=FILE pairs separated by commas (e.g. code=code.npz,chat=chat.npz), got {item!r}.")
        if name in tasks:
            raise click.UsageError(f"--moe-tasks names task {name!r} twice: give each task once.")
        if not pathlib.Path(path).exists():
            raise click.UsageError(f"--moe-tasks: the calibration data of task {name!r}, {path}, does not exist.")
        tasks[name] = str(path)
    found = find_tokenizer(model, tokenizer) if model is not None else tokenizer
    return {**moe, "tasks": tasks, "tokenizer": None if found is None else str(found)}


def _moe_bundle(model, result, quiet: bool) -> dict:
    """OUT/moe_bundle from the compile's per-task expert choices; on any failure the whole output folder goes (no partial output)."""
    import shutil

    from edgeprune.runtime.moe import bundle_from_report

    entry = next(p for p in result.report["passes"] if p["name"] == "moe")
    staging = result.out_dir / ".moe_bundle.partial"
    try:
        with _progress(quiet).stage("write the MoE retrieval bundle"):
            manifest = bundle_from_report(model, entry, staging)
        staging.rename(result.out_dir / "moe_bundle")
    except BaseException:
        shutil.rmtree(result.out_dir, ignore_errors=True)
        raise
    return manifest


def _bits_options(mode, size_budget, avg_bits, latency_budget, bit_options, block_size, decode_budget=None) -> dict:
    """The bits pass's options from the CLI flags."""
    from edgeprune.recipe import parse_size

    blocks = _ints(block_size, "--block-size")
    common = {"bit_options": _ints(bit_options, "--bit-options"), "block_size": blocks if len(blocks) > 1 else blocks[0]}
    if mode == "auto":
        budgets = {"size_budget_bytes": parse_size(size_budget) if size_budget else None, "avg_bits": avg_bits}
        for flag, what, given, example in (("--latency-budget", "latency", latency_budget, "150"),
                                           ("--decode-budget", "decode", decode_budget, "8")):
            if given is None:
                continue
            text = str(given).strip().lower()
            try:
                key, value = (f"{what}_budget_ratio", float(text[:-1])) if text.endswith("x") else (f"{what}_budget_ms", float(text))
            except ValueError:
                raise click.UsageError(f"{flag} takes milliseconds ({example}) or a ratio (0.8x), got {given!r}.") from None
            budgets[key] = value
        if not any(v is not None for v in budgets.values()):
            raise click.UsageError("--bits auto needs a budget: --size-budget, --avg-bits, --latency-budget or --decode-budget.")
        return {"mode": "auto", **{k: v for k, v in budgets.items() if v is not None}, **common}
    if mode in ("8", "4", "2"):
        return {"mode": "uniform", "bits": int(mode), "block_size": common["block_size"]}
    raise click.UsageError(f"--bits takes auto, 8, 4 or 2, got {mode!r}.")


@cli.command("validate")
@click.argument("reference", type=click.Path(path_type=pathlib.Path))
@click.argument("candidate", type=click.Path(path_type=pathlib.Path))
@click.option("--data", type=click.Path(path_type=pathlib.Path), help="Evaluation inputs (same formats as --calib); synthetic if absent.")
@click.option("--tokenizer", type=click.Path(path_type=pathlib.Path), help="tokenizer.json for text data (default: beside REFERENCE).")
@common_target
@click.option("--max-samples", type=int, default=64, show_default=True)
@click.option("--runs", type=int, default=30, show_default=True, help="Timed runs per model.")
@common_threads
@common_json
def validate_cmd(reference, candidate, data, tokenizer, target, max_samples, runs, threads, as_json):
    """Fidelity, latency, size and memory of CANDIDATE against REFERENCE."""
    from edgeprune.validation import validate_models

    result = validate_models(reference, candidate, data=data, tokenizer=tokenizer, target=target, threads=threads, max_samples=max_samples, runs=runs, progress=_progress(as_json))
    if as_json:
        _emit_json(result.to_dict())
        return
    rows = []
    for f in result.fidelity:
        rows.append((f"{f.name}: cosine mean / min", f"{f.cosine_mean:.6f} / {f.cosine_min:.6f}"))
        rows.append((f"{f.name}: max abs / rel error", f"{f.max_abs_error:.4g} / {f.max_rel_error:.4g}"))
        if f.top1_agreement is not None:
            rows.append((f"{f.name}: top-1 agreement", f"{f.top1_agreement:.4f}"))
        if f.perplexity_ratio is not None:
            rows.append((f"{f.name}: perplexity ref → cand", f"{f.perplexity_reference:.3f} → {f.perplexity_candidate:.3f} (×{f.perplexity_ratio:.4f})"))
    lat = result.latency
    if lat["measured"]:
        for q in ("p50", "p90"):
            rows.append((f"latency {q} ref → cand", f"{lat['reference'][q + '_ms']:.2f} → {lat['candidate'][q + '_ms']:.2f} ms (×{lat[q + '_ratio']:.3f})"))
        rm, cm = lat["reference"].get("peak_memory_mb"), lat["candidate"].get("peak_memory_mb")
        if rm is not None and cm is not None:
            rows.append(("peak memory ref → cand", f"{rm:.1f} → {cm:.1f} MB"))
    else:
        rows.append(("latency", lat["reason"]))
    gen = result.generation
    if gen and gen.get("measured"):
        ref, cand = gen["reference"], gen["candidate"]
        rows.append((f"prefill ({gen['prompt_tokens']} tokens) ref → cand", f"{ref['prefill_ms']:.2f} → {cand['prefill_ms']:.2f} ms (×{gen['prefill_ratio']:.3f})"))
        rows.append((f"decode tokens/s ({gen['new_tokens']} greedy) ref → cand",
                     f"{ref['decode_tokens_per_s']:.1f} → {cand['decode_tokens_per_s']:.1f} (×{gen['decode_speedup']:.3f})"))
        rows.append(("greedy tokens identical", f"{gen['same_tokens']} of {gen['new_tokens']}"))
    if result.cache:
        rows.append((f"KV cache ({result.cache['outputs']} outputs): cosine mean worst / min", f"{result.cache['cosine_mean_worst']:.6f} / {result.cache['cosine_min']:.6f}"))
    s = result.size
    rows.append(("file size ref → cand", f"{s['reference_bytes'] / 1e6:.2f} → {s['candidate_bytes'] / 1e6:.2f} MB (×{s['ratio']:.3f})"))
    out_console.print(_table(f"validate on {result.samples} samples of {result.data}", ["", "value"], rows))


@cli.command("profile")
@click.argument("model", type=click.Path(path_type=pathlib.Path))
@common_target
@click.option("--compare", type=click.Path(path_type=pathlib.Path), help="A second model: show where the time moved.")
@click.option("--top", type=int, default=10, show_default=True, help="Slowest nodes to list.")
@click.option("--data", type=click.Path(path_type=pathlib.Path), help="Input to profile on (first sample); synthetic if absent.")
@click.option("--tokenizer", type=click.Path(path_type=pathlib.Path))
@click.option("--seq-len", type=int, default=128, show_default=True, help="Sequence length for token models.")
@click.option("--runs", type=int, default=20, show_default=True)
@common_threads
@common_json
def profile_cmd(model, target, compare, top, data, tokenizer, seq_len, runs, threads, as_json):
    """Per-op-type and per-node time of MODEL from ONNX Runtime's profiler."""
    from edgeprune import model_io
    from edgeprune.calibration import load_calibration
    from edgeprune.runtime.profiler import compare_profiles, profile_model
    from edgeprune.runtime.targets import get_target, is_available
    from edgeprune.errors import TargetUnavailableError
    from edgeprune.validation import find_tokenizer, latency_feed

    target_profile = get_target(target)
    if not is_available(target_profile):
        raise TargetUnavailableError(f"target {target} needs {target_profile.provider}, which this onnxruntime build lacks: not measured here.")
    progress = _progress(as_json)
    ir_model = model_io.load_model(model)
    calib = load_calibration(data, ir_model, tokenizer=find_tokenizer(model, tokenizer), max_samples=1, seq_len=seq_len)
    feed = latency_feed(calib.samples[0], ir_model, seq_len)
    with progress.stage(f"profile {model.name} ({runs} runs)"):
        prof = profile_model(str(model), feed, target_profile, runs=runs, threads=threads)
    other = None
    if compare is not None:
        model_io.load_model(compare)  # a clear error for a bad second file
        with progress.stage(f"profile {compare.name} ({runs} runs)"):
            other = profile_model(str(compare), feed, target_profile, runs=runs, threads=threads)
    if as_json:
        data_out = {"model": prof.to_dict(), "input_shapes": {k: list(v.shape) for k, v in feed.items()}}
        if other is not None:
            data_out.update(compare=other.to_dict(), moved=compare_profiles(prof, other))
        _emit_json(data_out)
        return
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in feed.items())
    out_console.print(f"{model}: {prof.total_ms:.3f} ms of kernel time per run ({prof.runs} runs, inputs {shapes})")
    out_console.print(_table("by op type", ["op type", "ms/run", "share", "calls/run"], [(r.op_type, f"{r.total_ms:.3f}", f"{r.share:.1%}", r.calls) for r in prof.by_op_type]))
    out_console.print(_table(f"slowest {top} nodes", ["node", "op type", "ms/run", "share"], [(r.node, r.op_type, f"{r.ms:.3f}", f"{r.share:.1%}") for r in prof.by_node[:top]]))
    if other is not None:
        rows = [(r["op_type"], f"{r['a_ms']:.3f}", f"{r['b_ms']:.3f}", f"{r['delta_ms']:+.3f}") for r in compare_profiles(prof, other)]
        out_console.print(f"{compare}: {other.total_ms:.3f} ms of kernel time per run")
        out_console.print(_table("where the time moved", ["op type", model.name, compare.name, "delta ms"], rows))


@cli.command("inspect")
@click.argument("model", type=click.Path(path_type=pathlib.Path))
@common_json
def inspect_cmd(model, as_json):
    """Interface, opset, weights by op type and the structures edgeprune finds in MODEL."""
    from edgeprune.inspection import inspect_with_tables

    info, tables = inspect_with_tables(model)
    if as_json:
        _emit_json(info)
        return
    out_console.print(f"[bold]{info['path']}[/]  {info['file_bytes'] / 1e6:.2f} MB, IR {info['ir_version']}, opsets {info['opsets']}, {info['nodes']} nodes, {info['params']:,} parameters")
    io_rows = [("input", v["name"], v["dtype"], "[" + ", ".join(v["shape"]) + "]") for v in info["inputs"]]
    io_rows += [("output", v["name"], v["dtype"], "[" + ", ".join(v["shape"]) + "]") for v in info["outputs"]]
    out_console.print(_table("interface", ["", "name", "dtype", "shape"], io_rows))
    out_console.print(_table("weights by consuming op type", ["op type", "tensors", "parameters", "MB"], [(op, w["tensors"], f"{w['params']:,}", f"{w['bytes'] / 1e6:.2f}") for op, w in info["weights_by_op_type"].items()]))
    out_console.print("[bold]structures[/]")
    for line in info["summary"]:
        out_console.print(f"  • {line}", markup=False, highlight=False)
    for title, columns, rows in tables:  # what each pass would act on (EdgePass.describe)
        out_console.print(_table(title, columns, rows))


PACKAGE_TARGETS = ("android-arm64", "android-arm64-cpu", "ios-arm64", "ios-arm64-cpu", "linux-arm64", "linux-arm64-xnnpack", "linux-x64")


@cli.command("package")
@click.argument("model", required=False, type=click.Path(path_type=pathlib.Path))
@click.option("-o", "--output", "out", type=click.Path(path_type=pathlib.Path), help="Bundle folder (must be empty unless --force).")
@click.option("--target", "platform", type=click.Choice(PACKAGE_TARGETS), default="linux-x64", show_default=True, help="Platform the app ships to; picks the EP and the ORT-format optimization style.")
@click.option("--fix-shapes", help="Fix dynamic dimensions: NAME=N,... (dim names) or INPUT=AxBxC (a whole input).")
@click.option("--with-preprocessing", is_flag=True, help="Also bundle a model with the tokenizer (text) or image decoding (images) in the graph, via onnxruntime-extensions.")
@click.option("--optimization", type=click.Choice(["fixed", "runtime"]), help="ORT-format optimization style (default: fixed for CPU, runtime for NNAPI/CoreML/XNNPACK).")
@click.option("--calib", type=click.Path(path_type=pathlib.Path), help="Rows to compare .ort with .onnx on (same formats as compile --calib); synthetic if absent.")
@click.option("--tokenizer", type=click.Path(path_type=pathlib.Path), help="tokenizer.json or a folder holding one (default: beside the model).")
@click.option("--custom-op-library", type=click.Path(path_type=pathlib.Path), help="Shared library implementing the model's custom ops.")
@click.option("--verify", "verify_bundle", type=click.Path(path_type=pathlib.Path), help="Re-check a bundle: file hashes, then each model re-run on its stored rows.")
@click.option("--force", is_flag=True, help="Replace a non-empty bundle folder.")
@click.option("--runs", type=int, default=20, show_default=True, help="Timed runs per model for the latency figures.")
@common_threads
@common_json
def package_cmd(model, out, platform, fix_shapes, with_preprocessing, optimization, calib, tokenizer, custom_op_library,
                verify_bundle, force, runs, threads, as_json):
    """Package MODEL (an .onnx or a compile folder) into a bundle an app runs as it is, or --verify one."""
    if verify_bundle is not None:
        if model is not None or out is not None:
            raise click.UsageError("--verify takes only the bundle folder: drop MODEL and -o.")
        from edgeprune.runtime.package import verify_bundle as verify

        result = verify(verify_bundle, threads=threads)
        if as_json:
            _emit_json(result)
            return
        out_console.print(f"{verify_bundle}: {len(result['files_checked'])} files match the manifest; "
                          + "; ".join(f"{name} reproduces its outputs (cosine min {min(o['cosine_min'] for o in outs):.6f})" for name, outs in result["models"].items()))
        return
    if model is None or out is None:
        raise click.UsageError("give MODEL and -o BUNDLE, or --verify BUNDLE.")
    result = _package(model, out, platform, fix_shapes, with_preprocessing, optimization, calib, tokenizer, custom_op_library, force, runs, threads, as_json)
    if as_json:
        _emit_json(result.manifest)
        return
    _print_bundle(result)


def _package(model, out, platform, fix_shapes, with_preprocessing, optimization, calib, tokenizer, custom_op_library, force, runs, threads, quiet):
    """Build a bundle (shared by package and compile --package)."""
    from edgeprune.runtime.package import PackageOptions, package_model

    opts = PackageOptions(platform=platform, fix_shapes=fix_shapes, with_preprocessing=with_preprocessing, optimization=optimization,
                          calib=calib, tokenizer=tokenizer, custom_op_library=custom_op_library, force=force, threads=threads, runs=runs)
    return package_model(model, out, opts, progress=_progress(quiet))


def _print_bundle(result) -> None:
    m = result.manifest
    rows = [(f["path"], f"{f['bytes'] / 1e6:.3f} MB") for f in m["files"]]
    measured = m["measured"]
    rows.append(("session creation .onnx → .ort", f"{measured['session_create_s']['onnx'] * 1e3:.1f} → {measured['session_create_s']['ort'] * 1e3:.1f} ms"))
    if isinstance(measured["latency"], dict):
        rows.append(("latency p50 .onnx → .ort", f"{measured['latency']['onnx']['p50_ms']:.2f} → {measured['latency']['ort']['p50_ms']:.2f} ms"))
    ops = sum(len(v) for v in m["operators"].values())
    rows.append(("operators in the reduced config", str(ops)))
    for ep in ("nnapi", "coreml_mlprogram"):
        u = m["mobile_usability"][ep]
        rows.append((f"{ep}: nodes taken / partitions", f"{u['supported_share']:.0%} / {u['partitions']}"))
    out_console.print(_table(f"edgeprune package → {result.out_dir} ({m['target']['name']}, {m['optimization']} optimization)", ["", "value"], rows))
    out_console.print(f"Usage: {result.out_dir / 'README.md'}; check it any time with edgeprune package --verify {result.out_dir}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI and map errors to DESIGN.md's exit codes."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, standalone_mode=False)
        return 0
    except click.exceptions.Abort:
        err_console.print("aborted")
        return 2
    except click.ClickException as exc:
        exc.show()
        return 2
    except BudgetError as exc:
        err_console.print(f"[red]budget failed:[/] {escape(str(exc))}", highlight=False)
        return exc.exit_code
    except EdgepruneError as exc:
        if debug:
            err_console.print_exception()
        err_console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
        return exc.exit_code
    except Exception as exc:  # an internal error: say so, hint at --debug
        if debug:
            err_console.print_exception()
        err_console.print(f"[red]internal error:[/] {type(exc).__name__}: {escape(str(exc))}. Rerun with --debug and report it.", highlight=False)
        return 3


def entry() -> None:
    sys.exit(main())
