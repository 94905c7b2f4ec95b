"""The ``fuse_norms`` pass: a residual Add and the RMSNorm after it -> ORT's ``SkipSimplifiedLayerNormalization``.

A LLaMA-style decoder layer reads its input through ``h = a + b`` (the residual) and an RMSNorm of ``h``,
which exporters write as six ops (transformers: ``h * rsqrt(mean(h^2) + eps) * w``):

    y = Mul(w, Mul(h, Div(1, Sqrt(Add(ReduceMean(Pow(h, 2), axes=[-1], keepdims=1), eps)))))

ONNX Runtime's CPU optimizer turns the norm into ``SimplifiedLayerNormalization`` by itself but leaves the
Add beside it; ``com.microsoft.SkipSimplifiedLayerNormalization(a, b, w, epsilon)`` does both in one kernel
and also returns ``h`` (its fourth output), which the next residual reads.  That is the form
onnxruntime-genai's builder emits: one op per norm instead of two, 60 kernels fewer per decode step on a
30-layer model.  The norm that reads no residual (the first layer's) is left to ORT's own fusion.

Run it last: ``smooth`` folds its scales into the norm weight ``w`` of the plain form, and the ORT-format
quantizers of ``bits`` only touch the linears, so fusing after them changes nothing they do.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter.pattern import MatchResult, RewriteRule, RewriteRuleSet

from edgeprune.passes.base import EdgePass, EdgePassResult

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"


@dataclasses.dataclass
class FusedNormsConfig:
    """No options: a residual RMSNorm is fused exactly or left as it was."""


def _skip_rms_pattern(op, a, b, two, eps, one, w):
    h = op.Add(a, b, _outputs=["h"])
    mean = op.ReduceMean(op.Pow(h, two), _allow_other_inputs=True, _outputs=["mean"])
    normed = op.Mul(h, op.Div(one, op.Sqrt(op.Add(mean, eps))))
    return op.Mul(w, normed), h


def _scalar(value: ir.Value | None) -> float | None:
    const = ir.convenience.get_const_tensor(value) if value is not None else None
    return float(const.numpy().reshape(-1)[0]) if const is not None and const.size == 1 else None


def _check(context, a, b, two, eps, one, w, mean, **_) -> MatchResult:
    result = MatchResult()
    if _scalar(two) != 2.0 or _scalar(one) != 1.0 or _scalar(eps) is None:
        return result.fail("not an RMSNorm: the exponent, numerator or epsilon is not the constant it should be")
    node = mean.producer()
    axes = node.attributes.get_ints("axes", None)
    if axes is None and len(node.inputs) > 1:
        const = ir.convenience.get_const_tensor(node.inputs[1])
        axes = None if const is None else [int(x) for x in const.numpy().reshape(-1)]
    if axes is None or list(axes) != [-1] or node.attributes.get_int("keepdims", 1) != 1:
        return result.fail("the mean is not over the last axis, kept")
    weight = ir.convenience.get_const_tensor(w)
    if weight is None or len(weight.shape) != 1 or weight.dtype != ir.DataType.FLOAT:
        return result.fail("the norm weight is not a constant float32 vector")
    for x in (a, b):
        if ir.convenience.get_const_tensor(x) is not None:
            return result.fail("a constant addend is a bias, not a residual")
        if x.shape is not None and (len(x.shape) != 3 or x.shape[-1] != weight.shape[0]):
            return result.fail("the addends are not [batch, sequence, hidden]")
        if x.dtype not in (None, ir.DataType.FLOAT):
            return result.fail("not float32")
    return result


def _rewrite(op, a, b, eps, w, h, **_):
    y, _mean, _inv_std, total = op.SkipSimplifiedLayerNormalization(
        a, b, w, epsilon=float(np.float32(_scalar(eps))), _domain=MS_DOMAIN, _outputs=4)
    total.type, total.shape = h.type, h.shape
    return y, total


def _drop_unread_statistics(model: ir.Model) -> None:
    """Leave the fused norms' mean and inverse-std outputs (1 and 2) unnamed, i.e. absent, where nothing reads them:
    ORT's kernel allocates and writes every output that is present (onnxruntime-genai's graphs omit them)."""
    for node in model.graph:
        if node.domain == MS_DOMAIN and node.op_type == "SkipSimplifiedLayerNormalization":
            for value in node.outputs[1:3]:
                if not value.uses() and not value.is_graph_output():
                    value.name = ""


RULES = RewriteRuleSet([RewriteRule(_skip_rms_pattern, _rewrite, _check, name="SkipRMSNorm")], commute=True)


class FusedNormsPass(EdgePass):
    """Residual Add + RMSNorm pairs become one ``com.microsoft.SkipSimplifiedLayerNormalization`` each."""

    name: ClassVar[str] = "fuse_norms"
    Config: ClassVar[type] = FusedNormsConfig

    def call(self, model: ir.Model) -> EdgePassResult:
        count = RULES.apply_to_model(model)
        if count:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            _drop_unread_statistics(model)
        logger.info("fuse_norms: %d residual RMSNorms -> SkipSimplifiedLayerNormalization", count)
        return EdgePassResult(model, modified=bool(count), records=[], summary={"fused": count})

    @classmethod
    def describe(cls, model: ir.Model) -> dict[str, Any] | None:
        fused = sum(1 for n in model.graph if n.domain == MS_DOMAIN and n.op_type == "SkipSimplifiedLayerNormalization")
        if not fused:
            return None
        return {"summary": [f"{fused} com.microsoft.SkipSimplifiedLayerNormalization op(s) (fused residual norms)"],
                "fields": {"skip_norm_ops": fused}}
