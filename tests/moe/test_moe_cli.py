"""compile --moe-keep and --moe-tasks on the tiny Mixtral's loop-form export, end to end (verify, report, retrieval bundle)."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from moe_models import EXPERTS, LAYERS, prune_torch_experts, token_feed, torch_logits

from edgeprune.analysis import analyze
from edgeprune.calibration import load_calibration
from edgeprune.cli import main
from edgeprune.model_io import load_model
from edgeprune.passes.moe.moe_pass import allocate
from edgeprune.passes.moe.scores import collect_router_stats
from edgeprune.recipe import recipe_from_flags
from edgeprune.runtime.moe import RetrievalSession


def _run(capsys, *args) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_recipe_puts_moe_first():
    recipe = recipe_from_flags(moe={"keep": 0.5}, prune={"ratio": 0.2})
    assert [p.name for p in recipe.passes] == ["cleanup", "moe", "cleanup", "prune", "cleanup"]


def test_compile_moe_keep_half(mixtral_loop_onnx, tmp_path):
    """The pass inside a whole compile (cleanup before and after, verify, report); the API with short latency runs keeps it quick."""
    from edgeprune.pipeline import CompileOptions, compile_model

    feed = token_feed(np.random.default_rng(0), 4, 8)
    np.savez(tmp_path / "calib.npz", **feed)
    recipe = recipe_from_flags(moe={"keep": 0.5, "metric": "tcess"})
    options = CompileOptions(recipe=recipe, calib=tmp_path / "calib.npz", max_drop=5.0, latency_runs=3, profile=False, seq_len=16)
    report = compile_model(mixtral_loop_onnx, tmp_path / "out", options).report  # max_drop: a random-init model's logits move a lot
    (moe,) = [p for p in report["passes"] if p["name"] == "moe"]
    assert (moe["summary"]["experts_before"], moe["summary"]["experts_after"]) == (EXPERTS * LAYERS, EXPERTS * LAYERS // 2)
    assert report["verification"]["ort_ok"] and report["size"]["ratio"] < 0.7
    assert json.loads((tmp_path / "out" / "report.json").read_text())["passes"] == report["passes"]


def test_compile_bad_moe_keep_is_one_sentence_exit_2(mixtral_loop_onnx, tmp_path, capsys):
    code, _, err = _run(capsys, "compile", str(mixtral_loop_onnx), "-o", str(tmp_path / "out"), "--moe-keep", "abc")
    assert code == 2
    assert "--moe-keep 'abc' is not a number: give a fraction such as 0.5 or a count per layer such as 4." in err
    assert not (tmp_path / "out").exists()


# ---- compile --moe-tasks: per-task patterns, their union, and the retrieval bundle


def _task_npz(path, rng, low: int, high: int, rows: int = 6, length: int = 8):
    ids = rng.integers(low, high, (rows, length)).astype(np.int64)
    np.savez(path, input_ids=ids, attention_mask=np.ones_like(ids), position_ids=np.tile(np.arange(length, dtype=np.int64), (rows, 1)))
    return path


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    """Two tasks with disjoint vocabularies (ids 0-7 and 56-63), which the random-init model routes apart, and a mixed --calib."""
    folder = tmp_path_factory.mktemp("moe_tasks")
    rng = np.random.default_rng(0)
    return {
        "low": _task_npz(folder / "low.npz", rng, 0, 8), "high": _task_npz(folder / "high.npz", rng, 56, 64),
        "calib": _task_npz(folder / "calib.npz", rng, 0, 64),
    }  # fmt: skip


def _expected_kept(model_path, npz) -> tuple[list[list[int]], list[list[float]]]:
    """Each task's experts as the pass's parts choose them on the same rows: (kept per layer, routing frequency per layer)."""
    model = load_model(model_path)
    calib = load_calibration(npz, model, max_samples=64, seed=0)
    stats = collect_router_stats(model, analyze(model).moe_layers, calib)
    return [k.tolist() for k in allocate([s.tcess for s in stats], 0.5)], [s.frequency.tolist() for s in stats]


def test_compile_moe_tasks_writes_the_union_model_and_the_retrieval_bundle(mixtral, mixtral_loop_onnx, task_files, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, "compile", str(mixtral_loop_onnx), "-o", str(out), "--moe-keep", "0.5", "--calib", str(task_files["calib"]),
                             "--moe-tasks", f"low={task_files['low']},high={task_files['high']}", "--max-drop", "5")  # fmt: skip
    assert code == 0, err
    bundle = out / "moe_bundle"
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "moe_bundle", "report.html", "report.json", "report.md"]
    assert sorted(p.name for p in bundle.iterdir()) == ["full.onnx", "manifest.json", "probe.onnx", "store.bin", "task_high.onnx", "task_low.onnx"]
    expected = {t: _expected_kept(mixtral_loop_onnx, task_files[t]) for t in ("low", "high")}
    assert expected["low"][0] != expected["high"][0]
    union = [sorted(set(a) | set(b)) for a, b in zip(expected["low"][0], expected["high"][0])]
    report = json.loads((out / "report.json").read_text())
    (moe,) = [p for p in report["passes"] if p["name"] == "moe"]
    assert [r["kept"] for r in moe["records"]] == union  # model.onnx: the union of what the tasks need
    assert [len(k) for k in union] == [r["units_after"] for r in moe["records"]]
    for task, (kept, frequency) in expected.items():
        assert [r["kept_by_task"][task] for r in moe["records"]] == kept
        assert sum(map(len, kept)) == EXPERTS * LAYERS // 2
        assert moe["summary"]["tasks"][task] == {"experts": EXPERTS * LAYERS // 2, "kept_per_layer": [len(k) for k in kept], "calibration_tokens": 48}
        assert [r["routing_by_task"][task] for r in moe["records"]] == [[round(f, 4) for f in layer] for layer in frequency]
    analyzed = analyze(load_model(out / "model.onnx")).moe_layers
    assert [m.num_experts for m in analyzed] == [len(k) for k in union]
    # the bundle: each task graph is the torch model with that task's experts removed
    manifest = json.loads((bundle / "manifest.json").read_text())
    feed = token_feed(np.random.default_rng(5), 2, 9)
    for task, (kept, _) in expected.items():
        assert manifest["tasks"][task]["kept"] == kept
        got = ort.InferenceSession(str(bundle / f"task_{task}.onnx")).run(None, feed)[0]
        np.testing.assert_allclose(got, torch_logits(prune_torch_experts(mixtral, kept), feed), rtol=0, atol=1e-4)
    session = RetrievalSession(bundle)
    assert [session.choose({k: v[i : i + 1] for k, v in np.load(task_files[t]).items()}) for t in ("low", "high") for i in range(6)] == ["low"] * 6 + ["high"] * 6
    assert "moe: 2 tasks (low 8/16, high 8/16 experts, tcess); the model keeps their union" in stdout
    assert f"MoE retrieval bundle: {bundle}" in stdout
    assert "kept_by_task" in (out / "report.md").read_text() and "routing_by_task" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    ("tasks", "extra", "sentence"),
    [
        ("low", (), "--moe-tasks takes NAME=FILE pairs separated by commas (e.g. code=code.npz,chat=chat.npz), got 'low'."),
        ("low={low},low={high}", (), "--moe-tasks names task 'low' twice: give each task once."),
        ("low={low},high=nowhere.npz", (), "--moe-tasks: the calibration data of task 'high', nowhere.npz, does not exist."),
        ("low={low}", ("--no-keep",), "--moe-tasks goes with --moe-keep: give the share of experts each task keeps, e.g. --moe-keep 0.5."),
        ("low={low}", ("--bits", "8"), "--moe-tasks builds its bundle from the input's weights, so it does not combine with --prune, --bits or --sparse-attention: compile those separately."),
        ("lo.w={low}", (), "moe task name 'lo.w' must be letters, digits, '_' or '-' (it names a file in the bundle)."),
        ("low={low},high={bad}", (), "moe task 'high': calibration file {bad} holds no arrays: save one array per model input."),
    ],
)  # fmt: skip
def test_bad_moe_tasks_is_one_sentence_exit_2_and_nothing_written(mixtral_loop_onnx, task_files, tmp_path, capsys, tasks, extra, sentence):
    bad = tmp_path / "bad.npz"
    np.savez(bad)
    paths = {"low": task_files["low"], "high": task_files["high"], "bad": bad}
    keep = [] if "--no-keep" in extra else ["--moe-keep", "0.5"]
    args = ["compile", str(mixtral_loop_onnx), "-o", str(tmp_path / "out"), *keep, "--moe-tasks", tasks.format(**paths),
            "--calib", str(task_files["calib"]), *[a for a in extra if a != "--no-keep"]]  # fmt: skip
    code, _, err = _run(capsys, *args)
    assert code == 2
    assert sentence.format(**paths) in " ".join(err.split())
    assert not (tmp_path / "out").exists()
