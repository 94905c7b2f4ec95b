"""Streamed per-channel activation statistics from one ORT session over the calibration set.

Requested tensors become extra graph outputs of a copy of the model; each calibration batch is
run once and every requested tensor is folded into running per-channel statistics along its
``axis`` (all other axes count as observations): count, mean, variance (population, ddof=0,
merged across chunks with Chan's parallel algorithm in float64), sum of squares, absmax and an
optional Gram matrix X^T X.  Memory stays bounded: observations are folded in chunks, and nothing
per-sample is kept.

Padding: when the batch feeds an ``attention_mask`` of shape [batch, seq] and a tensor's leading
dims are that same [batch, seq] (and ``axis`` is neither of them), positions where the mask is 0
are left out, so right-padded text does not bias the statistics.  A tensor whose declared (or
inferred) axis 1 is a fixed number is never masked, so e.g. a [batch, 32, seq] rotary table is
not mistaken for token rows when seq happens to be 32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx_ir.passes.common import ShapeInferencePass

from edgeprune.calibration import CalibrationSet, static_dim
from edgeprune.errors import BadInputError
from edgeprune.model_io import to_proto
from edgeprune.runtime.session import make_session, run_outputs

logger = logging.getLogger(__name__)

#: Observations are folded in chunks of at most this many float64 elements (~64 MB).
_CHUNK_ELEMENTS = 8 * 1024 * 1024
#: A Gram matrix larger than this many bytes is refused (C x C float64).
_GRAM_LIMIT_BYTES = 2 * 1024**3


@dataclass
class TensorStats:
    """Per-channel statistics of one tensor (arrays are float64, one entry per channel)."""

    name: str
    axis: int
    count: int
    mean: np.ndarray
    var: np.ndarray
    sq_norm: np.ndarray
    absmax: np.ndarray
    gram: np.ndarray | None = None

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])

    def to_dict(self) -> dict:
        """JSON-able summary; the Gram matrix is reported by shape only."""
        return {
            "name": self.name,
            "axis": self.axis,
            "count": self.count,
            "channels": self.channels,
            "mean": self.mean.tolist(),
            "var": self.var.tolist(),
            "sq_norm": self.sq_norm.tolist(),
            "absmax": self.absmax.tolist(),
            "gram_shape": None if self.gram is None else list(self.gram.shape),
        }


class _Accumulator:
    """Running statistics for one tensor; ``add`` takes a (observations, channels) float64 block."""

    def __init__(self, name: str, axis: int, gram: bool):
        self.name, self.axis, self.want_gram = name, axis, gram
        self.count = 0
        self.mean = self.m2 = self.sq_norm = self.absmax = self.gram = None

    def add(self, block: np.ndarray) -> None:
        n = block.shape[0]
        if n == 0:
            return
        if self.mean is None:
            self._start(block.shape[1])
        elif block.shape[1] != self.mean.shape[0]:
            raise BadInputError(
                f"tensor {self.name!r} has {block.shape[1]} channels on axis {self.axis} in one batch and "
                f"{self.mean.shape[0]} in another: request an axis whose size does not change with the input."
            )
        mean_b = block.mean(axis=0)
        m2_b = ((block - mean_b) ** 2).sum(axis=0)
        total = self.count + n
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2_b + delta**2 * (self.count * n / total)
        self.count = total
        self.sq_norm += np.einsum("ij,ij->j", block, block)
        np.maximum(self.absmax, np.abs(block).max(axis=0), out=self.absmax)
        if self.gram is not None:
            self.gram += block.T @ block

    def _start(self, channels: int) -> None:
        if self.want_gram and channels * channels * 8 > _GRAM_LIMIT_BYTES:
            raise BadInputError(
                f"a Gram matrix of tensor {self.name!r} would be {channels}x{channels} "
                f"({channels * channels * 8 / 1024**3:.1f} GiB): request it without gram=True."
            )
        zeros = np.zeros(channels, dtype=np.float64)
        self.mean, self.m2, self.sq_norm, self.absmax = zeros.copy(), zeros.copy(), zeros.copy(), zeros.copy()
        if self.want_gram:
            self.gram = np.zeros((channels, channels), dtype=np.float64)

    def result(self) -> TensorStats:
        if self.mean is None:
            raise BadInputError(
                f"no observations of tensor {self.name!r} were collected: the calibration set is empty "
                "or every position was padding; pass calibration data with samples."
            )
        return TensorStats(
            self.name, self.axis, self.count, self.mean, self.m2 / self.count, self.sq_norm, self.absmax, self.gram
        )


def _observations(array: np.ndarray, axis: int, mask: np.ndarray | None) -> np.ndarray:
    """(observations, channels) view of ``array``, padded [batch, seq] positions dropped."""
    if mask is not None and axis >= 2 and array.ndim >= 3 and array.shape[:2] == mask.shape:
        array = array[mask.astype(bool)]  # (valid positions, *rest); axis shifts by one
        axis -= 1
    moved = np.moveaxis(array, axis, -1)
    return moved.reshape(-1, moved.shape[-1])


class StatsCollector:
    """Collect per-channel statistics of named tensors in one ORT session (one run per batch)."""

    def __init__(self, model: ir.Model, target="cpu", threads: int | None = None):
        self.model = model
        self.target = target
        self.threads = threads
        self._requests: dict[str, tuple[int, bool]] = {}
        self._session: ort.InferenceSession | None = None
        self._session_key: tuple | None = None
        self._fixed_dim1: set[str] = set()
        self._graph_inputs = {v.name for v in model.graph.inputs}
        self._produced = {v.name: v for node in model.graph for v in node.outputs if v.name}

    def request(self, tensor: str, *, axis: int = -1, gram: bool = False) -> None:
        """Ask for statistics of ``tensor`` along ``axis``; repeated requests merge (gram is or-ed)."""
        if tensor not in self._produced and tensor not in self._graph_inputs:
            raise BadInputError(self._unknown_message(tensor))
        if tensor in self._requests:
            old_axis, old_gram = self._requests[tensor]
            if old_axis != axis:
                raise ValueError(f"tensor {tensor!r} was already requested along axis {old_axis}, not {axis}")
            gram = gram or old_gram
        self._requests[tensor] = (axis, gram)

    def _unknown_message(self, tensor: str) -> str:
        if tensor in self.model.graph.initializers:
            return f"{tensor!r} is a weight (initializer), not an activation: read its values from the model instead."
        for node in ir.traversal.RecursiveGraphIterator(self.model.graph):
            if any(v.name == tensor for v in node.outputs):
                return (
                    f"tensor {tensor!r} lives inside a subgraph (If/Loop/Scan body), which ORT cannot expose: "
                    "request a tensor of the main graph."
                )
        return f"tensor {tensor!r} does not exist in the model's main graph: check the name (e.g. with `edgeprune inspect`)."

    def collect(
        self,
        calib: CalibrationSet,
        *,
        batch_size: int = 8,
        progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, TensorStats]:
        """Run every batch of ``calib`` once and return statistics for all requested tensors.

        ``progress(done_batches, total_batches)`` is called after each batch when given.
        """
        if not self._requests:
            return {}
        session = self._get_session()
        fetch = [name for name in self._requests if name not in self._graph_inputs]
        accumulators = {n: _Accumulator(n, axis, gram) for n, (axis, gram) in self._requests.items()}
        total = sum(1 for _ in calib.batches(batch_size))
        for done, feed in enumerate(calib.batches(batch_size), start=1):
            outputs = dict(zip(fetch, run_outputs(session, fetch, feed))) if fetch else {}
            mask = feed.get("attention_mask")
            mask = mask if mask is not None and mask.ndim == 2 else None
            for name, acc in accumulators.items():
                array = outputs[name] if name in outputs else feed[name]
                self._fold(acc, np.asarray(array), None if name in self._fixed_dim1 else mask)
            if progress is not None:
                progress(done, total)
        return {name: acc.result() for name, acc in accumulators.items()}

    @staticmethod
    def _fold(acc: _Accumulator, array: np.ndarray, mask: np.ndarray | None) -> None:
        if array.ndim == 0:
            array = array.reshape(1)
        axis = acc.axis if acc.axis >= 0 else acc.axis + array.ndim
        if not 0 <= axis < array.ndim:
            raise BadInputError(
                f"axis {acc.axis} is out of range for tensor {acc.name!r} of shape {list(array.shape)}: "
                "request an axis within its rank."
            )
        acc.axis = axis
        rows = _observations(array, axis, mask)
        step = max(1, _CHUNK_ELEMENTS // max(1, rows.shape[1]))
        for start in range(0, rows.shape[0], step):
            acc.add(rows[start : start + step].astype(np.float64))

    # ---- session

    def _get_session(self) -> ort.InferenceSession:
        key = tuple(sorted(self._requests))
        if self._session is None or self._session_key != key:
            fetch = [n for n in key if n not in self._graph_inputs]
            copy = _with_outputs(self.model, fetch)
            self._fixed_dim1 = _fixed_dim1(copy, key)
            self._session = make_session(copy, self.target, threads=self.threads)
            self._session_key = key
        return self._session


def _fixed_dim1(model: ir.Model, names: tuple[str, ...]) -> set[str]:
    """Requested tensors whose axis 1 has a fixed size: that axis is not the token axis."""
    values = {v.name: v for v in model.graph.inputs}
    values.update({v.name: v for node in model.graph for v in node.outputs if v.name})
    fixed = set()
    for name in names:
        shape = values[name].shape
        if shape is not None and len(shape) >= 2 and static_dim(shape[1]) is not None:
            fixed.add(name)
    return fixed


def _with_outputs(model: ir.Model, names: list[str]) -> ir.Model:
    """A copy of ``model`` whose graph also outputs ``names`` (typed, via shape inference if needed)."""
    copy = ir.from_proto(to_proto(model))
    produced = {v.name: v for node in copy.graph for v in node.outputs if v.name}
    values = [produced[n] for n in names]
    if any(v.type is None for v in values):
        ShapeInferencePass(strict_mode=False)(copy)
        produced = {v.name: v for node in copy.graph for v in node.outputs if v.name}
        values = [produced[n] for n in names]
    existing = {v.name for v in copy.graph.outputs}
    for value in values:
        if value.type is None:
            logger.warning("type of %r is unknown after shape inference; declaring it float32", value.name)
            value.type = ir.TensorType(ir.DataType.FLOAT)
        if value.name not in existing:
            copy.graph.outputs.append(value)
    return copy
