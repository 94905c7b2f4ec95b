"""Router statistics per expert, streamed in one ORT run per calibration batch, and the expert scores built on them.

For every MoE layer the run fetches the router logits and, in the loop form, each expert's
per-token contribution (routing weight x expert output, zero on tokens it did not get).  Per
layer and expert it accumulates, over non-padding tokens ``t`` with router probabilities ``p_t``
and top-k set ``S_t`` (as the graph selects it):

- ``frequency``: share of tokens with ``e`` in ``S_t``;
- ``tcess`` (PreMoe's task-conditioned expected selection score): mean of ``p_t[e] * [e in S_t]``,
  the probability mass the task really routes to ``e``;
- ``easy`` (EASY-EP's output-aware score): mean of ``g_t[e] * ||E_e(x_t)||``, with ``g`` the
  routing weight applied in the graph (0 on tokens that did not select ``e``); read off the
  contribution tensor in the loop form; in the dense form (every expert on every token) off the
  stacked expert-output tensor [E, T, H] the graph already computes (the last expert-stacked node's
  output), weighted by the top-k routing weights; recomputed in numpy from the stacked weights for a
  fused ``com.microsoft.MoE`` in float (relu/silu/identity, interleaved swiglu), and for
  ``com.microsoft.QMoE`` (or another MoE variant) by ORT's own kernel: the node alone in a small
  session with k = 1 and logits that route the expert's selected tokens to it with weight 1, so the
  dequantisation (bits, block size, zero points) is the kernel's, not a copy of it.

The per-channel moments of ``edgeprune.stats`` cannot express a top-k selection, so this module
keeps its own accumulators but runs the same way (one session with extra outputs, one run per
batch, nothing per-sample kept).  Scoring is pure: ``score(stats, metric)``.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from edgeprune.analysis.graph import attr, constant, node_name
from edgeprune.analysis.moe import MoELayer
from edgeprune.calibration import CalibrationSet
from edgeprune.errors import BadInputError
from edgeprune.runtime.session import make_session, run_outputs
from edgeprune.stats import _with_outputs

logger = logging.getLogger(__name__)

METRICS = ("tcess", "easy", "frequency", "loss")
#: Metrics that are a per-expert statistic of the routing (``loss`` is a search over the model's outputs: ``search``).
STATISTICS = ("tcess", "easy", "frequency")


@dataclasses.dataclass
class RouterStats:
    """Per-expert routing statistics of one layer over one calibration set (arrays of length E)."""

    layer: int
    tokens: int
    frequency: np.ndarray
    tcess: np.ndarray
    easy: np.ndarray | None

    def to_dict(self) -> dict:
        return {
            "layer": self.layer, "tokens": self.tokens, "frequency": self.frequency.tolist(),
            "tcess": self.tcess.tolist(), "easy": None if self.easy is None else self.easy.tolist(),
        }  # fmt: skip


def score(stats: RouterStats, metric: str) -> np.ndarray:
    """One importance value per expert (higher keeps)."""
    if metric not in METRICS:
        raise BadInputError(f"unknown MoE metric {metric!r}: choose one of {', '.join(METRICS)}.")
    if metric not in STATISTICS:
        raise BadInputError(f"MoE metric {metric!r} is a search over the model's outputs, not a per-expert routing statistic: the moe pass runs it (edgeprune.passes.moe.search).")
    values = getattr(stats, metric)
    if values is None:
        raise BadInputError(
            f"MoE metric 'easy' needs each expert's output, which layer {stats.layer}'s graph form does not expose here: "
            "use metric 'tcess' or 'frequency'."
        )
    return values


class _Layer:
    """Running sums for one layer."""

    def __init__(self, layer: MoELayer, model: ir.Model):
        self.layer = layer
        self.e = layer.num_experts
        self.tokens = 0
        self.frequency = np.zeros(self.e)
        self.tcess = np.zeros(self.e)
        self.easy = np.zeros(self.e)
        self.fused = _FusedExperts(layer, model) if layer.form == "fused" else None
        if self.fused is not None and not self.fused.supported:
            self.fused = _KernelExperts(layer, model)
        self.dense_output = _dense_expert_output(layer, model) if layer.form == "dense" else None
        self.has_easy = (
            layer.form == "loop" and all(x.contribution for x in layer.experts)
            or self.fused is not None and self.fused.supported
            or self.dense_output is not None
        )  # fmt: skip

    def fetches(self) -> list[str]:
        names = [self.layer.router.output]
        if self.layer.form == "loop" and self.has_easy:
            names += [x.contribution for x in self.layer.experts]
        if self.fused is not None and self.fused.supported:
            names.append(self.fused.input)
        if self.dense_output is not None:
            names.append(self.dense_output)
        return names

    def add(self, got: dict[str, np.ndarray], keep_rows: np.ndarray | None) -> None:
        logits = got[self.layer.router.output].reshape(-1, self.e).astype(np.float64)
        rows = keep_rows if keep_rows is not None and keep_rows.shape[0] == logits.shape[0] else None
        probs = _probabilities(logits, self.layer.scoring)
        k = min(self.layer.top_k or 1, self.e)
        top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        selected = np.zeros_like(probs, dtype=bool)
        np.put_along_axis(selected, top, True, axis=1)
        if rows is not None:
            probs, selected = probs[rows], selected[rows]
        self.tokens += probs.shape[0]
        self.frequency += selected.sum(axis=0)
        self.tcess += (probs * selected).sum(axis=0)
        if not self.has_easy:
            return
        if self.layer.form == "loop":
            for x in self.layer.experts:
                contrib = got[x.contribution].astype(np.float64)
                contrib = contrib.reshape(-1, contrib.shape[-1])
                if rows is not None and contrib.shape[0] == rows.shape[0]:
                    contrib = contrib[rows]
                self.easy[x.index] += np.linalg.norm(contrib, axis=1).sum()
            return
        weights = probs * selected
        if self.layer.normalize:
            weights = weights / np.maximum(weights.sum(axis=1, keepdims=True), 1e-30)
        if self.dense_output is not None:
            out = got[self.dense_output]
            tokens = logits.shape[0]
            if out.shape[0] != self.e or not tokens or out.size % (self.e * tokens):
                logger.info("MoE layer %d: no EASY scores, expert outputs %s have shape %s, not [%d, %d, hidden]",
                            self.layer.layer, self.dense_output, list(out.shape), self.e, tokens)  # fmt: skip
                self.has_easy = False
                return
            norms = np.linalg.norm(out.astype(np.float64).reshape(self.e, tokens, -1), axis=2).T  # [T, E]
            if rows is not None:
                norms = norms[rows]
            self.easy += (weights * norms).sum(axis=0)
        else:
            x = got[self.fused.input].reshape(-1, self.fused.hidden)
            x = x[rows] if rows is not None and x.shape[0] == rows.shape[0] else x
            for e in range(self.e):
                hit = selected[:, e]
                if hit.any():
                    out = self.fused.expert(e, x[hit])
                    self.easy[e] += (weights[hit, e] * np.linalg.norm(out, axis=1)).sum()

    def result(self) -> RouterStats:
        n = max(self.tokens, 1)
        return RouterStats(
            self.layer.layer, self.tokens, self.frequency / n, self.tcess / n, self.easy / n if self.has_easy else None
        )


def _probabilities(logits: np.ndarray, scoring: str | None) -> np.ndarray:
    if scoring == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


class _FusedExperts:
    """A com.microsoft.MoE node's experts evaluated in numpy (float64), for EASY-EP's output norm."""

    def __init__(self, layer: MoELayer, model: ir.Model):
        node = next(n for n in model.graph if (n.name or "") == layer.node or f"{n.op_type}:{n.outputs[0].name}" == layer.node)
        self.input = node.inputs[0].name
        self.activation = attr(node, "activation_type", "relu")
        self.fusion = attr(node, "swiglu_fusion", 0)
        self.alpha = attr(node, "activation_alpha", 1.0)
        self.beta = attr(node, "activation_beta", 0.0)
        self.limit = attr(node, "swiglu_limit", None)
        tensors = [constant(v) if v is not None else None for v in node.inputs]
        self.fc1 = tensors[2].numpy().astype(np.float64) if node.op_type == "MoE" and tensors[2] is not None else None
        get = lambda i: tensors[i].numpy().astype(np.float64) if len(tensors) > i and tensors[i] is not None else None  # noqa: E731
        self.b1, self.fc2, self.b2 = get(3), get(4), get(5)
        self.fc3 = get(6)
        self.supported = (
            node.op_type == "MoE" and self.fc1 is not None and self.fc2 is not None and self.fc3 is None
            and (self.activation in ("relu", "silu", "identity") or (self.activation == "swiglu" and self.fusion == 1))
        )  # fmt: skip
        self.hidden = self.fc1.shape[2] if self.fc1 is not None else 0

    def expert(self, e: int, x: np.ndarray) -> np.ndarray:
        h = x @ self.fc1[e].T + (self.b1[e] if self.b1 is not None else 0.0)
        if self.activation == "swiglu":
            g, lin = h[:, 0::2], h[:, 1::2]
            if self.limit is not None:
                g, lin = np.minimum(g, self.limit), np.clip(lin, -self.limit, self.limit)
            h = g / (1.0 + np.exp(-self.alpha * g)) * (lin + self.beta)
        elif self.activation == "silu":
            h = h / (1.0 + np.exp(-h))
        elif self.activation == "relu":
            h = np.maximum(h, 0.0)
        return h @ self.fc2[e].T + (self.b2[e] if self.b2 is not None else 0.0)


def _dense_expert_output(layer: MoELayer, model: ir.Model) -> str | None:
    """The dense form's stacked expert-output value [E, T, H]: the output of the last expert-stacked node in graph order
    (the down projection's bias Add, or its MatMul), every expert's output on every token before the routing weights."""
    stacked = {node for node, _ in layer.stacked}
    last = None
    for node in model.graph:
        if node_name(node) in stacked:
            last = node
    return None if last is None else last.outputs[0].name


class _KernelExperts:
    """The experts of a com.microsoft.MoE/QMoE node evaluated by ORT's kernel itself: the node alone (its constant
    weights, scales, biases, zero points), k = 1, and logits of 0 for the expert and -1e4 for the others, so each token
    goes to that one expert with routing weight 1 (softmax, renormalised or not) and the output is the expert's own."""

    def __init__(self, layer: MoELayer, model: ir.Model):
        node = next(n for n in model.graph if node_name(n) == layer.node)
        self.input = node.inputs[0].name
        self.e = layer.num_experts
        self.session = None
        self.supported = False
        dtype = node.inputs[0].dtype
        constants = [None if v is None else constant(v) for v in node.inputs]
        if dtype is None or any(v is not None and c is None for v, c in zip(node.inputs[2:], constants[2:])):
            return  # a non-constant extra input (e.g. router_weights) changes the aggregation: no stand-alone expert
        at = 5 if node.op_type == "QMoE" else 4
        fc2 = constants[at] if len(constants) > at else None
        if constants[2] is None or fc2 is None:
            return
        self.hidden = int(fc2.shape[1])  # fc2 weights are [E, hidden, inter (packed)] in both ops
        self.np_dtype = dtype.numpy()
        graph_inputs = [
            ir.Value(name="x", shape=ir.Shape(["tokens", self.hidden]), type=ir.TensorType(dtype)),
            ir.Value(name="logits", shape=ir.Shape(["tokens", self.e]), type=ir.TensorType(dtype)),
        ]
        initializers, args = [], list(graph_inputs)
        for i, (value, tensor) in enumerate(zip(node.inputs[2:], constants[2:]), start=2):
            if value is None:
                args.append(None)
                continue
            v = ir.Value(name=f"in{i}", shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
            initializers.append(v)
            args.append(v)
        attributes = [a for name, a in node.attributes.items() if name not in ("k", "use_sparse_mixer")] + [ir.AttrInt64("k", 1)]
        alone = ir.Node(node.domain, node.op_type, args, attributes=attributes, num_outputs=1, name="expert")
        alone.outputs[0].name = "y"
        graph = ir.Graph(graph_inputs, alone.outputs, nodes=[alone], initializers=initializers, opset_imports=dict(model.opset_imports), name="expert")
        try:
            self.session = make_session(ir.Model(graph, ir_version=model.ir_version), "cpu", threads=1)
        except Exception as exc:  # noqa: BLE001 -- an op variant the CPU EP cannot run: no EASY score for this layer
            logger.info("MoE layer %d: EASY scores unavailable, ORT cannot run %s alone (%s)", layer.layer, layer.node, exc)
            return
        self.supported = True

    def expert(self, e: int, x: np.ndarray) -> np.ndarray:
        logits = np.full((x.shape[0], self.e), -1e4, dtype=self.np_dtype)
        logits[:, e] = 0
        return self.session.run(None, {"x": np.ascontiguousarray(x, dtype=self.np_dtype), "logits": logits})[0].astype(np.float64)


def collect_router_stats(
    model: ir.Model, layers: list[MoELayer], calib: CalibrationSet, *, threads: int | None = None, batch_size: int = 8
) -> list[RouterStats]:
    """Routing statistics of every layer in ``layers`` over ``calib``, one ORT run per batch."""
    if not len(calib):
        raise BadInputError("the moe pass scores experts on calibration data, and the calibration set is empty: pass samples with --calib.")
    for layer in layers:
        if layer.router is None:
            raise BadInputError(f"MoE layer {layer.layer} has no router linear feeding it, so its routing cannot be measured.")
    acc = [_Layer(layer, model) for layer in layers]
    inputs = {v.name for v in model.graph.inputs}
    wanted = list(dict.fromkeys(name for a in acc for name in a.fetches()))
    fetch = [name for name in wanted if name not in inputs]
    session = make_session(_with_outputs(model, fetch), "cpu", threads=threads)
    for feed in calib.batches(batch_size):
        got = dict(zip(fetch, run_outputs(session, fetch, feed)))
        got.update({name: feed[name] for name in wanted if name in inputs})
        mask = feed.get("attention_mask")
        rows = mask.reshape(-1).astype(bool) if mask is not None and mask.ndim == 2 else None
        for a in acc:
            a.add(got, rows)
    return [a.result() for a in acc]
