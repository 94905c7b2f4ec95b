"""Task patterns over one expert store, and run-time retrieval, on the tiny Mixtral's loop-form export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from moe_models import EXPERTS, LAYERS

from edgeprune.calibration import CalibrationSet
from edgeprune.errors import BadInputError
from edgeprune.model_io import load_model
from edgeprune.runtime.moe import NB_FLOOR, RetrievalSession, build_bundle, routing_log_likelihood


def _prompts(rng, low, high, n, length=10):
    out = []
    for _ in range(n):
        ids = rng.integers(low, high, (1, length)).astype(np.int64)
        out.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(length, dtype=np.int64)[None]})
    return out


@pytest.fixture(scope="module")
def bundle(mixtral_loop_onnx, tmp_path_factory):
    rng = np.random.default_rng(0)
    # two "tasks" with disjoint vocabularies (ids 0-7 and 56-63): a random-init model routes them apart
    tasks = {"low": CalibrationSet(_prompts(rng, 0, 8, 4), "low"), "high": CalibrationSet(_prompts(rng, 56, 64, 4), "high")}
    out = tmp_path_factory.mktemp("bundle")
    return out, build_bundle(mixtral_loop_onnx, tasks, out, keep=0.5, probe_layers=2)


def _external(path) -> dict[str, tuple[int, int]]:
    model = onnx.load(str(path), load_external_data=False)
    refs = {}
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            refs[t.name] = (int(info["offset"]), int(info["length"]))
    return refs


def test_task_graphs_reference_only_their_experts_in_one_store(bundle, mixtral_loop_onnx):
    out, manifest = bundle
    assert sorted(p.name for p in out.iterdir()) == ["full.onnx", "manifest.json", "probe.onnx", "store.bin", "task_high.onnx", "task_low.onnx"]
    full_refs = _external(out / "full.onnx")
    assert len(full_refs) == len(load_model(mixtral_loop_onnx).graph.initializers)  # every weight lives in the store, once
    for name in ("low", "high"):
        task = manifest["tasks"][name]
        assert [len(k) for k in task["kept"]] != [] and sum(map(len, task["kept"])) == EXPERTS * LAYERS // 2
        refs = _external(out / task["graph"])
        assert set(refs) < set(full_refs) and all(full_refs[n] == r for n, r in refs.items())
        kept_bytes = manifest["graphs"][task["graph"]]["store_bytes_referenced"]
        assert kept_bytes == sum(length for _, length in refs.values()) < manifest["graphs"]["full.onnx"]["store_bytes_referenced"]
    assert manifest["tasks"]["low"]["kept"] != manifest["tasks"]["high"]["kept"]


def test_bundle_graphs_reproduce_the_models_they_stand_for(bundle, mixtral_loop_onnx):
    out, manifest = bundle
    feed = _prompts(np.random.default_rng(9), 0, 64, 1, 7)[0]
    reference = ort.InferenceSession(str(mixtral_loop_onnx)).run(None, feed)[0]
    np.testing.assert_array_equal(ort.InferenceSession(str(out / "full.onnx")).run(None, feed)[0], reference)
    session = RetrievalSession(out)
    task, (logits,) = session.run(feed, task="low")
    assert task == "low" and logits.shape == reference.shape


@pytest.mark.parametrize("method", ["routing-nb", "tcess-l1"])
def test_retrieval_picks_the_task_a_prompt_comes_from(bundle, method):
    out, _ = bundle
    session = RetrievalSession(out, method=method)
    assert session.method == method and session.layers == 2
    rng = np.random.default_rng(1)  # held-out prompts, not the calibration ones
    low = [session.choose(p) for p in _prompts(rng, 0, 8, 10)]
    high = [session.choose(p) for p in _prompts(rng, 56, 64, 10)]
    accuracy = (low.count("low") + high.count("high")) / 20
    assert accuracy >= 0.9, (low, high)
    assert session.last_choice_seconds is not None and session.last_choice_seconds < 1.0


def test_not_a_bundle_is_one_sentence(tmp_path):
    with pytest.raises(BadInputError) as err:
        RetrievalSession(tmp_path)
    assert str(err.value) == f"{tmp_path} is not an MoE retrieval bundle (no manifest.json): build one with compile --moe-tasks."


def test_routing_log_likelihood_is_the_bernoulli_sum():
    selected = np.array([[True, False, True], [False, True, True]])
    frequency = [1.0, 0.5, 0.25]  # 1.0 is clipped to 1 - NB_FLOOR
    f = np.array([1 - NB_FLOOR, 0.5, 0.25])
    expected = np.log(f[0]) + np.log(1 - f[1]) + np.log(f[2]) + np.log(1 - f[0]) + np.log(f[1]) + np.log(f[2])
    assert routing_log_likelihood(selected, frequency) == pytest.approx(expected, rel=1e-12)


def test_padding_tokens_do_not_count(bundle):
    out, _ = bundle
    session = RetrievalSession(out)
    prompt = _prompts(np.random.default_rng(3), 0, 8, 1, 6)[0]
    padded = {k: np.concatenate([v, np.zeros((1, 4), np.int64) + (56 if k == "input_ids" else 0)], axis=1) for k, v in prompt.items()}
    padded["position_ids"] = np.arange(10, dtype=np.int64)[None]
    plain, with_pad = session.scores(prompt), session.scores(padded)
    assert plain.keys() == with_pad.keys() and all(abs(plain[t] - with_pad[t]) < 1e-9 for t in plain)


def test_unknown_retrieval_method_is_one_sentence(bundle):
    out, _ = bundle
    with pytest.raises(BadInputError) as err:
        RetrievalSession(out, method="cosine")
    assert str(err.value) == "unknown retrieval method 'cosine': choose one of tcess-l1, routing-nb."


def test_a_compile_without_tasks_has_no_bundle_to_write(tmp_path):
    from edgeprune.runtime.moe import bundle_from_report

    with pytest.raises(BadInputError) as err:
        bundle_from_report("model.onnx", {"records": [{"kept": [0, 1]}]}, tmp_path / "b")
    assert str(err.value) == "the compile's moe pass ran without tasks, so there are no task patterns to bundle: pass --moe-tasks."
    assert not (tmp_path / "b").exists()


def _store_mappings(store) -> int:
    with open("/proc/self/maps") as maps:
        return sum(line.rstrip().endswith(str(store)) for line in maps)


def test_prepacking_off_keeps_the_outputs_and_maps_the_store(bundle):
    """prepacking=False: the same logits; ORT keeps the task's weights as pages mapped from store.bin instead of packed copies."""
    from edgeprune.runtime.moe import _options

    out, _ = bundle
    feed = _prompts(np.random.default_rng(5), 0, 8, 1)[0]
    store = (out / "store.bin").resolve()
    linux = Path("/proc/self/maps").exists()
    count = (lambda: _store_mappings(store)) if linux else (lambda: 0)  # noqa: E731
    start = count()
    packed = RetrievalSession(out, threads=1)
    task, want = packed.run(feed)
    after_packed = count()
    mapped = RetrievalSession(out, threads=1, prepacking=False)
    got_task, got = mapped.run(feed, task)
    assert got_task == task
    np.testing.assert_allclose(got[0], want[0], atol=1e-5, rtol=0)
    if linux:  # the unpacked weights are served from the mapped store: more of it stays mapped than for the packed session
        assert count() - after_packed > after_packed - start
    assert _options(1, prepacking=False).get_session_config_entry("session.disable_prepacking") == "1"
    with pytest.raises(RuntimeError):  # the default leaves ORT's own setting alone
        _options(1).get_session_config_entry("session.disable_prepacking")
