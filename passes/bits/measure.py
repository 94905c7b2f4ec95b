"""What each option costs in accuracy: relative output error per part and option (from calibration
statistics), how much each node's error matters (importance), and the model-level cross-checks
recorded beside them.  Pure functions of the model, the units and the context, so the driver holds
no measured state; the caches that spare an accuracy back-off the same work are keyed by content."""

from __future__ import annotations

import contextlib
import hashlib
import math

import numpy as np
import onnx_ir as ir

from edgeprune.analysis.graph import attr, node_name
from edgeprune.context import StatsRequest
from edgeprune.model_io import to_proto
from edgeprune.passes.bits import sensitivity
from edgeprune.passes.bits.sensitivity import KEEP, Option
from edgeprune.passes.bits.units import Part, Unit


def stage(context, text: str):
    """A progress stage on the context, or nothing outside a compile."""
    return context.progress.stage(text) if context is not None else contextlib.nullcontext()


# --------------------------------------------------------------------------- content keys


def _digest(*parts) -> str:
    """A short hash of arrays, strings and numbers: cache keys that a changed input cannot hit."""
    h = hashlib.blake2b(digest_size=16)
    for x in parts:
        if isinstance(x, np.ndarray):
            h.update(f"{x.dtype}{x.shape}".encode())
            h.update(np.ascontiguousarray(x).tobytes())
        else:
            h.update(repr(x).encode())
        h.update(b"|")
    return h.hexdigest()


def _stats_digest(st) -> str | None:
    if st is None:
        return None
    return _digest(st.count, st.axis, st.mean, st.var, st.sq_norm, st.absmax,
                   st.gram if st.gram is not None else "no gram")


def _model_digest(model: ir.Model) -> str:
    """Hash of the graph (ops, wiring, attributes) and every initializer's bytes."""
    h = hashlib.blake2b(digest_size=16)
    for node in model.graph:
        attrs = sorted((k, a.value.tobytes() if a.type == ir.AttributeType.TENSOR else repr(a.value))
                       for k, a in node.attributes.items())
        h.update(repr((node.domain, node.op_type, node.name, [v.name if v is not None else "" for v in node.inputs],
                       [v.name for v in node.outputs], attrs)).encode())
    for name, v in model.graph.initializers.items():
        h.update(name.encode())
        if v.const_value is not None:
            h.update(v.const_value.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- errors and sizes


def _float_bytes(arr: np.ndarray) -> int:
    return arr.dtype.itemsize


def _conv_bytes(w: np.ndarray, o: Option, float_bytes: int) -> int:
    """Conv weight bytes: dynamic int8 has one weight scale (ConvInteger), QDQ one per output channel
    plus the scale and zero point of its input and output."""
    if o.kind == KEEP:
        return w.nbytes
    if o.kind == "qdq":
        return w.size + w.shape[0] * (float_bytes + 1) + 2 * (float_bytes + o.bits // 8)
    return w.size + float_bytes + 1


def sizes(units: list[Unit]) -> None:
    """Fill each part's bytes per option: shapes alone decide them, so budgets are checked before measuring."""
    for u in units:
        for p in u.parts:
            fb = _float_bytes(p.weight)
            for o in p.options:
                p.sizes[o.key] = _conv_bytes(p.weight, o, fb) if p.op == "Conv" else sensitivity.option_bytes(o, p.weight.shape, fb)


def measure(model: ir.Model, units: list[Unit], context) -> dict:
    """Fill each part's error (relative output error on calibration rows) and size per option.

    Returns the calibration statistics it used (the Grams GPTQ and the importance need again).
    """
    gram_inputs = sorted({p.input for u in units for p in u.parts if p.op in ("MatMul", "Gemm")})
    conv_inputs = sorted({p.input for u in units for p in u.parts if p.op == "Conv"})
    requests = [StatsRequest(t, axis=-1, gram=True) for t in gram_inputs] + [StatsRequest(t, axis=1) for t in conv_inputs]
    # Static QDQ also rounds each node's output to a calibrated range: its noise needs that range.
    qdq_outputs = {p.output: (1 if p.op == "Conv" else -1) for u in units for p in u.parts
                   if p.output and any(o.kind == "qdq" for o in p.options)}
    requests += [StatsRequest(t, axis=a) for t, a in sorted(qdq_outputs.items()) if t not in gram_inputs + conv_inputs]
    stats = context.stats(model, requests) if requests else {}
    counts = _token_counts(units, context.calibration.samples)
    with stage(context, f"quantization error of {sum(len(p.options) for u in units for p in u.parts)} unit options"):
        sizes(units)
        for u in units:
            for p in u.parts:
                p.errors.update(_cached_errors(context, p, stats, counts))
    return stats


def _token_counts(units: list[Unit], samples) -> dict[str, np.ndarray]:
    """Per-row lookup counts of each embedding input that is a graph input (others: uniform)."""
    out = {}
    for u in units:
        for p in u.parts:
            if p.op != "Gather":
                continue
            rows = p.weight.shape[0]
            c = np.zeros(rows, dtype=np.float64)
            for s in samples:
                if p.input in s:
                    ids = np.asarray(s[p.input]).ravel()
                    mask = np.asarray(s.get("attention_mask", np.ones_like(s[p.input]))).ravel().astype(bool)
                    ids = ids[mask] if mask.shape == ids.shape else ids
                    np.add.at(c, ids[(ids >= 0) & (ids < rows)], 1.0)
            # Add-one smoothing spread over the table: unseen tokens still count a little, so a
            # small calibration set does not declare them free to destroy.
            out[p.node] = c + max(c.sum(), 1.0) / rows
    return out


def _cached_errors(context, p: Part, stats, counts) -> dict[str, float]:
    """``_errors``, remembered on the context under a hash of everything they are computed from.

    Accuracy back-off re-runs the pass on a fresh copy of the same model; the errors are the
    same, so they are computed once.  The key holds the weight, the options and the statistics
    by content, so statistics collected again after a back-off never meet stale errors.
    """
    cache = context.__dict__.setdefault("_bits_error_cache", {})
    qdq_out = stats.get(p.output) if any(o.kind == "qdq" for o in p.options) else None
    key = (p.node, p.op, _digest(p.weight), tuple(o.key for o in p.options), _stats_digest(stats.get(p.input)),
           _stats_digest(qdq_out), _digest(counts[p.node]) if p.node in counts else None)
    if key not in cache:
        cache[key] = _errors(p, stats, counts)
    return cache[key]


def _errors(p: Part, stats, counts) -> dict[str, float]:
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
        energy = _conv_energy(p.weight, st.sq_norm)
        w2 = p.weight.reshape(p.weight.shape[0], -1)
        den = float((energy * np.square(w2)).sum())
        for o in lossy:
            deq = sensitivity.int8_channel_dequant(p.weight, axis=0) if o.kind == "qdq" else sensitivity.int8_tensor_dequant(p.weight)
            q = deq.reshape(p.weight.shape[0], -1)
            num = (float((energy * np.square(q - w2)).sum()) + _activation_noise(p, o, q, st, stats))
            errs[o.key] = math.sqrt(num / den) if den > 0 else 0.0
        return errs
    qs, extra = [], []
    for o in lossy:  # each option's noise right after its weight: a block-offset grid is still in its memo then
        qs.append(sensitivity.simulate(o, p.weight, gram=st.gram))
        extra.append(_activation_noise(p, o, qs[-1], st, stats))
    for o, e in zip(lossy, sensitivity.gram_rel_errors(p.weight, qs, st.gram, extra_sq=extra)):
        errs[o.key] = e
    return errs


def _conv_energy(weight: np.ndarray, sq_norm: np.ndarray) -> np.ndarray:
    """Input energy each weight of a Conv multiplies, laid out as ``weight.reshape(C_out, -1)``.

    A Conv with ``group`` g splits its C_in input channels into g groups: filter o reads only the
    C_in/g channels of group o // (C_out/g) (depthwise: one each), so each filter takes its own
    group's slice of the per-channel energy; g = 1 is the dense case.
    """
    cout, per_group = weight.shape[:2]
    groups = sq_norm.size // per_group
    if groups * per_group != sq_norm.size or cout % groups:
        raise ValueError(f"a Conv weight {list(weight.shape)} cannot read {sq_norm.size} input channels")
    taps = int(np.prod(weight.shape[2:]))
    by_filter = np.repeat(np.asarray(sq_norm, np.float64).reshape(groups, per_group), cout // groups, axis=0)
    return np.repeat(by_filter, taps, axis=1)


def _activation_noise(p: Part, o: Option, q: np.ndarray, st, stats) -> float:
    """Squared output error from rounding activations: dynamic int8 rounds the input, static QDQ the
    input and the output, each to a per-tensor range, MatMulNBits at accuracy level 4 the input per
    block of K (uniform noise model)."""
    if o.kind in ("nbits", "gptq") and o.accuracy_level == 4:
        if o.offsets:  # the int8 activations multiply the centred codes; the offsets see exact block sums
            q = sensitivity.offset_dequant(p.weight, o, st.gram if o.rounding == "wmse" else None, centred_only=True)
        return sensitivity.block_activation_noise_sq(q, st.absmax, st.count, o.block)
    if o.kind not in ("int8-dynamic", "qdq"):
        return 0.0
    noise = sensitivity.activation_noise_sq(q, float(st.absmax.max()), st.count, bits=o.bits)
    out = stats.get(p.output) if o.kind == "qdq" else None
    if out is not None:
        scale = 2.0 * float(out.absmax.max()) / float((1 << o.bits) - 1)
        noise += out.count * out.absmax.size * scale * scale / 12.0
    return noise


def simulate(p: Part, o: Option, stats) -> np.ndarray:
    """``p``'s weight after quantize-dequantize in ``o``'s format (GPTQ rounds against the input's Gram,
    ``wmse`` weighs by its diagonal)."""
    gram = stats[p.input].gram if o.kind == "gptq" or o.rounding == "wmse" else None
    return sensitivity.simulate(o, p.weight, gram=gram)


# --------------------------------------------------------------------------- importance


def residual_adds(model: ir.Model, structures) -> tuple[dict[str, object], dict[str, tuple[str, str]]]:
    """(node -> its block's writer linear, writer node -> (stream after the residual Add, stream before)).

    The writer is the block's output linear (attention o, FFN down); its residual Add is the Add
    consuming its output whose other operand is not a constant.
    """
    writer: dict[str, object] = {}
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


def residual_importance(model: ir.Model, structures, units: list[Unit], context, stats) -> None:
    """Weight each node's squared relative error by how much its block writes into the residual stream.

    A transformer block's output is added to the residual stream; noise relative to the block's
    output matters in proportion to ||block output||^2 / ||residual after the add||^2 (a block
    that writes little into a large stream is forgiving; layer-0 MLPs that write massive
    activations are not).  Every linear of the block (q/k/v/o, gate/up/down) shares its block's
    ratio; nodes outside blocks (LM head, embeddings, poolers) weigh 1: their relative error is
    already relative to the stream or the logits.
    """
    parts = {p.node: p for u in units for p in u.parts}
    writer, adds = residual_adds(model, structures)
    resid = {w: out for w, (out, _) in adds.items() if w in parts and parts[w].input in stats}
    if not resid:
        return
    stream = context.stats(model, [StatsRequest(t, axis=-1) for t in sorted(set(resid.values()))])
    ratio = {}
    for wnode, tensor in resid.items():
        p = parts[wnode]
        out_sq = sensitivity._quad(stats[p.input].gram, p.weight, False)
        stream_sq = float(stream[tensor].sq_norm.sum())
        ratio[wnode] = out_sq / stream_sq if stream_sq > 0 else 1.0
    for node, w in writer.items():
        if node in parts and w.node in ratio:
            parts[node].importance = ratio[w.node]


def _fed_weight(node: ir.Node, p: Part, arr: np.ndarray) -> np.ndarray:
    """``arr`` (laid out as the quantizer sees the weight) as the node reads it: a Gemm with transB reads W^T."""
    if p.op == "Gemm" and attr(node, "transB", 0):
        return np.ascontiguousarray(arr.T)
    return arr


def measured_importance(model: ir.Model, units: list[Unit], context, stats) -> None:
    """Importance = (model-output error / local error)^2 with only that node quantized, for every node.

    One ORT session of a copy whose unit weights are graph inputs: each probe feeds one node's
    quantize-dequantized weight (its smallest lossy option) and the others' originals, so a
    probe costs one forward pass on one held-back row, not a session per node.  The results are
    remembered on the context under the model's and the row's content.
    """
    from edgeprune.runtime.session import make_session

    if context is None or not len(context.holdout):
        return
    parts = [p for u in units for p in u.parts if any(o.kind != KEEP for o in p.options) and p.op != "Conv"]
    if not parts:
        return
    # One held-back row, token inputs cut to 64 positions: a probe is a ranking signal, not a metric.
    feeds = {k: (v[:, :64] if v.ndim == 2 and v.dtype.kind in "iu" else v)
             for k, v in next(iter(context.holdout.batches(1))).items()}
    cache = context.__dict__.setdefault("_bits_probe_cache", {})
    base = (_model_digest(model), _digest(*[x for k in sorted(feeds) for x in (k, np.asarray(feeds[k]))]))
    keys = [(*base, p.node, tuple(sorted(p.sizes.items())), tuple(sorted(p.errors.items()))) for p in parts]
    if all(k in cache for k in keys):
        for p, k in zip(parts, keys):
            p.probe, p.importance = cache[k]
        return
    work = model.clone()
    nodes = {node_name(n): n for n in work.graph}
    arrays: dict[str, np.ndarray] = {}
    for i, p in enumerate(parts):
        name = f"__edgeprune_w{i}"
        node = nodes[p.node]
        arr = _fed_weight(node, p, p.weight)
        value = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(arr.shape))
        work.graph.inputs.append(value)
        node.replace_input_with(0 if p.op == "Gather" else 1, value)
        arrays[name] = arr
    for name, v in list(work.graph.initializers.items()):
        if not v.uses() and not v.is_graph_output():
            del work.graph.initializers[name]
    with stage(context, f"model-output sensitivity of {len(parts)} nodes (one session, one row each)"):
        session = make_session(to_proto(work), "cpu", threads=context.threads)
        out_name = session.get_outputs()[0].name
        ref = session.run([out_name], {**feeds, **arrays})[0].astype(np.float64)
        ref_sq = float(np.square(ref).sum())
        for i, p in enumerate(parts):
            probe = min((o for o in p.options if o.kind != KEEP), key=lambda o: (p.sizes[o.key], o.key))
            local = p.errors[probe.key]
            name = f"__edgeprune_w{i}"
            q = simulate(p, probe, stats)
            arr = np.ascontiguousarray(q.T) if arrays[name] is not p.weight else q
            out = session.run([out_name], {**feeds, **arrays, name: arr})[0].astype(np.float64)
            out_err = math.sqrt(float(np.square(out - ref).sum()) / ref_sq) if ref_sq > 0 else 0.0
            p.probe = {"option": probe.key, "local_rel_error": local, "output_rel_error": out_err}
            if local > 0:
                p.importance = float(np.clip((out_err / local) ** 2, 1e-3, 1e3))
            cache[keys[i]] = (p.probe, p.importance)


# --------------------------------------------------------------------------- cross-checks in the records


def block_cosines(model: ir.Model, structures, records: list[dict], context) -> None:
    """Proxy: cosine between each block's residual stream before and after it, on one held-back row.

    A block whose output barely turns the stream (cosine near 1) is a candidate for fewer bits;
    recorded beside the measured errors as a cross-check, not used by the solver.
    """
    from edgeprune.runtime.session import make_session

    if context is None or not len(context.holdout):
        return
    writer, adds = residual_adds(model, structures)
    if not adds:
        return
    names = sorted({n for pair in adds.values() for n in pair})
    work = model.clone()
    values = {v.name: v for v in work.graph.inputs}
    values.update({v.name: v for n in work.graph for v in n.outputs if v.name})
    existing = {v.name for v in work.graph.outputs}
    work.graph.outputs.extend(values[n] for n in names if n not in existing)
    feed = next(iter(context.holdout.batches(1)))
    with stage(context, f"block cosines of {len(adds)} residual blocks"):
        session = make_session(to_proto(work), "cpu", threads=context.threads)
        got = dict(zip(names, session.run(names, feed)))
    cos = {w: sensitivity.cosine(got[before], got[after]) for w, (after, before) in adds.items()}
    for r in records:
        w = writer.get(r["layer"])
        if w is not None and w.node in cos:
            r["block_cosine"] = cos[w.node]


def _with_weight(model: ir.Model, part: Part, new_weight: np.ndarray) -> ir.Model:
    """A copy of ``model`` where ``part``'s node reads ``new_weight`` (a fresh initializer; float, same numerics)."""
    work = model.clone()
    node = next(n for n in work.graph if node_name(n) == part.node)
    arr = new_weight if part.op == "Gather" else _fed_weight(node, part, new_weight)
    value = ir.Value(name=f"__edgeprune_check_{part.node}",
                     const_value=ir.tensor(np.ascontiguousarray(arr, dtype=np.float32)))
    work.graph.register_initializer(value)
    node.replace_input_with(0 if part.op == "Gather" else 1, value)  # a transposed head is fed untransposed
    return work


def output_checks(model: ir.Model, units: list[Unit], choice: list[int], records: list[dict], context,
                  checks: int, stats) -> None:
    """Model-output error with only one node quantized (simulated), for the most sensitive chosen nodes."""
    from edgeprune.verify import run_batches

    if checks <= 0 or context is None or not len(context.holdout):
        return
    cand = sorted((r for r in records if r["rel_error"] > 0), key=lambda r: -r["rel_error"])[:checks]
    if not cand:
        return
    by_node = {p.node: (p, o) for u, i in zip(units, choice) for p, o in zip(u.parts, u.combos()[i])}
    batches = list(context.holdout.batches(1))[:2]  # two rows: a cross-check, not a metric
    with stage(context, f"model-output error of the {len(cand)} most sensitive nodes"):
        ref = run_batches(to_proto(model), batches, threads=context.threads)
        for rec in cand:
            p, o = by_node[rec["layer"]]
            out = run_batches(to_proto(_with_weight(model, p, simulate(p, o, stats))), batches, threads=context.threads)
            rec["output_rel_error"] = _rel(ref, out)


def _rel(ref: list, out: list) -> float:
    """Relative Frobenius error of the first output, over the batches."""
    key = next(iter(ref[0]))
    num = sum(float(np.square(np.asarray(o[key], np.float64) - np.asarray(r[key], np.float64)).sum()) for r, o in zip(ref, out))
    den = sum(float(np.square(np.asarray(r[key], np.float64)).sum()) for r in ref)
    return math.sqrt(num / den) if den > 0 else 0.0
