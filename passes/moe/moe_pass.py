"""The ``moe`` pass: score experts on the calibration data's routing, keep the best under a global budget, remove the rest.

``keep`` is a fraction of all experts (a float in (0, 1]) or a count per layer (an int).  With a
fraction and ``allocation = "global"`` the budget is spread across layers by one ranking of each
expert's share of its layer's total score (so layers whose routing is concentrated give up more),
after each layer keeps its ``min_keep`` best; ``"uniform"`` keeps the same count in every layer.
Removal is physical in every supported form (``remove``); layers the analysis could not take
apart are refused with the analysis's own sentence.

With ``tasks`` (task name -> calibration data, as ``--calib`` takes it) each task's experts are
chosen on its own rows at ``keep``, and the model keeps the union of what the tasks need; the
records carry each task's kept experts and routing histogram (selection frequency per expert),
which ``edgeprune.runtime.moe`` turns into the retrieval bundle.  ``experts`` replays a choice:
keep exactly those experts per layer, with no calibration read.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, ShapeInferencePass

from edgeprune.analysis import analyze
from edgeprune.analysis.moe import MoELayer
from edgeprune.errors import BadInputError, CalibrationDataError, UnsupportedModelError
from edgeprune.model_io import param_count
from edgeprune.passes.base import EdgePass, EdgePassResult
from edgeprune.passes.moe import remove
from edgeprune.passes.moe.scores import METRICS, RouterStats, collect_router_stats, score
from edgeprune.passes.moe.search import METRIC as LOSS_METRIC
from edgeprune.passes.moe.search import loss_search

logger = logging.getLogger(__name__)

ALLOCATIONS = ("global", "uniform")
#: A task name becomes part of a file name in the retrieval bundle.
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_REMOVE = {"loop": remove.remove_loop, "dense": remove.remove_dense, "fused": remove.remove_fused}


@dataclasses.dataclass
class MoEConfig:
    keep: float | int = 1.0
    """A float in (0, 1]: share of all experts kept; an int >= 1: experts kept per layer."""
    metric: str = "tcess"
    """tcess (PreMoe), easy (EASY-EP, gate weight x expert-output norm), frequency, or loss (drop the experts whose removal
    costs the calibration loss least, measured round by round: ``search``)."""
    allocation: str = "global"
    """global (one ranking of per-layer score shares) or uniform (same count per layer)."""
    min_keep: int = 1
    """Experts every layer keeps at least."""
    tasks: dict[str, str] | None = None
    """Task name -> calibration data (file or folder, as --calib takes): each task keeps ``keep`` of the experts
    chosen on its own rows, and the model keeps the union of the tasks' experts."""
    tokenizer: str | None = None
    """With ``tasks``: the tokenizer for text task files."""
    task_samples: int = 64
    """With ``tasks``: calibration rows read per task."""
    experts: list[list[int]] | None = None
    """Replay: keep exactly these experts (indices per MoE layer); no calibration is read."""

    def __post_init__(self) -> None:
        keep = self.keep
        if isinstance(keep, bool) or not isinstance(keep, (int, float)):
            raise BadInputError(f"moe keep must be a number, got {keep!r}: e.g. keep = 0.5 keeps half the experts, keep = 4 keeps 4 per layer.")
        if isinstance(keep, float) and not 0 < keep <= 1:
            raise BadInputError(f"moe keep as a fraction must be in (0, 1], got {keep}: e.g. keep = 0.5 keeps half the experts.")
        if isinstance(keep, int) and keep < 1:
            raise BadInputError(f"moe keep as a count must be >= 1 expert per layer, got {keep}.")
        if not isinstance(self.metric, str) or self.metric not in METRICS:
            raise BadInputError(f"unknown moe metric {self.metric!r}: choose one of {', '.join(METRICS)}.")
        if not isinstance(self.allocation, str) or self.allocation not in ALLOCATIONS:
            raise BadInputError(f"unknown moe allocation {self.allocation!r}: choose one of {', '.join(ALLOCATIONS)}.")
        if isinstance(self.min_keep, bool) or not isinstance(self.min_keep, int) or self.min_keep < 1:
            raise BadInputError(f"moe min_keep must be an int >= 1, got {self.min_keep!r}.")
        if self.tasks is not None:
            if not isinstance(self.tasks, dict) or not self.tasks:
                raise BadInputError(f"moe tasks must be a table of task name -> calibration file, got {self.tasks!r}.")
            for name, source in self.tasks.items():
                if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
                    raise BadInputError(f"moe task name {name!r} must be letters, digits, '_' or '-' (it names a file in the bundle).")
                if not isinstance(source, str) or not source:
                    raise BadInputError(f"moe task {name!r} needs a calibration file or folder, got {source!r}.")
            if self.experts is not None:
                raise BadInputError("moe takes either tasks (choose experts per task) or experts (replay a choice), not both.")
        if isinstance(self.task_samples, bool) or not isinstance(self.task_samples, int) or self.task_samples < 1:
            raise BadInputError(f"moe task_samples must be an int >= 1, got {self.task_samples!r}.")
        if self.experts is not None and (
            not isinstance(self.experts, list)
            or not all(isinstance(k, list) and k and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in k) for k in self.experts)
        ):
            raise BadInputError("moe experts must list, per MoE layer, the expert indices to keep (at least one each), e.g. [[0, 3], [1, 2]].")


def allocate(scores: list[np.ndarray], keep: float | int, allocation: str = "global", min_keep: int = 1) -> list[np.ndarray]:
    """Sorted indices of the experts each layer keeps.  Pure: scores in, choices out; ties go to the lower index."""
    sizes = [len(s) for s in scores]
    order = [np.lexsort((np.arange(len(s)), -np.asarray(s, dtype=np.float64))) for s in scores]
    if isinstance(keep, int):
        counts = [min(keep, n) for n in sizes]
    elif allocation == "uniform":
        counts = [min(n, max(min_keep, int(round(keep * n)))) for n in sizes]
    else:
        budget = int(round(keep * sum(sizes)))
        counts = [min(min_keep, n) for n in sizes]
        shares = []
        for layer, s in enumerate(scores):
            s = np.asarray(s, dtype=np.float64)
            total = s.sum()
            share = s / total if total > 0 else np.full(len(s), 1.0 / len(s))
            shares += [(-share[i], layer, rank) for rank, i in enumerate(order[layer]) if rank >= counts[layer]]
        shares.sort()
        left = budget - sum(counts)
        for _, layer, _rank in shares:
            if left <= 0:
                break
            counts[layer] += 1  # shares fall with rank inside a layer, so each layer's picks stay a prefix of its order
            left -= 1
    return [np.sort(order[layer][: counts[layer]]) for layer in range(len(scores))]


class MoEExpertPruningPass(EdgePass):
    """Remove the experts the calibration data routes to least, in every MoE layer, with their router rows."""

    name = "moe"
    Config = MoEConfig

    @classmethod
    def describe(cls, model: ir.Model) -> dict[str, Any] | None:
        layers = analyze(model).moe_layers
        if not layers:
            return None
        lines = [
            f"MoE layer {m.layer}: {m.form} form, {m.num_experts} experts, top-{m.top_k}"
            + (", renormalised" if m.normalize else "") + (f"; not prunable: {m.problem}" if m.problem else "")
            for m in layers
        ]  # fmt: skip
        return {"summary": lines, "fields": {"moe_layers": [m.to_dict() for m in layers]}}

    def relaxed(self, last: EdgePassResult | None = None) -> MoEExpertPruningPass | None:
        keep = self.config.keep
        if isinstance(keep, int) or self.config.experts is not None:
            return None
        looser = round(1 - (1 - keep) * 0.75, 4)
        if looser >= 0.99:
            return None
        return MoEExpertPruningPass(dataclasses.replace(self.config, keep=looser), self.context)

    def call(self, model: ir.Model) -> EdgePassResult:
        cfg = self.config
        layers = analyze(model).moe_layers
        if not layers:
            raise UnsupportedModelError("the moe pass found no MoE layer (router -> TopK, or com.microsoft.MoE) in the model: drop --moe-keep for this model.")
        for layer in layers:
            if layer.problem:
                raise UnsupportedModelError(layer.problem)
            if not layer.prunable:
                raise UnsupportedModelError(
                    f"MoE layer {layer.layer} ({layer.node}) has a router but its experts were not found in a form the moe pass "
                    "can remove (optimum's expert loop, gpt-oss's dense form, or com.microsoft.MoE/QMoE)."
                )
        if cfg.experts is not None:
            return self._remove(model, layers, _replayed(cfg.experts, layers), [{} for _ in layers], {"experts": "replayed"})
        if cfg.tasks:
            return self._for_tasks(model, layers)
        if cfg.keep == 1.0 and not isinstance(cfg.keep, int):
            return EdgePassResult(model, modified=False, summary={"keep": 1.0, "note": "keep 1.0: no expert removed"})
        stats = self.router_stats(model, layers)
        keeps, scores, search = self._choose(model, layers, stats, self.context.calibration, "")
        details = [_stats_fields(s, values) for s, values in zip(stats, scores)]
        return self._remove(model, layers, keeps, details, {"calibration_tokens": stats[0].tokens if stats else 0, **search})

    def _choose(self, model: ir.Model, layers: list[MoELayer], stats: list[RouterStats], calib, label: str) -> tuple[list[np.ndarray], list, dict]:
        """(kept experts per layer, the score per expert the choice rests on, summary fields) under the config's metric."""
        cfg = self.config
        if cfg.metric != LOSS_METRIC:
            scores = [score(s, cfg.metric) for s in stats]
            return allocate(scores, cfg.keep, cfg.allocation, cfg.min_keep), scores, {}
        with self.context.progress.stage(f"loss search over {sum(m.num_experts for m in layers)} experts{label}"):
            found = loss_search(model, layers, calib, cfg.keep, cfg.allocation, cfg.min_keep, threads=self.context.threads)
        fields = {"search": {"objective": found.objective, "calibration_loss_full": found.loss_full, "calibration_loss_kept": found.loss_kept,
                             "evaluations": found.evaluations, "rounds": found.rounds}}  # fmt: skip
        return found.keeps, found.first_costs, fields

    def _for_tasks(self, model: ir.Model, layers: list[MoELayer]) -> EdgePassResult:
        """Each task's experts on its own rows; the model keeps their union, the records each task's choice and routing."""
        cfg = self.config
        by_task: dict[str, tuple[list[RouterStats], list[np.ndarray]]] = {}
        searches: dict[str, dict | None] = {}
        for name, calib in self._task_calibrations(model).items():
            with self.context.progress.stage(f"router statistics of task {name} ({len(calib)} rows)"):
                stats = collect_router_stats(model, layers, calib, threads=self.context.threads)
            kept, _, search = self._choose(model, layers, stats, calib, f" for task {name}")
            by_task[name] = (stats, kept)
            searches[name] = search.get("search")
        keeps = [np.unique(np.concatenate([kept[i] for _, kept in by_task.values()])) for i in range(len(layers))]
        details = [
            {
                "kept_by_task": {t: [int(e) for e in kept[i]] for t, (_, kept) in by_task.items()},
                "routing_by_task": {t: [round(float(f), 4) for f in stats[i].frequency] for t, (stats, _) in by_task.items()},
                "tcess_by_task": {t: [float(v) for v in stats[i].tcess] for t, (stats, _) in by_task.items()},
            }
            for i in range(len(layers))
        ]  # fmt: skip
        total = sum(m.num_experts for m in layers)
        tasks = {
            t: {"experts": int(sum(len(k) for k in kept)), "kept_per_layer": [len(k) for k in kept], "calibration_tokens": stats[0].tokens,
                **({"search": searches[t]} if searches.get(t) else {})}
            for t, (stats, kept) in by_task.items()
        }  # fmt: skip
        result = self._remove(model, layers, keeps, details, {"tasks": tasks, "union": True})
        each = ", ".join(f"{t} {v['experts']}/{total}" for t, v in tasks.items())
        result.summary["headline"] = (
            f"moe: {len(tasks)} tasks ({each} experts, {cfg.metric}); "
            f"the model keeps their union, {result.summary['experts_after']} of {total}; per layer "
            + ", ".join(f"{r['units_after']}/{r['units_before']}" for r in result.records)
        )
        return result

    def _task_calibrations(self, model: ir.Model) -> dict:
        from edgeprune.calibration import load_calibration

        if self.context is None:
            raise BadInputError("the moe pass chooses each task's experts on its calibration rows: run it inside a compile (it needs a context).")
        calibrations = {}
        for name, source in self.config.tasks.items():
            try:
                calib = load_calibration(source, model, tokenizer=self.config.tokenizer, max_samples=self.config.task_samples, seed=0)
            except CalibrationDataError as exc:
                raise CalibrationDataError(f"moe task {name!r}: {exc}") from exc
            calibrations[name] = calib
        return calibrations

    def _remove(self, model: ir.Model, layers: list[MoELayer], keeps: list[np.ndarray], details: list[dict], extra: dict) -> EdgePassResult:
        cfg = self.config
        before = param_count(model)
        records = []
        modified = False
        for layer, detail, keep in zip(layers, details, keeps):
            k = layer.top_k
            if len(keep) < layer.num_experts:
                k = _REMOVE[layer.form](model.graph, layer, keep)
                modified = True
            records.append({**_record(layer, keep, k), **detail})
        if modified:
            RemoveUnusedNodesPass()(model)
            _clear_intermediate_shapes(model)
            ShapeInferencePass(strict_mode=False)(model)
        after = param_count(model)
        summary = {
            "keep": cfg.keep, "metric": cfg.metric, "allocation": cfg.allocation,
            "experts_before": sum(m.num_experts for m in layers), "experts_after": int(sum(len(k) for k in keeps)),
            "params_before": before, "params_after": after, **extra,
            "per_layer_chart": {"y": "kept_fraction", "ylabel": "kept experts (fraction)"},
        }  # fmt: skip
        how = "replayed" if cfg.experts is not None else f"{cfg.metric}, {cfg.allocation}"
        summary["headline"] = (
            f"moe: kept {summary['experts_after']} of {summary['experts_before']} experts ({how}); per layer "
            + ", ".join(f"{r['units_after']}/{r['units_before']}" for r in records)
        )
        logger.info("moe: %d -> %d experts, %d -> %d params", summary["experts_before"], summary["experts_after"], before, after)
        return EdgePassResult(model, modified=modified, records=records, summary=summary)

    def router_stats(self, model: ir.Model, layers: list[MoELayer]) -> list[RouterStats]:
        if self.context is None:
            raise BadInputError("the moe pass scores experts by how the calibration data routes: pass calibration samples (--calib).")
        with self.context.progress.stage(f"router statistics for {len(layers)} MoE layers"):
            return collect_router_stats(model, layers, self.context.calibration, threads=self.context.threads)


def _record(layer: MoELayer, keep: np.ndarray, k: int | None) -> dict:
    return {
        "layer": f"moe.{layer.layer}", "index": layer.layer, "kind": "experts", "form": layer.form,
        "units_before": layer.num_experts, "units_after": int(len(keep)), "kept": [int(i) for i in keep],
        "kept_fraction": len(keep) / layer.num_experts, "top_k_before": layer.top_k, "top_k_after": k,
    }  # fmt: skip


def _stats_fields(stats: RouterStats, values: np.ndarray) -> dict:
    """A layer's scores and routing on the calibration data (frequency: the routing histogram, top-k so it sums to k)."""
    return {"scores": [None if v is None else float(v) for v in values], "frequency": stats.frequency.tolist(), "tcess": stats.tcess.tolist(), "tokens": stats.tokens}


def _replayed(experts: list[list[int]], layers: list[MoELayer]) -> list[np.ndarray]:
    if len(experts) != len(layers):
        raise BadInputError(f"moe experts lists {len(experts)} layer(s), and the model has {len(layers)} MoE layers: give one list per layer.")
    keeps = []
    for layer, kept in zip(layers, experts):
        bad = [i for i in kept if i >= layer.num_experts]
        if bad:
            raise BadInputError(f"moe experts names expert {bad[0]} in MoE layer {layer.layer}, which has {layer.num_experts} experts (0-{layer.num_experts - 1}).")
        keeps.append(np.unique(np.asarray(kept, dtype=np.int64)))
    return keeps


def _clear_intermediate_shapes(model: ir.Model) -> None:
    """Shapes recorded before the edit may carry the old expert count or k; shape inference fills them again."""
    outputs = {id(v) for v in model.graph.outputs}
    for node in model.graph:
        for value in node.outputs:
            if id(value) not in outputs:
                value.shape = None


