"""The KV-cache interface of a decoder exported with past key/values.

optimum's ``text-generation-with-past`` exports and onnxruntime-genai's builder both name the
cache ``past_key_values.<layer>.key|value`` (inputs, [batch, kv_heads, past_len, head_dim]) and
``present.<layer>.key|value`` (outputs, past_len + new tokens).  Calibration, verification and
latency feed such a model an *empty* cache (a prefill from scratch); generation feeds each step
the previous step's presents.  Passes must keep this interface: the cache's shapes are a contract
with the user's generation loop (onnxruntime-genai's config names them), so nothing may change
the number of KV heads or the head size.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from edgeprune.errors import BadInputError, VerificationError

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_PRESENT = re.compile(r"^present\.(\d+)\.(key|value)$")
#: The sequence axis of a cache tensor [batch, kv_heads, length, head_dim].
SEQ_AXIS = 2


@dataclass(frozen=True)
class CacheEntry:
    """One cache tensor: its input, the output that returns it grown, and its fixed dims."""

    layer: int
    kind: str  # "key" | "value"
    past: str
    present: str
    dtype: np.dtype
    heads: int | None
    head_dim: int | None


def present_name(past: str) -> str:
    return "present." + past[len("past_key_values.") :]


def cache_entries(inputs: Iterable[tuple[str, np.dtype, Sequence | None]], outputs: Iterable[str] | None = None) -> list[CacheEntry]:
    """The cache tensors among (name, dtype, shape) inputs, in layer order; with ``outputs``, only those whose present output exists."""
    outs = None if outputs is None else set(outputs)
    entries = []
    for name, dtype, shape in inputs:
        match = _PAST.match(name)
        if not match or (outs is not None and present_name(name) not in outs):
            continue
        dims = list(shape) if shape is not None and len(shape) == 4 else [None] * 4
        fixed = [d if isinstance(d, int) and d > 0 else None for d in dims]
        entries.append(CacheEntry(int(match.group(1)), match.group(2), name, present_name(name), np.dtype(dtype), fixed[1], fixed[3]))
    return sorted(entries, key=lambda e: (e.layer, e.kind))


def model_cache(model) -> list[CacheEntry]:
    """Cache entries of an ``onnx_ir`` model (empty when it has no KV cache); symbolic head sizes read off the graph."""
    fixed = fused_cache_shapes(model)
    inputs = []
    for v in model.graph.inputs:
        shape = None if v.shape is None else list(v.shape)
        if v.name in fixed and shape is not None and len(shape) == 4:
            shape[1], shape[3] = fixed[v.name]
        inputs.append((v.name, v.dtype.numpy() if v.dtype is not None else np.float32, shape))
    return cache_entries(inputs, [v.name for v in model.graph.outputs])


def _const_width(value) -> int | None:
    """Last dim of a constant weight, looking through a DequantizeLinear (QDQ form)."""
    if value is not None and value.producer() is not None and value.producer().op_type == "DequantizeLinear":
        value = value.producer().inputs[0]
    if value is not None and value.const_value is not None and value.shape is not None and isinstance(value.shape[-1], int):
        return value.shape[-1]
    return None


def _width(value, depth: int = 4) -> int | None:
    """The last dim of a value: from its shape, else from the projection that produced it (float or quantized)."""
    if value is None:
        return None
    if value.shape is not None and len(value.shape) and isinstance(value.shape[-1], int):
        return value.shape[-1]
    node = value.producer()
    if node is None or depth == 0:
        return None
    if node.op_type == "MatMulNBits":
        return node.attributes.get_int("N", 0) or None
    if node.op_type in ("MatMul", "MatMulInteger", "Gemm") and len(node.inputs) > 1:
        width = _const_width(node.inputs[1])
        if width is not None:
            return width
    if node.op_type in ("Add", "Mul", "Cast", "MatMulInteger", "MatMul"):  # bias, dequantize scale, cast back
        return next((w for w in (_width(i, depth - 1) for i in node.inputs[:1]) if w), None)
    return None


def fused_cache_shapes(model) -> dict[str, tuple[int, int]]:
    """Cache input -> (kv heads, head size) from the ``com.microsoft`` GroupQueryAttention reading it.

    onnxruntime-genai's builder declares the head size as a symbol (``kv_cache_dim``); the fused op
    fixes it: K's width / kv_num_heads, or a packed QKV width / (num_heads + 2 kv_num_heads).
    """
    found: dict[str, tuple[int, int]] = {}
    for node in model.graph:
        if node.domain != "com.microsoft" or node.op_type != "GroupQueryAttention" or len(node.inputs) < 5:
            continue
        heads, kv = node.attributes.get_int("num_heads", 0), node.attributes.get_int("kv_num_heads", 0)
        key_width, query_width = _width(node.inputs[1]), _width(node.inputs[0])
        if key_width and kv:
            head = key_width // kv
        elif query_width and heads and kv and node.inputs[1] is None:
            head = query_width // (heads + 2 * kv)
        else:
            continue
        for past in node.inputs[3:5]:
            if past is not None and past.is_graph_input():
                found[past.name] = (kv, head)
    return found


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def session_cache(session) -> list[CacheEntry]:
    """Cache entries of an onnxruntime session; symbolic head sizes read off the model file's graph."""
    inputs = [(i.name, _ORT_TYPES.get(i.type, np.float32), i.shape) for i in session.get_inputs()]
    entries = cache_entries(inputs, [o.name for o in session.get_outputs()])
    path = getattr(session, "_model_path", None)  # set when the session was created from a file
    if path and any(e.heads is None or e.head_dim is None for e in entries):
        import onnx
        import onnx_ir as ir

        fixed = fused_cache_shapes(ir.from_proto(onnx.load(path, load_external_data=False)))
        entries = [dataclasses.replace(e, heads=fixed[e.past][0], head_dim=fixed[e.past][1]) if e.past in fixed else e for e in entries]
    return entries


def spec_cache(specs) -> list[CacheEntry]:
    """Cache entries among calibration ``InputSpec``s (feeding needs no outputs)."""
    return cache_entries((s.name, s.dtype, s.shape) for s in specs)


def is_cache_input(name: str) -> bool:
    return bool(_PAST.match(name))


def is_present_output(name: str) -> bool:
    return bool(_PRESENT.match(name))


def empty_cache(entries: Sequence[CacheEntry], batch: int, length: int = 0) -> dict[str, np.ndarray]:
    """Zero-length past tensors: the feed of a prefill from scratch (``length`` > 0: zeros of that many positions,
    the feed of a decode step timed at that context; a step's time does not depend on the values)."""
    feeds = {}
    for e in entries:
        if e.heads is None or e.head_dim is None:
            raise BadInputError(
                f"cache input {e.past!r} has no fixed head count and head size, and no GroupQueryAttention reads it to tell "
                "them, so an empty cache cannot be built: re-export the model with static kv_heads and head_dim (optimum does)."
            )
        feeds[e.past] = np.zeros((batch, e.heads, length, e.head_dim), dtype=e.dtype)
    return feeds


def check_kept(before: Sequence[CacheEntry], after: Sequence[CacheEntry]) -> None:
    """Refuse a compiled model whose cache interface (names, dtype, heads, head size) a pass changed: that is our bug."""
    def same(a: CacheEntry, b: CacheEntry) -> bool:  # a size the candidate's graph no longer shows (a quantized QKV) is not a change
        return (a.past, a.present, a.dtype) == (b.past, b.present, b.dtype) and all(y is None or x == y for x, y in ((a.heads, b.heads), (a.head_dim, b.head_dim)))

    if len(before) != len(after) or not all(same(a, b) for a, b in zip(before, after)):
        changed = sorted({e.past for e in before} ^ {e.past for e in after}) or [a.past for a, b in zip(before, after) if not same(a, b)]
        raise VerificationError(f"a pass changed the KV-cache interface at {', '.join(changed[:4])}; nothing was written. Please report this.")
