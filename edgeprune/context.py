"""The CompileContext: what every pass may ask of the compile it runs in.

It carries the target, the calibration rows (statistics part and held-back part), the
untouched reference model, the analysis, budgets, seed and progress. Statistics are filled
lazily: a pass asks for the tensors it needs and one ORT run per batch collects them all.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import onnx_ir as ir

from edgeprune.progress import Progress

if TYPE_CHECKING:
    from edgeprune.analysis import Structures
    from edgeprune.calibration import CalibrationSet
    from edgeprune.runtime.targets import Target
    from edgeprune.stats import TensorStats


@dataclasses.dataclass
class StatsRequest:
    tensor: str
    axis: int = -1
    gram: bool = False


@dataclasses.dataclass
class CompileContext:
    target: Target
    calibration: CalibrationSet
    holdout: CalibrationSet
    reference: ir.Model
    structures: Structures | None = None
    seed: int = 0
    threads: int | None = None
    budgets: dict[str, Any] = dataclasses.field(default_factory=dict)
    progress: Progress = dataclasses.field(default_factory=Progress)
    _stats: dict[tuple[str, int, bool], TensorStats] = dataclasses.field(default_factory=dict, repr=False)

    def stats(self, model: ir.Model, requests: list[StatsRequest]) -> dict[str, TensorStats]:
        """Statistics of ``requests`` on ``model`` over the calibration rows, collected once and cached.

        The cache belongs to the current model; the pipeline calls ``invalidate_stats`` after a
        pass changes the graph, so later passes see the activations they will really get.
        """
        from edgeprune.stats import StatsCollector

        missing = [r for r in requests if (r.tensor, r.axis, r.gram) not in self._stats]
        if missing:
            collector = StatsCollector(model, target="cpu", threads=self.threads)
            for r in missing:
                collector.request(r.tensor, axis=r.axis, gram=r.gram)
            with self.progress.stage(f"calibration statistics for {len(missing)} tensors"):
                collected = collector.collect(self.calibration)
            for r in missing:
                self._stats[(r.tensor, r.axis, r.gram)] = collected[r.tensor]
        return {r.tensor: self._stats[(r.tensor, r.axis, r.gram)] for r in requests}

    def invalidate_stats(self) -> None:
        self._stats.clear()
