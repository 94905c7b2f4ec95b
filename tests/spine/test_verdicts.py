"""compile's verdicts: a default fidelity floor (issue 10, defect 4) and a slower output said plainly (defect 5).

Without ``--max-drop`` a compile must still back off from, or refuse, a model whose fidelity falls
below the default floor of its output kind; figures below that floor are flagged (red in the
terminal and the HTML); a compile whose output measures slower than its input says so in one line
of the terminal summary, report.md and report.html.  The models are built here: two 1x1 convs
whose channels each carry their own share of the output, so pruning any strong channel wrecks it.
"""

from __future__ import annotations

import dataclasses
import html as html_mod
import io
import json
import re

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from rich.console import Console

from edgeprune import cli
from edgeprune.cli import main
from edgeprune.fidelity import OutputFidelity
from edgeprune.passes import registry
from edgeprune.passes.base import EdgePass, EdgePassResult

from tiny_models import write_mlp, write_mlp_calib


def _channels_model(folder, scales) -> tuple:
    """x[N,C,4,4] -> Conv1x1 diag(scales) -> Relu -> Conv1x1 2 x identity -> y: channel c carries scales[c] of the output."""
    c = len(scales)
    proto = onnx.parser.parse_model(f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, {c}, 4, 4] x) => (float[N, {c}, 4, 4] y) {{
        h = Conv (x, w1, b1)
        r = Relu (h)
        y = Conv (r, w2, b2)
    }}""")
    weights = {"w1": np.diag(np.asarray(scales, np.float32)).reshape(c, c, 1, 1), "b1": np.zeros(c, np.float32),
               "w2": 2 * np.eye(c, dtype=np.float32).reshape(c, c, 1, 1), "b2": np.zeros(c, np.float32)}  # fmt: skip
    # (w2 != w1 even when every scale is 1: cleanup merges equal initializers, which would make one shared weight)
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(a, n) for n, a in weights.items())
    onnx.checker.check_model(proto)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, folder / "convs.onnx")
    np.savez(folder / "calib.npz", x=np.random.default_rng(1).standard_normal((16, c, 4, 4)).astype(np.float32))
    return folder / "convs.onnx", folder / "calib.npz"


def _run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------- the floor per output kind


@pytest.mark.parametrize("fid, floor", [
    (OutputFidelity("last_hidden_state", 8, 0.5, 0.1, 1.0, 1.0), ("cosine mean", 0.99)),
    (OutputFidelity("logits", 8, 0.5, 0.1, 1.0, 1.0, top1_agreement=0.5), ("top-1 agreement", 0.95)),
    (OutputFidelity("logits", 8, 0.5, 0.1, 1.0, 1.0, top1_agreement=0.5, perplexity_reference=10.0, perplexity_candidate=12.0),
     ("perplexity ratio", 1.05)),
])
def test_default_floor_follows_the_output_kind(fid, floor):
    from edgeprune.fidelity import default_floor

    got = default_floor(fid)
    assert (got.measure, got.limit) == floor
    assert not got.holds(fid)
    good = dataclasses.replace(fid, cosine_mean=0.995, top1_agreement=None if fid.top1_agreement is None else 0.96,
                               perplexity_candidate=None if fid.perplexity_candidate is None else 10.4)
    assert default_floor(good).holds(good)


# --------------------------------------------------------------------------- defect 4: no silent wreck


def test_a_wrecking_prune_without_max_drop_backs_off_above_the_floor(tmp_path, capsys):
    # Four strong channels and four near-silent ones: pruning 75% must cut strong ones (cosine ~0.7),
    # pruning the silent ones is nearly free, so back-off ends at a ratio that keeps the floor.
    model, calib = _channels_model(tmp_path / "in", [1.0] * 4 + [0.01] * 4)
    code, stdout, stderr = _run(capsys, "compile", model, "-o", tmp_path / "out", "--calib", calib, "--prune", "0.75", "--round-to", "1", "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    ver = report["verification"]
    assert report["backoff"] and all(b["drop"] > 0.01 for b in report["backoff"])
    assert ver["outputs"][0]["cosine_mean"] >= 0.99
    assert ver["floor"] == {"source": "default", "max_drop": None,
                            "outputs": [{"output": "y", "measure": "cosine mean", "limit": 0.99, "value": ver["outputs"][0]["cosine_mean"], "ok": True}]}
    assert ver["budget_ok"] is True
    prune = report["passes"][1]
    assert prune["config"]["ratio"] < 0.75 and prune["summary"]["removed_params"] > 0
    line = f"backed off {len(report['backoff'])} time(s) to keep the default fidelity floor: prune ratio 0.75 -> {prune['config']['ratio']}."
    assert f"> **{line}**" in (tmp_path / "out" / "report.md").read_text().splitlines()


def test_a_wreck_that_cannot_back_off_exits_1_with_one_sentence_and_no_output(tmp_path, capsys):
    # Every channel matters equally: even the smallest ratio the pass backs off to removes one of
    # eight channels (cosine ~0.96 < 0.99), so nothing holds.  Before the floor: exit 0, budget_ok true.
    model, calib = _channels_model(tmp_path / "in", [1.0] * 8)
    before = model.read_bytes()
    out = tmp_path / "out"
    code, _, stderr = _run(capsys, "compile", model, "-o", out, "--calib", calib, "--prune", "0.3", "--round-to", "1")
    assert code == 1, stderr
    assert re.fullmatch(r"budget failed: fidelity below the default floor: output 'y' cosine mean 0\.9\d{3} < 0\.99 after \d+ attempt\(s\), "
                        r"and no pass can back off further; nothing was written \(prune less, or pass --max-drop to accept a larger drop\)\.",
                        stderr.splitlines()[-1]), stderr
    assert not out.exists() and model.read_bytes() == before


def test_max_drop_replaces_the_floor_and_figures_below_it_are_flagged_red(tmp_path, capsys, monkeypatch):
    model, calib = _channels_model(tmp_path / "in", [1.0] * 8)
    out = tmp_path / "out"
    term = io.StringIO()
    monkeypatch.setattr(cli, "out_console", Console(file=term, force_terminal=True, color_system="standard", width=200))
    code, _, stderr = _run(capsys, "compile", model, "-o", out, "--calib", calib, "--prune", "0.3", "--round-to", "1", "--max-drop", "0.2")
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    cos = report["verification"]["outputs"][0]["cosine_mean"]
    assert 0.8 < cos < 0.99 and not report["backoff"]
    assert report["verification"]["floor"]["source"] == "--max-drop"
    assert report["verification"]["below_default_floor"] == [{"output": "y", "measure": "cosine mean", "limit": 0.99, "value": cos}]
    line = f"fidelity below the default floor, accepted by --max-drop 0.2: y cosine mean {cos:.4f} < 0.99."
    text = term.getvalue()
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
    assert line in plain
    row = next(r for r in text.splitlines() if "y: cosine mean/min" in r)
    assert re.search(r"\x1b\[(1;)?31m" + re.escape(f"{cos:.6f}"), row), row  # the figure itself is red
    md = (out / "report.md").read_text()
    assert line in md and f"**{cos:.6f}" in md
    html = (out / "report.html").read_text()
    assert ".below-floor{color:#c00" in html and f"<td class='below-floor'>{cos:.6f}" in html
    assert f"<p class='verdict'>{html_mod.escape(line)}</p>" in html


def test_an_intact_compile_flags_nothing(tmp_path, capsys):
    model, calib = write_mlp(tmp_path / "in"), write_mlp_calib(tmp_path / "in")
    code, stdout, stderr = _run(capsys, "compile", model, "-o", tmp_path / "out", "--calib", calib, "--json")
    assert code == 0, stderr
    ver = json.loads(stdout)["verification"]
    assert ver["floor"]["outputs"] == [{"output": "logits", "measure": "top-1 agreement", "limit": 0.95, "value": 1.0, "ok": True}]
    assert ver["below_default_floor"] == []
    assert "below-floor'>" not in (tmp_path / "out" / "report.html").read_text()


# --------------------------------------------------------------------------- defect 5: slower says so


@dataclasses.dataclass
class SlowConfig:
    nodes: int = 400


class SlowPass(EdgePass):
    """Test-only: appends ``nodes`` Add/Sub pairs of a constant to the output, so the model really runs slower, exactly."""

    name = "test-slow"
    Config = SlowConfig

    def call(self, model: ir.Model) -> EdgePassResult:
        out = model.graph.outputs[0]
        shift = ir.Value(name="slow_shift", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([]),
                         const_value=ir.tensor(np.float32(0.5), name="slow_shift"))
        model.graph.register_initializer(shift)
        value = out
        for i in range(self.config.nodes):
            node = ir.node("Add" if i % 2 == 0 else "Sub", [value, shift], name=f"slow_{i}")
            node.outputs[0].name = f"slow_{i}_out"
            node.outputs[0].type, node.outputs[0].shape = out.type, out.shape
            model.graph.append(node)
            value = node.outputs[0]
        name = out.name
        out.name = f"{name}_before_slow"
        value.name = name
        model.graph.outputs[0] = value
        return EdgePassResult(model, modified=True)


def test_a_slower_output_says_so_in_the_terminal_markdown_and_html(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(registry._BUILTIN, "test-slow", f"{__name__}:SlowPass")
    model, calib = write_mlp(tmp_path / "in"), write_mlp_calib(tmp_path / "in")
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[passes]]\nname = "test-slow"\n')
    out = tmp_path / "out"
    code, stdout, stderr = _run(capsys, "compile", model, "-o", out, "--calib", calib, "--recipe", recipe)
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    lat = report["latency"]
    assert lat["p50_ratio"] > 1.5  # 800 extra nodes on a 4-node model
    line = (f"slower than the input: latency p50 {lat['candidate']['p50_ms']:.2f} ms vs {lat['reference']['p50_ms']:.2f} ms "
            f"({lat['p50_ratio']:.2f}x) on cpu.")
    assert line in stdout.splitlines()
    assert f"> **{line}**" in (out / "report.md").read_text().splitlines()
    assert f"<p class='verdict'>{html_mod.escape(line)}</p>" in (out / "report.html").read_text()


def test_only_a_faster_output_says_nothing_about_its_speed():
    from edgeprune import report as report_mod

    base = {"latency": {"measured": True, "p50_ratio": 0.8, "reference": {"p50_ms": 1.0}, "candidate": {"p50_ms": 0.8}},
            "target": {"name": "cpu"}, "verification": {"outputs": []}}
    assert report_mod.verdicts(base) == []
    slower = {**base, "latency": {**base["latency"], "p50_ratio": 1.25, "candidate": {"p50_ms": 1.25}}}
    assert report_mod.verdicts(slower) == ["slower than the input: latency p50 1.25 ms vs 1.00 ms (1.25x) on cpu."]
    level = {**base, "latency": {**base["latency"], "p50_ratio": 1.03, "candidate": {"p50_ms": 1.03}}}
    assert report_mod.verdicts(level) == ["no faster than the input: latency p50 1.03 ms vs 1.00 ms (1.03x, within timing noise) on cpu."]


# --------------------------------------------------------------------------- defect 7: third-party log lines


_NOISY_COMPILE = """
import logging, sys, warnings
from edgeprune import pipeline
from edgeprune.cli import entry

verify = pipeline.verify

def noisy(*args, **kwargs):  # what the libraries we call do while we run them
    logging.warning("Please consider to run pre-processing before quantization.")  # ORT's quantizer, on the root logger
    logging.getLogger("onnxscript.optimizer").warning("onnxscript: a rewrite rule did not apply")
    warnings.warn("onnx_ir: a deprecated attribute")
    logging.getLogger("edgeprune.pipeline").warning("edgeprune: our own warning")
    return verify(*args, **kwargs)

pipeline.verify = noisy
entry()
"""


def test_third_party_warnings_do_not_leak_into_the_cli_output(tmp_path):
    """Third-party log lines and Python warnings stay out of a user's terminal (--debug shows them); ours stay in."""
    import subprocess
    import sys

    model, calib = write_mlp(tmp_path / "in"), write_mlp_calib(tmp_path / "in")
    run = [sys.executable, "-c", _NOISY_COMPILE]
    args = ["compile", str(model), "--calib", str(calib)]
    quiet = subprocess.run([*run, *args, "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    for leak in ("pre-processing", "onnxscript:", "onnx_ir:"):
        assert leak not in quiet.stderr + quiet.stdout
    assert "WARNING edgeprune.pipeline: edgeprune: our own warning" in quiet.stderr
    debug = subprocess.run([*run, "--debug", *args, "-o", str(tmp_path / "out2")], capture_output=True, text=True, timeout=300)
    assert debug.returncode == 0
    assert all(leak in debug.stderr for leak in ("pre-processing", "onnxscript:", "onnx_ir:"))


def test_summary_shows_a_size_budget_prediction_beside_the_written_bytes():
    from edgeprune.report import summary_rows

    report = {"size": {"reference_bytes": 4_000_000, "candidate_bytes": 1_001_000, "ratio": 0.25025},
              "passes": [{"name": "cleanup", "summary": {}}, {"name": "bits", "summary": {"predicted_bytes": 1_000_000, "written_bytes": 1_001_000}}],
              "latency": {"measured": False, "reason": "not measured here"}, "verification": {}}  # fmt: skip
    assert [tuple(r) for r in summary_rows(report)][:2] == [
        ("file size", "4.00 MB", "1.00 MB", "0.250"),
        ("bits: predicted / written bytes", "1.00 MB", "1.00 MB", "1.0010"),
    ]
