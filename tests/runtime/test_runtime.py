"""Tests for edgeprune.runtime: targets, sessions, latency and per-op profiling on tiny models."""

from __future__ import annotations

import gc
import os
import pathlib
import shutil

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import onnxruntime
import pytest

from edgeprune.errors import BadInputError, CalibrationDataError, TargetUnavailableError, UnsupportedModelError
from edgeprune.runtime import latency, profiler, session, targets

RNG = np.random.default_rng(0)
W1 = RNG.standard_normal((16, 32)).astype(np.float32)
W2 = RNG.standard_normal((32, 8)).astype(np.float32)


def _mlp(with_relu: bool = True) -> onnx.ModelProto:
    """x @ W1 -> Relu -> @ W2 (Relu optional), weights as initializers."""
    act = "a = Relu(h)" if with_relu else "a = Identity(h)"
    model = onnx.parser.parse_model(f"""
        <ir_version: 10, opset_import: ["" : 21]>
        mlp (float[N, 16] x) => (float[N, 8] y) {{
            h = MatMul(x, w1)
            {act}
            y = MatMul(a, w2)
        }}""")
    model.graph.initializer.extend([onnx.numpy_helper.from_array(W1, "w1"), onnx.numpy_helper.from_array(W2, "w2")])
    onnx.checker.check_model(model)
    return model


def _reference(x: np.ndarray, with_relu: bool = True) -> np.ndarray:
    h = x @ W1
    return (np.maximum(h, 0) if with_relu else h) @ W2


@pytest.fixture
def feeds() -> dict[str, np.ndarray]:
    return {"x": RNG.standard_normal((4, 16)).astype(np.float32)}


# --- targets -------------------------------------------------------------------------------

def test_targets_declared_and_cpu_available():
    assert set(targets.TARGETS) == {"cpu", "cuda", "openvino", "qnn", "coreml", "nnapi", "xnnpack"}
    cpu = targets.get_target("CPU")
    assert cpu.provider == "CPUExecutionProvider" and targets.is_available(cpu)
    assert targets.get_target("qnn").static_shapes and not cpu.static_shapes
    d = targets.get_target("qnn").to_dict()
    assert d["fast_formats"] == ["qdq-int8", "qdq-int16"] and d["provider_options"] == {"backend_type": "htp"}
    hash(targets.get_target("qnn"))  # frozen targets stay usable as dict keys


def test_unknown_target_names_known_ones():
    with pytest.raises(BadInputError) as err:
        targets.get_target("tpu")
    msg = str(err.value)
    assert "tpu" in msg and all(name in msg for name in targets.TARGETS)


def _missing_target() -> targets.Target | None:
    available = set(onnxruntime.get_available_providers())
    return next((t for t in targets.TARGETS.values() if t.provider not in available), None)


def test_unavailable_target_raises_target_unavailable():
    missing = _missing_target()
    if missing is None:
        pytest.skip("every declared EP is installed here")
    assert not targets.is_available(missing)
    with pytest.raises(TargetUnavailableError) as err:
        session.make_session(_mlp(), missing.name)
    assert missing.provider in str(err.value) and "not measured here" in str(err.value)


# --- session -------------------------------------------------------------------------------

def test_session_from_proto_ir_and_path_match_numpy(tmp_path, feeds):
    proto = _mlp()
    path = tmp_path / "mlp.onnx"
    onnx.save(proto, path)
    expected = _reference(feeds["x"])
    for model in (proto, ir.serde.deserialize_model(proto), str(path), path):
        sess = session.make_session(model, "cpu", threads=1)
        out = session.run(sess, feeds)
        assert list(out) == ["y"]
        np.testing.assert_allclose(out["y"], expected, rtol=1e-4, atol=1e-4)


def test_session_options_applied():
    sess = session.make_session(_mlp(), threads=2, optimization_level="disabled")
    opts = sess.get_session_options()
    assert opts.intra_op_num_threads == 2 and opts.inter_op_num_threads == 1
    assert opts.execution_mode == onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    assert opts.graph_optimization_level == onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    with pytest.raises(BadInputError):
        session.make_session(_mlp(), optimization_level="max")
    with pytest.raises(BadInputError):
        session.make_session(_mlp(), threads=0)


def test_model_with_external_data_is_loaded_from_its_folder(tmp_path, feeds):
    path = tmp_path / "ext.onnx"
    onnx.save_model(_mlp(), path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=0)
    source = session.prepare_model(path)
    assert source.size_bytes == path.stat().st_size + (tmp_path / "ext.onnx.data").stat().st_size
    out = session.run(session.make_session(path), feeds)
    np.testing.assert_allclose(out["y"], _reference(feeds["x"]), rtol=1e-4, atol=1e-4)


def test_unregistered_op_is_bad_input():
    model = onnx.parser.parse_model("""
        <ir_version: 10, opset_import: ["" : 21, "acme.ops" : 1]>
        g (float[N, 4] x) => (float[N, 4] y) { y = acme.ops.Frobnicate(x) }""")
    with pytest.raises(UnsupportedModelError) as err:
        session.make_session(model)
    msg = str(err.value)
    assert "Frobnicate" in msg and "\n" not in msg


def test_invalid_graph_is_bad_input():
    model = onnx.parser.parse_model("""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[N, 4] x) => (float[N, 4] y) { y = Relu(x, x) }""")
    with pytest.raises(BadInputError) as err:
        session.make_session(model)
    assert "INVALID_GRAPH" in str(err.value) and "re-export" in str(err.value)


def test_op_without_kernel_is_unsupported():
    model = onnx.parser.parse_model("""
        <ir_version: 10, opset_import: ["" : 21]>
        g (bfloat16[N, 4] x) => (bfloat16[N, 4] y) { y = Relu(x) }""")
    with pytest.raises(UnsupportedModelError, match="no kernel.*Relu"):
        session.make_session(model)


def test_not_onnx_file_is_bad_input(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"certainly not a protobuf")
    with pytest.raises(BadInputError, match="not ONNX or is truncated"):
        session.make_session(path)


def test_models_over_protobuf_limit_go_through_external_data(monkeypatch, tmp_path, feeds):
    """Lower the 2 GB limits so a tiny model takes the big-model path: temp file + external data."""
    from edgeprune import model_io

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 0)
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 0)
    expected = _reference(feeds["x"])
    proto = _mlp()
    for model in (proto, proto, ir.serde.deserialize_model(_mlp())):  # proto twice: it is not mutated
        source = session.prepare_model(model)
        folder = pathlib.Path(source.tmpdir)
        assert isinstance(source.ort_input, str) and len(list(folder.iterdir())) == 2
        assert source.size_bytes >= W1.nbytes + W2.nbytes
        shutil.rmtree(folder)
        sess = session.make_session(model)
        np.testing.assert_allclose(session.run(sess, feeds)["y"], expected, rtol=1e-4, atol=1e-4)
        del sess
        gc.collect()
        res = latency.measure_latency(model, feeds, warmup=0, runs=1, threads=1)
        assert res.file_size_bytes >= W1.nbytes + W2.nbytes
        assert not list(tmp_path.iterdir())  # temporary model folders are removed with their sessions


def test_missing_path_and_bad_feeds(tmp_path, feeds):
    with pytest.raises(BadInputError):
        session.make_session(tmp_path / "nope.onnx")
    sess = session.make_session(_mlp())
    with pytest.raises(CalibrationDataError) as err:
        session.run(sess, {"z": feeds["x"]})
    assert str(err.value) == "the inputs fed to the model do not match it (missing x): feed exactly x."
    with pytest.raises(CalibrationDataError) as err:
        session.run(sess, {"x": feeds["x"].astype(np.float64)})
    assert str(err.value) == ("onnxruntime rejected the inputs (Unexpected input data type. Actual: (tensor(double)) , "
                              "expected: (tensor(float))): give each input the dtype and shape the model declares.")


def test_statistics_runs_map_bad_feeds_like_every_other_run():
    """StatsCollector runs through session.run_outputs, so a wrong dtype is one sentence, not ORT's exception."""
    from edgeprune.calibration import CalibrationSet
    from edgeprune.stats import StatsCollector

    collector = StatsCollector(ir.from_proto(_mlp()))
    collector.request("x")
    collector.request("y")
    rows = CalibrationSet([{"x": np.zeros((1, 4), np.float64)}], "test")
    with pytest.raises(CalibrationDataError) as err:
        collector.collect(rows)
    assert str(err.value) == ("onnxruntime rejected the inputs (Unexpected input data type. Actual: (tensor(double)) , "
                              "expected: (tensor(float))): give each input the dtype and shape the model declares.")


def test_one_file_size_helper_counts_external_data_and_tolerates_unparsable_files(tmp_path):
    from edgeprune import model_io

    path = tmp_path / "ext.onnx"
    onnx.save_model(_mlp(), path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=0)
    expected = path.stat().st_size + (tmp_path / "ext.onnx.data").stat().st_size
    assert model_io.file_size(path) == session.prepare_model(path).size_bytes == expected
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01garbage" * 10)
    assert model_io.file_size(garbage) == session.prepare_model(garbage).size_bytes == 90


def test_profile_prefix_writes_json(tmp_path, feeds):
    sess = session.make_session(_mlp(), profile=True, profile_prefix=str(tmp_path / "p"))
    session.run(sess, feeds)
    written = pathlib.Path(sess.end_profiling())
    assert written.parent == tmp_path and written.name.startswith("p") and written.exists()


# --- latency -------------------------------------------------------------------------------

def _check_result(res: latency.LatencyResult, runs: int, warmup: int, size: int) -> None:
    assert res.runs == runs and res.warmup == warmup
    assert 0 < res.min_ms <= res.p50_ms <= res.p90_ms <= res.p99_ms
    assert res.min_ms <= res.mean_ms
    assert res.throughput_per_s == pytest.approx(4 * 1000.0 / res.mean_ms)
    assert res.file_size_bytes == size
    if os.path.exists("/proc/self/clear_refs"):
        assert res.peak_memory_mb is not None and res.peak_memory_mb >= 0
    d = res.to_dict()
    assert set(d) >= {"p50_ms", "p90_ms", "p99_ms", "throughput_per_s", "peak_memory_mb", "file_size_bytes"}


def test_measure_latency_fields(feeds):
    proto = _mlp()
    res = latency.measure_latency(proto, feeds, warmup=2, runs=15, threads=1)
    _check_result(res, 15, 2, proto.ByteSize())
    assert res.threads == 1
    with pytest.raises(BadInputError):
        latency.measure_latency(proto, feeds, runs=0)


def test_measure_latency_file_size_from_path(tmp_path, feeds):
    path = tmp_path / "m.onnx"
    onnx.save(_mlp(), path)
    res = latency.measure_latency(path, feeds, warmup=1, runs=3, threads=1)
    assert res.file_size_bytes == path.stat().st_size


def test_measure_side_by_side_returns_every_model(feeds):
    models = {"base": _mlp(), "no_relu": ir.serde.deserialize_model(_mlp(with_relu=False))}
    results = latency.measure_side_by_side(models, feeds, warmup=1, runs=10, threads=1)
    assert list(results) == ["base", "no_relu"]
    _check_result(results["base"], 10, 1, models["base"].ByteSize())
    assert results["no_relu"].file_size_bytes == len(session.prepare_model(models["no_relu"]).ort_input)
    # Per-model feeds are accepted too.
    per_model = {"base": feeds, "no_relu": {"x": feeds["x"][:2]}}
    results = latency.measure_side_by_side(models, per_model, warmup=0, runs=2, threads=1)
    assert results["no_relu"].throughput_per_s == pytest.approx(2 * 1000.0 / results["no_relu"].mean_ms)


def test_side_by_side_results_keep_their_rounds_and_pair_them(feeds):
    results = latency.measure_side_by_side({"a": _mlp(), "b": _mlp(with_relu=False)}, feeds, warmup=0, runs=4, threads=1)
    a, b = results["a"], results["b"]
    assert len(a.times_ms) == len(b.times_ms) == 4 and min(a.times_ms) == a.min_ms
    assert "times_ms" not in a.to_dict()
    assert latency.round_ratios(a, b) == [x / y for x, y in zip(a.times_ms, b.times_ms)]


def test_paired_ratio_cancels_load_drift():
    """Load doubles halfway through: the candidate ran 0.8x the reference in all rounds but one, while the ratio of
    the medians (each taken over a fast and a slow half) says 1.07x."""
    def result(times):
        return latency._result(times, 1, 0, 1, None, None)

    # In round 2 the load doubled between the reference's run and the candidate's: that one pair is off.
    ref, cand = [10.0, 10.0, 10.0, 20.0, 20.0, 20.0], [8.0, 8.0, 16.0, 16.0, 16.0, 16.0]
    assert result(cand).p50_ms / result(ref).p50_ms == pytest.approx(16.0 / 15.0)
    assert latency.round_ratios(result(cand), result(ref)) == [0.8, 0.8, 1.6, 0.8, 0.8, 0.8]
    assert latency.paired_ratio(result(cand), result(ref)) == 0.8
    # Results without rounds (or with different counts) give the ratio of medians.
    bare = latency.LatencyResult(8.0, 8.0, 8.0, 8.0, 8.0, 125.0, 3, 0, 1, None, None)
    assert latency.round_ratios(bare, result(ref)) == [0.8 / 1.5]


# --- profiler ------------------------------------------------------------------------------

def test_profile_shares_and_op_types(feeds):
    prof = profiler.profile_model(_mlp(), feeds, runs=6, warmup=2, threads=1)
    assert prof.runs == 6 and prof.total_ms > 0
    ops = {t.op_type: t for t in prof.by_op_type}
    assert "MatMul" in ops and ops["MatMul"].calls == 2 and ops["Relu"].calls == 1
    assert sum(t.share for t in prof.by_op_type) == pytest.approx(1.0)
    assert sum(n.share for n in prof.by_node) == pytest.approx(1.0)
    assert sum(n.ms for n in prof.by_node) == pytest.approx(prof.total_ms)
    assert len(prof.by_node) == 3
    assert prof.to_dict()["by_op_type"][0]["op_type"] in ops


def test_profile_drops_warmup_runs_by_timestamp():
    def run_events(ts, durs):
        evs = [{"cat": "Session", "name": "model_run", "ts": ts, "dur": 100}]
        for i, d in enumerate(durs):
            evs.append({"cat": "Node", "name": f"n{i}_kernel_time", "ts": ts + 1 + i, "dur": d,
                        "args": {"op_name": "MatMul" if i == 0 else "Relu"}})
            evs.append({"cat": "Node", "name": f"n{i}_fence_before", "ts": ts + 1 + i, "dur": 999})
        return evs

    events = run_events(0, [5000, 5000]) + run_events(1000, [30, 10]) + run_events(2000, [50, 10])
    prof = profiler.parse_profile(events, warmup=1)
    assert prof.runs == 2
    ops = {t.op_type: t for t in prof.by_op_type}
    assert ops["MatMul"].total_ms == pytest.approx(0.040) and ops["Relu"].total_ms == pytest.approx(0.010)
    assert ops["MatMul"].share == pytest.approx(0.8) and prof.total_ms == pytest.approx(0.050)


def test_profile_json_is_deleted(tmp_path, feeds, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    profiler.profile_model(_mlp(), feeds, runs=2, warmup=1, threads=1)
    assert not list(tmp_path.rglob("*.json"))


def test_compare_profiles_finds_removed_op(feeds):
    base = profiler.profile_model(_mlp(), feeds, runs=4, warmup=1, threads=1)
    pruned = profiler.profile_model(_mlp(with_relu=False), feeds, runs=4, warmup=1, threads=1)
    rows = profiler.compare_profiles(base, pruned)
    relu = next(r for r in rows if r["op_type"] == "Relu")
    assert relu["b_ms"] == 0 and relu["delta_ms"] < 0 and relu["ratio"] == 0 and relu["b_calls"] == 0
    deltas = [abs(r["delta_ms"]) for r in rows]
    assert deltas == sorted(deltas, reverse=True)


def test_graph_nodes_reads_the_wiring_without_the_weights(tmp_path):
    """The node list read field by field through mmap equals onnx's parse of the same file."""
    import onnx

    from edgeprune.runtime.session import graph_nodes

    proto = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
        g (float[2, 4] x) => (float[2, 4] y, float[2, 4] z) {
            h = MatMul(x, W)
            y = com.microsoft.FusedGelu(h)
            z = Add(h, y)
        }
        """)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((4, 4), np.float32), "W"))
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    assert graph_nodes(path) == [("", "MatMul", ["x", "W"], ["h"]), ("com.microsoft", "FusedGelu", ["h"], ["y"]),
                                 ("", "Add", ["h", "y"], ["z"])]
