"""Structured pruning: score FFN neurons and attention heads, allocate a parameter budget, remove them physically.

Three concerns are kept apart (Torch-Pruning's split): *groups* (what is coupled; ``groups``, on the
graph edits in ``edits`` and the conv dependency graph in ``dependency``), *importance* (``scoring``,
pure, one registry of metrics) and *allocation* (``allocation``).  A group is one layer's units of one
kind whose channels are the input channels of one consuming linear:

- ``_FFNGroup``: neurons of up (and gate) outputs / down inputs.  The element-wise region
  between them is checked to be closed; per-channel constants in it are sliced too.
- ``_HeadGroup``: query heads.  Multi-head attention (KV heads = heads) removes a head's q, k
  and v columns and its o rows.  With GQA only q and o shrink (KV heads and head_dim stay);
  the exporter's repeat_kv (Unsqueeze -> Expand -> Reshape) is replaced by one ``Gather`` of
  the KV heads the kept query heads read, which is exact for any batch and length and works
  even when groups keep different numbers of heads.  ``kv_groups=True`` prunes whole KV groups
  (a KV head and its query heads) instead.  Head-split Reshape shapes (constant or a Concat of
  constants and dynamic pieces) get the new head count; -1 entries need nothing.

- ``_ConvGroup``: a conv channel dependency group (``dependency``): the producers'
  output filters and biases, BatchNormalization parameters, per-channel constants, depthwise
  convs in lockstep (filters, bias, ``group`` attribute) and the consumers' input slices (Conv
  weight axis 1, Gemm/MatMul rows after global pooling).  Residual-coupled groups are left out
  unless ``conv_residual``.

Transforms of the linear groups, in order: slice producers' output columns and
biases, rewrite shapes, then shrink the consumer's input rows with optional least-squares refit
``(G_KK + lambda I) W' = G_K: W`` on the calibration Gram and bias compensation
``b += mu^T W - mu_K^T W'`` (FLAP's ``W[pruned]^T mu[pruned]`` when there is no refit), which
keeps the mean output of the consumer exact.  Intermediate value shapes are cleared afterwards;
the following cleanup pass infers them again.
"""


from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import onnx_ir as ir

from edgeprune.analysis import analyze
from edgeprune.context import StatsRequest
from edgeprune.errors import BadInputError, UnsupportedModelError
from edgeprune.model_io import param_count
from edgeprune.passes.base import EdgePass, EdgePassResult
from edgeprune.passes.prune import allocation as alloc
from edgeprune.passes.prune import scoring
from edgeprune.passes.prune.describe import inspect_report, left_out_summary
from edgeprune.passes.prune.dependency import channel_groups
from edgeprune.passes.prune.edits import _Graph, _Skip
from edgeprune.passes.prune.groups import Footprint, _conv_groups, _FFNGroup, _Group, _HeadGroup, distinct_params

logger = logging.getLogger(__name__)

UNIT_KINDS = ("ffn", "heads", "conv")



@dataclasses.dataclass
class PruneConfig:
    ratio: float = 0.2
    """Share of the prunable parameters (FFN weights, attention q/o, and k/v where removed with a head) to remove, in [0, 1)."""
    metric: str = "flap"
    """A name in ``scoring.METRICS``: flap (fluctuation), wanda (Wanda-sp), magnitude (L2) or magnitude_l1."""
    allocation: str = "global"
    """global (per-layer standardized, one ranking), floor (global with min_keep_fraction), uniform."""
    round_to: int = 8
    """Keep FFN and conv widths multiples of this (1 disables); head counts are not rounded."""
    units: str = "ffn,heads,conv"
    """Comma-separated unit kinds to prune: ffn, heads, conv (conv output channel groups)."""
    compensate: bool = True
    """FLAP bias compensation of the consumer (needs calibration data)."""
    refit: bool = False
    """Least-squares refit of the consumer on the calibration Gram (needs calibration data)."""
    ridge: float = 1e-2
    """Refit ridge, relative to mean(diag G)."""
    min_keep_fraction: float = 0.1
    """Per-layer floor for allocation='floor'."""
    kv_groups: bool = False
    """With GQA, prune whole KV groups (KV head + its query heads) instead of query heads."""
    conv_residual: bool = False
    """Also prune conv channel groups coupled by residual Adds (narrows the whole residual stream)."""

    def __post_init__(self) -> None:
        if not isinstance(self.ratio, (int, float)) or not 0 <= self.ratio < 1:
            raise BadInputError(f"prune ratio must be in [0, 1), got {self.ratio!r}: e.g. ratio = 0.2 removes 20% of the prunable parameters.")
        if not isinstance(self.metric, str) or self.metric not in scoring.METRICS:
            raise BadInputError(f"unknown prune metric {self.metric!r}: choose one of {', '.join(scoring.METRICS)}.")
        if not isinstance(self.allocation, str) or self.allocation not in alloc.METHODS:
            raise BadInputError(f"unknown prune allocation {self.allocation!r}: choose one of {', '.join(alloc.METHODS)}.")
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise BadInputError(f"prune round_to must be >= 1 (1 disables rounding), got {self.round_to}.")
        kinds = [k.strip() for k in str(self.units).split(",") if k.strip()]
        if not kinds or any(k not in UNIT_KINDS for k in kinds):
            raise BadInputError(f"prune units {self.units!r} must be a comma-separated subset of {', '.join(UNIT_KINDS)}.")
        numbers = all(isinstance(x, (int, float)) for x in (self.min_keep_fraction, self.ridge))
        if not numbers or not 0 <= self.min_keep_fraction <= 1 or self.ridge < 0:
            raise BadInputError("prune min_keep_fraction must be in [0, 1] and ridge >= 0.")

    @property
    def unit_kinds(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in self.units.split(",") if k.strip())


# --------------------------------------------------------------------------- group discovery


def _discover(g: _Graph, structures, cfg: PruneConfig) -> tuple[list[_Group], list[dict]]:
    """The groups the pass scores, and a record (with the ``_Skip`` reason) for each one left out.

    The one place that decides what is prunable: the pass and ``find_groups`` (``edgeprune inspect``) both call it.
    Read-only: building a group plans its edits but changes nothing.
    """
    groups: list[_Group] = []
    skipped: list[dict] = []
    kinds = cfg.unit_kinds
    candidates: list[tuple[str, int, Any]] = []
    if "ffn" in kinds:
        candidates += [("ffn", b.layer, lambda b=b: _FFNGroup(g, b)) for b in structures.ffn_blocks]
    if "heads" in kinds:
        candidates += [("heads", b.layer, lambda b=b: _HeadGroup(g, b, cfg.kv_groups)) for b in structures.attention_blocks]
    for kind, layer, make in candidates:
        try:
            groups.append(make())
        except _Skip as why:
            skipped.append({"layer": f"{layer}.{kind}", "index": layer, "kind": kind, "skipped": str(why), "kept_fraction": 1.0})
    if "conv" in kinds:
        first = len(structures.ffn_blocks) + len(structures.attention_blocks)
        conv_groups, conv_skipped = _conv_groups(g, cfg.conv_residual, first_index=first)
        groups += conv_groups
        skipped += conv_skipped
    return groups, skipped


def find_groups(model: ir.Model, config: PruneConfig | None = None) -> tuple[list[dict], list[dict]]:
    """What the prune pass would score on ``model`` (nothing is changed), and what it would leave out and why.

    Groups: ``label``, ``kind`` (ffn | heads | conv), ``layer``, ``units`` (neurons, heads, KV groups or
    channels), ``unit_size`` (channels per unit), ``unit_params`` (parameters one unit carries) and
    ``consumer``.  Skipped: ``label``, ``kind``, ``layer`` and ``reason``.
    """
    return _found(model, analyze(model), config if config is not None else PruneConfig())


def _found(model: ir.Model, structures, cfg: PruneConfig) -> tuple[list[dict], list[dict]]:
    groups, skipped = _discover(_Graph(model), structures, cfg)
    found = [
        {"label": grp.label, "kind": grp.kind, "layer": grp.layer, "units": grp.units, "unit_size": grp.unit_size,
         "unit_params": grp.unit_params, "consumer": grp.consumer_name}
        for grp in groups
    ]  # fmt: skip
    left_out = [{"label": r["layer"], "kind": r["kind"], "layer": r["index"], "reason": r["skipped"]} for r in skipped]
    return found, left_out


# --------------------------------------------------------------------------- the pass


@dataclasses.dataclass
class _Decision:
    group: _Group
    scores: np.ndarray
    keep: np.ndarray


class StructuredPruningPass(EdgePass):
    """Remove the least important FFN neurons, attention heads and conv channels until ``ratio`` of their parameters is gone."""

    name = "prune"
    Config = PruneConfig

    @classmethod
    def describe(cls, model: ir.Model) -> dict:
        """The groups the pass would score at its default options, those it leaves out and why, and the conv channel groups."""
        structures = analyze(model)
        found, left_out = _found(model, structures, PruneConfig())
        return inspect_report(found, left_out, channel_groups(model) if structures.conv_layers else [])

    def relaxed(self, last: EdgePassResult | None = None) -> StructuredPruningPass | None:
        ratio = round(self.config.ratio * 0.75, 4)
        if ratio < 0.01:
            return None
        return StructuredPruningPass(dataclasses.replace(self.config, ratio=ratio), self.context)

    def call(self, model: ir.Model) -> EdgePassResult:
        cfg = self.config
        if cfg.ratio == 0:
            return EdgePassResult(model, modified=False, summary={"ratio": 0.0, "note": "ratio 0: nothing pruned"})
        g = _Graph(model)
        groups, records = _discover(g, analyze(model), cfg)
        if not groups:  # one behaviour whatever the reason: the user asked to prune, and nothing can be
            raise UnsupportedModelError(_nothing_prunable(model, cfg, records))
        if records:  # one line for all the groups left out; each reason stays in the report's records
            warn = any(not r["skipped"].startswith("residual") for r in records)
            (logger.warning if warn else logger.info)(
                "prune: left out %d of %d groups (%s)", len(records), len(records) + len(groups), left_out_summary([r["skipped"] for r in records])
            )
        stats, compensation = self._stats(model, groups)
        scored = []
        for group in groups:
            scores = group.score(cfg.metric, g, stats)
            channels = group.score(cfg.metric, g, stats, unit_size=1) if group.unit_size > 1 else None
            rounding = cfg.round_to if group.kind in ("ffn", "conv") else 1
            scored.append(alloc.GroupScores(group.label, group.kind, scores, group.unit_params, rounding, channels, group.channel_params))
        keeps = alloc.allocate(scored, cfg.ratio, cfg.allocation, min_keep_fraction=cfg.min_keep_fraction)
        params_before = param_count(model)
        decisions = [_Decision(group, gs.scores, keep) for group, gs, keep in zip(groups, scored, keeps)]
        counts = _exact_counts(g, decisions)  # before any edit: the footprints read the original tensors
        modified = False
        for d in decisions:
            record = _record(d)
            if len(d.keep) < d.group.units:
                done = d.group.apply(g, d.keep, d.group.stats_for_apply(stats), cfg)
                record.update(done)
                modified = True
            records.append(record)
        if modified:
            _clear_intermediate_shapes(model)
        records.sort(key=lambda r: (r.get("index", -1), r["kind"]))
        summary = self._summary(model, decisions, records, compensation, params_before, *counts)
        logger.info("prune: %s -> %s params (%.1f%% of prunable removed)", summary["params_before"], summary["params_after"], 100 * summary["removed_share"])
        return EdgePassResult(model, modified=modified, records=records, summary=summary)

    # ---- pieces

    def _stats(self, model: ir.Model, groups: list[_Group]) -> tuple[dict, str]:
        cfg = self.config
        needs = scoring.METRICS[cfg.metric].needs_stats
        wants = cfg.compensate or cfg.refit
        if self.context is None:
            if needs:
                raise BadInputError(
                    f"prune metric {cfg.metric!r} needs calibration data: pass calibration samples (--calib) or use metric = 'magnitude'."
                )
            return {}, "skipped: no calibration data" if wants else "none"
        if not needs and not wants:
            return {}, "none"
        requests: dict[str, StatsRequest] = {}
        for group in groups:
            for request in group.stat_requests(cfg):
                old = requests.get(request.tensor)
                if old is None or (request.gram and not old.gram):
                    requests[request.tensor] = request
        stats = self.context.stats(model, list(requests.values()))
        parts = (["bias"] if cfg.compensate else []) + (["refit"] if cfg.refit else [])
        return stats, "+".join(parts) or "none"

    def _summary(self, model, decisions, records, compensation, before: int, prunable: int, removed: int) -> dict:
        cfg = self.config
        after = param_count(model)
        return {
            "ratio": cfg.ratio,
            "metric": cfg.metric,
            "allocation": cfg.allocation,
            "units": list(cfg.unit_kinds),
            "round_to": cfg.round_to,
            "compensation": compensation,
            "params_before": before,
            "params_after": after,
            "prunable_params": prunable,
            "removed_params": removed,
            "removed_share": removed / prunable if prunable else 0.0,
            "removed_share_of_model": (before - after) / before if before else 0.0,
            "groups": len(decisions),
            "skipped": [r for r in records if "skipped" in r],
            "per_layer_chart": {"y": "kept_fraction", "ylabel": "kept fraction"},
        }


def _record(d: _Decision) -> dict:
    s = np.asarray(d.scores, dtype=np.float64)
    g = d.group
    return {
        "layer": g.label,
        "index": g.layer,
        "kind": g.kind,
        "units_before": g.units,
        "units_after": int(len(d.keep)),
        "removed": int(g.units - len(d.keep)),
        "kept_fraction": len(d.keep) / g.units,
        "unit_params": g.unit_params,
        "score_mean": float(s.mean()),
        "score_min": float(s.min()),
        "score_max": float(s.max()),
        "consumer": g.consumer_name,
    }


def _exact_counts(g: _Graph, decisions: list[_Decision]) -> tuple[int, int]:
    """(prunable, removed) parameters, each weight element counted once however many groups or nodes touch it."""
    prunable, removed = [], []
    for d in decisions:
        pruned = d.group.channels_of(np.setdiff1d(np.arange(d.group.units), d.keep))
        for part in d.group.footprint(g):
            prunable.append(part)
            removed.append(Footprint(part.value, part.axis, part.positions[pruned]))
    return distinct_params(prunable), distinct_params(removed)


_DROP_PRUNE = "drop --prune (or the prune pass from the recipe) for this model."


def _nothing_prunable(model: ir.Model, cfg: PruneConfig, left_out: list[dict]) -> str:
    """The one sentence for a model with no group the pass can prune, whether groups were found and left out or none were found."""
    if left_out:
        n = len(left_out)
        return (f"prune found nothing it can prune in this model: {n} group{'' if n == 1 else 's'} left out "
                f"({left_out_summary([r['skipped'] for r in left_out])}): {_DROP_PRUNE}")
    ops = sorted({n.op_type for n in model.graph})
    return (
        "prune found nothing it can prune in this model (no FFN block of constant-weight MatMul/Gemm "
        f"around an activation, no Softmax attention with q/k/v/o projections, no Conv with a constant weight; the model's ops are "
        f"{', '.join(ops[:20])}{'...' if len(ops) > 20 else ''}): {_DROP_PRUNE}"
    )


def _clear_intermediate_shapes(model: ir.Model) -> None:
    """Widths changed: drop inferred shapes of intermediate values (types stay); cleanup infers them again."""
    for node in model.graph:
        for out in node.outputs:
            if not out.is_graph_output():
                out.shape = None

