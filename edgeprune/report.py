"""Write a compile's report three ways: report.json (versioned), report.md, report.html.

The JSON is the record of truth: every measured figure and every pass decision. The markdown
and the single-file HTML (plots embedded as PNG data URIs, no network) are views of it.

Per-layer charts: a pass that wants one puts ``"per_layer_chart": {"y": FIELD, "ylabel": TEXT}``
in its summary and a ``"layer"`` plus FIELD in each of its records; the HTML draws it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import pathlib
from typing import Any


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:.2f} MB"


def _f(x: float | None, fmt: str = ".4f") -> str:
    return "n/a" if x is None else format(x, fmt)


class SummaryRow(tuple):
    """(what, input, output, ratio); ``alert`` says why cell ``alert_cell`` is flagged (red in the terminal and HTML, bold in markdown), or is ''."""

    alert: str
    alert_cell: int

    def __new__(cls, what: str, inp: str, out: str, ratio: str, alert: str = "", alert_cell: int = 2):
        row = super().__new__(cls, (what, inp, out, ratio))
        row.alert, row.alert_cell = alert, alert_cell
        return row


def _below_floor(report: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(output, measure) -> its entry in the report's ``below_default_floor``."""
    return {(b["output"], b["measure"]): b for b in report.get("verification", {}).get("below_default_floor", [])}


#: A p50 ratio up to this is timing noise, not a slowdown (unchanged tiny models measured 0.99-1.02x side by side here).
LATENCY_NOISE = 1.05


def verdicts(report: dict[str, Any]) -> list[str]:
    """The lines a user must not miss, shown above everything else: a slower output, fidelity under the default floor."""
    lines = []
    lat = report.get("latency", {})
    ratio = lat.get("p50_ratio") or 0.0
    if lat.get("measured") and ratio > 1:
        figures = f"latency p50 {lat['candidate']['p50_ms']:.2f} ms vs {lat['reference']['p50_ms']:.2f} ms"
        if ratio > LATENCY_NOISE:
            lines.append(f"slower than the input: {figures} ({ratio:.2f}x) on {report['target']['name']}.")
        else:
            lines.append(f"no faster than the input: {figures} ({ratio:.2f}x, within timing noise) on {report['target']['name']}.")
    gen = report.get("generation") or {}
    if gen.get("measured") and gen["decode_speedup"] < 1:
        ref, cand = gen["reference"]["decode_tokens_per_s"], gen["candidate"]["decode_tokens_per_s"]
        noise = " (within timing noise)" if gen["decode_speedup"] >= 1 / LATENCY_NOISE else ""
        lines.append(f"decodes slower than the input: {cand:.1f} vs {ref:.1f} tokens/s ({gen['decode_speedup']:.2f}x{noise}) on {report['target']['name']}.")
    below = report.get("verification", {}).get("below_default_floor", [])
    if below:
        why = f", accepted by --max-drop {report['verification']['max_drop']}" if report["verification"].get("max_drop") is not None else ""
        figures = "; ".join(f"{b['output']} {b['measure']} {b['value']:.4f} {'>' if b['measure'] == 'perplexity ratio' else '<'} {b['limit']:g}" for b in below)
        lines.append(f"fidelity below the default floor{why}: {figures}.")
    backoff = report.get("backoff") or []
    if backoff:  # what the user asked for and did not get
        first, final = backoff[0]["passes"], [p["config"] for p in report.get("passes", [])]
        changes = [f"{p['name']} {k} {a[k]} -> {b[k]}" for p, a, b in zip(report.get("passes", []), first, final) for k in b if a.get(k) != b[k]]
        kept = "the --max-drop budget" if report.get("verification", {}).get("max_drop") is not None else "the default fidelity floor"
        lines.append(f"backed off {len(backoff)} time(s) to keep {kept}: {', '.join(changes)}.")
    return lines


def summary_rows(report: dict[str, Any]) -> list[SummaryRow]:
    """(what, input, output, ratio) rows shared by the CLI table, report.md and report.html; figures under the default floor carry an alert."""
    rows: list[Any] = []
    size = report.get("size", {})
    rows.append(("file size", _mb(size.get("reference_bytes")), _mb(size.get("candidate_bytes")), _f(size.get("ratio"), ".3f")))
    for p in report.get("passes", []):  # a size budget: what the solver predicted against the bytes written
        summ = p.get("summary", {})
        if summ.get("predicted_bytes") is not None and summ.get("written_bytes") is not None:
            rows.append((f"{p['name']}: predicted / written bytes", _mb(summ["predicted_bytes"]), _mb(summ["written_bytes"]),
                         _f(summ["written_bytes"] / summ["predicted_bytes"], ".4f")))
    inp, out = report.get("input", {}), report.get("output", {})
    if inp.get("params"):
        rows.append(("parameters", f"{inp['params']:,}", f"{out.get('params', 0):,}", _f(out.get("params", 0) / inp["params"], ".3f")))
    lat = report.get("latency", {})
    if lat.get("measured"):
        for q in ("p50", "p90"):
            rows.append(
                (
                    f"latency {q}",
                    f"{lat['reference'][f'{q}_ms']:.2f} ms",
                    f"{lat['candidate'][f'{q}_ms']:.2f} ms",
                    _f(lat[f"{q}_ratio"], ".3f"),
                )
            )
        ref_mem, cand_mem = lat["reference"].get("peak_memory_mb"), lat["candidate"].get("peak_memory_mb")
        if ref_mem is not None and cand_mem is not None:
            rows.append(("peak memory", f"{ref_mem:.1f} MB", f"{cand_mem:.1f} MB", _f(cand_mem / ref_mem if ref_mem else None, ".3f")))
    else:
        rows.append(("latency", lat.get("reason", "not measured"), "", ""))
    rows += _generation_rows(report.get("generation"))
    below = _below_floor(report)

    def alert(name: str, measure: str) -> str:
        b = below.get((name, measure))
        return "" if b is None else f"below the default floor {b['limit']:g}"

    for o in report.get("verification", {}).get("outputs", []):
        name = o["name"]
        rows.append(SummaryRow(f"{name}: cosine mean/min", "1", f"{o['cosine_mean']:.6f} / {o['cosine_min']:.6f}", "", alert(name, "cosine mean")))
        if o.get("top1_agreement") is not None:
            rows.append(SummaryRow(f"{name}: top-1 agreement", "1", f"{o['top1_agreement']:.4f}", "", alert(name, "top-1 agreement")))
        if o.get("perplexity_ratio") is not None:
            rows.append(SummaryRow(f"{name}: perplexity", _f(o["perplexity_reference"], ".3f"), _f(o["perplexity_candidate"], ".3f"),
                                   _f(o["perplexity_ratio"], ".4f"), alert(name, "perplexity ratio"), alert_cell=3))
    cache = report.get("verification", {}).get("kv_cache")
    if cache:
        rows.append((f"KV cache ({cache['outputs']} outputs): cosine mean worst/min", "1",
                     f"{cache['cosine_mean_worst']:.6f} / {cache['cosine_min']:.6f}", ""))
    if report.get("calibration", {}).get("synthetic"):  # the figures above came from inputs that are not the user's
        rows.append(("calibration data", "synthetic data", "", ""))
    return [r if isinstance(r, SummaryRow) else SummaryRow(*r) for r in rows]


def _generation_rows(gen: dict[str, Any] | None) -> list[SummaryRow]:
    """A KV-cache decoder's prefill and decode speed (greedy, side by side); a slower output is flagged."""
    if not gen or not gen.get("measured"):
        return []
    ref, cand = gen["reference"], gen["candidate"]
    prefill_slow = "slower than the input" if gen["prefill_ratio"] > LATENCY_NOISE else ""
    decode_slow = "slower than the input" if gen["decode_speedup"] < 1 / LATENCY_NOISE else ""
    return [
        SummaryRow(f"prefill ({gen['prompt_tokens']} tokens, from an empty cache)", f"{ref['prefill_ms']:.2f} ms", f"{cand['prefill_ms']:.2f} ms",
                   _f(gen["prefill_ratio"], ".3f"), prefill_slow, alert_cell=3),
        SummaryRow(f"decode tokens/s ({gen['new_tokens']} greedy, cache reused)", f"{ref['decode_tokens_per_s']:.1f}", f"{cand['decode_tokens_per_s']:.1f}",
                   _f(gen["decode_speedup"], ".3f"), decode_slow, alert_cell=3),
        SummaryRow("greedy tokens identical to the input's", str(gen["new_tokens"]), str(gen["same_tokens"]), ""),
    ]  # fmt: skip


def _markdown_row(row: SummaryRow) -> str:
    cells = [str(c) for c in row]
    if row.alert:
        cells[row.alert_cell] = f"**{cells[row.alert_cell]}** ({row.alert})"
    return "| " + " | ".join(cells) + " |"


def to_markdown(report: dict[str, Any]) -> str:
    inp, out, ver = report["input"], report.get("output", {}), report["verification"]
    lines = [
        "# edgeprune compile report",
        "",
        *[f"> **{line}**" for line in verdicts(report)],
        *([""] if verdicts(report) else []),
        f"- input: `{inp['path']}` (sha256 `{inp['sha256'][:16]}…`, opset {inp['opset']})",
        f"- output: `{out.get('path', 'n/a')}`",
        f"- target: {report['target']['name']} ({report['target']['provider']})",
        f"- recipe: {', '.join(p['name'] for p in report['recipe']['passes'])} ({report['recipe']['source']})",
        f"- calibration: {report['calibration']['source']}, {report['calibration']['statistics_rows']} rows for statistics, "
        f"{report['calibration']['holdout_rows']} held back for verification" + (" (synthetic!)" if report["calibration"]["synthetic"] else ""),
        f"- verification: onnx.checker {'ok' if ver['checker_ok'] else ver.get('checker_note') or 'FAILED'}, ORT load {'ok' if ver['ort_ok'] else 'FAILED'}, "
        f"fidelity drop {ver['drop']:.6f}" + (f" (budget {ver['max_drop']})" if ver.get("max_drop") is not None else ""),
        f"- edgeprune {report['edgeprune_version']}, {report['created']}, {report.get('seconds', 'n/a')} s",
        "",
        "## Summary",
        "",
        "| | input | output | ratio |",
        "|---|---|---|---|",
    ]
    lines += [_markdown_row(row) for row in summary_rows(report)]
    lat = report.get("latency", {})
    if lat.get("measured"):
        shapes = ", ".join(f"{k} {v}" for k, v in lat["input_shapes"].items())
        lines += ["", f"Latency: {lat['reference']['runs']} interleaved runs after {lat['reference']['warmup']} warm-up, threads {lat['threads'] or 'ORT default'}, inputs {shapes}."]
    lines += ["", "## Structures found", ""] + [f"- {s}" for s in report.get("structures_summary", [])]
    lines += ["", "## Passes", ""]
    for p in report["passes"]:
        lines.append(f"### {p['name']} ({'modified' if p['modified'] else 'no change'}, {p['seconds']} s)")
        lines += ["", f"config: `{json.dumps(p['config'])}`", "", f"summary: `{json.dumps(p['summary'])}`", ""]
        if p["records"]:
            keys = list(p["records"][0].keys())
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in p["records"]]
            lines.append("")
    if report.get("backoff"):
        lines += ["## Accuracy back-off", ""] + [f"- drop {b['drop']:.4f}: {b.get('relaxed', '')}" for b in report["backoff"]]
    prof = report.get("profile")
    if prof:
        lines += ["", "## Where the time goes (ORT profiler, per run)", "", "| op type | input ms | output ms | delta ms |", "|---|---|---|---|"]
        for row in prof["moved"][:15]:
            lines.append(f"| {row['op_type']} | {row['a_ms']:.3f} | {row['b_ms']:.3f} | {row['delta_ms']:+.3f} |")
    return "\n".join(lines) + "\n"


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _charts(report: dict[str, Any]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    charts = []
    prof = report.get("profile")
    if prof:
        rows = sorted(prof["moved"], key=lambda r: -max(r["a_ms"], r["b_ms"]))[:12]
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1))
        y = range(len(rows))
        ax.barh([i + 0.2 for i in y], [r["a_ms"] for r in rows], height=0.4, label="input")
        ax.barh([i - 0.2 for i in y], [r["b_ms"] for r in rows], height=0.4, label="output")
        ax.set_yticks(list(y), [r["op_type"] for r in rows])
        ax.invert_yaxis()
        ax.set_xlabel("ms per run (sum of kernel times)")
        ax.legend()
        charts.append(("Latency by op type", _png(fig)))
        plt.close(fig)
    size = report.get("size")
    if size:
        fig, ax = plt.subplots(figsize=(4, 2.5))
        ax.bar(["input", "output"], [size["reference_bytes"] / 1e6, size["candidate_bytes"] / 1e6], color=["#888", "#2a7"])
        ax.set_ylabel("MB on disk")
        charts.append(("Size before and after", _png(fig)))
        plt.close(fig)
    for p in report.get("passes", []):
        spec = p.get("summary", {}).get("per_layer_chart")
        if not spec or not p["records"]:
            continue
        recs = [r for r in p["records"] if spec["y"] in r]
        fig, ax = plt.subplots(figsize=(max(5, 0.25 * len(recs)), 3))
        ax.bar(range(len(recs)), [r[spec["y"]] for r in recs])
        ax.set_xticks(range(len(recs)), [str(r.get("layer", i)) for i, r in enumerate(recs)], rotation=90, fontsize=7)
        ax.set_ylabel(spec.get("ylabel", spec["y"]))
        charts.append((f"{p['name']}: {spec.get('ylabel', spec['y'])} per layer", _png(fig)))
        plt.close(fig)
    return charts


def to_html(report: dict[str, Any]) -> str:
    rows = "".join(
        "<tr>" + "".join(
            f"<td class='below-floor'>{html.escape(str(c))} <small>({html.escape(row.alert)})</small></td>"
            if row.alert and i == row.alert_cell else f"<td>{html.escape(str(c))}</td>"
            for i, c in enumerate(row)
        ) + "</tr>"
        for row in summary_rows(report)
    )
    verdict_html = "".join(f"<p class='verdict'>{html.escape(line)}</p>" for line in verdicts(report))
    charts = "".join(f"<h2>{html.escape(t)}</h2><img alt='{html.escape(t)}' src='{src}'>" for t, src in _charts(report))
    if not any(p.get("summary", {}).get("per_layer_chart") for p in report.get("passes", [])):
        charts += "<h2>Per-layer decisions</h2><p>No pass in this recipe makes per-layer decisions.</p>"
    structures = "".join(f"<li>{html.escape(s)}</li>" for s in report.get("structures_summary", []))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>edgeprune report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.25em .6em}}img{{max-width:100%}}
pre{{background:#f6f6f6;padding:1em;overflow:auto;max-height:30em}}
.below-floor{{color:#c00;font-weight:bold}}.verdict{{color:#c00;font-weight:bold}}</style></head><body>
<h1>edgeprune compile report</h1>
<p>{html.escape(report['input']['path'])} &rarr; {html.escape(report.get('output', {}).get('path', ''))},
target {html.escape(report['target']['name'])}, {html.escape(report['created'])}</p>
{verdict_html}
<table><tr><th></th><th>input</th><th>output</th><th>ratio</th></tr>{rows}</table>
<h2>Structures found</h2><ul>{structures}</ul>
{charts}
<h2>report.json</h2><pre>{html.escape(json.dumps(report, indent=1))}</pre>
</body></html>
"""


def write_reports(report: dict[str, Any], folder: pathlib.Path) -> None:
    folder = pathlib.Path(folder)
    (folder / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (folder / "report.md").write_text(to_markdown(report))
    (folder / "report.html").write_text(to_html(report))
