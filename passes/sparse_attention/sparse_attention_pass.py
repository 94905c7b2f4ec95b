"""The ``sparse_attention`` pass: causal self-attention blocks -> dynamic block-sparse attention.

Each matched block becomes ``edgeprune.DynamicSparseAttention`` (functions.py) with its keep ratio:
optimum's MatMul/Softmax form (with or without a KV cache) through the rewrite rules, and ORT's fused
``com.microsoft.GroupQueryAttention`` / ``MultiHeadAttention`` through a direct rewrite (rules.py).
Blocks the rules do not match, or that are not causal, stay dense with the reason in the record.
Keep ratio 1.0 is the no-op setting and returns the model untouched.

``allocation = "uniform"`` gives every layer ``keep``; ``"calibrated"`` treats ``keep`` as the mean
budget and gives each layer one of ``candidates`` from calibration measurements (allocation.py):
layers whose attention output suffers most stay denser, up to 1.0 (every block: exact dense).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

import onnx
import onnx_ir as ir

from edgeprune.errors import BadInputError
from edgeprune.passes.base import EdgePass, EdgePassResult
from edgeprune.passes.sparse_attention import allocation, functions, rules

logger = logging.getLogger(__name__)

SELECT = ("group", "head")
ALLOCATION = ("uniform", "calibrated")


@dataclasses.dataclass
class SparseAttentionConfig:
    """keep: fraction of key blocks each query block keeps; select: one choice per KV group or per query head."""

    keep: float = 0.25
    block: int = 64
    select: str = "head"  # per query head: the selection that keeps perplexity within +2 % at 25 % (BENCHMARKS)
    min_len: int = 1024
    sink: int = 1
    allocation: str = "uniform"
    candidates: tuple[float, ...] = (0.125, 0.25, 0.375, 0.5, 0.75, 1.0)

    def __post_init__(self):
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not 0.0 < self.keep <= 1.0:
            raise BadInputError(f"sparse attention keep must be a number in (0, 1], got {self.keep!r}: pass e.g. 0.25.")
        for name in ("block", "min_len", "sink"):
            value = getattr(self, name)
            low = 1 if name == "block" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise BadInputError(f"sparse attention {name} must be an integer >= {low}, got {value!r}.")
        if self.select not in SELECT:
            raise BadInputError(f"sparse attention select must be one of {', '.join(SELECT)}, got {self.select!r}.")
        if self.allocation not in ALLOCATION:
            raise BadInputError(f"sparse attention allocation must be one of {', '.join(ALLOCATION)}, got {self.allocation!r}.")
        cands = self.candidates if isinstance(self.candidates, (list, tuple)) else [self.candidates]
        if not cands or any(isinstance(c, bool) or not isinstance(c, (int, float)) or not 0.0 < c <= 1.0 for c in cands):
            raise BadInputError(f"sparse attention candidates must be keep ratios in (0, 1], got {self.candidates!r}: e.g. [0.125, 0.25, 0.5, 1.0].")
        self.candidates = tuple(sorted({float(c) for c in cands}))
        if self.allocation == "calibrated" and self.candidates[0] > self.keep:
            raise BadInputError(
                f"sparse attention keep budget {self.keep} is below the smallest candidate {self.candidates[0]}: "
                "raise keep or add a smaller candidate."
            )


def _softmaxes(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == "Softmax" and n.domain in ("", "ai.onnx")]


def _is_op(node: ir.Node) -> bool:
    return node.domain == functions.DOMAIN and node.op_type in functions.OPS


def _existing(model: ir.Model) -> int:
    return sum(1 for n in model.graph if _is_op(n))


class SparseAttentionPass(EdgePass):
    """Dynamic block-sparse attention for long-context prefill (portable op; C++ kernel where registered)."""

    name: ClassVar[str] = "sparse_attention"
    Config: ClassVar[type] = SparseAttentionConfig

    def call(self, model: ir.Model) -> EdgePassResult:
        cfg = self.config
        existing = _existing(model)
        summary: dict[str, Any] = {"keep": cfg.keep, "block": cfg.block, "select": cfg.select,
                                   "min_len": cfg.min_len, "already_sparse": existing}  # fmt: skip
        if cfg.keep >= 1.0:
            summary["note"] = "keep 1.0: every block kept, attention left as it was"
            return EdgePassResult(model, modified=False, summary=summary)
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        softmaxes = _softmaxes(model)
        fused = rules.fused_nodes(model)
        if opset < functions.MIN_OPSET:
            reason = f"opset {opset} < {functions.MIN_OPSET}: the op's body needs opset 13 forms"
            records = [{"layer": i, "softmax": n.name, "status": "dense", "reason": reason} for i, n in enumerate(softmaxes)]
            records += [{"layer": len(softmaxes) + i, "node": n.name, "form": n.op_type, "status": "dense", "reason": reason}
                        for i, n in enumerate(fused)]  # fmt: skip
            return EdgePassResult(model, modified=False, records=records, summary=summary)
        options = {"block": cfg.block, "keep": cfg.keep, "sink": cfg.sink, "min_len": cfg.min_len,
                   "per_group": int(cfg.select == "group")}  # fmt: skip
        plan = {n.name: options for n in softmaxes}
        reasons = {n.name: rules.reason_not_matched(n) for n in softmaxes}
        calibrated = cfg.allocation == "calibrated"
        if calibrated and (self.context is None or not len(self.context.calibration)):
            raise BadInputError(
                "sparse attention allocation 'calibrated' needs calibration data: pass calibration samples (--calib) "
                "or use allocation = 'uniform'."
            )
        before = {id(n) for n in model.graph if _is_op(n)}
        count = rules.apply(model, plan) if plan else 0
        left = {n.name for n in _softmaxes(model)}
        new = [n for n in model.graph if _is_op(n) and id(n) not in before]
        fused_records = []
        for node in fused:  # ORT's fused GroupQueryAttention / MultiHeadAttention
            record = {"node": node.name, "form": node.op_type}
            reason = rules.fused_reason(node)
            if reason is None:
                new.append(rules.rewrite_fused(model, node, options))
                count += 1
            else:
                record.update(status="dense", keep=1.0, reason=reason)
            fused_records.append(record)
        measured: list[allocation.LayerMeasure] = []
        keeps = [cfg.keep] * len(new)
        if calibrated and new:
            measured = self._measure(ir.serde.serialize_model(model), new)  # q/k/v are upstream of the op: their dense values
            keeps = allocation.allocate([m.error() for m in measured], cfg.candidates, cfg.keep)
            for node, keep in zip(new, keeps):
                node.attributes["keep"] = ir.AttrFloat32("keep", keep)
        sparse_rank = iter(range(len(new)))
        records = []
        for i, node in enumerate(softmaxes):
            if node.name in left:
                records.append({"layer": i, "softmax": node.name, "status": "dense", "keep": 1.0, "reason": reasons[node.name]})
                continue
            records.append(self._record({"layer": i, "softmax": node.name}, next(sparse_rank), keeps, measured))
        for i, record in enumerate(fused_records):
            record = {"layer": len(softmaxes) + i, **record}
            records.append(record if "status" in record else self._record(record, next(sparse_rank), keeps, measured))
        if count:
            functions.add_functions(model)
        summary.update(sparse_layers=count, dense_layers=len(softmaxes) + len(fused) - count, allocation=cfg.allocation)
        if new:
            summary["mean_keep"] = round(sum(keeps) / len(keeps), 6)
        logger.info("sparse attention: %d of %d attention blocks rewritten (keep %.3f, %s)", count, len(softmaxes) + len(fused),
                    cfg.keep, cfg.allocation)  # fmt: skip
        return EdgePassResult(model, modified=bool(count), records=records, summary=summary)

    def _record(self, record: dict[str, Any], rank: int, keeps: list[float], measured: list) -> dict[str, Any]:
        record.update(status="sparse", keep=keeps[rank])
        if measured:
            record["measured"] = [{"keep": c, "recall": round(rc, 6), "error": round(er, 6)}
                                  for c, rc, er in zip(self.config.candidates, measured[rank].recall(), measured[rank].error())]  # fmt: skip
            if keeps[rank] >= 1.0:
                record.update(status="dense", reason="allocated keep 1.0 (its output error needs every block): exact dense attention in the op")
        return record

    def _measure(self, dense_input: onnx.ModelProto, nodes: list[ir.Node]) -> list[allocation.LayerMeasure]:
        """Each rewritten layer's recall and output error per candidate, on the input model's q/k/v."""
        from edgeprune.runtime.session import make_session  # lazily, as the other passes do

        cfg = self.config
        names = [[v.name for v in n.inputs[:3]] for n in nodes]
        have = {o.name for o in dense_input.graph.output}
        for name in dict.fromkeys(x for triple in names for x in triple):
            if name not in have:
                dense_input.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        session = make_session(dense_input, threads=self.context.threads)
        wanted = list(dict.fromkeys(x for triple in names for x in triple))
        measures = [allocation.LayerMeasure(cfg.candidates) for _ in nodes]
        with self.context.progress.stage(f"sparse attention: measuring {len(nodes)} layers at {len(cfg.candidates)} keep ratios"):
            for feeds in self.context.calibration.batches(batch_size=1):
                values = dict(zip(wanted, session.run(wanted, feeds)))
                for node, triple, measure in zip(nodes, names, measures):
                    q, k, v = (values[x] for x in triple)
                    if k.shape[2] != q.shape[2]:  # a row fed with a non-empty cache: prefills are what is measured
                        continue
                    measure.add(q, k, v, scale=node.attributes.get_float("scale", q.shape[-1] ** -0.5), block=cfg.block,
                                sink=cfg.sink, per_group=cfg.select == "group")  # fmt: skip
        if any(m.rows == 0 for m in measures):
            raise BadInputError(
                "sparse attention allocation 'calibrated' measures prefills from an empty cache, and no calibration row "
                "had one: give calibration rows with empty past_key_values, or use allocation = 'uniform'."
            )
        return measures

    @classmethod
    def describe(cls, model: ir.Model) -> dict[str, Any] | None:
        existing = _existing(model)
        if not existing:
            return None
        return {"summary": [f"{existing} edgeprune.DynamicSparseAttention op(s) (dynamic block-sparse attention)"],
                "fields": {"sparse_attention_ops": existing}}  # fmt: skip
