"""Static shapes for EPs that need them (ORT's shape-fixing helpers) and the mobile-usability check.

Fixing uses ``onnxruntime.tools.onnx_model_utils`` (what ``make_dynamic_shape_fixed`` calls);
the usability figures come from ``onnxruntime.tools.mobile_helpers.usability_checker``, read as
numbers (nodes each EP would take, partitions, what forces a CPU fallback) instead of its log.
"""

from __future__ import annotations

import logging
import pathlib
import tempfile

import onnx
from onnxruntime.tools import onnx_model_utils
from onnxruntime.tools.mobile_helpers import usability_checker

from edgeprune.errors import BadInputError

logger = logging.getLogger(__name__)


def parse_fix_shapes(text: str | None) -> dict[str, object]:
    """``batch_size=1,sequence_length=128`` (dim names) or ``pixel_values=1x3x224x224`` (a whole input)."""
    fixes: dict[str, object] = {}
    if not text:
        return fixes
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            dims = [int(v) for v in value.lower().split("x")]
            if any(d < 1 for d in dims):
                raise ValueError
        except ValueError:
            raise BadInputError(
                f"--fix-shapes entry {item!r} is not NAME=N or INPUT=AxBxC with positive integers: "
                "write e.g. --fix-shapes batch_size=1,sequence_length=128."
            ) from None
        fixes[name.strip()] = dims[0] if len(dims) == 1 else dims
    return fixes


def dynamic_dims(proto: onnx.ModelProto) -> list[tuple[str, int, str]]:
    """(input, axis, dim name or '?') of every graph-input dimension without a fixed size."""
    found = []
    initializers = {i.name for i in proto.graph.initializer}
    for value in proto.graph.input:
        if value.name in initializers or not value.type.HasField("tensor_type"):
            continue
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if not (dim.HasField("dim_value") and dim.dim_value > 0):
                found.append((value.name, axis, dim.dim_param or "?"))
    return found


def fix_shapes(proto: onnx.ModelProto, fixes: dict[str, object]) -> onnx.ModelProto:
    """Apply ``fixes`` in place with ORT's helpers; unknown names are refused with the known ones."""
    if not fixes:
        return proto
    inputs = {v.name for v in proto.graph.input}
    params = {d for _, _, d in dynamic_dims(proto) if d != "?"}
    for name, value in fixes.items():
        if isinstance(value, list):
            if name not in inputs:
                raise BadInputError(f"--fix-shapes names input {name!r}, which the model lacks (inputs: {', '.join(sorted(inputs))}): use one of them.")
            try:
                onnx_model_utils.make_input_shape_fixed(proto.graph, name, value)
            except ValueError as exc:
                raise BadInputError(f"--fix-shapes {name}={'x'.join(map(str, value))} does not fit the input ({exc}): give one size per axis.") from exc
        elif name in params:
            onnx_model_utils.make_dim_param_fixed(proto.graph, name, int(value))
        else:
            known = ", ".join(sorted(params)) or "none"
            raise BadInputError(
                f"--fix-shapes names dimension {name!r}, which no model input has (dynamic dimensions: {known}): "
                "use one of those names, or INPUT=AxBxC for a whole input."
            )
    try:
        onnx_model_utils.fix_output_shapes(proto)
    except Exception as exc:  # noqa: BLE001 - shape inference on odd graphs; the fixed inputs are what matters
        logger.warning("output shapes not updated after fixing inputs: %s", exc)
    return proto


def require_static(proto: onnx.ModelProto, ep_name: str) -> None:
    """Refuse a model whose inputs still have dynamic dims when the EP needs static shapes."""
    dims = dynamic_dims(proto)
    if not dims:
        return
    named = sorted({d for _, _, d in dims if d != "?"})
    unnamed = [(i, a) for i, a, d in dims if d == "?"]
    where = ", ".join(f"{i}[{a}]" + ("" if d == "?" else f" ({d})") for i, a, d in dims)
    if named:
        example = ",".join(f"{d}=<size>" for d in named)
        if unnamed:
            example += "," + ",".join(f"{i}=<AxB...>" for i in sorted({i for i, _ in unnamed}))
    else:
        example = ",".join(f"{i}=<AxB...>" for i in sorted({i for i, _ in unnamed}))
    raise BadInputError(
        f"{ep_name} needs static shapes, but these input dimensions are dynamic: {where}: "
        f"pass --fix-shapes {example} with the sizes the app will feed."
    )


def _partition(info) -> dict:
    total = max(info.num_nodes, 1)
    return {
        "nodes": info.num_nodes,
        "supported_nodes": info.num_supported_nodes,
        "supported_share": round(info.num_supported_nodes / total, 4),
        "partitions": info.num_partitions,
        "unsupported_ops": sorted(info.unsupported_ops),
        "nodes_unsupported_for_dynamic_shape": info.nodes_unsupported_due_to_dynamic_input,
        "suitability": info.suitability().name.lower(),
    }


def mobile_usability(model_path: pathlib.Path) -> dict:
    """Which share of the graph NNAPI / CoreML would take (ORT's static check), as the converter would see it.

    The model is first optimized to ORT's basic level, as ``check_onnx_model_mobile_usability``
    does, since conversion applies those optimizations too.
    """
    with tempfile.TemporaryDirectory(prefix="edgeprune_usability_") as tmp:
        basic = pathlib.Path(tmp) / "model.basic.onnx"
        onnx_model_utils.optimize_model(model_path, basic, use_external_initializers=True)
        proto = usability_checker.ModelProtoWithShapeInfo(basic).model_with_shape_info
        checks = {
            "nnapi": usability_checker.check_nnapi_partitions,
            "coreml_mlprogram": lambda m, f: usability_checker.check_coreml_partitions(m, f, "coreml_supported_mlprogram_ops.md"),
            "coreml_neuralnetwork": lambda m, f: usability_checker.check_coreml_partitions(m, f, "coreml_supported_neuralnetwork_ops.md"),
        }
        result: dict = {"checker": "onnxruntime.tools.mobile_helpers.usability_checker (op-type based; EP-specific limits not checked)"}
        for name, check in checks.items():
            result[name] = _partition(check(proto, True))
            if result[name]["nodes_unsupported_for_dynamic_shape"]:  # what fixing the shapes would gain
                result[name]["if_shapes_fixed"] = _partition(check(proto, False))
        return result
