"""Pass protocol, registry, recipes, and the cleanup pass's "must not change outputs" contract."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from edgeprune import model_io
from edgeprune.errors import BadInputError
from edgeprune.passes.base import EdgePassResult
from edgeprune.passes.cleanup import CleanupConfig, CleanupPass
from edgeprune.passes.registry import available_passes, get_pass
from edgeprune.recipe import default_recipe, load_recipe

from tiny_models import mlp_proto


def _run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("opset", [11, 13, 17, 21])
def test_cleanup_keeps_outputs_and_shrinks_graph(opset):
    proto = mlp_proto(opset=opset)
    model = ir.from_proto(proto)
    result = CleanupPass()(model)
    assert isinstance(result, EdgePassResult) and result.modified
    assert result.summary["nodes_after"] < result.summary["nodes_before"]
    out = model_io.to_proto(result.model)
    onnx.checker.check_model(out)
    # Constant branch folded to 1.0, then Mul-by-one and Identity removed.
    assert sorted(n.op_type for n in out.graph.node) == ["Add", "MatMul", "MatMul", "Relu"]
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    np.testing.assert_allclose(_run(out, x), _run(proto, x), rtol=1e-6, atol=1e-6)


def test_cleanup_on_clean_graph_reports_no_change():
    model = ir.from_proto(mlp_proto())
    CleanupPass()(model)
    again = CleanupPass()(model)
    assert again.modified is False


def test_cleanup_without_folding_only_removes_dead_code():
    model = ir.from_proto(mlp_proto())
    result = CleanupPass(CleanupConfig(fold_constants=False))(model)
    ops = [n.op_type for n in result.model.graph]
    assert "Identity" not in ops and ops.count("Constant") == 2


def test_registry_lists_cleanup_and_refuses_unknown():
    assert "cleanup" in available_passes()
    assert get_pass("cleanup") is CleanupPass
    with pytest.raises(BadInputError, match="known passes are .*cleanup"):
        get_pass("nope")


def test_from_options_checks_names():
    assert CleanupPass.from_options({"iterations": 1}).config.iterations == 1
    with pytest.raises(BadInputError, match="no option"):
        CleanupPass.from_options({"iteration": 1})


def test_recipes_toml_and_yaml(tmp_path):
    toml = tmp_path / "r.toml"
    toml.write_text('[[passes]]\nname = "cleanup"\n[passes.options]\niterations = 3\n')
    yaml = tmp_path / "r.yaml"
    yaml.write_text("passes:\n  - cleanup\n")
    assert load_recipe(toml).passes[0].options == {"iterations": 3}
    assert load_recipe(yaml).passes[0].name == "cleanup"
    assert default_recipe().passes[0].name == "cleanup"
    bad = tmp_path / "r.json"
    bad.write_text("{}")
    with pytest.raises(BadInputError, match="toml"):
        load_recipe(bad)
    empty = tmp_path / "e.toml"
    empty.write_text("")
    with pytest.raises(BadInputError, match="no 'passes'"):
        load_recipe(empty)
    broken = tmp_path / "b.toml"
    broken.write_text("[[passes]\n")
    with pytest.raises(BadInputError, match="not valid TOML"):
        load_recipe(broken)
