"""The compile spine through the CLI: outputs, reports, budgets, and every bad-input refusal.

Bad input must give exit code 2, one sentence, and leave no output folder behind; the input
model must be untouched whatever happens.
"""

from __future__ import annotations

import json
import re

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
    assert re.fullmatch(r"budget failed: accuracy budget not met: fidelity drop 0\.\d{4} > --max-drop 0\.001 after 1 attempt\(s\), "
                        r"and no pass can back off further; nothing was written\.\n", stderr.splitlines(keepends=True)[-1]), stderr
    assert not out.exists()


def test_force_replaces_non_empty_output(mlp, tmp_path, capsys):
    model, calib = mlp
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    code, _, stderr = _run(capsys, "compile", model, "-o", out, "--calib", calib)
    assert stderr.splitlines()[-1] == f"error: the output folder {out.resolve()} is not empty: choose an empty folder or pass --force."
    assert code == 2 and (out / "old.txt").exists()
    code, _, _ = _run(capsys, "compile", model, "-o", out, "--calib", calib, "--force")
    assert code == 0 and not (out / "old.txt").exists() and (out / "model.onnx").exists()


def _bad(capsys, tmp_path, *args, error: str):
    """Exit 2, ``error`` as the last line of stderr exactly (progress lines may come before it), no output."""
    out = tmp_path / "out"
    code, stdout, stderr = _run(capsys, "compile", *args, "-o", out)
    assert code == 2, (stdout, stderr)
    assert stderr.splitlines()[-1] == error, stderr
    assert "Traceback" not in stderr
    assert not out.exists(), "bad input must leave no output folder"
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert not leftovers, "no staging folders left behind"
    return stderr


def test_not_onnx(tmp_path, capsys):
    bogus = tmp_path / "model.onnx"
    bogus.write_text("this is a text file, not a model\n" * 20)
    _bad(capsys, tmp_path, bogus, error=f"error: {bogus} is not a readable ONNX model (DecodeError): the file is not ONNX "
         "or is truncated; re-export it or copy it again.")


def test_truncated_onnx(tmp_path, capsys):
    model = write_mlp(tmp_path / "in")
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])
    _bad(capsys, tmp_path, model, error=f"error: {model} is not a readable ONNX model (DecodeError): the file is not ONNX "
         "or is truncated; re-export it or copy it again.")


def test_missing_external_data(tmp_path, capsys):
    proto = onnx.load(write_mlp(tmp_path / "src"))
    folder = tmp_path / "in"
    folder.mkdir()
    onnx.save(proto, folder / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True, location="m.onnx.data", size_threshold=0)
    (folder / "m.onnx.data").unlink()
    _bad(capsys, tmp_path, folder / "m.onnx", error=f"error: the model's external data file(s) m.onnx.data are missing: "
         f"put them in {folder} next to the .onnx file.")


def test_missing_model_file(tmp_path, capsys):
    _bad(capsys, tmp_path, tmp_path / "nope.onnx", error=f"error: {tmp_path / 'nope.onnx'} does not exist: check the path to the model.")


@pytest.mark.parametrize(
    "arrays, problem",
    [
        ({"y": np.zeros((4, 4), np.float32)},
         "calibration data has input 'y', which is not a model input (the model's inputs are x): rename or drop it."),
        ({"x": np.zeros((4, 4), np.int64)},
         "calibration input 'x' has dtype int64 but the model expects float32: save 'x' as float32 (e.g. array.astype(np.float32))."),
        ({"x": np.zeros((4, 5), np.float32)},
         "calibration input 'x' has size 5 on axis 1 but the model expects 4 [N, 4]: resize or re-export the data to match."),
        ({"x": np.zeros((4, 2, 4), np.float32)},
         "calibration input 'x' has shape [1, 2, 4] (rank 3) but the model expects rank 2 [N, 4]: reshape it (axis 0 is the sample axis)."),
    ],
    ids=["unknown-name", "dtype", "static-dim", "rank"],
)
def test_calibration_that_does_not_fit(tmp_path, capsys, arrays, problem):
    model = write_mlp(tmp_path / "in")
    calib = tmp_path / "in" / "bad.npz"
    np.savez(calib, **arrays)
    _bad(capsys, tmp_path, model, "--calib", calib, error=f"error: {calib} (4 of 4 samples), sample 0: {problem}")


def test_empty_calibration_file(tmp_path, capsys):
    model = write_mlp(tmp_path / "in")
    empty = tmp_path / "in" / "empty.txt"
    empty.write_text("")
    _bad(capsys, tmp_path, model, "--calib", empty,
         error=f"error: calibration file {empty} is empty: write samples into it or pass another file.")


def test_output_is_the_input_model(tmp_path, capsys):
    model = write_mlp(tmp_path / "in")
    before = model.read_bytes()
    resolved = model.resolve()
    code, _, stderr = _run(capsys, "compile", model, "-o", model)
    assert (code, stderr) == (2, f"error: the output folder {resolved} would overwrite the input {resolved}: choose another -o folder.\n")
    code, _, stderr = _run(capsys, "compile", model, "-o", model.parent)
    assert (code, stderr) == (2, f"error: the output folder {resolved.parent} would overwrite the input {resolved}: choose another -o folder.\n")
    assert model.read_bytes() == before


def test_unknown_target(tmp_path, capsys):
    model = write_mlp(tmp_path / "in")
    _bad(capsys, tmp_path, model, "--target", "tpu9000",
         error="error: unknown target 'tpu9000': choose one of cpu, cuda, openvino, qnn, coreml, nnapi, xnnpack.")


def test_recipe_with_unknown_pass(tmp_path, capsys):
    model = write_mlp(tmp_path / "in")
    recipe = tmp_path / "in" / "r.toml"
    recipe.write_text('[[passes]]\nname = "prune-everything"\n')
    known = ", ".join(sorted(registry.available_passes()))
    assert "cleanup" in known.split(", ")
    _bad(capsys, tmp_path, model, "--recipe", recipe,
         error=f"error: unknown pass 'prune-everything' in the recipe: known passes are {known}.")


def test_recipe_with_unknown_option(tmp_path, capsys):
    model = write_mlp(tmp_path / "in")
    recipe = tmp_path / "in" / "r.toml"
    recipe.write_text('[[passes]]\nname = "cleanup"\n[passes.options]\nfold = true\n')
    _bad(capsys, tmp_path, model, "--recipe", recipe,
         error="error: pass 'cleanup' has no option(s) fold: its options are fold_constants, iterations.")


def _refuse_heavy_work(monkeypatch):
    """Make loading the model, calibration data and reference runs fail loudly if anything reaches them."""
    from edgeprune import model_io, pipeline

    def heavy(*args, **kwargs):
        raise AssertionError("heavy work ran before the recipe's options were checked")

    monkeypatch.setattr(model_io, "load_model", heavy)
    monkeypatch.setattr(pipeline, "load_calibration", heavy)
    monkeypatch.setattr(pipeline, "run_batches", heavy)
    monkeypatch.setattr(pipeline, "analyze", heavy)


def test_recipe_options_are_checked_before_any_heavy_work(mlp, tmp_path, capsys, monkeypatch):
    model, calib = mlp
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - cleanup\n  - name: cleanup\n    options: {iterations: 1, sweeps: 3}\n")
    _refuse_heavy_work(monkeypatch)
    _bad(capsys, tmp_path, model, "--calib", calib, "--recipe", recipe,
         error="error: pass 'cleanup' has no option(s) sweeps: its options are fold_constants, iterations.")


def test_bits_recipe_without_a_budget_is_refused_before_any_heavy_work(mlp, tmp_path, capsys, monkeypatch):
    model, calib = mlp
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[passes]]\nname = "bits"\n[passes.options]\nmode = "auto"\n')
    _refuse_heavy_work(monkeypatch)
    _bad(capsys, tmp_path, model, "--calib", calib, "--recipe", recipe,
         error="error: --bits auto needs a budget: pass --size-budget, --avg-bits, --latency-budget or --decode-budget.")


def test_recipe_object_options_are_checked_before_any_heavy_work(mlp, tmp_path, monkeypatch):
    """The Python API takes a Recipe as it is, so compile itself must build the passes first."""
    from edgeprune.errors import BadInputError
    from edgeprune.pipeline import CompileOptions, compile_model
    from edgeprune.recipe import PassSpec, Recipe

    model, calib = mlp
    _refuse_heavy_work(monkeypatch)
    recipe = Recipe([PassSpec("cleanup"), PassSpec("cleanup", {"fold": False})])
    with pytest.raises(BadInputError) as err:
        compile_model(model, tmp_path / "out", CompileOptions(recipe=recipe, calib=calib))
    assert str(err.value) == "pass 'cleanup' has no option(s) fold: its options are fold_constants, iterations."
    assert not (tmp_path / "out").exists()


TOO_FEW_ROWS = ("error: compile needs at least 2 calibration rows, some to collect statistics on and at least one held back "
                "to verify the result, but got 1: pass --calib with 2 or more rows and --max-samples 2 or more.")


def test_one_calibration_row_by_max_samples_is_refused(mlp, tmp_path, capsys, monkeypatch):
    model, calib = mlp
    _refuse_heavy_work(monkeypatch)  # --max-samples is known before anything is loaded
    _bad(capsys, tmp_path, model, "--calib", calib, "--max-samples", "1", error=TOO_FEW_ROWS)


def test_one_calibration_row_in_the_file_is_refused(tmp_path, capsys, monkeypatch):
    from edgeprune import pipeline

    model = write_mlp(tmp_path / "in")
    calib = write_mlp_calib(tmp_path / "in", n=1)
    monkeypatch.setattr(pipeline, "run_batches", lambda *a, **k: pytest.fail("reference outputs computed for one row"))
    _bad(capsys, tmp_path, model, "--calib", calib, error=TOO_FEW_ROWS)


def test_two_calibration_rows_compile(mlp, tmp_path, capsys):
    model, calib = mlp
    code, stdout, stderr = _run(capsys, "compile", model, "-o", tmp_path / "out", "--calib", calib, "--max-samples", "2", "--json")
    assert code == 0, stderr
    rows = json.loads(stdout)["calibration"]
    assert (rows["samples"], rows["statistics_rows"], rows["holdout_rows"]) == (2, 1, 1)


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


@pytest.mark.parametrize("args, error", [
    (["--prune", "1.0"], "error: prune ratio must be in [0, 1), got 1.0: e.g. ratio = 0.2 removes 20% of the prunable parameters."),
    (["--prune", "-0.1"], "error: prune ratio must be in [0, 1), got -0.1: e.g. ratio = 0.2 removes 20% of the prunable parameters."),
    (["--prune", "0.2", "--round-to", "0"], "error: prune round_to must be >= 1 (1 disables rounding), got 0."),
])
def test_prune_flag_bad_values(mlp, tmp_path, capsys, args, error):
    model, calib = mlp
    _bad(capsys, tmp_path, model, "--calib", calib, *args, error=error)


def test_prune_and_recipe_are_exclusive(mlp, tmp_path, capsys):
    model, calib = mlp
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[passes]]\nname = "cleanup"\n')
    _bad(capsys, tmp_path, model, "--calib", calib, "--recipe", recipe, "--prune", "0.2",
         error="Error: give either --recipe or --prune/--bits, not both: put the passes in the recipe.")


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
    # every ratio loses something; nothing written
    assert code == 1 and re.fullmatch(r"budget failed: accuracy budget not met: fidelity drop 0\.\d{4} > --max-drop 0\.0 after \d+ attempt\(s\), "
                                      r"and no pass can back off further; nothing was written\.", stderr.splitlines()[-1]), stderr
    assert not (tmp_path / "out").exists()
    assert len(calls) == 1, "the prune pass's input is the same at every attempt: one statistics run"


def test_rounding_flag_offers_the_searched_grid(mlp, tmp_path, capsys):
    model, calib = mlp
    code, stdout, stderr = _run(capsys, "compile", model, "-o", tmp_path / "out", "--calib", calib, "--bits", "4",
                                "--block-size", "32", "--rounding", "wmse", "--json")
    assert code == 0, stderr
    bits = json.loads(stdout)["passes"][-1]
    assert bits["config"]["mse_rounding"] == ["wmse"]
    assert {r["format"] for r in bits["records"]} == {"nbits4-b32-asym-wmse"}


def test_bits_flags_build_the_recipe(mlp, tmp_path, capsys):
    model, calib = mlp
    code, stdout, stderr = _run(capsys, "compile", model, "-o", tmp_path / "out", "--calib", calib, "--prune", "0.25", "--round-to", "1",
                                "--bits", "4", "--block-size", "32", "--gptq", "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert [p["name"] for p in report["passes"]] == ["cleanup", "prune", "cleanup", "smooth", "bits"]  # smooth: the cpu default
    config = report["passes"][4]["config"]
    assert config["mode"] == "uniform" and config["bits"] == 4 and config["gptq"] is True
    assert {r["format"] for r in report["passes"][4]["records"]} == {"gptq4-b32-asym"}


def test_smooth_flag_runs_before_bits(mlp, tmp_path, capsys):
    model, calib = mlp
    code, stdout, stderr = _run(capsys, "compile", model, "-o", tmp_path / "out", "--calib", calib, "--bits", "8",
                                "--smooth", "0.6", "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert [(p["name"], p["config"].get("alpha")) for p in report["passes"]] == [("cleanup", None), ("smooth", 0.6), ("bits", None)]


@pytest.mark.parametrize("target, smooth, passes", [
    ("cpu", None, ["cleanup", "smooth", "bits"]),
    ("cpu", {"alpha": 0}, ["cleanup", "bits"]),
    ("cuda", None, ["cleanup", "bits"]),
    ("cuda", {"alpha": 0.5}, ["cleanup", "smooth", "bits"]),
])
def test_bits_smooths_first_on_the_cpu_unless_told(target, smooth, passes):
    from edgeprune.recipe import recipe_from_flags

    recipe = recipe_from_flags(bits={"mode": "uniform", "bits": 8}, smooth=smooth, target=target)
    assert [p.name for p in recipe.passes] == passes


ALLOW_SLOWER_ALONE = ("Error: --allow-slower lifts the speed bound a size budget implies: it goes with --bits auto and "
                      "--size-budget or --avg-bits, without --latency-budget.")


@pytest.mark.parametrize("args, error", [
    (["--bits", "auto"], "Error: --bits auto needs a budget: --size-budget, --avg-bits, --latency-budget or --decode-budget."),
    (["--bits", "3"], "Error: --bits takes auto, 8, 4 or 2, got '3'."),
    (["--avg-bits", "4.5"], "Error: --size-budget, --avg-bits, --latency-budget, --decode-budget, --allow-slower, --pack-siblings, --block-offsets, --gptq, --rounding and --smooth go with --bits."),
    (["--gptq"], "Error: --size-budget, --avg-bits, --latency-budget, --decode-budget, --allow-slower, --pack-siblings, --block-offsets, --gptq, --rounding and --smooth go with --bits."),
    (["--rounding", "wmse"], "Error: --size-budget, --avg-bits, --latency-budget, --decode-budget, --allow-slower, --pack-siblings, --block-offsets, --gptq, --rounding and --smooth go with --bits."),
    (["--smooth", "0.7"], "Error: --size-budget, --avg-bits, --latency-budget, --decode-budget, --allow-slower, --pack-siblings, --block-offsets, --gptq, --rounding and --smooth go with --bits."),
    (["--bits", "8", "--smooth", "1"], "error: smooth alpha must be a number in (0, 1), not 1.0: e.g. --smooth 0.7."),
    (["--bits", "auto", "--size-budget", "lots"], "error: size 'lots' is not a size: write e.g. 137MB, 90MiB or a number of bytes."),
    (["--bits", "auto", "--latency-budget", "fast"], "Error: --latency-budget takes milliseconds (150) or a ratio (0.8x), got 'fast'."),
    (["--bits", "auto", "--decode-budget", "soon"], "Error: --decode-budget takes milliseconds (8) or a ratio (0.8x), got 'soon'."),
    (["--decode-budget", "0.3x"], "Error: --size-budget, --avg-bits, --latency-budget, --decode-budget, --allow-slower, --pack-siblings, --block-offsets, --gptq, --rounding and --smooth go with --bits."),
    (["--allow-slower"], "Error: --size-budget, --avg-bits, --latency-budget, --decode-budget, --allow-slower, --pack-siblings, --block-offsets, --gptq, --rounding and --smooth go with --bits."),
    (["--bits", "8", "--allow-slower"], ALLOW_SLOWER_ALONE),
    (["--pack-siblings"], "Error: --size-budget, --avg-bits, --latency-budget, --decode-budget, --allow-slower, --pack-siblings, --block-offsets, --gptq, --rounding and --smooth go with --bits."),
    (["--bits", "4", "--pack-siblings"], "Error: --pack-siblings chooses one format per group of siblings: it goes with --bits auto."),
    (["--bits", "auto", "--latency-budget", "0.8x", "--allow-slower"], ALLOW_SLOWER_ALONE),
    (["--bits", "auto", "--size-budget", "1KB", "--latency-budget", "0.8x", "--allow-slower"], ALLOW_SLOWER_ALONE),
])
def test_bits_flag_mistakes(mlp, tmp_path, capsys, args, error):
    model, calib = mlp
    _bad(capsys, tmp_path, model, "--calib", calib, *args, error=error)


def test_error_sentences_keep_their_bracketed_shapes(tmp_path, capsys):
    """rich would read '[N, 4]' as a markup tag and drop it from the sentence."""
    model = write_mlp(tmp_path)
    np.savez(tmp_path / "bad.npz", x=np.zeros((5, 4, 2), np.float32))
    code, _, err = _run(capsys, "compile", model, "-o", tmp_path / "out", "--calib", tmp_path / "bad.npz")
    assert code == 2
    assert " ".join(err[err.index("error: "):].split()) == (
        f"error: {tmp_path / 'bad.npz'} (5 of 5 samples), sample 0: calibration input 'x' has shape [1, 4, 2] (rank 3) but the "
        "model expects rank 2 [N, 4]: reshape it (axis 0 is the sample axis)."
    )
    assert not (tmp_path / "out").exists()


def test_backoff_restarts_at_the_relaxed_pass(mlp, tmp_path, capsys, noise_pass, monkeypatch):
    """A back-off re-runs only the relaxed pass and those after it: the passes before it see the same model."""
    from edgeprune.passes.cleanup import CleanupPass

    calls = []
    original = CleanupPass.call

    def counting(self, model):
        calls.append(len(list(model.graph)))
        return original(self, model)

    monkeypatch.setattr(CleanupPass, "call", counting)
    model, calib = mlp
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[passes]]\nname = "cleanup"\n[[passes]]\nname = "test-noise"\n[passes.options]\nnoise = 0.5\n')
    code, stdout, stderr = _run(capsys, "compile", model, "-o", tmp_path / "out", "--calib", calib, "--recipe", recipe,
                                "--max-drop", "0.001", "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert len(report["backoff"]) >= 1
    assert len(calls) == 1, "cleanup's input is the same at every attempt: it runs once"
    assert [p["name"] for p in report["passes"]] == ["cleanup", "test-noise"]
    assert report["passes"][0]["summary"]["nodes_before"] == calls[0]
    assert report["verification"]["drop"] <= 0.001
