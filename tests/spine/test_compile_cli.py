"""The compile spine through the CLI: outputs, reports, budgets, and every bad-input refusal.

Bad input must give exit code 2, one sentence, and leave no output folder behind; the input
model must be untouched whatever happens.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgeprune.cli import main
from edgeprune.passes import registry

from tiny_models import write_mlp, write_mlp_calib


@pytest.fixture
def mlp(tmp_path):
    model = write_mlp(tmp_path / "in")
    calib = write_mlp_calib(tmp_path / "in")
    return model, calib


@pytest.fixture
def noise_pass(monkeypatch):
    monkeypatch.setitem(registry._BUILTIN, "test-noise", "tiny_models:NoisePass")


def _run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _outputs(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_compile_writes_verified_model_and_reports(mlp, tmp_path, capsys):
    model, calib = mlp
    before = model.read_bytes()
    out = tmp_path / "out"
    code, stdout, stderr = _run(capsys, "compile", model, "-o", out, "--calib", calib, "--json")
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "report.html", "report.json", "report.md"]
    assert model.read_bytes() == before
    report = json.loads((out / "report.json").read_text())
    assert json.loads(stdout)["schema"] == report["schema"] == "edgeprune.report/1"
    # cleanup folded the constant branch and removed the Identity
    assert report["passes"][0]["name"] == "cleanup" and report["passes"][0]["modified"]
    assert report["output"]["nodes"] < report["input"]["nodes"]
    ops = {n.op_type for n in onnx.load(out / "model.onnx").graph.node}
    assert "Identity" not in ops and "Constant" not in ops
    ver = report["verification"]
    assert ver["checker_ok"] and ver["ort_ok"] and ver["drop"] == pytest.approx(0, abs=1e-6)
    assert report["calibration"]["statistics_rows"] + report["calibration"]["holdout_rows"] == 16
    assert report["latency"]["measured"] and report["latency"]["p50_ratio"] > 0
    assert report["profile"]["candidate"]["by_op_type"]
    x = np.random.default_rng(5).standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_allclose(_outputs(out / "model.onnx", x), _outputs(model, x), rtol=1e-5, atol=1e-6)
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "Latency by op type" in html
    assert "| file size |" in (out / "report.md").read_text()


def test_compile_human_output_has_summary_table(mlp, tmp_path, capsys):
    model, calib = mlp
    code, stdout, _ = _run(capsys, "compile", model, "-o", tmp_path / "out", "--calib", calib)
    assert code == 0
    assert "latency p50" in stdout and "cosine" in stdout and "report.html" in stdout


def test_max_drop_backs_off_until_budget_holds(mlp, tmp_path, capsys, noise_pass):
    model, calib = mlp
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[passes]]\nname = "test-noise"\n[passes.options]\nnoise = 0.5\n')
    code, stdout, stderr = _run(capsys, "compile", model, "-o", tmp_path / "out", "--calib", calib, "--recipe", recipe, "--max-drop", "0.001", "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["backoff"], "the noisy first attempt must have been backed off"
    assert report["verification"]["drop"] <= 0.001
    assert all(b["drop"] > 0.001 for b in report["backoff"])


def test_max_drop_that_cannot_hold_exits_1_and_writes_nothing(mlp, tmp_path, capsys, noise_pass):
    model, calib = mlp
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - name: test-noise\n    options: {noise: 0.5, can_relax: false}\n")
    out = tmp_path / "out"
    code, _, stderr = _run(capsys, "compile", model, "-o", out, "--calib", calib, "--recipe", recipe, "--max-drop", "0.001")
    assert code == 1
    assert "budget" in stderr and "nothing was written" in stderr
    assert not out.exists()


def test_force_replaces_non_empty_output(mlp, tmp_path, capsys):
    model, calib = mlp
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    code, _, stderr = _run(capsys, "compile", model, "-o", out, "--calib", calib)
    assert code == 2 and "not empty" in stderr and (out / "old.txt").exists()
    code, _, _ = _run(capsys, "compile", model, "-o", out, "--calib", calib, "--force")
    assert code == 0 and not (out / "old.txt").exists() and (out / "model.onnx").exists()


def _bad(capsys, tmp_path, *args, expect: str):
    out = tmp_path / "out"
    code, stdout, stderr = _run(capsys, "compile", *args, "-o", out)
    assert code == 2, (stdout, stderr)
    assert expect in stderr.lower(), stderr
    assert "Traceback" not in stderr
    assert not out.exists(), "bad input must leave no output folder"
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert not leftovers, "no staging folders left behind"
    return stderr


def test_not_onnx(tmp_path, capsys):
    bogus = tmp_path / "model.onnx"
    bogus.write_text("this is a text file, not a model\n" * 20)
    _bad(capsys, tmp_path, bogus, expect="not")


def test_truncated_onnx(tmp_path, capsys):
    model = write_mlp(tmp_path / "in")
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])
    _bad(capsys, tmp_path, model, expect="truncated")


def test_missing_external_data(tmp_path, capsys):
    proto = onnx.load(write_mlp(tmp_path / "src"))
    folder = tmp_path / "in"
    folder.mkdir()
    onnx.save(proto, folder / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True, location="m.onnx.data", size_threshold=0)
    (folder / "m.onnx.data").unlink()
    _bad(capsys, tmp_path, folder / "m.onnx", expect="external data")


def test_missing_model_file(tmp_path, capsys):
    _bad(capsys, tmp_path, tmp_path / "nope.onnx", expect="does not exist")


@pytest.mark.parametrize(
    "arrays, expect",
    [
        ({"y": np.zeros((4, 4), np.float32)}, "y"),  # unknown input name
        ({"x": np.zeros((4, 4), np.int64)}, "dtype"),  # wrong dtype
        ({"x": np.zeros((4, 5), np.float32)}, "x"),  # wrong static dim
        ({"x": np.zeros((4, 2, 4), np.float32)}, "rank"),  # wrong rank
    ],
)
def test_calibration_that_does_not_fit(tmp_path, capsys, arrays, expect):
    model = write_mlp(tmp_path / "in")
    calib = tmp_path / "in" / "bad.npz"
    np.savez(calib, **arrays)
    stderr = _bad(capsys, tmp_path, model, "--calib", calib, expect=expect)
    assert "calib" in stderr.lower() or "input" in stderr.lower()


def test_empty_calibration_file(tmp_path, capsys):
    model = write_mlp(tmp_path / "in")
    empty = tmp_path / "in" / "empty.txt"
    empty.write_text("")
    _bad(capsys, tmp_path, model, "--calib", empty, expect="empty")


def test_output_is_the_input_model(tmp_path, capsys):
    model = write_mlp(tmp_path / "in")
    before = model.read_bytes()
    code, _, stderr = _run(capsys, "compile", model, "-o", model)
    assert code == 2 and "overwrite" in stderr
    code, _, stderr = _run(capsys, "compile", model, "-o", model.parent)
    assert code == 2
    assert model.read_bytes() == before


def test_unknown_target(tmp_path, capsys):
    model = write_mlp(tmp_path / "in")
    stderr = _bad(capsys, tmp_path, model, "--target", "tpu9000", expect="target")
    assert "cpu" in stderr


def test_recipe_with_unknown_pass(tmp_path, capsys):
    model = write_mlp(tmp_path / "in")
    recipe = tmp_path / "in" / "r.toml"
    recipe.write_text('[[passes]]\nname = "prune-everything"\n')
    stderr = _bad(capsys, tmp_path, model, "--recipe", recipe, expect="unknown pass")
    assert "cleanup" in stderr


def test_recipe_with_unknown_option(tmp_path, capsys):
    model = write_mlp(tmp_path / "in")
    recipe = tmp_path / "in" / "r.toml"
    recipe.write_text('[[passes]]\nname = "cleanup"\n[passes.options]\nfold = true\n')
    _bad(capsys, tmp_path, model, "--recipe", recipe, expect="no option")


def test_unmeasurable_target_still_compiles_and_says_so(mlp, tmp_path, capsys):
    model, calib = mlp
    code, stdout, stderr = _run(capsys, "compile", model, "-o", tmp_path / "out", "--calib", calib, "--target", "qnn", "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["latency"]["measured"] is False
    assert "not measured here" in report["latency"]["reason"]


def test_usage_errors_exit_2(tmp_path, capsys):
    code, _, _ = _run(capsys, "compile", "-o", tmp_path / "out")
    assert code == 2
    code, _, _ = _run(capsys, "no-such-command")
    assert code == 2


def test_prune_flag_shrinks_the_model(mlp, tmp_path, capsys):
    model, calib = mlp
    code, stdout, stderr = _run(capsys, "compile", model, "-o", tmp_path / "out", "--calib", calib, "--prune", "0.5", "--round-to", "1", "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert [p["name"] for p in report["passes"]] == ["cleanup", "prune", "cleanup"]
    assert report["recipe"]["source"] == "command line"
    assert report["output"]["params"] < report["input"]["params"]
    hidden = {tuple(i.dims) for i in onnx.load(tmp_path / "out" / "model.onnx").graph.initializer if len(i.dims) == 2}
    assert (4, 4) in hidden and (4, 3) in hidden  # 8 hidden neurons -> 4


@pytest.mark.parametrize("args, expect", [(["--prune", "1.0"], "ratio"), (["--prune", "-0.1"], "ratio"), (["--prune", "0.2", "--round-to", "0"], "round_to")])
def test_prune_flag_bad_values(mlp, tmp_path, capsys, args, expect):
    model, calib = mlp
    _bad(capsys, tmp_path, model, "--calib", calib, *args, expect=expect)


def test_prune_and_recipe_are_exclusive(mlp, tmp_path, capsys):
    model, calib = mlp
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[passes]]\nname = "cleanup"\n')
    _bad(capsys, tmp_path, model, "--calib", calib, "--recipe", recipe, "--prune", "0.2", expect="either --recipe or --prune")


def test_backoff_reuses_calibration_statistics(mlp, tmp_path, capsys, monkeypatch):
    from edgeprune import stats

    calls = []
    original = stats.StatsCollector.collect

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(stats.StatsCollector, "collect", counting)
    model, calib = mlp
    code, _, stderr = _run(capsys, "compile", model, "-o", tmp_path / "out", "--calib", calib, "--prune", "0.5", "--round-to", "1", "--max-drop", "0")
    assert code == 1 and "back off further" in stderr  # every ratio loses something; nothing written
    assert not (tmp_path / "out").exists()
    assert len(calls) == 1, "the prune pass's input is the same at every attempt: one statistics run"


def test_bits_flags_build_the_recipe(mlp, tmp_path, capsys):
    model, calib = mlp
    code, stdout, stderr = _run(capsys, "compile", model, "-o", tmp_path / "out", "--calib", calib, "--prune", "0.25", "--round-to", "1",
                                "--bits", "4", "--block-size", "32", "--gptq", "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert [p["name"] for p in report["passes"]] == ["cleanup", "prune", "cleanup", "bits"]
    config = report["passes"][3]["config"]
    assert config["mode"] == "uniform" and config["bits"] == 4 and config["gptq"] is True
    assert {r["format"] for r in report["passes"][3]["records"]} == {"gptq4-b32-asym"}


@pytest.mark.parametrize("args, expect", [
    (["--bits", "auto"], "needs a budget"),
    (["--bits", "3"], "--bits takes"),
    (["--avg-bits", "4.5"], "go with --bits"),
    (["--gptq"], "go with --bits"),
    (["--bits", "auto", "--size-budget", "lots"], "not a size"),
    (["--bits", "auto", "--latency-budget", "fast"], "--latency-budget takes"),
])
def test_bits_flag_mistakes(mlp, tmp_path, capsys, args, expect):
    model, calib = mlp
    _bad(capsys, tmp_path, model, "--calib", calib, *args, expect=expect.lower())
