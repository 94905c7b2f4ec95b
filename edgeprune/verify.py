"""Run models on calibration rows and check a candidate against its reference.

compile never writes a model that has not passed ``verify``: onnx.checker, a load in ONNX
Runtime, and output fidelity against the reference on held-back rows.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import re
import tempfile
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from edgeprune import model_io
from edgeprune.errors import VerificationError
from edgeprune.fidelity import OutputFidelity, compare_outputs, separate_cache, worst_drop

logger = logging.getLogger(__name__)


def run_batches(model: ir.Model | onnx.ModelProto | str, batches: list[dict[str, np.ndarray]], *, threads: int | None = None) -> list[dict[str, np.ndarray]]:
    """Outputs of ``model`` on each feed in ``batches`` (ORT CPU, the numerical ground truth)."""
    from edgeprune.runtime.session import make_session, run

    session = make_session(model, "cpu", threads=threads)
    return [run(session, feed) for feed in batches]


@dataclasses.dataclass
class Verification:
    checker_ok: bool
    ort_ok: bool
    fidelity: list[OutputFidelity]
    samples: int
    cache: dict[str, Any] | None = None  # a KV-cache model's present.* outputs, summarized (fidelity.separate_cache)
    checker_note: str | None = None  # why the checker's verdict was not required (verify.check_model)

    @property
    def drop(self) -> float:
        return worst_drop(self.fidelity)

    def to_dict(self) -> dict[str, Any]:
        return {
            "checker_ok": self.checker_ok,
            "ort_ok": self.ort_ok,
            "samples": self.samples,
            "drop": self.drop,
            "outputs": [f.to_dict() for f in self.fidelity],
            "kv_cache": self.cache,
            "checker_note": self.checker_note,
        }


_SET_ASIDE = "edgeprune.checker_skip"  # a domain the checker does not know, so it skips the node


def checker_error(model: ir.Model, proto: onnx.ModelProto | None = None) -> str | None:
    """The first line of onnx.checker's complaint about ``model`` (serialized as ``proto`` when given), or None when it passes."""
    proto = model_io.to_proto(model) if proto is None else proto
    try:
        if proto.ByteSize() <= model_io.PROTOBUF_LIMIT:
            onnx.checker.check_model(proto)
        else:  # the checker reads models over 2 GB only from a path, with external data
            with tempfile.TemporaryDirectory() as tmp:
                model_io.save_model(model, pathlib.Path(tmp) / "model.onnx")
                onnx.checker.check_model(str(pathlib.Path(tmp) / "model.onnx"))
    except onnx.checker.ValidationError as exc:
        return str(exc).splitlines()[0]
    return None


def check_model(model: ir.Model, input_error: str | None = None) -> onnx.ModelProto:
    """onnx.checker on the serialized model; a failure is our bug, not the user's.

    ``input_error`` is the input model's own checker failure: an input that already fails the same
    way (onnxruntime-genai's models use ORT's SimplifiedLayerNormalization in the ONNX domain, which
    the checker does not know) is held to ORT loading and running it instead.
    """
    proto = model_io.to_proto(model)  # serialized once: the checker and ORT both read it
    error = checker_error(model, proto)
    unknown = re.match(r"No Op registered for (\S+) with domain_version", input_error or "")
    if error is not None and error == input_error and unknown:  # check the rest: the input's unknown op set aside
        probe = ir.from_proto(model_io.to_proto(model))
        for node in probe.graph:
            if node.op_type == unknown.group(1) and node.domain in ("", "ai.onnx"):
                node.domain = _SET_ASIDE
        probe.opset_imports[_SET_ASIDE] = 1
        error = checker_error(probe)
    if error is not None:
        raise VerificationError(f"the compiled model fails onnx.checker ({error}); nothing was written. Please report this.")
    return proto


def verify(
    candidate: ir.Model,
    batches: list[dict[str, np.ndarray]],
    reference_outputs: list[dict[str, np.ndarray]],
    *,
    threads: int | None = None,
    input_checker_error: str | None = None,
) -> Verification:
    """Checker + ORT load + fidelity of ``candidate`` against ``reference_outputs`` on ``batches``."""
    proto = check_model(candidate, input_checker_error)
    try:
        outputs = run_batches(proto, batches, threads=threads)
    except Exception as exc:
        raise VerificationError(
            f"ONNX Runtime cannot run the compiled model ({str(exc).splitlines()[0]}); nothing was written. Please report this."
        ) from exc
    fidelity, cache = separate_cache(compare_outputs(reference_outputs, outputs, batches))
    samples = sum(next(iter(b.values())).shape[0] for b in batches) if batches else 0
    return Verification(checker_ok=input_checker_error is None, ort_ok=True, fidelity=fidelity, samples=samples, cache=cache,
                        checker_note=None if input_checker_error is None else f"the input already fails onnx.checker ({input_checker_error})")
