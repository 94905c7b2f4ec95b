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
    """Cache entries of an ``onnx_ir`` model (empty when it has no KV cache)."""
    inputs = [(v.name, v.dtype.numpy() if v.dtype is not None else np.float32, None if v.shape is None else list(v.shape)) for v in model.graph.inputs]
    return cache_entries(inputs, [v.name for v in model.graph.outputs])


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def session_cache(session) -> list[CacheEntry]:
    """Cache entries of an onnxruntime session."""
    inputs = [(i.name, _ORT_TYPES.get(i.type, np.float32), i.shape) for i in session.get_inputs()]
    return cache_entries(inputs, [o.name for o in session.get_outputs()])


def spec_cache(specs) -> list[CacheEntry]:
    """Cache entries among calibration ``InputSpec``s (feeding needs no outputs)."""
    return cache_entries((s.name, s.dtype, s.shape) for s in specs)


def is_cache_input(name: str) -> bool:
    return bool(_PAST.match(name))


def is_present_output(name: str) -> bool:
    return bool(_PRESENT.match(name))


def empty_cache(entries: Sequence[CacheEntry], batch: int) -> dict[str, np.ndarray]:
    """Zero-length past tensors: the feed of a prefill from scratch."""
    feeds = {}
    for e in entries:
        if e.heads is None or e.head_dim is None:
            raise BadInputError(
                f"cache input {e.past!r} has no fixed head count and head size, so an empty cache cannot be built: "
                "re-export the model with static kv_heads and head_dim (optimum and onnxruntime-genai do)."
            )
        feeds[e.past] = np.zeros((batch, e.heads, 0, e.head_dim), dtype=e.dtype)
    return feeds


def check_kept(before: Sequence[CacheEntry], after: Sequence[CacheEntry]) -> None:
    """Refuse a compiled model whose cache interface (names, dtype, heads, head size) a pass changed: that is our bug."""
    if list(before) != list(after):
        changed = sorted({e.past for e in before} ^ {e.past for e in after}) or [a.past for a, b in zip(before, after) if a != b]
        raise VerificationError(f"a pass changed the KV-cache interface at {', '.join(changed[:4])}; nothing was written. Please report this.")
