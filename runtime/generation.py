"""Prefill and decode speed of a KV-cache decoder: greedy generation with the cache reused.

An edge LLM is judged by how fast it reads a prompt (prefill) and how many tokens per second it
then writes (decode).  ``measure_generation`` runs the same greedy generation on several models
in interleaved rounds (as ``latency.measure_side_by_side`` does for single runs), so the ratios
hold on a busy machine.  Each step feeds the previous step's ``present.*`` outputs back as
``past_key_values.*`` through IOBinding, without copying the cache into numpy.

One round: a prefill of the prompt (which yields the first new token), then ``new_tokens - 1``
decode steps of one token each.  Decode speed is those steps over their time.  ``prefill_chunk``
reads the prompt in steps of that many tokens through the cache, as an app does with a long prompt:
a one-shot prefill holds the whole [heads, T, T] score tensors and [T, vocab] logits at once (a
4k-token prompt was OOM-killed on a shared machine), and the chunks give the same greedy tokens.

``Generator`` is the single-model API: ``Generator.open(model).generate(prompt, new_tokens)``.

When every ``present.*`` output comes straight from a ``com.microsoft.GroupQueryAttention`` that reads the
matching ``past_key_values.*`` input (``fuse_attention``'s models, onnxruntime-genai's), the generator gives
each cache tensor one buffer of the generation's full length and binds it as both the past input and the
present output, as onnxruntime-genai does (``past_present_share_buffer``): GQA then writes the new keys and
values in place and reads the valid length from ``attention_mask``, instead of copying the whole cache into
a newly allocated present tensor at every step.  The tokens and logits are the same either way.

A decode step is one hot session issuing a few hundred small parallel sections (SmolLM2-135M: 309 kernels per
token), so ONNX Runtime's thread policy decides much of its speed.  ``Generator.open`` lets the intra-op
threads spin between sections (``spinning=True``, ORT's and onnxruntime-genai's default), which pays on cores
the loop has to itself and costs where others run on them: SmolLM2-135M, 2 threads, 128-token prompt, 64 new
tokens, interleaved rounds, onnxruntime-genai's int4 graph 110.7 -> 144.0 tok/s and an edgeprune-fused fp32
model 40.7 -> 46.8 on a quiet 2-core machine, but 92.3 -> 60.6 and 28.9 -> 19.6 with a 2-thread compile running
beside it.  ``measure_generation`` compares models side by side and keeps edgeprune's no-spin default unless
``spinning=True`` is given, one policy for every model it compares.  With the same policy on both sides this
loop decodes as fast as onnxruntime-genai's own generator on the same graph (no spin 110.7 vs 105.4 tok/s,
spin 144.0 vs 131.5; the same 309 kernels per token in ORT's profile).
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
_MS_DOMAIN = "com.microsoft"


def _gqa_owns_the_cache(session, cache: Sequence[kv_cache.CacheEntry]) -> bool:
    """Whether every present output is a GroupQueryAttention's present_key/value over the matching past input,
    the total length coming from ``attention_mask`` (then one buffer can serve as both, see the module doc)."""
    path = getattr(session, "_model_path", None)
    if not path or "attention_mask" not in {i.name for i in session.get_inputs()}:
        return False
    from edgeprune.runtime.session import graph_nodes

    # The file the session was just made from, its nodes only: loading the proto would hold the weights twice.
    producers = {out: (node, i) for node in graph_nodes(path) for i, out in enumerate(node[3]) if out}
    for entry in cache:
        (domain, op_type, inputs, _), index = producers.get(entry.present, (("", "", [], []), None))
        if op_type != "GroupQueryAttention" or domain != _MS_DOMAIN or index not in (1, 2):
            return False
        if len(inputs) <= index + 2 or inputs[index + 2] != entry.past:  # present_key <- past_key (input 3), value 4
            return False
    return bool(cache)


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
    prefill_chunk: int | None = None  # None: the prompt in one step

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_chunk(prefill_chunk: int | None) -> int | None:
    if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1):
        raise BadInputError(f"prefill_chunk must be a positive number of tokens or None (one shot), got {prefill_chunk!r}.")
    return prefill_chunk


class Generator:
    """Greedy generation on one KV-cache decoder session (the cache reused through IOBinding).

    ``prefill_chunk=None`` reads the prompt in one step; an int reads it in steps of that many
    tokens, each attending to the cache of the ones before (bounded memory for long prompts).
    ``share_buffer`` (default: where the model allows it, see the module doc) keeps each cache tensor in one
    buffer of the generation's length, bound as both past input and present output; False always feeds the
    previous step's present outputs back.

    A decode step does no allocation on the Python side: the token, ``attention_mask`` and ``position_ids``
    are views of buffers kept across steps (ones and 0..n-1, grown when a longer generation comes), and the
    one-token logits go into one array bound once, so ``_step``'s logits are valid until the next step.
    """

    def __init__(self, session, *, prefill_chunk: int | None = None, share_buffer: bool | None = None):
        import onnxruntime as ort

        self.session = session
        self.prefill_chunk = _check_chunk(prefill_chunk)
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
        logits = session.get_outputs()[0]
        vocab = logits.shape[-1] if logits.shape else None
        self.vocab = vocab if isinstance(vocab, int) and vocab > 0 and logits.type == "tensor(float)" and len(logits.shape) == 3 else None
        self._bound = None  # (cache buffers, the IOBinding that has them bound as past and present)
        self._bound_logits = None  # (the shared-buffer binding, the OrtValue bound to it as the logits output)
        self._ones = np.ones((1, 0), dtype=np.int64)  # attention_mask[:, :total]
        self._positions = np.zeros((1, 0), dtype=np.int64)  # position_ids[:, past:total]
        self._token = np.zeros((1, 1), dtype=np.int64)  # the decode step's input_ids, written in place
        self._one_logits = None  # (array, OrtValue) of the one-token logits, made at the first decode step
        self._ort = ort
        self.share_buffer = _gqa_owns_the_cache(session, self.cache) if share_buffer in (None, True) else False
        if share_buffer and not self.share_buffer:
            raise BadInputError(
                "share_buffer=True needs every present.* output to come from a com.microsoft.GroupQueryAttention over the "
                "matching past input and an attention_mask input (compile with --fuse-attention); use share_buffer=None."
            )

    @classmethod
    def open(cls, model, target="cpu", *, threads: int | None = None, prefill_chunk: int | None = None,
             share_buffer: bool | None = None, spinning: bool = True) -> Generator:
        """A generator on a new session for ``model`` (a path, ``onnx_ir.Model`` or ``onnx.ModelProto``).

        ``spinning`` (default True, as ONNX Runtime and onnxruntime-genai do) lets the session's intra-op threads
        busy-wait between a step's parallel sections; False is edgeprune's default for every other session (see
        ``make_session``).  See the module doc for when each pays.
        """
        session = make_session(model, resolve_target(target), threads=threads, spinning=spinning)
        return cls(session, prefill_chunk=prefill_chunk, share_buffer=share_buffer)

    def _grow(self, total: int) -> None:
        """The mask and position buffers hold at least ``total`` positions (doubled, so a generation grows them
        a few times at most)."""
        if self._ones.shape[1] < total:
            size = max(total, 2 * self._ones.shape[1])
            self._ones = np.ones((1, size), dtype=np.int64)
            self._positions = np.arange(size, dtype=np.int64)[None, :]

    def _logits_for(self, n: int):
        """(array, OrtValue) the logits of an ``n``-token step are written into: one kept for decode steps."""
        if n == 1:
            if self._one_logits is None:
                array = np.empty((1, 1, self.vocab), dtype=np.float32)
                self._one_logits = (array, self._ort.OrtValue.ortvalue_from_numpy(array))
            return self._one_logits
        array = np.empty((1, n, self.vocab), dtype=np.float32)
        return array, self._ort.OrtValue.ortvalue_from_numpy(array)

    def _step(self, ids: np.ndarray, past_len: int, past) -> tuple[np.ndarray, list]:
        n = ids.shape[1]
        total = past_len + n
        self._grow(total)
        arrays = {
            "input_ids": ids if ids.dtype == np.int64 else ids.astype(np.int64),
            "attention_mask": self._ones[:, :total],
            "position_ids": self._positions[:, past_len:total],
        }
        if self.share_buffer:  # the cache is bound once per generation: GQA writes the new rows in place
            if self._bound is None or self._bound[0] is not past:
                binding = self.session.io_binding()
                binding.bind_output(self.logits, self.device)  # first: get_outputs() lists outputs in binding order
                for entry, value in zip(self.cache, past):
                    binding.bind_ortvalue_input(entry.past, value)
                    binding.bind_ortvalue_output(entry.present, value)
                self._bound = (past, binding)
            binding = self._bound[1]
        else:
            binding = self.session.io_binding()
            binding.bind_output(self.logits, self.device)  # first: get_outputs() lists outputs in binding order
            for entry, value in zip(self.cache, past):
                binding.bind_ortvalue_input(entry.past, value)
                binding.bind_output(entry.present, self.device)
        for name in self.inputs:
            binding.bind_cpu_input(name, arrays[name])
        logits = None
        if self.vocab is not None:  # ORT writes the logits into our array: no copy out, no wrapper per output
            logits, value = self._logits_for(n)
            if not self.share_buffer:
                binding.bind_ortvalue_output(self.logits, value)
            elif self._bound_logits is None or self._bound_logits[0] is not binding or self._bound_logits[1] is not value:
                binding.bind_ortvalue_output(self.logits, value)  # decode steps after the first keep this one
                self._bound_logits = (binding, value)
        else:
            binding.bind_output(self.logits, self.device)
        self.session.run_with_iobinding(binding)
        if self.share_buffer:
            return (logits if logits is not None else binding.get_outputs()[0].numpy())[0, -1], past
        outputs = binding.get_outputs()
        return (logits if logits is not None else outputs[0].numpy())[0, -1], outputs[1:]

    def run(self, prompt: Sequence[int] | np.ndarray, new_tokens: int) -> tuple[list[int], float, float]:
        """(generated ids, prefill seconds, decode seconds) of one greedy generation of ``new_tokens`` (>= 1)."""
        ort = self._ort
        ids = np.asarray(prompt, dtype=np.int64).reshape(-1)
        if ids.size == 0 or new_tokens < 1:
            raise BadInputError(f"generation needs a non-empty prompt and new_tokens >= 1, got {ids.size} tokens and {new_tokens}.")
        chunk = self.prefill_chunk or ids.size
        empty = kv_cache.empty_cache(self.cache, 1)
        if self.share_buffer:  # one zeroed buffer per cache tensor, as long as the whole generation
            length = ids.size + new_tokens
            empty = {name: np.zeros((1, a.shape[1], length, a.shape[3]), dtype=a.dtype) for name, a in empty.items()}
        past = [ort.OrtValue.ortvalue_from_numpy(a) for a in empty.values()]
        self._grow(ids.size + new_tokens)
        start = time.perf_counter()
        for c in range(0, ids.size, chunk):
            logits, past = self._step(ids[None, c : c + chunk], c, past)
        prefill = time.perf_counter() - start
        tokens = [int(np.argmax(logits))]
        token = self._token
        start = time.perf_counter()
        for position in range(ids.size, ids.size + new_tokens - 1):
            token[0, 0] = tokens[-1]
            logits, past = self._step(token, position, past)
            tokens.append(int(np.argmax(logits)))
        return tokens, prefill, time.perf_counter() - start

    def generate(self, prompt: Sequence[int] | np.ndarray, new_tokens: int) -> list[int]:
        """The greedy continuation of ``prompt``: ``new_tokens`` ids."""
        return self.run(prompt, new_tokens)[0]


#: the former private name (benchmarks/run_llm_peers.py imports it); use ``Generator``
_Generator = Generator


def measure_generation(
    models: Mapping[str, object],
    prompt: Sequence[int],
    *,
    new_tokens: int = 64,
    target="cpu",
    rounds: int = 3,
    warmup: int = 1,
    threads: int | None = None,
    prefill_chunk: int | None = None,
    spinning: bool = False,
) -> dict[str, GenerationResult]:
    """Greedy generation of ``new_tokens`` after ``prompt`` on each model, interleaved round by round.

    ``prefill_chunk`` prefills in steps of that many tokens through the cache (None: one shot).
    ``spinning`` is every session's thread policy (see ``Generator.open``): one policy for all the models
    compared, so the ratios compare the models and not the policies.
    Peak memory per model is the growth while its session is created and its warm-up
    generations run (the cache at full length included), on top of the sessions already open.
    """
    _check_counts(warmup, rounds)
    _check_chunk(prefill_chunk)
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
            session = make_session(sources[name], target, threads=threads, spinning=spinning)
            generators[name] = Generator(session, prefill_chunk=prefill_chunk)
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
            peak_memory_mb=peaks[name], tokens=tokens[name], prefill_chunk=prefill_chunk,
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
