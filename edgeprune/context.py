"""The CompileContext: what every pass may ask of the compile it runs in.

It carries the target, the calibration rows (statistics part and held-back part),
threads and progress. Statistics are filled lazily: a pass asks for
the tensors it needs and one ORT run per batch collects them all. Budgets and seeds live in each
pass's own config, so a recipe says everything a pass decides by.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from edgeprune.progress import Progress

if TYPE_CHECKING:
    from edgeprune.calibration import CalibrationSet
    from edgeprune.fidelity import OutputFidelity
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
    threads: int | None = None
    progress: Progress = dataclasses.field(default_factory=Progress)
    stage: int = 0
    """Index of the pass now running in the recipe; set by the pipeline."""
    holdout_batches: list[dict[str, np.ndarray]] | None = None
    """The held-back rows in batches and the compile input's outputs on them (set by the pipeline), so a
    pass can check a candidate end to end (``held_back_fidelity``) where its own error model may be wrong."""
    reference_outputs: list[dict[str, np.ndarray]] | None = None
    _stats: dict[tuple[int, str, int, bool], TensorStats] = dataclasses.field(default_factory=dict, repr=False)

    def stats(self, model: ir.Model, requests: list[StatsRequest]) -> dict[str, TensorStats]:
        """Statistics of ``requests`` on ``model`` over the calibration rows, collected once and cached.

        A pass sees the model that the passes before it produced, so entries are keyed by the
        pass's ``stage``: later passes get the activations they will really see, and an accuracy
        back-off that relaxes pass j keeps what passes up to j collected (``invalidate_stats``).
        """
        from edgeprune.stats import StatsCollector

        key = lambda r: (self.stage, r.tensor, r.axis, r.gram)  # noqa: E731
        missing = [r for r in requests if key(r) not in self._stats]
        if missing:
            collector = StatsCollector(model, target="cpu", threads=self.threads)
            for r in missing:
                collector.request(r.tensor, axis=r.axis, gram=r.gram)
            with self.progress.stage(f"calibration statistics for {len(missing)} tensors"):
                collected = collector.collect(self.calibration)
            for r in missing:
                self._stats[key(r)] = collected[r.tensor]
        return {r.tensor: self._stats[key(r)] for r in requests}

    def invalidate_stats(self, after_stage: int = -1) -> None:
        """Forget statistics collected by passes after ``after_stage`` (all of them by default)."""
        self._stats = {k: v for k, v in self._stats.items() if k[0] <= after_stage}

    def held_back_fidelity(self, model: ir.Model) -> list[OutputFidelity] | None:
        """``model``'s fidelity to the compile's input on the held-back rows, per output (a KV cache's
        ``present.*`` aside, as verification does); None outside a compile."""
        if self.reference_outputs is None or self.holdout_batches is None:
            return None
        from edgeprune.fidelity import compare_outputs, separate_cache
        from edgeprune.verify import run_batches

        outputs = run_batches(model, self.holdout_batches, threads=self.threads)
        return separate_cache(compare_outputs(self.reference_outputs, outputs, self.holdout_batches))[0]
