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


def _twin_weights_proto() -> onnx.ModelProto:
    """x @ w_a + x @ w_b where w_a and w_b hold the same numbers: nothing to fold, one duplicate."""
    proto = onnx.parser.parse_model(
        '<ir_version: 10, opset_import: ["" : 21]> g (float[N, 4] x) => (float[N, 4] y) '
        "{ a = MatMul(x, w_a) b = MatMul(x, w_b) y = Add(a, b) }"
    )
    w = np.random.default_rng(3).standard_normal((4, 4)).astype(np.float32)
    proto.graph.initializer.extend([onnx.numpy_helper.from_array(w, "w_a"), onnx.numpy_helper.from_array(w, "w_b")])
    return proto


@pytest.mark.parametrize(
    "fold_constants, matmuls, removed",
    [(False, 2, {}), (True, 1, {"MatMul": 1})],  # the optimizer's CSE then merges the two MatMuls
)
def test_cleanup_removing_a_duplicate_initializer_reports_modified(fold_constants, matmuls, removed):
    proto = _twin_weights_proto()
    model = ir.from_proto(proto)
    result = CleanupPass(CleanupConfig(fold_constants=fold_constants))(model)
    assert result.modified is True
    assert list(model.graph.initializers) == ["w_a"]
    assert [n.inputs[1].name for n in model.graph if n.op_type == "MatMul"] == ["w_a"] * matmuls
    assert result.summary == {"nodes_before": 3, "nodes_after": 1 + matmuls, "removed_by_op": removed}
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_allclose(_run(model_io.to_proto(model), x), _run(proto, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fold_constants", [True, False])
def test_cleanup_on_an_already_clean_model_reports_unmodified(fold_constants):
    model = ir.from_proto(_twin_weights_proto())
    CleanupPass(CleanupConfig(fold_constants=fold_constants))(model)
    before = model_io.to_proto(model).SerializeToString()
    again = CleanupPass(CleanupConfig(fold_constants=fold_constants))(model)
    assert again.modified is False
    assert model_io.to_proto(model).SerializeToString() == before


@pytest.mark.parametrize("build", ["mlp", "bert", "twins"])
def test_cleanup_gives_exactly_what_onnxscripts_optimizer_gives(build):
    """The spelt-out pass list must stay optimize_ir's (guards an onnxscript upgrade)."""
    import onnxscript.optimizer
    from onnx_ir.passes.common import DeduplicateInitializersPass, IdentityEliminationPass, RemoveUnusedNodesPass

    from prune_models import bert_proto

    proto = {"mlp": mlp_proto, "bert": lambda: bert_proto(heads=4, ffn=64), "twins": _twin_weights_proto}[build]()
    expected = ir.from_proto(proto)
    onnxscript.optimizer.optimize_ir(expected, num_iterations=2)
    for step in (IdentityEliminationPass(), DeduplicateInitializersPass(), RemoveUnusedNodesPass()):
        step(expected)
    model = ir.from_proto(proto)
    CleanupPass()(model)
    assert model_io.to_proto(model) == model_io.to_proto(expected)


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
    with pytest.raises(BadInputError) as err:
        load_recipe(bad)
    assert str(err.value) == f"recipe {bad} must be a .toml, .yaml or .yml file."
    empty = tmp_path / "e.toml"
    empty.write_text("")
    with pytest.raises(BadInputError) as err:
        load_recipe(empty)
    assert str(err.value) == f"recipe {empty} has no 'passes' list: add at least one pass, e.g. name = \"cleanup\"."
    broken = tmp_path / "b.toml"
    broken.write_text("[[passes]\n")
    with pytest.raises(BadInputError) as err:
        load_recipe(broken)
    assert str(err.value) == f"recipe {broken} is not valid TOML (Expected ']]' at the end of an array declaration (at line 1, column 9)): fix the file."
