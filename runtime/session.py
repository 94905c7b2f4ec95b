"""Session factory: turn any model form into an ORT session on a target, with clear errors.

Everything that measures or runs a model goes through :func:`make_session`, so thread
settings, graph optimization and error mapping are the same for latency, profiling,
calibration statistics and validation.  Sessions use ``threads`` intra-op threads, one
inter-op thread and sequential execution, which keeps timings repeatable on edge CPUs.
"""

from __future__ import annotations

import logging
import mmap
import os
import pathlib
import re
import shutil
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime

from edgeprune import model_io
from edgeprune.errors import BadInputError, CalibrationDataError, UnsupportedModelError
from edgeprune.runtime import kernels
from edgeprune.runtime.targets import Target, require_available, resolve_target

logger = logging.getLogger(__name__)

_OPT_LEVELS = {
    "disabled": onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_EXTERNAL_NAME = "model.onnx.data"


@dataclass
class ModelSource:
    """What ORT loads (bytes or a file path) plus the model's on-disk size.

    In-memory models over the 2 GB protobuf limit are written to a temporary folder with
    external data; ``tmpdir`` is then removed when the session using it is garbage collected.
    """

    ort_input: bytes | str
    size_bytes: int | None
    tmpdir: str | None = None
    label: str = "model"


def _memory_label(model: "ir.Model | onnx.ModelProto") -> str:
    name = model.graph.name
    return f"the in-memory model {name!r}" if name else "the in-memory model"


def prepare_model(model: "ir.Model | onnx.ModelProto | str | os.PathLike | ModelSource") -> ModelSource:
    """Serialize ``model`` once for ORT; big in-memory models go through a temporary file."""
    if isinstance(model, ModelSource):
        return model
    if isinstance(model, (str, os.PathLike)):
        path = pathlib.Path(model)
        if not path.is_file():
            raise BadInputError(f"{path} is not a model file: check the path to the .onnx file.")
        return ModelSource(str(path), model_io.file_size(path), label=str(path))
    if isinstance(model, ir.Model):
        if model_io.model_bytes(model) > model_io.EXTERNAL_DATA_THRESHOLD:
            tmpdir = tempfile.mkdtemp(prefix="edgeprune_model_")
            path = pathlib.Path(tmpdir) / "model.onnx"
            model_io.save_model(model, path)
            return ModelSource(str(path), model_io.file_size(path), tmpdir, label=_memory_label(model))
        data = model_io.to_proto(model).SerializeToString()
        return ModelSource(data, len(data), label=_memory_label(model))
    if isinstance(model, onnx.ModelProto):
        if model.ByteSize() > model_io.PROTOBUF_LIMIT:
            tmpdir = tempfile.mkdtemp(prefix="edgeprune_model_")
            path = pathlib.Path(tmpdir) / "model.onnx"
            # Through onnx-ir: onnx.save_model(save_as_external_data=True) would rewrite the
            # caller's proto in place to point at our temporary file.
            ir.save(ir.serde.deserialize_model(model), path, external_data=_EXTERNAL_NAME)
            return ModelSource(str(path), model_io.file_size(path), tmpdir, label=_memory_label(model))
        data = model.SerializeToString()
        return ModelSource(data, len(data), label=_memory_label(model))
    raise BadInputError(
        f"cannot run a {type(model).__name__}: pass an onnx_ir.Model, an onnx.ModelProto or a path "
        "to an .onnx file."
    )


_SOURCE_PREFIX = re.compile(r"^\S+\.(?:h|cc|cpp|c):\d+ .*?\)\s+")
_MAX_REASON = 300


def _ort_reason(exc: Exception) -> tuple[str, str]:
    """Split ORT's '[ONNXRuntimeError] : 10 : INVALID_GRAPH : text' into (code, first line of text)."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    code = type(exc).__name__
    parts = first.split(" : ", 3)
    if first.startswith("[ONNXRuntimeError]") and len(parts) == 4:
        code, first = parts[2].strip(), parts[3].strip()
    first = _SOURCE_PREFIX.sub("", first)  # drop "file.h:46 void ns::Func(args) " from ORT_ENFORCE
    if len(first) > _MAX_REASON:
        first = first[:_MAX_REASON].rstrip() + "..."
    return code, first.rstrip(".")


def load_error(exc: Exception, label: str, target: Target | str = "cpu") -> BadInputError:
    """Map an ORT load failure to one sentence with ORT's reason and a fix (also for ORT's tools that load models)."""
    target = resolve_target(target)
    code, reason = _ort_reason(exc)
    lowered = reason.lower()
    if code == "NO_SUCHFILE":
        return BadInputError(
            f"onnxruntime could not open {label} ({reason}): check the path and that its external "
            "data files sit next to it."
        )
    if code == "INVALID_PROTOBUF":
        return BadInputError(
            f"onnxruntime could not parse {label} ({reason}): the file is not ONNX or is truncated; "
            "re-export it or copy it again."
        )
    if "is not a registered function/op" in reason:
        return UnsupportedModelError(
            f"onnxruntime does not know an op in {label} ({reason}): register the custom-op "
            "library that defines it, or replace the op with standard ONNX ops."
        )
    if code == "NOT_IMPLEMENTED":
        return UnsupportedModelError(
            f"onnxruntime has no kernel on target {target.name} for an op in {label} ({reason}): "
            "convert that op to a dtype or opset the target implements (float32 always works on "
            "cpu), or use an onnxruntime build that implements it."
        )
    if "opset" in lowered or "ir version" in lowered:
        return UnsupportedModelError(
            f"this onnxruntime cannot load {label} at its version ({reason}): re-export with an "
            "older opset / IR version or upgrade onnxruntime."
        )
    return BadInputError(
        f"onnxruntime refused to load {label} ({code}: {reason}): the model is not valid; check it "
        "with onnx.checker.check_model(full_check=True) and re-export it."
    )


def _session_options(threads: int | None, profile: bool, profile_prefix: str | None,
                     optimization_level: str, spinning: bool = False) -> tuple[onnxruntime.SessionOptions, str | None]:
    if optimization_level not in _OPT_LEVELS:
        raise BadInputError(
            f"unknown optimization level {optimization_level!r}: choose one of {', '.join(_OPT_LEVELS)}."
        )
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise BadInputError(f"threads must be a positive integer, got {threads!r}: pass e.g. threads=1.")
    so = onnxruntime.SessionOptions()
    so.graph_optimization_level = _OPT_LEVELS[optimization_level]
    so.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads is not None:
        so.intra_op_num_threads = threads
    # No busy-waiting between parallel sections: edgeprune runs several sessions in one process
    # (side-by-side latency, microbenchmarks), and an idle session's spinning threads steal the
    # cores of the one being timed.  Measured on MiniLM, 2 threads on 2 shared cores: fp32 p50
    # 46 ms spinning vs 31 ms not (int8: 26 vs 14 ms).  ``spinning=True`` (ORT's own default) is for a
    # caller that runs one hot session on cores of its own, e.g. a generation loop (see make_session).
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3  # errors only: EP fallback warnings would flood the user's terminal
    profile_dir = None
    if profile:
        if profile_prefix is None:
            profile_dir = tempfile.mkdtemp(prefix="edgeprune_profile_")
            profile_prefix = os.path.join(profile_dir, "ort_profile")
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so, profile_dir


def make_session(
    model: "ir.Model | onnx.ModelProto | str | os.PathLike | ModelSource",
    target: Target | str = "cpu",
    *,
    threads: int | None = None,
    profile: bool = False,
    profile_prefix: str | None = None,
    optimization_level: str = "all",
    custom_op_libraries: Sequence[str | os.PathLike] = (),
    config: Mapping[str, str] | None = None,
    spinning: bool = False,
) -> onnxruntime.InferenceSession:
    """Create an ORT session for ``model`` on ``target``.

    ``threads=None`` keeps ORT's default intra-op pool (one thread per physical core).
    ``custom_op_libraries`` are registered before loading (edgeprune's own kernel library is
    registered by itself when the model uses its ops); ``config`` adds session config entries
    (e.g. ``session.enable_saved_runtime_optimizations``) after edgeprune's own.
    ``spinning=True`` lets the intra-op threads busy-wait between parallel sections (ORT's and
    onnxruntime-genai's default); edgeprune's sessions do not unless asked, since an idle or
    co-running session's spinning threads take the cores of the one being timed.
    With ``profile=True`` and no ``profile_prefix`` the profile JSON goes to a temporary folder
    that is removed with the session; read it via ``session.end_profiling()`` first.
    Raises TargetUnavailableError when the target's EP is missing and BadInputError (or
    UnsupportedModelError) when ORT refuses the model.
    """
    target = resolve_target(target)
    require_available(target)
    if not isinstance(spinning, bool):
        raise BadInputError(f"spinning must be True or False, got {spinning!r}.")
    so, profile_dir = _session_options(threads, profile, profile_prefix, optimization_level, spinning)
    for library in custom_op_libraries:
        try:
            so.register_custom_ops_library(str(library))
        except Exception as exc:  # pybind raises a bare Fail for a missing or foreign library
            if profile_dir:
                shutil.rmtree(profile_dir, ignore_errors=True)
            raise BadInputError(
                f"onnxruntime could not load the custom-op library {library} ({_ort_reason(exc)[1]}): "
                "check the path and that the library was built for this platform and onnxruntime."
            ) from exc
    for key, value in (config or {}).items():
        so.add_session_config_entry(str(key), str(value))
    source = prepare_model(model)
    if target.provider == "CPUExecutionProvider" and uses_kernel_ops(source):
        register_kernels(so)
    providers: list = [(target.provider, dict(target.provider_options))]
    if target.provider != "CPUExecutionProvider":
        providers.append("CPUExecutionProvider")  # nodes the EP cannot take fall back to CPU
    # Folders this call created; a ModelSource passed in stays owned by its caller.
    owned = [d for d in (profile_dir, None if source is model else source.tmpdir) if d]
    try:
        session = onnxruntime.InferenceSession(source.ort_input, so, providers=providers)
    except Exception as exc:  # pybind raises Fail, InvalidGraph, NotImplemented, InvalidArgument...
        for folder in owned:
            shutil.rmtree(folder, ignore_errors=True)
        raise load_error(exc, source.label, target) from exc
    for folder in owned:
        weakref.finalize(session, shutil.rmtree, folder, ignore_errors=True)
    logger.debug("session for %s on %s (threads=%s, profile=%s, spinning=%s)", source.label, target.name, threads, profile, spinning)
    return session


def uses_kernel_ops(model: "ModelSource | bytes | ir.Model | onnx.ModelProto | str | os.PathLike") -> bool:
    """Whether a node of the graph, a subgraph or a model-local function calls an op of edgeprune's kernel library.

    Reads the serialized model ORT is given (bytes, or the file through mmap) field by field and skips
    every field but the nodes by its length, so the cost is in the number of nodes, not the weights'
    bytes, and nothing is parsed a second time.  Unreadable data answers False (ORT then says why).
    """
    if isinstance(model, (ir.Model, onnx.ModelProto)):
        model = prepare_model(model)
    data = model.ort_input if isinstance(model, ModelSource) else model
    if isinstance(data, bytes):
        return _calls_kernel_ops(data)
    try:
        with open(data, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _calls_kernel_ops(mm)
    except (OSError, ValueError):
        return False


def graph_nodes(path: str | os.PathLike) -> list[tuple[str, str, list[str], list[str]]]:
    """(domain, op type, inputs, outputs) of each node of the model file's main graph, read like
    :func:`uses_kernel_ops` (through mmap, every other field skipped by its length): a caller that
    wants the wiring of a big model does not pay for loading its weights."""
    nodes = []
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for number, a, b in _messages(mm, 0, len(mm)):
            if number != _MODEL_GRAPH:
                continue
            for field, c, d in _messages(mm, a, b):
                if field != _GRAPH_NODE:
                    continue
                node = {_NODE_INPUT: [], _NODE_OUTPUT: [], _NODE_OP_TYPE: [], _NODE_DOMAIN: []}
                for n, e, f in _messages(mm, c, d):
                    if n in node:
                        node[n].append(bytes(mm[e:f]).decode())
                nodes.append(("".join(node[_NODE_DOMAIN]), "".join(node[_NODE_OP_TYPE]), node[_NODE_INPUT], node[_NODE_OUTPUT]))
    return nodes


# Protobuf field numbers (onnx.proto) on the path from the model to its nodes' op types.
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_GRAPH_NODE = 1
_FUNCTION_NODE = 7
_NODE_INPUT, _NODE_OUTPUT, _NODE_OP_TYPE, _NODE_ATTRIBUTE, _NODE_DOMAIN = 1, 2, 4, 5, 7
_ATTRIBUTE_GRAPH, _ATTRIBUTE_GRAPHS = 6, 11


def _varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def _messages(buf, start: int, end: int):
    """(field number, start, end) of each length-delimited field of the message in buf[start:end]; others skipped."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise ValueError("truncated field")
            yield key >> 3, pos, pos + length
            pos += length
        else:
            raise ValueError(f"unsupported wire type {wire}")


def _graph_calls(buf, start: int, end: int, field: int, ops: set[bytes], domain: bytes) -> bool:
    """Whether a node (field ``field`` of this GraphProto/FunctionProto), or one in its subgraphs, is (domain, op in ops)."""
    for number, a, b in _messages(buf, start, end):
        if number != field:
            continue
        op_type, node_domain, graphs = b"", b"", []
        for n, c, d in _messages(buf, a, b):
            if n == _NODE_OP_TYPE:
                op_type = bytes(buf[c:d])
            elif n == _NODE_DOMAIN:
                node_domain = bytes(buf[c:d])
            elif n == _NODE_ATTRIBUTE:
                graphs += [(e, f) for m, e, f in _messages(buf, c, d) if m in (_ATTRIBUTE_GRAPH, _ATTRIBUTE_GRAPHS)]
        if node_domain == domain and op_type in ops:
            return True
        if any(_graph_calls(buf, e, f, _GRAPH_NODE, ops, domain) for e, f in graphs):
            return True
    return False


def _calls_kernel_ops(buf) -> bool:
    ops, domain = {op.encode() for op in kernels.KERNEL_OPS}, kernels.DOMAIN.encode()
    try:
        for number, a, b in _messages(buf, 0, len(buf)):
            if number == _MODEL_GRAPH and _graph_calls(buf, a, b, _GRAPH_NODE, ops, domain):
                return True
            if number == _MODEL_FUNCTIONS and _graph_calls(buf, a, b, _FUNCTION_NODE, ops, domain):
                return True
    except (IndexError, ValueError):
        return False
    return False


def register_kernels(so: onnxruntime.SessionOptions) -> bool:
    """Register the custom-op library when built and this ORT can load it; otherwise the op's function body runs."""
    library = kernels.sparse_attention_library()
    if library is None:
        return False
    version = tuple(int(p) for p in re.findall(r"\d+", onnxruntime.__version__)[:2])
    if version < kernels.MIN_ORT:
        logger.warning(
            "onnxruntime %s is too old for the sparse-attention kernel (needs >= %d.%d): running the portable op",
            onnxruntime.__version__, *kernels.MIN_ORT,
        )
        return False
    so.register_custom_ops_library(library)
    return True


def check_feeds(session: onnxruntime.InferenceSession, feeds: dict[str, np.ndarray]) -> None:
    """Raise CalibrationDataError when feed names do not match the session's inputs."""
    expected = [i.name for i in session.get_inputs()]
    missing = [n for n in expected if n not in feeds]
    unknown = [n for n in feeds if n not in expected]
    if missing or unknown:
        problem = f"missing {', '.join(missing)}" if missing else f"unknown {', '.join(unknown)}"
        raise CalibrationDataError(
            f"the inputs fed to the model do not match it ({problem}): feed exactly {', '.join(expected)}."
        )


def run_error(exc: Exception) -> Exception:
    """Map an ORT run failure: bad feeds are the user's; anything else stays an internal error."""
    code, reason = _ort_reason(exc)
    if code == "INVALID_ARGUMENT":
        return CalibrationDataError(
            f"onnxruntime rejected the inputs ({reason}): give each input the dtype and shape the model declares."
        )
    return exc


def run_outputs(session: onnxruntime.InferenceSession, names: list[str] | None, feeds: dict[str, np.ndarray]) -> list:
    """``session.run(names, feeds)`` with ORT's failures mapped by :func:`run_error`: every run goes through here."""
    try:
        return session.run(names, feeds)
    except Exception as exc:  # noqa: BLE001 - re-raised, mapped when the user's feeds are at fault
        mapped = run_error(exc)
        if mapped is exc:
            raise
        raise mapped from exc


def run(session: onnxruntime.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run once and return every output by name."""
    check_feeds(session, feeds)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, run_outputs(session, names, feeds)))
