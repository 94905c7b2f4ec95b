"""compile --moe-keep on the tiny Mixtral's loop-form export, end to end (verify, report)."""

from __future__ import annotations

import json

import numpy as np
from moe_models import EXPERTS, LAYERS, token_feed

from edgeprune.cli import main
from edgeprune.recipe import recipe_from_flags


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
