"""The kernel library: found when built, registered by make_session only for models that use it."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from edgeprune.runtime import kernels, session


def test_library_is_a_loadable_custom_op_library_when_built():
    library = kernels.sparse_attention_library()
    if library is None:
        pytest.skip("the kernel was not built (no C++ compiler at install): the portable op runs")
    so = ort.SessionOptions()
    so.register_custom_ops_library(library)  # raises if RegisterCustomOps fails


def test_too_old_onnxruntime_falls_back_to_the_portable_op(monkeypatch, caplog):
    if kernels.sparse_attention_library() is None:
        pytest.skip("the kernel was not built")
    monkeypatch.setattr(session.onnxruntime, "__version__", "1.12.1")
    assert session.register_kernels(ort.SessionOptions()) is False
    assert "onnxruntime 1.12.1 is too old for the sparse-attention kernel (needs >= 1.13): running the portable op" in caplog.text


def test_missing_library_means_no_registration(monkeypatch):
    monkeypatch.setattr(kernels, "sparse_attention_library", lambda: None)
    assert session.register_kernels(ort.SessionOptions()) is False


# ----------------------------------------------------------------- which models use the kernel's ops

import onnx  # noqa: E402
import onnx_ir as ir  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from edgeprune.errors import UnsupportedModelError  # noqa: E402


def _model(nodes, functions=(), initializers=(), inputs=("x",)) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(name, TensorProto.FLOAT, [2]) for name in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], list(initializers),
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("edgeprune", 1), helper.make_opsetid("other", 1)]
    return helper.make_model(graph, opset_imports=opsets, functions=list(functions), ir_version=10)


def _in_if(node) -> onnx.NodeProto:
    branch = helper.make_graph([node], "branch", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    inner = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)], "inner", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])  # fmt: skip
    return helper.make_node("Loop", ["", "c"], ["y"], body=inner)  # two levels of subgraph


def _local_function(op: str, domain: str) -> onnx.FunctionProto:
    return helper.make_function("local", "Wrap", ["x"], ["y"], [helper.make_node(op, ["x"], ["y"], domain=domain)],
                                [helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)])  # fmt: skip


USES = {
    "graph node": _model([helper.make_node("DynamicSparseAttention", ["x", "x", "x"], ["y"], domain="edgeprune", block=8)]),
    "masked op": _model([helper.make_node("BlockSparseAttentionMasked", ["x"], ["y"], domain="edgeprune")]),
    "nested subgraph": _model([_in_if(helper.make_node("BlockSparseAttention", ["x"], ["y"], domain="edgeprune"))]),
    "function body": _model([helper.make_node("Wrap", ["x"], ["y"], domain="local")],
                            [_local_function("BlockSparseAttention", "edgeprune")]),
}
# Each of these holds a kernel op's name somewhere other than a node of its domain (a byte search found them all).
NOT_USES = {
    "plain": _model([helper.make_node("Relu", ["x"], ["y"])]),
    "node name": _model([helper.make_node("Relu", ["x"], ["y"], name="edgeprune/DynamicSparseAttention")]),
    "other domain": _model([helper.make_node("BlockSparseAttention", ["x"], ["y"], domain="other")]),
    "function in another domain": _model([helper.make_node("Wrap", ["x"], ["y"], domain="local")],
                                         [_local_function("BlockSparseAttention", "other")]),
    "renamed portable op": _model([helper.make_node("DynamicSparseAttentionPortable", ["x"], ["y"], domain="edgeprune")]),
    "weights' bytes": _model([helper.make_node("Relu", ["x"], ["y"])], initializers=[
        helper.make_tensor("w", TensorProto.FLOAT, [1024], (b"DynamicSparseAttention" * 200)[:4096], raw=True)]),
    "input name": _model([helper.make_node("Relu", ["BlockSparseAttention"], ["y"])], inputs=("BlockSparseAttention",)),
}


def _forms(proto: onnx.ModelProto, folder):
    path = folder / "model.onnx"
    onnx.save(proto, path)
    return {"proto": proto, "ir": ir.from_proto(proto), "bytes": proto.SerializeToString(), "path": str(path),
            "source": session.prepare_model(path)}  # fmt: skip


@pytest.mark.parametrize("case", USES)
def test_models_calling_a_kernel_op_are_found_in_every_form(case, tmp_path):
    assert {form: session.uses_kernel_ops(m) for form, m in _forms(USES[case], tmp_path).items()} == dict.fromkeys(
        ("proto", "ir", "bytes", "path", "source"), True)


@pytest.mark.parametrize("case", NOT_USES)
def test_a_kernel_op_name_outside_a_node_of_its_domain_is_not_a_use(case, tmp_path):
    assert {form: session.uses_kernel_ops(m) for form, m in _forms(NOT_USES[case], tmp_path).items()} == dict.fromkeys(
        ("proto", "ir", "bytes", "path", "source"), False)


def test_unreadable_bytes_are_not_a_use(tmp_path):
    data = USES["graph node"].SerializeToString()
    assert session.uses_kernel_ops(data)
    assert not session.uses_kernel_ops(data[: len(data) // 2])  # truncated inside the graph
    assert not session.uses_kernel_ops(b"\xff" * 64)
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert not session.uses_kernel_ops(str(tmp_path / "empty.onnx"))


def test_make_session_asks_for_the_kernel_only_when_the_graph_calls_it(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(session, "register_kernels", lambda so: calls.append(so) or False)
    plain = NOT_USES["weights' bytes"]
    session.make_session(plain)
    session.make_session(str(_forms(plain, tmp_path)["path"]))
    assert calls == []
    with pytest.raises(UnsupportedModelError, match="does not know an op"):  # the spy registered nothing
        session.make_session(USES["graph node"])
    assert len(calls) == 1
