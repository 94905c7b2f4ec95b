"""Load and save models as onnx-ir, with clear errors for bad files and atomic writes.

Every pass works on ``onnx_ir.Model``; this module is the only place that turns files into
models and back.  Loading lifts ``Constant`` weights to initializers so passes find all
weights in one place; saving keeps opset and IR version and switches to external data when
the model would not fit in a 2 GB protobuf.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass

from edgeprune.errors import BadInputError

logger = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2 * 1024**3 - 1
#: Above this many bytes of weights a model is saved with external data.
EXTERNAL_DATA_THRESHOLD = 1800 * 1024**2


def _read_proto(path: pathlib.Path) -> onnx.ModelProto:
    """Parse the protobuf without touching external data, mapping every failure to one sentence."""
    if not path.exists():
        raise BadInputError(f"{path} does not exist: check the path to the model.")
    if path.is_dir():
        raise BadInputError(f"{path} is a folder: pass the .onnx file inside it.")
    if path.stat().st_size == 0:
        raise BadInputError(f"{path} is empty: re-export the model.")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning, ValueError...
        raise BadInputError(
            f"{path} is not a readable ONNX model ({type(exc).__name__}): the file is not ONNX "
            "or is truncated; re-export it or copy it again."
        ) from exc
    if not proto.graph.node and not proto.graph.output:
        # Random bytes often parse as an empty ModelProto.
        raise BadInputError(
            f"{path} is not an ONNX model (no graph found): the file is not ONNX or is truncated; "
            "re-export it."
        )
    return proto


def _check_external_data(proto: onnx.ModelProto, base: pathlib.Path) -> None:
    missing = set()
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if onnx.external_data_helper.uses_external_data(tensor):
            info = onnx.external_data_helper.ExternalDataInfo(tensor)
            location = base / info.location
            if not location.exists():
                missing.add(info.location)
            elif info.length and location.stat().st_size < info.offset + info.length:
                raise BadInputError(
                    f"external data file {location} is shorter than the model expects: it is "
                    "truncated; copy it again next to the model."
                )
    if missing:
        names = ", ".join(sorted(missing))
        raise BadInputError(
            f"the model's external data file(s) {names} are missing: put them in {base} next to "
            "the .onnx file."
        )


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load ``path`` as an ``ir.Model`` with weights as initializers; raise BadInputError on bad files."""
    path = pathlib.Path(path)
    proto = _read_proto(path)
    _check_external_data(proto, path.parent)
    try:
        model = ir.load(path)
    except Exception as exc:
        raise BadInputError(
            f"{path} could not be read as ONNX ({exc}): re-export the model."
        ) from exc
    LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=16)(model)
    if model_bytes(model) <= EXTERNAL_DATA_THRESHOLD:
        # Weights kept in an external data file are read in: ORT gets a model this size as
        # bytes, where a relative data path cannot resolve, and nothing written later may point
        # back at the input's data file.
        ir.external_data.load_to_model(model)
    return model


def model_bytes(model: ir.Model) -> int:
    """Bytes of all initializers (the weights) in the main graph."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialize for ORT and the checker (in memory; loads external weights)."""
    return ir.serde.serialize_model(model)


def save_model(model: ir.Model, path: str | os.PathLike) -> list[pathlib.Path]:
    """Write ``model`` to ``path`` (external data beside it when large); return the files written."""
    path = pathlib.Path(path)
    if model_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        data_name = path.name + ".data"
        ir.save(model, path, external_data=data_name)
        return [path, path.parent / data_name]
    ir.save(model, path)
    return [path]


def check_output_dir(out: str | os.PathLike, *, force: bool = False, inputs: tuple = ()) -> pathlib.Path:
    """Refuse an output folder that is (or holds) one of ``inputs``, is a file, or is non-empty without ``force``."""
    out = pathlib.Path(out).resolve()
    for item in inputs:
        item = pathlib.Path(item).resolve()
        if out == item or out in item.parents:
            raise BadInputError(
                f"the output folder {out} would overwrite the input {item}: choose another -o folder."
            )
    if out.exists() and not out.is_dir():
        raise BadInputError(f"{out} is a file, not a folder: -o takes a folder; choose another path.")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise BadInputError(f"the output folder {out} is not empty: choose an empty folder or pass --force.")
    return out


@contextmanager
def atomic_output_dir(out: str | os.PathLike, *, force: bool = False, inputs: tuple = ()) -> Iterator[pathlib.Path]:
    """Yield a staging folder whose contents replace ``out`` only if the block succeeds.

    Refuses ``out`` when it is one of ``inputs`` (or holds one), or is a non-empty folder and
    ``force`` is off, so a user's model is never overwritten and a failed compile leaves nothing.
    """
    out = check_output_dir(out, force=force, inputs=inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        backup = out.with_name(f".{out.name}.old")
        shutil.rmtree(backup, ignore_errors=True)
        out.rename(backup)
        staging.rename(out)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        staging.rename(out)


def _attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.value)


def param_count(model: ir.Model) -> int:
    """Number of weights in the main graph's initializers.

    Packed N-bit weights (MatMulNBits, GatherBlockQuantized) count as the weights they hold, not
    as their storage bytes, and their block scales and zero points count as metadata, so a
    quantized model reports the parameters of the model it stands for.
    """
    logical: dict[str, int] = {}
    metadata: set[str] = set()
    for node in model.graph:
        if node.domain != "com.microsoft" or node.op_type not in ("MatMulNBits", "GatherBlockQuantized"):
            continue
        packed = node.inputs[1] if node.op_type == "MatMulNBits" else node.inputs[0]
        if packed is None or packed.const_value is None:
            continue
        if node.op_type == "MatMulNBits":
            logical[packed.name] = _attr_int(node, "K", 0) * _attr_int(node, "N", 0)
        elif packed.const_value.dtype == ir.DataType.UINT8:  # two 4-bit values per byte
            logical[packed.name] = packed.const_value.size * 8 // _attr_int(node, "bits", 4)
        metadata.update(v.name for v in node.inputs[2:] if v is not None)
    return sum(
        logical.get(name, v.const_value.size)
        for name, v in model.graph.initializers.items()
        if v.const_value is not None and name not in metadata
    )


def file_size(path: str | os.PathLike) -> int:
    """Bytes on disk of a model file plus the external data files it references, each counted once.

    The one definition of a model's size (reports, latency results, model cards). A file that
    does not parse counts as itself: whoever loads it next reports the real problem.
    """
    path = pathlib.Path(path)
    total = path.stat().st_size
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - see the docstring
        return total
    locations = {
        onnx.external_data_helper.ExternalDataInfo(tensor).location
        for tensor in onnx.external_data_helper._get_all_tensors(proto)
        if onnx.external_data_helper.uses_external_data(tensor)
    }
    return total + sum((path.parent / loc).stat().st_size for loc in sorted(locations) if (path.parent / loc).exists())


def sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in blocks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
