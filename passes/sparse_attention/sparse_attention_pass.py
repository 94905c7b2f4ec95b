"""The ``sparse_attention`` pass: causal self-attention blocks -> dynamic block-sparse attention.

Each matched block becomes ``edgeprune.DynamicSparseAttention`` (functions.py) with its keep ratio;
blocks the rules do not match, or that are not causal, stay dense with the reason in the record.
Keep ratio 1.0 is the no-op setting and returns the model untouched.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

import onnx_ir as ir

from edgeprune.errors import BadInputError
from edgeprune.passes.base import EdgePass, EdgePassResult
from edgeprune.passes.sparse_attention import functions, rules

logger = logging.getLogger(__name__)

SELECT = ("group", "head")


@dataclasses.dataclass
class SparseAttentionConfig:
    """keep: fraction of key blocks each query block keeps; select: one choice per KV group or per query head."""

    keep: float = 0.25
    block: int = 64
    select: str = "group"
    min_len: int = 1024
    sink: int = 1

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


def _softmaxes(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == "Softmax" and n.domain in ("", "ai.onnx")]


def _existing(model: ir.Model) -> int:
    return sum(1 for n in model.graph if n.domain == functions.DOMAIN and n.op_type == functions.DYNAMIC)


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
        if opset < functions.MIN_OPSET:
            records = [{"layer": i, "softmax": n.name, "status": "dense",
                        "reason": f"opset {opset} < {functions.MIN_OPSET}: the op's body needs opset 13 forms"}
                       for i, n in enumerate(softmaxes)]  # fmt: skip
            return EdgePassResult(model, modified=False, records=records, summary=summary)
        options = {"block": cfg.block, "keep": cfg.keep, "sink": cfg.sink, "min_len": cfg.min_len,
                   "per_group": int(cfg.select == "group")}  # fmt: skip
        plan = {n.name: options for n in softmaxes}
        reasons = {n.name: rules.reason_not_matched(n) for n in softmaxes}
        count = rules.apply(model, plan) if plan else 0
        left = {n.name for n in _softmaxes(model)}
        records = []
        for i, node in enumerate(softmaxes):
            if node.name in left:
                records.append({"layer": i, "softmax": node.name, "status": "dense", "keep": 1.0, "reason": reasons[node.name]})
            else:
                records.append({"layer": i, "softmax": node.name, "status": "sparse", "keep": cfg.keep})
        if count:
            functions.add_functions(model)
        summary.update(sparse_layers=count, dense_layers=len(softmaxes) - count)
        logger.info("sparse attention: %d of %d attention blocks rewritten (keep %.3f)", count, len(softmaxes), cfg.keep)
        return EdgePassResult(model, modified=bool(count), records=records, summary=summary)

    @classmethod
    def describe(cls, model: ir.Model) -> dict[str, Any] | None:
        existing = _existing(model)
        if not existing:
            return None
        return {"summary": [f"{existing} edgeprune.DynamicSparseAttention op(s) (dynamic block-sparse attention)"],
                "fields": {"sparse_attention_ops": existing}}  # fmt: skip
