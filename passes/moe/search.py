"""The ``loss`` metric: choose the experts to remove by what removing them costs the model's output on the calibration data.

Router statistics (frequency, TCESS, EASY-EP) rank experts by how the data routes, one layer at a
time; they cannot see that an expert a layer routes little to may carry what the next layers need,
or that a layer's diffuse routing makes every removal there costly.  This search measures instead:
starting from all experts, each round scores every removable expert by the calibration loss of the
model without it (the others removed so far stay removed) and drops the cheapest ones, a quarter of
what is still to drop (at least one), until the budget is met.

The loss is the one compile verifies with: for LM logits (rank 3, "logit" in the name) with
``input_ids`` in the feeds, the mean next-token NLL over real tokens; for any other model, the
relative squared error of every float output against the full model's (sum of squared differences
over sum of squares).  Every candidate is evaluated in one ORT session of a copy of the model in
which each router's logits get a mask input added (0 for a kept expert, a large negative value for
a removed one).  A masked router is the removal: softmax over the kept experts' logits (what
``remove`` leaves when it slices the router rows), top-k among them, renormalised or not as the
graph does; sigmoid scores of masked experts are 0 and never win top-k while k experts remain.

Cost: one forward pass over the calibration rows per candidate; with E experts in all and R to
remove, about E + (E - 1) + ... per round over roughly log_{4/3}(R) + 3 rounds (111 to 181 passes
for 32 experts at half kept).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import onnx_ir as ir

from edgeprune.analysis.moe import MoELayer
from edgeprune.calibration import CalibrationSet
from edgeprune.errors import BadInputError
from edgeprune.fidelity import next_token_nll, is_lm_logits
from edgeprune.model_io import to_proto
from edgeprune.runtime.session import make_session, run_outputs

logger = logging.getLogger(__name__)

METRIC = "loss"
#: Each round drops this share of what is still to drop (at least one expert).
ROUND_SHARE = 0.25
MASK_INPUT = "edgeprune_moe_mask_{layer}"


@dataclasses.dataclass
class LossSearch:
    """The experts each layer keeps and how the search got there."""

    keeps: list[np.ndarray]
    """Sorted kept indices per layer."""
    first_costs: list[list[float | None]]
    """Per layer and expert: the calibration loss increase of removing that expert alone (None: not removable)."""
    loss_full: float
    loss_kept: float
    objective: str
    evaluations: int
    rounds: int


def masked_model(model: ir.Model, layers: list[MoELayer]) -> ir.Model:
    """A copy of ``model`` whose every router output gets an input ``edgeprune_moe_mask_<layer>`` [E] added before its consumers."""
    copy = ir.from_proto(to_proto(model))
    produced = {v.name: v for node in copy.graph for v in node.outputs if v.name}
    for layer in layers:
        value = produced.get(layer.router.output) if layer.router is not None else None
        if value is None:
            raise BadInputError(f"MoE layer {layer.layer}: its router output {layer.router.output if layer.router else None!r} is not in the graph, so it cannot be masked.")
        dtype = value.dtype or ir.DataType.FLOAT
        mask = ir.Value(name=MASK_INPUT.format(layer=layer.layer), shape=ir.Shape([layer.num_experts]), type=ir.TensorType(dtype))
        uses = list(value.uses())
        add = ir.Node("", "Add", [value, mask], name=f"edgeprune_moe_mask_add_{layer.layer}", num_outputs=1)
        add.outputs[0].name = f"{value.name}_masked"
        add.outputs[0].dtype = dtype
        copy.graph.insert_after(value.producer(), add)
        for user, index in uses:
            user.replace_input_with(index, add.outputs[0])
        copy.graph.inputs.append(mask)
    return copy


def mask_feeds(layers: list[MoELayer], kept: np.ndarray, dtype=np.float32) -> dict[str, np.ndarray]:
    """The mask inputs for ``kept`` ([layers, E] bool): 0 where kept, a large negative where removed."""
    low = -np.finfo(dtype).max / 4
    return {MASK_INPUT.format(layer=layer.layer): np.where(kept[i], 0.0, low).astype(dtype) for i, layer in enumerate(layers)}


class Objective:
    """The calibration loss of the model with a set of experts kept: one ORT run per calibration batch."""

    def __init__(self, model: ir.Model, layers: list[MoELayer], calib: CalibrationSet, *, threads: int | None = None, batch_size: int = 8):
        if not len(calib):
            raise BadInputError("the moe pass's loss metric measures each removal on calibration data, and the calibration set is empty: pass samples with --calib.")
        self.layers = layers
        masked = masked_model(model, layers)
        self.dtypes = [layer_dtype(masked, layer) for layer in layers]
        self.session = make_session(masked, "cpu", threads=threads)
        inputs = {i.name for i in self.session.get_inputs()}
        self.feeds = [{k: v for k, v in feed.items() if k in inputs} for feed in calib.batches(batch_size)]
        outputs = self.session.get_outputs()
        first = outputs[0]
        self.lm = is_lm_logits(first.name, len(first.shape)) and all("input_ids" in f for f in self.feeds)
        self.outputs = [first.name] if self.lm else [o.name for o in outputs if o.type in ("tensor(float)", "tensor(float16)", "tensor(double)")]
        if not self.outputs:
            raise BadInputError("the moe pass's loss metric compares float outputs, and the model has none: use --moe-metric tcess.")
        self.objective = "next-token NLL" if self.lm else "relative squared output error"
        self.evaluations = 0
        self.reference = None
        if not self.lm:
            full = np.ones((len(layers), max(m.num_experts for m in layers)), dtype=bool)
            self.reference = [self._run(full, feed) for feed in self.feeds]

    def _run(self, kept: np.ndarray, feed: dict) -> list[np.ndarray]:
        masks = {}
        for i, layer in enumerate(self.layers):
            masks.update(mask_feeds([layer], kept[i : i + 1, : layer.num_experts], self.dtypes[i]))
        return run_outputs(self.session, self.outputs, {**feed, **masks})

    def __call__(self, kept: np.ndarray) -> float:
        self.evaluations += 1
        if self.lm:
            total, count = 0.0, 0
            for feed in self.feeds:
                (logits,) = self._run(kept, feed)
                mask = feed.get("attention_mask")
                t, c = next_token_nll(logits, feed["input_ids"], mask if mask is not None and mask.ndim == 2 else None)
                total, count = total + t, count + c
            return total / max(count, 1)
        err = ref = 0.0
        for feed, reference in zip(self.feeds, self.reference):
            for got, want in zip(self._run(kept, feed), reference):
                want = want.astype(np.float64)
                err += float(((got.astype(np.float64) - want) ** 2).sum())
                ref += float((want**2).sum())
        return err / max(ref, 1e-30)


def layer_dtype(model: ir.Model, layer: MoELayer):
    value = next(v for v in model.graph.inputs if v.name == MASK_INPUT.format(layer=layer.layer))
    return value.dtype.numpy()


def targets(sizes: list[int], keep: float | int, allocation: str, min_keep: int) -> tuple[list[int], int]:
    """(per-layer floor, total budget) of kept experts: a count per layer or ``uniform`` fixes every layer; ``global`` fixes the total."""
    if isinstance(keep, int):
        floors = [min(keep, n) for n in sizes]
        return floors, sum(floors)
    if allocation == "uniform":
        floors = [min(n, max(min_keep, int(round(keep * n)))) for n in sizes]
        return floors, sum(floors)
    floors = [min(min_keep, n) for n in sizes]
    return floors, max(sum(floors), int(round(keep * sum(sizes))))


def loss_search(
    model: ir.Model, layers: list[MoELayer], calib: CalibrationSet, keep: float | int, allocation: str = "global", min_keep: int = 1,
    *, threads: int | None = None, batch_size: int = 8,
) -> LossSearch:
    """Drop experts round by round, the cheapest by calibration loss first (see the module), until ``keep`` is met."""
    sizes = [m.num_experts for m in layers]
    floors, budget = targets(sizes, keep, allocation, min_keep)
    objective = Objective(model, layers, calib, threads=threads, batch_size=batch_size)
    kept = np.zeros((len(layers), max(sizes)), dtype=bool)
    for i, n in enumerate(sizes):
        kept[i, :n] = True
    loss_full = objective(kept)
    first: list[list[float | None]] = [[None] * n for n in sizes]
    rounds = 0
    while kept.sum() > budget:
        candidates = [(i, int(e)) for i in range(len(sizes)) if kept[i].sum() > floors[i] for e in np.flatnonzero(kept[i])]
        if not candidates:
            break
        costs = []
        for i, e in candidates:
            kept[i, e] = False
            costs.append(objective(kept))
            kept[i, e] = True
        if rounds == 0:
            for (i, e), c in zip(candidates, costs):
                first[i][e] = c - loss_full
        rounds += 1
        drop = max(1, math.ceil(ROUND_SHARE * (kept.sum() - budget)))
        for j in sorted(range(len(candidates)), key=lambda j: (costs[j], candidates[j])):
            i, e = candidates[j]
            if drop == 0:
                break
            if kept[i].sum() > floors[i]:
                kept[i, e] = False
                drop -= 1
    loss_kept = objective(kept)
    logger.info("moe loss search: %s %.4f -> %.4f in %d rounds, %d evaluations", objective.objective, loss_full, loss_kept, rounds, objective.evaluations)
    return LossSearch(
        keeps=[np.flatnonzero(kept[i, :n]) for i, n in enumerate(sizes)], first_costs=first, loss_full=loss_full, loss_kept=loss_kept,
        objective=objective.objective, evaluations=objective.evaluations, rounds=rounds,
    )  # fmt: skip
