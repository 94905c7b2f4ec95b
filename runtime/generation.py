"""Prefill and decode speed of a KV-cache decoder: greedy generation with the cache reused.

An edge LLM is judged by how fast it reads a prompt (prefill) and how many tokens per second it
then writes (decode).  ``measure_generation`` runs the same greedy generation on several models
in interleaved rounds (as ``latency.measure_side_by_side`` does for single runs), so the ratios
hold on a busy machine.  Each step feeds the previous step's ``present.*`` outputs back as
``past_key_values.*`` through IOBinding, without copying the cache into numpy.

One round: a prefill of the prompt (which yields the first new token), then ``new_tokens - 1``
decode steps of one token each.  Decode speed is those steps over their time.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from edgeprune import kv_cache
from edgeprune.errors import BadInputError
from edgeprune.runtime.latency import _check_counts, _cleanup, _peak_since, _prepare_file, _reset_peak, _warm_process
from edgeprune.runtime.session import make_session
from edgeprune.runtime.targets import resolve_target

_STEP_INPUTS = ("input_ids", "attention_mask", "position_ids")


@dataclass
class GenerationResult:
    """Medians over the timed rounds; ``tokens`` is the greedy continuation (the same every round)."""

    prompt_tokens: int
    new_tokens: int
    prefill_ms: float
    decode_ms_per_token: float
    decode_tokens_per_s: float
    rounds: int
    threads: int | None
    peak_memory_mb: float | None
    tokens: list[int]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class _Generator:
    """One session plus the names it needs; ``run`` is one greedy generation."""

    def __init__(self, session):
        self.session = session
        self.cache = kv_cache.session_cache(session)
        if not self.cache:
            raise BadInputError(
                "the model has no KV cache (inputs past_key_values.N.key/value with outputs present.N.key/value): "
                "decode speed needs a model exported with past key/values, e.g. optimum's text-generation-with-past."
            )
        names = {i.name for i in session.get_inputs()}
        other = sorted(names - set(_STEP_INPUTS) - {e.past for e in self.cache})
        if "input_ids" not in names or other:
            raise BadInputError(
                f"the decoder's inputs {sorted(names)} are not input_ids / attention_mask / position_ids plus the cache: "
                "only standard decoder interfaces are driven here."
            )
        self.inputs = [n for n in _STEP_INPUTS if n in names]
        self.logits = session.get_outputs()[0].name
        self.device = "cpu"

    def _step(self, ids: np.ndarray, past_len: int, past) -> tuple[np.ndarray, list]:
        binding = self.session.io_binding()
        n = ids.shape[1]
        arrays = {
            "input_ids": ids,
            "attention_mask": np.ones((1, past_len + n), dtype=np.int64),
            "position_ids": np.arange(past_len, past_len + n, dtype=np.int64)[None, :],
        }
        for name in self.inputs:
            binding.bind_cpu_input(name, arrays[name])
        for entry, value in zip(self.cache, past):
            binding.bind_ortvalue_input(entry.past, value)
        binding.bind_output(self.logits, self.device)
        for entry in self.cache:
            binding.bind_output(entry.present, self.device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy()[0, -1], outputs[1:]

    def run(self, prompt: np.ndarray, new_tokens: int) -> tuple[list[int], float, float]:
        """(generated ids, prefill seconds, decode seconds) of one greedy generation."""
        import onnxruntime as ort

        past = [ort.OrtValue.ortvalue_from_numpy(a) for a in kv_cache.empty_cache(self.cache, 1).values()]
        start = time.perf_counter()
        logits, past = self._step(prompt[None, :], 0, past)
        prefill = time.perf_counter() - start
        tokens = [int(np.argmax(logits))]
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            logits, past = self._step(np.array([[tokens[-1]]], dtype=np.int64), len(prompt) + len(tokens) - 1, past)
            tokens.append(int(np.argmax(logits)))
        return tokens, prefill, time.perf_counter() - start


def measure_generation(
    models: Mapping[str, object],
    prompt: Sequence[int],
    *,
    new_tokens: int = 64,
    target="cpu",
    rounds: int = 3,
    warmup: int = 1,
    threads: int | None = None,
) -> dict[str, GenerationResult]:
    """Greedy generation of ``new_tokens`` after ``prompt`` on each model, interleaved round by round.

    Peak memory per model is the growth while its session is created and its warm-up
    generations run (the cache at full length included), on top of the sessions already open.
    """
    _check_counts(warmup, rounds)
    if new_tokens < 2:
        raise BadInputError(f"new_tokens must be >= 2 (one from the prefill, the rest decoded), got {new_tokens}.")
    ids = np.asarray(prompt, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        raise BadInputError("the prompt is empty: give at least one token id.")
    target = resolve_target(target)
    names = list(models)
    sources, generators, peaks = {}, {}, {}
    prefill = {n: [] for n in names}
    decode = {n: [] for n in names}
    tokens: dict[str, list[int]] = {}
    _warm_process(target, threads)
    try:
        for name in names:
            sources[name] = _prepare_file(models[name])
            rss = _reset_peak()
            generators[name] = _Generator(make_session(sources[name], target, threads=threads))
            for _ in range(warmup):
                generators[name].run(ids, new_tokens)
            peaks[name] = _peak_since(rss)
        for r in range(rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                tokens[name], p, d = generators[name].run(ids, new_tokens)
                prefill[name].append(p)
                decode[name].append(d)
    finally:
        generators.clear()
        gc.collect()
        for name, source in sources.items():
            _cleanup(source, models[name])
    results = {}
    for name in names:
        per_token = statistics.median(decode[name]) / (new_tokens - 1)
        results[name] = GenerationResult(
            prompt_tokens=int(ids.size), new_tokens=new_tokens, prefill_ms=statistics.median(prefill[name]) * 1e3,
            decode_ms_per_token=per_token * 1e3, decode_tokens_per_s=1.0 / per_token, rounds=rounds, threads=threads,
            peak_memory_mb=peaks[name], tokens=tokens[name],
        )  # fmt: skip
    return results


def same_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two greedy continuations share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
