"""Bit allocation: give each weight-bearing node the storage format its measured sensitivity deserves.

Units are every MatMul/Gemm by a constant weight, every Conv, and every Gather on an embedding
table; a table tied to the LM head (``MatMul(x, Transpose(table))``) forms one joint unit whose
options are pairs (embedding format, head format): both uses may differ, and the table's bytes
are counted once while both stay float or while the lookup reads the head's packed MatMulNBits
table (``gather-tied``: GatherBlockQuantized over the same initializers, same bits and blocks).

Per unit and option the pass measures the relative output error on the calibration rows
(``edgeprune.passes.bits.sensitivity``: the exact quantize-dequantize of ORT's tools, then
``tr(dW^T G dW) / tr(W^T G W)`` on the Gram of the node's input), and records proxies beside it
(outlier share; the measured model-output error when only that unit changes, for the units with
the largest local error).  A multiple-choice knapsack (``edgeprune.passes.bits.knapsack``, HiGHS via scipy)
picks one option per unit minimising the sum of squared relative errors under the budget:
``size_budget_bytes`` (whole-model weight bytes), ``avg_bits`` (bits per weight over the units,
scales included) or ``latency_budget_ms`` / ``latency_budget_ratio`` (per-option latencies from cached microbenchmarks on
the target, plus one DynamicQuantizeLinear per distinct dynamic-int8 input).  The choice is
emitted through ORT's own quantizers (``edgeprune.passes.bits.emit``); a latency budget is then
checked by timing the emitted model against the float one, and re-solved tighter on a miss.

Formats follow the target profile: on CPU/GPU MatMulNBits (2/4/8-bit blocks, optionally GPTQ
rounding: ``edgeprune.passes.bits.gptq``), GatherBlockQuantized and dynamic int8; on NPU-style targets
(no dynamic int8) static QDQ with 8- or 16-bit activations.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from typing import Any

import numpy as np
import onnx_ir as ir

from edgeprune.passes.bits import knapsack, sensitivity
from edgeprune.analysis import analyze
from edgeprune.context import StatsRequest
from edgeprune.errors import BadInputError
from edgeprune.model_io import model_bytes
from edgeprune.passes.base import EdgePass, EdgePassResult
from edgeprune.passes.bits.sensitivity import KEEP, Option

logger = logging.getLogger(__name__)

_NBITS_TOOL_BITS = (2, 4, 8)  # what ORT 1.32's MatMulNBitsQuantizer writes (it asserts bits in [2, 4, 8])
_QDQ_BITS = (8, 16)  # activation widths of static QDQ (int8 weights either way)
_CURVE_POINTS = 12
_LATENCY_TOLERANCE = 0.03  # a measured ratio this far above the budget counts as met (timing noise)
# A latency budget this far below the microbenchmarks' floor is refused; closer ones get the fastest
# choice, measured (the microbenchmarks' floor has been 5-10 % pessimistic on MiniLM).
_LATENCY_FLOOR_SLACK = 0.15


@dataclasses.dataclass
class BitAllocationConfig:
    mode: str = "auto"
    """``auto``: solve for a budget; ``uniform``: every unit at ``bits``."""
    bits: int | None = None
    """Uniform mode: 8 (8-bit weight-only MatMulNBits, uint8 embeddings) or 4 / 2 (block-quantized)."""
    size_budget_bytes: int | None = None
    """Auto mode: total weight bytes of the output model (all initializers)."""
    avg_bits: float | None = None
    """Auto mode: average bits per weight over the quantizable units, scales and zero points included."""
    latency_budget_ms: float | None = None
    latency_budget_ratio: float | None = None
    """Auto mode: prefill latency as a fraction of the float model's, both measured in this pass
    (robust where the machine's speed drifts, e.g. shared CPUs); excludes ``latency_budget_ms``."""
    """Auto mode: prefill latency (batch 1, ``latency_tokens`` tokens) of the output model on the target."""
    bit_options: tuple[int, ...] = (4, 8)
    """Bit widths to offer besides keeping float (2 also works: ORT's 2-bit RTN costs 0.3-0.6 relative error
    per SmolLM2 layer, so it is opt-in); 16 asks for fp16, emitted only where the target runs it."""
    block_size: int | tuple[int, ...] = (32, 64, 128)
    """Block size(s) of block-quantized formats (powers of two >= 16); each bit width is offered with each."""
    symmetric: bool = False
    """Symmetric blocks (no zero points) for MatMulNBits/GatherBlockQuantized."""
    accuracy_level: int | None = None
    """MatMulNBits accuracy_level (None: ORT's default; 4 = int8 compute on CPU, faster, less exact)."""
    gptq: bool = False
    """Offer GPTQ rounding (``edgeprune.passes.bits.gptq``: same grid and bytes, less output error on data like the
    calibration rows) for 2/4-bit MatMul weights.  Opt-in: it fits the calibration domain; SmolLM2
    calibrated on Tiny Shakespeare and scored on WikiText-2 does worse with it (uniform 4-bit b64:
    perplexity 28.8 vs 27.5 round-to-nearest), though its layer errors drop 50 % on held-back
    Shakespeare.  Use it when the calibration data is the deployment data."""
    dynamic_int8: bool = True
    """Offer dynamic int8 (quantize_dynamic: activations quantized too) where the target runs it."""
    solver: str = "auto"
    """``auto`` (milp, greedy for huge models), ``milp`` or ``greedy``."""
    output_checks: int = 4
    """Measure the model-output error with only that unit quantized, for this many most-sensitive units."""
    latency_tokens: int = 128
    """Sequence length of the latency microbenchmarks."""
    latency_checks: int = 3
    """Latency budgets: measure the emitted model (side by side with the float one) up to this many
    times, re-solving with a tighter budget after each miss."""
    latency_runs: int = 10
    """Timed runs per model in each latency check, at least (small models get up to 50)."""
    importance: str = "measured"
    """Weight of each node's squared relative error: ``measured`` (model-output error when only that node
    is quantized, over its local error, measured for every node in one session), ``uniform`` (1 each) or
    ``residual`` (its block's ||output||^2 / ||residual stream||^2)."""
    relax_step: float = 0.15
    """Accuracy back-off: each step grows the budget by this fraction (uniform: 2 -> 4 -> 8 bits)."""

    def __post_init__(self):
        self.bit_options = tuple(int(b) for b in self.bit_options)
        blocks = (self.block_size,) if isinstance(self.block_size, int) else tuple(self.block_size)
        if not blocks or any(b < 16 or b & (b - 1) for b in blocks):
            raise ValueError(f"block sizes must be powers of two >= 16, not {self.block_size!r}")
        self.block_size = blocks[0] if len(blocks) == 1 else blocks
        if self.mode not in ("auto", "uniform"):
            raise ValueError(f"mode must be 'auto' or 'uniform', not {self.mode!r}")
        if self.importance not in ("uniform", "residual", "measured"):
            raise ValueError(f"importance must be 'uniform', 'residual' or 'measured', not {self.importance!r}")


# --------------------------------------------------------------------------- units


@dataclasses.dataclass
class _Part:
    """One node of a unit: its weight and how its error is measured."""

    node: str
    op: str  # MatMul, Gemm, Conv, Gather
    weight: np.ndarray  # as the quantizer sees it: [K, N] for MatMul/Gemm, [vocab, dim] for Gather
    input: str
    options: list[Option]
    errors: dict[str, float] = dataclasses.field(default_factory=dict)
    sizes: dict[str, int] = dataclasses.field(default_factory=dict)
    importance: float = 1.0  # weight of this node's squared relative error in the objective
    probe: dict | None = None  # the measured model-output error behind a "measured" importance
    output: str = ""  # the node's output tensor (static QDQ quantizes it too)


@dataclasses.dataclass
class _Unit:
    parts: list[_Part]
    tied_bytes: int = 0  # bytes of a float table shared by all parts (counted once while all are float)

    @property
    def name(self) -> str:
        return " + ".join(p.node for p in self.parts)

    def combos(self) -> list[tuple[Option, ...]]:
        """Every choice of one option per part; a ``gather-tied`` lookup only beside its matching head."""
        return [cb for cb in itertools.product(*[p.options for p in self.parts]) if _tied_ok(cb)]

    def size(self, combo: tuple[Option, ...]) -> int:
        if self.tied_bytes and all(o.kind == KEEP for o in combo):
            return self.tied_bytes
        return sum(p.sizes[o.key] for p, o in zip(self.parts, combo))

    def error(self, combo: tuple[Option, ...]) -> float:
        return sum(p.importance * p.errors[o.key] ** 2 for p, o in zip(self.parts, combo))

    @property
    def params(self) -> int:
        """Distinct weights: a tied table counts once."""
        if self.tied_bytes:
            return self.tied_bytes // self.parts[0].weight.dtype.itemsize
        return sum(p.weight.size for p in self.parts)


def _tied_ok(combo: tuple[Option, ...]) -> bool:
    """A lookup reading the head's packed table needs the head in exactly that format."""
    return all(o.kind != "gather-tied" or dataclasses.replace(o, kind="nbits") in combo for o in combo)


def _float_bytes(arr: np.ndarray) -> int:
    return arr.dtype.itemsize


class BitAllocationPass(EdgePass):
    """Choose a storage format per weight-bearing node under a size/latency budget; emit with ORT's tools."""

    name = "bits"
    Config = BitAllocationConfig

    # ------------------------------------------------------------------ back-off

    def relaxed(self) -> BitAllocationPass | None:
        c = self.config
        if c.mode == "uniform":
            nxt = {2: 4, 4: 8}.get(c.bits or 0)
            return None if nxt is None else BitAllocationPass(dataclasses.replace(c, bits=nxt), self.context)
        grow = 1.0 + c.relax_step
        if c.size_budget_bytes is not None:
            new = dataclasses.replace(c, size_budget_bytes=int(c.size_budget_bytes * grow))
        elif c.avg_bits is not None:
            if c.avg_bits >= 32:
                return None
            new = dataclasses.replace(c, avg_bits=min(32.0, c.avg_bits * grow))
        elif c.latency_budget_ms is not None:
            new = dataclasses.replace(c, latency_budget_ms=c.latency_budget_ms * grow)
        elif c.latency_budget_ratio is not None:
            if c.latency_budget_ratio >= 1.0:
                return None
            new = dataclasses.replace(c, latency_budget_ratio=min(1.0, c.latency_budget_ratio * grow))
        else:
            return None
        if getattr(self, "_float_reached", False):
            return None
        return BitAllocationPass(new, self.context)

    # ------------------------------------------------------------------ main

    def call(self, model: ir.Model) -> EdgePassResult:
        c = self.config
        self._check_config()
        notes: list[str] = []
        target = self.context.target if self.context is not None else None
        kinds, why_not = _formats_for(target, c)
        notes += why_not
        structures = analyze(model)
        units, skipped = self._units(model, structures, kinds, notes)
        if not units:
            notes.append("no weight-bearing node with a constant float weight was found: nothing to quantize")
            return EdgePassResult(model, modified=False, summary={"notes": notes, **skipped})
        self._measure(model, units)
        if c.importance == "residual":
            self._importance(model, structures, units)
        elif c.importance == "measured":
            self._measured_importance(model, units)
        other_bytes = model_bytes(model) - sum(_float_size(u) for u in units)
        items = [[knapsack.Item(u.error(cb), u.size(cb)) for cb in u.combos()] for u in units]
        shared: list[knapsack.SharedCost] = []
        latency_info: dict[str, Any] = {}
        if (c.latency_budget_ms is not None or c.latency_budget_ratio is not None) and c.mode == "auto":
            items, shared, latency_info = self._latency(model, units, items)
        budget = self._budget(units, other_bytes, items, latency_info, notes)
        float_choice = [next(i for i, cb in enumerate(u.combos()) if all(o.kind == KEEP for o in cb)) for u in units]
        summary: dict[str, Any] = {
            "mode": c.mode, "units": len(units), **skipped, "float_unit_bytes": sum(_float_size(u) for u in units),
            "other_bytes": other_bytes, "formats_offered": sorted({o.key for u in units for p in u.parts for o in p.options}),
            "per_layer_chart": {"y": "bits", "ylabel": "bits per weight"}, "latency": latency_info or None,
        }  # fmt: skip
        if budget.get("noop"):
            self._float_reached = True
            notes.append(budget["noop"])
            summary["notes"] = notes
            return EdgePassResult(model, modified=False, records=self._records(units, float_choice), summary=summary)
        if c.mode == "uniform":
            choice = [self._uniform_choice(u) for u in units]
            sol = knapsack.Solution(choice, *knapsack.totals(items, choice), method="uniform", feasible=True)
        else:
            sol = knapsack.solve(items, size_budget=budget.get("size"), latency_budget=budget.get("latency"),
                                 shared=shared, method=c.solver)
            if not sol.feasible and budget.get("latency") is not None:
                fastest = self._fastest(items, shared, budget.get("size"))
                if fastest.feasible:  # just below the predicted floor: let the measurement decide
                    notes.append("the latency budget is just below what the microbenchmarks predict for the fastest "
                                 "choice: that choice is emitted and measured")
                    sol = fastest
            if not sol.feasible:
                floor = budget["floor_text"]
                if budget.get("latency") is not None:  # shared DynamicQuantizeLinear costs can make it infeasible
                    floor += (f"; the fastest model the offered formats allow needs {knapsack.floor(items, by='latency'):.3f} ms "
                              f"in the quantizable nodes against {budget['latency']:.3f} ms left for them")
                raise BadInputError(f"the budget cannot be met: {floor}; raise the budget.")
            summary["tradeoff"] = self._curve(items, shared, budget, other_bytes)
        plan = self._plan(units, sol)
        if all(o.kind == KEEP for o in plan.values()):
            self._float_reached = True
            notes.append("the solver kept every unit float: the budget allows the float model")
            summary["notes"] = notes
            return EdgePassResult(model, modified=False, records=self._records(units, sol.choice), summary=summary)
        new, log = self._emit(model, units, plan)
        if budget.get("latency") is not None:
            sol, new, log, summary["latency_check"] = self._meet_latency(model, units, items, shared, budget, latency_info,
                                                                         sol, new, log, notes)
        summary.update(solver=sol.method, objective=sol.error, unit_bytes=int(sol.size), solver_note=sol.note,
                       budget=budget.get("text"), floor=budget.get("floor_text"))
        if sol.latency:
            summary["predicted_latency_ms"] = sol.latency + latency_info.get("rest_ms", 0.0)
        records = self._records(units, sol.choice)
        self._output_checks(model, units, sol.choice, records)
        self._block_cosines(model, structures, records)
        model.graph = new.graph
        model.ir_version = new.ir_version
        summary.update(emit=log, weight_bytes_after=model_bytes(model),
                       avg_bits=8.0 * sol.size / sum(u.params for u in units))
        summary["notes"] = notes
        logger.info("bits: %d units, %.2f avg bits, %.1f MB of weights", len(units), summary["avg_bits"], summary["weight_bytes_after"] / 1e6)
        return EdgePassResult(model, modified=True, records=records, summary=summary)

    # ------------------------------------------------------------------ emission and the latency check

    def _fastest(self, items, shared, size_budget):
        """The most accurate of the choices of least predicted latency within the size budget.

        Two solves, lexicographic: the least latency first, then the least error at that latency
        (a tie-breaking term in one objective would sit below the solver's tolerance).
        """
        by_latency = [[knapsack.Item(it.latency, it.size, 0.0) for it in row] for row in items]
        s = knapsack.solve(by_latency, size_budget=size_budget, method=self.config.solver)
        least = knapsack.totals(items, s.choice, shared)[2]
        best = knapsack.solve(items, size_budget=size_budget, latency_budget=least * (1 + 1e-6) + 1e-9, shared=shared,
                              method=self.config.solver)
        choice = best.choice if best.feasible else s.choice
        return knapsack.Solution(choice, *knapsack.totals(items, choice, shared), method=f"{s.method} (fastest)",
                                 feasible=s.feasible)

    @staticmethod
    def _plan(units: list[_Unit], sol) -> dict[str, Option]:
        return {p.node: o for u, i in zip(units, sol.choice) for p, o in zip(u.parts, u.combos()[i])}

    def _emit(self, model: ir.Model, units: list[_Unit], plan: dict[str, Option]):
        from edgeprune.passes.bits.emit import emit

        with self._stage("emit through ORT's quantizers"):
            grams = {p.node: self._gram_stats[p.input].gram for u in units for p in u.parts if plan[p.node].kind == "gptq"}
            rows = self.context.calibration.samples if any(o.kind == "qdq" for o in plan.values()) else None
            return emit(model, plan, accuracy_level=self.config.accuracy_level, grams=grams, calibration=rows)

    def _meet_latency(self, model, units, items, shared, budget, latency_info, sol, new, log, notes):
        """Measure the emitted model against the float one on the target; re-solve while it misses the budget.

        Per-shape microbenchmarks miss what happens between nodes (fusions such as attention or
        DynamicQuantizeMatMul, which quantized neighbours enable or block; cache traffic), so the
        prediction can be off by tens of percent.  Each miss tightens the solver's budget by the
        measured overshoot and re-solves; after ``latency_checks`` measurements the last model is
        kept, with a note when it still misses.
        """
        from edgeprune.runtime.latency import measure_side_by_side
        from edgeprune.validation import latency_feed

        c = self.config
        float_ms = latency_info["float_ms"]
        target = c.latency_budget_ratio if c.latency_budget_ratio is not None else c.latency_budget_ms / float_ms
        feed = latency_feed(self.context.calibration.samples[0], model, c.latency_tokens)
        # p50 of a few runs is noisy on a shared machine: small models get more runs (about 2 s per model).
        runs = max(c.latency_runs, min(50, int(2000.0 / max(float_ms, 1e-3))))
        solver_budget = budget["latency"]
        attempts, fastest = [], False
        while True:
            with self._stage("measure the emitted model's latency side by side with the float model"):
                lat = measure_side_by_side({"float": model, "candidate": new}, feed, self.context.target, warmup=2,
                                           runs=runs, threads=self.context.threads)
            ratio = lat["candidate"].p50_ms / lat["float"].p50_ms
            predicted = sol.latency + latency_info["rest_ms"]
            attempts.append({"solver_budget_ms": solver_budget, "predicted_ms": predicted, "predicted_ratio": predicted / float_ms,
                             "measured_ratio": ratio, "measured_ms": lat["candidate"].p50_ms,
                             "float_ms": lat["float"].p50_ms, "fastest_choice": fastest})
            if ratio <= target * (1 + _LATENCY_TOLERANCE) or len(attempts) >= c.latency_checks or fastest:
                break
            solver_budget -= (ratio - target) * float_ms
            nxt = knapsack.solve(items, size_budget=budget.get("size"), latency_budget=solver_budget, shared=shared,
                                 method=c.solver)
            if not nxt.feasible:  # the microbenchmarks see nothing faster: take the fastest choice the size allows
                fastest = True
                nxt = self._fastest(items, shared, budget.get("size"))
                if nxt.choice == sol.choice:
                    break
                solver_budget = nxt.latency
            sol = nxt
            new, log = self._emit(model, units, self._plan(units, sol))
        met = attempts[-1]["measured_ratio"] <= target * (1 + _LATENCY_TOLERANCE)
        if not met:
            notes.append(f"measured latency {attempts[-1]['measured_ratio']:.2f}x of the float model misses the budget "
                         f"{target:.2f}x after {len(attempts)} measurement(s): the offered formats are not faster here")
        return sol, new, log, {"target_ratio": target, "met": met, "attempts": attempts}

    # ------------------------------------------------------------------ pieces

    def _simulate(self, p: _Part, o: Option) -> np.ndarray:
        gram = self._gram_stats[p.input].gram if o.kind == "gptq" else None
        return sensitivity.simulate(o, p.weight, gram=gram)

    def _stage(self, text: str):
        import contextlib

        return self.context.progress.stage(text) if self.context is not None else contextlib.nullcontext()

    def _check_config(self) -> None:
        c = self.config
        budgets = [b for b in (c.size_budget_bytes, c.avg_bits, c.latency_budget_ms, c.latency_budget_ratio) if b is not None]
        if self.context is None:
            raise BadInputError("bit allocation measures errors on calibration data: run it inside a compile (with --calib).")
        if c.mode == "uniform":
            if c.bits not in (2, 4, 8):
                raise BadInputError(f"uniform bits must be 2, 4 or 8, not {c.bits!r}: pass --bits 8 or --bits 4.")
            return
        if not budgets:
            raise BadInputError("--bits auto needs a budget: pass --size-budget, --avg-bits or --latency-budget.")
        if c.size_budget_bytes is not None and c.avg_bits is not None:
            raise BadInputError("--size-budget and --avg-bits both bound the size: pass only one of them.")
        if c.latency_budget_ms is not None and c.latency_budget_ratio is not None:
            raise BadInputError("latency_budget_ms and latency_budget_ratio both bound the latency: pass only one of them.")
        if any(b <= 0 for b in budgets):
            raise BadInputError("budgets must be positive: pass a size in bytes/MB, bits per weight or milliseconds.")

    def _units(self, model: ir.Model, structures, kinds: set[str], notes: list[str]) -> tuple[list[_Unit], dict]:
        c = self.config
        if c.mode == "uniform":  # offer exactly the uniform width (plus float for nodes it cannot take)
            c = dataclasses.replace(c, bit_options=(c.bits,))
        units: list[_Unit] = []
        head_of = {e.tied_with: e for e in structures.embeddings if e.tied}

        def mm_options(k: int) -> list[Option]:
            opts = [Option(KEEP)]
            if "int8-dynamic" in kinds and 8 in c.bit_options:
                opts.append(Option("int8-dynamic", 8))
            opts += [Option("qdq", b) for b in _QDQ_BITS if f"qdq{b}" in kinds]
            if "nbits" in kinds:
                opts += [Option("nbits", b, blk, c.symmetric) for b in c.bit_options if b in _NBITS_TOOL_BITS
                         for blk in _blocks(c)]
                if c.gptq:
                    opts += [Option("gptq", b, blk, c.symmetric) for b in c.bit_options if b in (2, 4) for blk in _blocks(c)]
            return opts

        def gather_options(dim: int) -> list[Option]:
            opts = [Option(KEEP)]
            if "int8-dynamic" in kinds and 8 in c.bit_options:
                opts.append(Option("int8-gather", 8))
            if "nbits" in kinds and 4 in c.bit_options:
                opts += [Option("gather-nbits", 4, blk, c.symmetric) for blk in _blocks(c) if dim % blk == 0]
            return opts

        init = model.graph.initializers
        lin_by_node = {lin.node: lin for lin in structures.linears}
        for lin in structures.linears:
            if lin.node in head_of:
                continue
            w = _weight_array(init, lin)
            if w is None:
                continue
            units.append(_Unit([_Part(lin.node, lin.op_type, w, lin.input, mm_options(w.shape[0]), output=lin.output)]))
        for emb in structures.embeddings:
            table = init[emb.table].const_value.numpy()
            if table.dtype != np.float32:
                continue
            part = _Part(emb.node, "Gather", table, emb.input, gather_options(emb.dim))
            if emb.tied and emb.tied_with in lin_by_node:
                lin = lin_by_node[emb.tied_with]
                head = _Part(lin.node, "MatMul", np.ascontiguousarray(table.T) if lin.transposed else table,
                             lin.input, mm_options(emb.dim), output=lin.output)
                if lin.transposed:  # the head's [dim, vocab] blocks run along dim: the table's rows
                    part.options += [dataclasses.replace(o, kind="gather-tied") for o in head.options
                                     if o.kind == "nbits" and emb.dim % o.block == 0]
                units.append(_Unit([part, head], tied_bytes=table.nbytes))
            else:
                units.append(_Unit([part]))
        for conv in structures.conv_layers:
            w = init[conv.weight].const_value.numpy() if conv.weight in init else None
            if w is None or w.dtype != np.float32:
                continue
            opts = [Option(KEEP)] + ([Option("int8-dynamic", 8)] if "int8-dynamic" in kinds and 8 in c.bit_options else [])
            opts += [Option("qdq", b) for b in _QDQ_BITS if f"qdq{b}" in kinds]
            units.append(_Unit([_Part(conv.node, "Conv", w, conv.input, opts, output=conv.output)]))
        # What is left alone, and why.
        from edgeprune.passes.bits.emit import QUANTIZED_OPS, node_name

        found = {p.node for u in units for p in u.parts}
        quantized = sum(1 for n in model.graph if n.op_type in QUANTIZED_OPS)
        no_const = sum(1 for n in model.graph if n.op_type in ("MatMul", "Gemm", "Conv") and node_name(n) not in found)
        if quantized:
            notes.append(f"{quantized} nodes are already quantized ({', '.join(sorted({n.op_type for n in model.graph if n.op_type in QUANTIZED_OPS}))}): left as they are")
        if no_const:
            notes.append(f"{no_const} MatMul/Gemm/Conv nodes have no constant float weight (activation x activation, "
                         "or a weight computed at run time): left as they are")
        return units, {"already_quantized_nodes": quantized, "nodes_without_constant_weight": no_const}

    def _measure(self, model: ir.Model, units: list[_Unit]) -> None:
        """Fill each part's error (relative output error on calibration rows) and size per option."""
        gram_inputs = sorted({p.input for u in units for p in u.parts if p.op in ("MatMul", "Gemm")})
        conv_inputs = sorted({p.input for u in units for p in u.parts if p.op == "Conv"})
        requests = [StatsRequest(t, axis=-1, gram=True) for t in gram_inputs] + [StatsRequest(t, axis=1) for t in conv_inputs]
        # Static QDQ also rounds each node's output to a calibrated range: its noise needs that range.
        qdq_outputs = {p.output: (1 if p.op == "Conv" else -1) for u in units for p in u.parts
                       if p.output and any(o.kind == "qdq" for o in p.options)}
        requests += [StatsRequest(t, axis=a) for t, a in sorted(qdq_outputs.items()) if t not in gram_inputs + conv_inputs]
        stats = self.context.stats(model, requests) if requests else {}
        self._gram_stats = stats
        counts = self._token_counts(units)
        with self._stage(f"quantization error of {sum(len(p.options) for u in units for p in u.parts)} unit options"):
            for u in units:
                for p in u.parts:
                    fb = _float_bytes(p.weight)
                    for o in p.options:
                        if p.op == "Conv":
                            p.sizes[o.key] = _conv_bytes(p.weight, o, fb)
                        else:
                            p.sizes[o.key] = sensitivity.option_bytes(o, p.weight.shape, fb)
                    p.errors.update(self._cached_errors(p, stats, counts))

    def _importance(self, model: ir.Model, structures, units: list[_Unit]) -> None:
        """Weight each node's squared relative error by how much its block writes into the residual stream.

        A transformer block's output is added to the residual stream; noise relative to the block's
        output matters in proportion to ||block output||^2 / ||residual after the add||^2 (a block
        that writes little into a large stream is forgiving; layer-0 MLPs that write massive
        activations are not).  Every linear of the block (q/k/v/o, gate/up/down) shares its block's
        ratio; nodes outside blocks (LM head, embeddings, poolers) weigh 1: their relative error is
        already relative to the stream or the logits.
        """
        parts = {p.node: p for u in units for p in u.parts}
        writer, adds = _residual_adds(model, structures)
        resid = {w: out for w, (out, _) in adds.items() if w in parts and parts[w].input in self._gram_stats}
        if not resid:
            return
        stats = self.context.stats(model, [StatsRequest(t, axis=-1) for t in sorted(set(resid.values()))])
        ratio = {}
        for wnode, tensor in resid.items():
            p = parts[wnode]
            out_sq = sensitivity._quad(self._gram_stats[p.input].gram, p.weight, False)
            stream_sq = float(stats[tensor].sq_norm.sum())
            ratio[wnode] = out_sq / stream_sq if stream_sq > 0 else 1.0
        for node, w in writer.items():
            if node in parts and w.node in ratio:
                parts[node].importance = ratio[w.node]

    def _measured_importance(self, model: ir.Model, units: list[_Unit]) -> None:
        """Importance = (model-output error / local error)^2 with only that node quantized, for every node.

        One ORT session of a copy whose unit weights are graph inputs: each probe feeds one node's
        quantize-dequantized weight (its smallest lossy option) and the others' originals, so a
        probe costs one forward pass on one held-back row, not a session per node.
        """
        import onnx

        from edgeprune.model_io import to_proto
        from edgeprune.runtime.session import make_session

        if self.context is None or not len(self.context.holdout):
            return
        parts = [p for u in units for p in u.parts if any(o.kind != KEEP for o in p.options) and p.op != "Conv"]
        if not parts:
            return
        proto = to_proto(model)
        nodes = {(n.name or f"{n.op_type}:{n.output[0]}"): n for n in proto.graph.node}
        # One held-back row, token inputs cut to 64 positions: a probe is a ranking signal, not a metric.
        feeds = {k: (v[:, :64] if v.ndim == 2 and v.dtype.kind in "iu" else v)
                 for k, v in next(iter(self.context.holdout.batches(1))).items()}
        import hashlib

        cache = self.context.__dict__.setdefault("_bits_probe_cache", {})
        keys = [(p.node, hashlib.blake2b(p.weight.tobytes(), digest_size=16).hexdigest(), tuple(sorted(p.sizes)),
                 id(self.context.holdout)) for p in parts]
        if all(k in cache for k in keys):
            for p, k in zip(parts, keys):
                p.probe, p.importance = cache[k]
            return
        arrays: dict[str, np.ndarray] = {}
        for i, p in enumerate(parts):
            name = f"__edgeprune_w{i}"
            node = nodes[p.node]
            if p.op == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
                arr = np.ascontiguousarray(p.weight.T)
            else:
                arr = p.weight
            node.input[0 if p.op == "Gather" else 1] = name
            proto.graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(arr.shape)))
            arrays[name] = arr
        used = {x for n in proto.graph.node for x in n.input}
        keep = [t for t in proto.graph.initializer if t.name in used]
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(keep)
        with self._stage(f"model-output sensitivity of {len(parts)} nodes (one session, one row each)"):
            session = make_session(proto, "cpu", threads=self.context.threads)
            out_name = session.get_outputs()[0].name
            ref = session.run([out_name], {**feeds, **arrays})[0].astype(np.float64)
            ref_sq = float(np.square(ref).sum())
            for i, p in enumerate(parts):
                probe = min((o for o in p.options if o.kind != KEEP), key=lambda o: (p.sizes[o.key], o.key))
                local = p.errors[probe.key]
                name = f"__edgeprune_w{i}"
                q = self._simulate(p, probe)
                arr = np.ascontiguousarray(q.T) if arrays[name] is not p.weight else q
                out = session.run([out_name], {**feeds, **arrays, name: arr})[0].astype(np.float64)
                out_err = math.sqrt(float(np.square(out - ref).sum()) / ref_sq) if ref_sq > 0 else 0.0
                p.probe = {"option": probe.key, "local_rel_error": local, "output_rel_error": out_err}
                if local > 0:
                    p.importance = float(np.clip((out_err / local) ** 2, 1e-3, 1e3))
                cache[keys[i]] = (p.probe, p.importance)

    def _block_cosines(self, model: ir.Model, structures, records: list[dict]) -> None:
        """Proxy: cosine between each block's residual stream before and after it, on one held-back row.

        A block whose output barely turns the stream (cosine near 1) is a candidate for fewer bits;
        recorded beside the measured errors as a cross-check, not used by the solver.
        """
        if self.context is None or not len(self.context.holdout):
            return
        writer, adds = _residual_adds(model, structures)
        if not adds:
            return
        from edgeprune.model_io import to_proto
        from edgeprune.runtime.session import make_session

        names = sorted({n for pair in adds.values() for n in pair})
        proto = to_proto(model)
        import onnx

        existing = {o.name for o in proto.graph.output}
        proto.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in existing)
        feed = next(iter(self.context.holdout.batches(1)))
        with self._stage(f"block cosines of {len(adds)} residual blocks"):
            session = make_session(proto, "cpu", threads=self.context.threads)
            values = dict(zip(names, session.run(names, feed)))
        cos = {w: sensitivity.cosine(values[before], values[after]) for w, (after, before) in adds.items()}
        for r in records:
            w = writer.get(r["layer"])
            if w is not None and w.node in cos:
                r["block_cosine"] = cos[w.node]

    def _token_counts(self, units: list[_Unit]) -> dict[str, np.ndarray]:
        """Per-row lookup counts of each embedding input that is a graph input (others: uniform)."""
        out = {}
        for u in units:
            for p in u.parts:
                if p.op != "Gather":
                    continue
                rows = p.weight.shape[0]
                c = np.zeros(rows, dtype=np.float64)
                for s in self.context.calibration.samples:
                    if p.input in s:
                        ids = np.asarray(s[p.input]).ravel()
                        mask = np.asarray(s.get("attention_mask", np.ones_like(s[p.input]))).ravel().astype(bool)
                        ids = ids[mask] if mask.shape == ids.shape else ids
                        np.add.at(c, ids[(ids >= 0) & (ids < rows)], 1.0)
                # Add-one smoothing spread over the table: unseen tokens still count a little, so a
                # small calibration set does not declare them free to destroy.
                out[p.node] = c + max(c.sum(), 1.0) / rows
        return out

    def _cached_errors(self, p: _Part, stats, counts) -> dict[str, float]:
        """``_errors``, remembered on the context for the same weight, statistics and options.

        Accuracy back-off re-runs the pass on a fresh copy of the same model; the errors are the
        same, so they are computed once.  The key holds the statistics object (replaced whenever
        the pipeline invalidates statistics) and a hash of the weight bytes.
        """
        import hashlib

        cache = self.context.__dict__.setdefault("_bits_error_cache", {})
        st = stats.get(p.input)
        key = (p.node, hashlib.blake2b(p.weight.tobytes(), digest_size=16).hexdigest(), id(st) if st is not None else None,
               tuple(o.key for o in p.options), p.op == "Gather" and self.context.calibration is not None and id(self.context.calibration))
        if key not in cache:
            cache[key] = self._errors(p, stats, counts)
        return cache[key]

    def _errors(self, p: _Part, stats, counts) -> dict[str, float]:
        """Relative output error of each option of one part."""
        errs = {o.key: 0.0 for o in p.options if o.kind == KEEP}
        lossy = [o for o in p.options if o.kind != KEEP]
        if not lossy:
            return errs
        if p.op == "Gather":
            for o in lossy:
                errs[o.key] = sensitivity.row_weighted_rel_error(p.weight, sensitivity.simulate(o, p.weight), counts[p.node])
            return errs
        st = stats[p.input]
        if p.op == "Conv":
            # Diagonal Gram (per-input-channel energy): exact cross terms would need im2col statistics.
            # quantize_dynamic writes ConvInteger with one weight scale (per tensor), whatever per_channel says.
            w2 = p.weight.reshape(p.weight.shape[0], -1).T
            per = np.repeat(st.sq_norm, int(np.prod(p.weight.shape[2:])))
            den = float(per @ np.square(w2).sum(axis=1))
            for o in lossy:
                deq = sensitivity.int8_channel_dequant(p.weight, axis=0) if o.kind == "qdq" else sensitivity.int8_tensor_dequant(p.weight)
                q = deq.reshape(p.weight.shape[0], -1).T
                num = (float(per @ np.square(q - w2).sum(axis=1)) + self._activation_noise(p, o, q, st, stats))
                errs[o.key] = math.sqrt(num / den) if den > 0 else 0.0
            return errs
        qs = [sensitivity.simulate(o, p.weight, gram=st.gram) for o in lossy]
        extra = [self._activation_noise(p, o, q, st, stats) for o, q in zip(lossy, qs)]
        for o, e in zip(lossy, sensitivity.gram_rel_errors(p.weight, qs, st.gram, extra_sq=extra)):
            errs[o.key] = e
        return errs

    @staticmethod
    def _activation_noise(p: _Part, o: Option, q: np.ndarray, st, stats) -> float:
        """Squared output error from rounding activations: dynamic int8 rounds the input, static QDQ the
        input and the output, each to a per-tensor range (uniform noise model)."""
        if o.kind not in ("int8-dynamic", "qdq"):
            return 0.0
        noise = sensitivity.activation_noise_sq(q, float(st.absmax.max()), st.count, bits=o.bits)
        out = stats.get(p.output) if o.kind == "qdq" else None
        if out is not None:
            scale = 2.0 * float(out.absmax.max()) / float((1 << o.bits) - 1)
            noise += out.count * out.absmax.size * scale * scale / 12.0
        return noise

    def _budget(self, units, other_bytes, items, latency_info, notes) -> dict[str, Any]:
        c = self.config
        float_unit = sum(_float_size(u) for u in units)
        min_unit = knapsack.floor(items)
        params = sum(u.params for u in units)
        floor_text = (f"the smallest model the offered formats allow is {(min_unit + other_bytes) / 1e6:.2f} MB of weights "
                      f"({8 * min_unit / params:.2f} bits per weight over the quantized nodes)")
        out: dict[str, Any] = {"floor_text": floor_text}
        if c.mode == "uniform":
            return out
        texts, noop = [], []
        if c.size_budget_bytes is not None or c.avg_bits is not None:
            if c.size_budget_bytes is not None:
                unit_budget = c.size_budget_bytes - other_bytes
                texts.append(f"{c.size_budget_bytes / 1e6:.2f} MB of weights ({unit_budget / 1e6:.2f} MB for the quantizable nodes)")
            else:
                unit_budget = c.avg_bits * params / 8.0
                texts.append(f"{c.avg_bits:g} bits per weight over the quantizable nodes ({unit_budget / 1e6:.2f} MB)")
            out["size"] = unit_budget
            if unit_budget < min_unit:
                raise BadInputError(f"the size budget ({texts[-1]}) is below the floor: {floor_text}; raise the budget.")
            if unit_budget >= float_unit:
                noop.append(f"the size budget ({texts[-1]}) is at or above the float model's size")
        if c.latency_budget_ms is not None or c.latency_budget_ratio is not None:
            rest = latency_info["rest_ms"]
            lat_floor = knapsack.floor(items, by="latency") + rest
            ms = c.latency_budget_ms if c.latency_budget_ms is not None else c.latency_budget_ratio * latency_info["float_ms"]
            out["latency"] = ms - rest
            what = f"{ms:.1f} ms" if c.latency_budget_ratio is None else f"{c.latency_budget_ratio:g} x the float model's {latency_info['float_ms']:.1f} ms = {ms:.1f} ms"
            texts.append(f"latency {what} (model outside the units: {rest:.1f} ms)")
            if ms < lat_floor * (1 - _LATENCY_FLOOR_SLACK):
                raise BadInputError(
                    f"the latency budget {what} is below the fastest model the offered formats "
                    f"allow (about {lat_floor:.1f} ms by the microbenchmarks): raise the budget."
                )
            if ms >= latency_info["float_ms"]:
                noop.append(f"the latency budget {what} is at or above the float model's "
                            f"{latency_info['float_ms']:.1f} ms")
        out["text"] = "; ".join(texts)
        bounded = (c.size_budget_bytes is not None or c.avg_bits is not None) + (
            c.latency_budget_ms is not None or c.latency_budget_ratio is not None)
        if len(noop) == bounded:
            out["noop"] = " and ".join(noop) + ": nothing to do"
        return out

    def _uniform_choice(self, u: _Unit) -> int:
        bits = self.config.bits
        combos = u.combos()

        def want(p: _Part) -> Option:
            if p.op == "Gather":
                pref = ["gather-tied"] + (["int8-gather"] if bits == 8 else ["gather-nbits"])
            elif p.op == "Conv":
                pref = ["int8-dynamic", "qdq"]
            else:
                pref = ["gptq", "nbits", "qdq"]
            for kind in pref:
                for o in p.options:
                    if (o.kind == kind and (kind not in ("nbits", "gptq", "gather-tied", "qdq") or o.bits == bits)
                            and o.block in (0, _blocks(self.config)[0])):
                        return o
            return Option(KEEP)

        target = tuple(want(p) for p in u.parts)
        if target not in combos:  # a tied lookup shares only a round-to-nearest head: same grid, no GPTQ
            target = tuple(dataclasses.replace(o, kind="nbits") if o.kind == "gptq" else o for o in target)
        return combos.index(target)

    def _curve(self, items, shared, budget, other_bytes) -> list[dict]:
        """Error/size (or error/latency) points the solver sees between the floor and the float model."""
        by_lat = "latency" in budget
        key = (lambda it: it.latency) if by_lat else (lambda it: it.size)
        lo = knapsack.floor(items, by="latency" if by_lat else "size")
        hi = sum(max(key(it) for it in opts) for opts in items)
        points = []
        for b in np.linspace(lo, hi, _CURVE_POINTS):
            kw = {"latency_budget": b} if by_lat else {"size_budget": b}
            s = knapsack.solve(items, shared=shared, method=self.config.solver, **kw)
            if s.feasible:
                pt = {"budget": float(b), "error": s.error, "size_bytes": int(s.size + other_bytes)}
                if by_lat:
                    pt["latency_ms"] = s.latency
                points.append(pt)
        return points

    def _latency(self, model, units, items):
        from edgeprune.passes.bits import microbench

        c = self.config
        target = self.context.target
        with self._stage("latency microbenchmarks per shape and format"):
            table = microbench.unit_latencies(units, target, tokens=c.latency_tokens, threads=self.context.threads,
                                              accuracy_level=c.accuracy_level)
            float_ms, float_units_ms = microbench.model_latency(model, self.context, units, table, c.latency_tokens)
        new_items, groups = [], {}
        for ui, u in enumerate(units):
            row = []
            for oi, cb in enumerate(u.combos()):
                lat = sum(table[(p.node, o.key)] for p, o in zip(u.parts, cb))
                row.append(knapsack.Item(items[ui][oi].error, items[ui][oi].size, lat))
                for p, o in zip(u.parts, cb):
                    if o.kind == "int8-dynamic" and p.op in ("MatMul", "Gemm"):
                        groups.setdefault(p.input, []).append((ui, oi))
            new_items.append(row)
        shared = [knapsack.SharedCost(tuple(m), latency=table[("dql", inp)]) for inp, m in groups.items()]
        info = {"float_ms": float_ms, "rest_ms": max(float_ms - float_units_ms, 0.0), "units_float_ms": float_units_ms,
                "tokens": c.latency_tokens, "per_unit_ms": {f"{k[0]}|{k[1]}": v for k, v in table.items()}}
        return new_items, shared, info

    def _records(self, units: list[_Unit], choice: list[int]) -> list[dict]:
        recs = []
        for u, i in zip(units, choice):
            combo = u.combos()[i]
            for p, o in zip(u.parts, combo):
                size = p.sizes[o.key] if not (u.tied_bytes and all(x.kind == KEEP for x in combo)) else u.tied_bytes / len(u.parts)
                bits = 8.0 * p.sizes[o.key] / p.weight.size
                if o.kind == "gather-tied":  # stored once, in the head's initializers
                    bits = max(8.0 * q.sizes[x.key] / q.weight.size for q, x in zip(u.parts, combo))
                recs.append({
                    "layer": p.node, "op": p.op, "shape": list(p.weight.shape), "params": int(p.weight.size),
                    "format": o.key, "bits": round(bits, 3), "bytes": int(size),
                    "rel_error": p.errors[o.key], "importance": p.importance, "probe": p.probe, "tied_unit": u.name if len(u.parts) > 1 else None,
                    "options": {k: {"bytes": p.sizes[k], "rel_error": p.errors[k]} for k in p.sizes},
                    "outlier_share": sensitivity.outlier_share(p.weight),
                })  # fmt: skip
        return recs

    def _output_checks(self, model, units, choice, records) -> None:
        """Model-output error with only one node quantized (simulated), for the most sensitive chosen nodes."""
        n = self.config.output_checks
        if n <= 0 or self.context is None or not len(self.context.holdout):
            return
        from edgeprune.model_io import to_proto
        from edgeprune.verify import run_batches

        cand = sorted((r for r in records if r["rel_error"] > 0), key=lambda r: -r["rel_error"])[:n]
        if not cand:
            return
        by_node = {p.node: (p, o) for u, i in zip(units, choice) for p, o in zip(u.parts, u.combos()[i])}
        batches = list(self.context.holdout.batches(1))[:2]  # two rows: a cross-check, not a metric
        proto = to_proto(model)
        with self._stage(f"model-output error of the {len(cand)} most sensitive nodes"):
            ref = run_batches(proto, batches, threads=self.context.threads)
            for rec in cand:
                p, o = by_node[rec["layer"]]
                out = run_batches(_with_weight(proto, model, p, self._simulate(p, o)), batches,
                                  threads=self.context.threads)
                rec["output_rel_error"] = _rel(ref, out)


# --------------------------------------------------------------------------- helpers


def _formats_for(target, c: BitAllocationConfig) -> tuple[set[str], list[str]]:
    """Option kinds the target has kernels for, and notes on the requested ones it lacks."""
    fast = set(target.fast_formats) if target is not None else {"fp32", "int8-dynamic", "int4-matmulnbits"}
    name = target.name if target is not None else "cpu"
    kinds, notes = set(), []
    if "int4-matmulnbits" in fast:
        kinds.add("nbits")
    elif any(b in (2, 4) for b in c.bit_options):
        notes.append(f"target {name} has no MatMulNBits kernel: 2/4-bit formats not offered")
    if "int8-dynamic" in fast and c.dynamic_int8:
        kinds.add("int8-dynamic")
    for b in c.bit_options:
        if b == 3 or b in (5, 6, 7):
            notes.append(f"{b}-bit: ORT 1.32's MatMulNBitsQuantizer writes only 2, 4 or 8 bits, so {b}-bit is not offered")
        if b == 16:
            notes.append("fp16 is not emitted by this pass (no ORT tool converts single nodes); float stays fp32"
                         + ("" if "fp16" in fast else f", and target {name} does not run fp16 fast anyway"))
    if "int8-dynamic" not in fast:  # NPU-style targets: static QDQ (on CPU, dynamic int8 is the faster int8)
        kinds |= {f"qdq{b}" for b in _QDQ_BITS if f"qdq-int{b}" in fast and 8 in c.bit_options}
    if not kinds:
        raise BadInputError(
            f"target {name} runs none of the formats this pass emits (MatMulNBits, dynamic int8, static QDQ): "
            "choose --target cpu or cuda, or leave bit allocation out of the recipe."
        )
    return kinds, notes


def _residual_adds(model: ir.Model, structures) -> tuple[dict[str, Any], dict[str, tuple[str, str]]]:
    """(node -> its block's writer linear, writer node -> (stream after the residual Add, stream before)).

    The writer is the block's output linear (attention o, FFN down); its residual Add is the Add
    consuming its output whose other operand is not a constant.
    """
    writer: dict[str, Any] = {}
    for b in structures.attention_blocks:
        for lin in (b.q, b.k, b.v, b.o, b.packed_qkv):
            if lin is not None and b.o is not None:
                writer[lin.node] = b.o
    for f in structures.ffn_blocks:
        for lin in (f.gate, f.up, f.down):
            if lin is not None:
                writer[lin.node] = f.down
    produced = {v.name: v for n in model.graph for v in n.outputs if v.name}
    adds: dict[str, tuple[str, str]] = {}
    for w in {id(w): w for w in writer.values()}.values():
        value = produced.get(w.output)
        for use in value.uses() if value is not None else ():
            node = use.node
            other = node.inputs[1 - use.idx] if node.op_type == "Add" and len(node.inputs) == 2 else None
            if other is not None and other.const_value is None and other.name:
                adds[w.node] = (node.outputs[0].name, other.name)
                break
    return writer, adds


def _blocks(c: BitAllocationConfig) -> tuple[int, ...]:
    return (c.block_size,) if isinstance(c.block_size, int) else tuple(c.block_size)


def _weight_array(init, lin) -> np.ndarray | None:
    """[K, N] float32 weight of a linear as the quantizer sees it, or None when it is not float32."""
    if lin.weight not in init or init[lin.weight].const_value is None:
        return None
    w = init[lin.weight].const_value.numpy()
    if w.dtype != np.float32 or w.ndim != 2:
        return None
    return np.ascontiguousarray(w.T) if lin.transposed else w


def _conv_bytes(w: np.ndarray, o: Option, float_bytes: int) -> int:
    """Conv weight bytes: dynamic int8 has one weight scale (ConvInteger), QDQ one per output channel
    plus the scale and zero point of its input and output."""
    if o.kind == KEEP:
        return w.nbytes
    if o.kind == "qdq":
        return w.size + w.shape[0] * (float_bytes + 1) + 2 * (float_bytes + o.bits // 8)
    return w.size + float_bytes + 1


def _float_size(u: _Unit) -> int:
    return u.tied_bytes or sum(p.weight.nbytes for p in u.parts)


def _with_weight(proto, model: ir.Model, part: _Part, new_weight: np.ndarray):
    """A copy of ``proto`` where ``part``'s node reads ``new_weight`` (a fresh initializer; float, same numerics)."""
    import onnx

    p2 = onnx.ModelProto()
    p2.CopyFrom(proto)
    node = next(n for n in p2.graph.node if (n.name or f"{n.op_type}:{n.output[0]}") == part.node)
    name = f"__edgeprune_check_{part.node}"
    if part.op == "Gather":
        arr, idx = new_weight, 0
    elif part.op == "Gemm":
        attrs = {a.name: a.i for a in node.attribute}
        arr, idx = (new_weight.T if attrs.get("transB", 0) else new_weight), 1
    else:
        arr, idx = new_weight, 1  # MatMul reads [K, N] directly (a transposed head is fed untransposed)
    p2.graph.initializer.append(onnx.numpy_helper.from_array(np.ascontiguousarray(arr, dtype=np.float32), name))
    node.input[idx] = name
    return p2


def _rel(ref: list, out: list) -> float:
    """Relative Frobenius error of the first output, over the batches."""
    key = next(iter(ref[0]))
    num = sum(float(np.square(np.asarray(o[key], np.float64) - np.asarray(r[key], np.float64)).sum()) for r, o in zip(ref, out))
    den = sum(float(np.square(np.asarray(r[key], np.float64)).sum()) for r in ref)
    return math.sqrt(num / den) if den > 0 else 0.0
