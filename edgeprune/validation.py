"""Validate a candidate against a reference: fidelity, latency, size and memory on a target.

``edgeprune validate`` calls ``validate_models``; ``compile`` calls ``measure_pair`` for the
latency half after its own verification. Latency is always measured side by side (interleaved
runs in one process), so the ratio holds even on a busy machine.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any

import numpy as np
import onnx_ir as ir

from edgeprune import model_io
from edgeprune.calibration import CalibrationSet, input_specs, load_calibration
from edgeprune.errors import BadInputError
from edgeprune import kv_cache
from edgeprune.fidelity import OutputFidelity, compare_outputs, separate_cache, worst_drop
from edgeprune.progress import Progress
from edgeprune.runtime.targets import Target, get_target, is_available
from edgeprune.verify import run_batches

logger = logging.getLogger(__name__)

#: Sequence length of the latency input for token models (batch 1), as in BENCHMARKS.md.
LATENCY_SEQ_LEN = 128


def latency_feed(sample: dict[str, np.ndarray], model: ir.Model, seq_len: int = LATENCY_SEQ_LEN) -> dict[str, np.ndarray]:
    """One batch-1 input for latency: a real sample, token inputs tiled to ``seq_len`` where the axis is dynamic.

    Short calibration sentences would understate the cost of a model meant for longer inputs,
    so token ids are repeated to the benchmark length; masks become ones and position ids a range.
    """
    specs = {s.name: s for s in input_specs(model)}
    feed = {name: np.asarray(value)[:1] for name, value in sample.items()}
    for name, value in feed.items():
        spec = specs.get(name)
        dynamic_seq = spec is not None and spec.shape is not None and len(spec.shape) == 2 and not isinstance(spec.shape[1], int)
        if not dynamic_seq or value.ndim != 2 or not np.issubdtype(value.dtype, np.integer):
            continue
        if name == "position_ids":
            feed[name] = np.arange(seq_len, dtype=value.dtype)[None, :]
        elif "mask" in name or name == "token_type_ids":
            feed[name] = np.full((1, seq_len), value.flat[0] if name == "token_type_ids" else 1, dtype=value.dtype)
        else:
            reps = -(-seq_len // value.shape[1])
            feed[name] = np.tile(value, (1, reps))[:, :seq_len]
    return feed


def decode_cache(model: ir.Model) -> list[kv_cache.CacheEntry]:
    """The model's KV-cache entries, refused with the fix where it has none (a decode step needs a cache)."""
    entries = kv_cache.model_cache(model)
    if not entries:
        raise BadInputError("a decode budget needs a model with a KV cache (inputs past_key_values.N.key/value): export it "
                            "with past key/values (optimum's text-generation-with-past), or use --latency-budget.")
    return entries


def decode_feed(sample: dict[str, np.ndarray], model: ir.Model, context: int) -> dict[str, np.ndarray]:
    """One decode step's batch-1 input: the sample's first token after a cache of ``context`` positions (zeros), the
    mask ``context + 1`` ones and the position ``context``: what a generation's step costs at that length."""
    entries = decode_cache(model)
    feed = {name: np.asarray(value)[:1] for name, value in sample.items() if not kv_cache.is_cache_input(name)}
    if "input_ids" not in feed:
        raise BadInputError(f"a decode step needs an input_ids input; the calibration rows have {sorted(feed)}.")
    feed["input_ids"] = feed["input_ids"][:, :1]
    if "attention_mask" in feed:
        feed["attention_mask"] = np.ones((1, context + 1), dtype=feed["attention_mask"].dtype)
    if "position_ids" in feed:
        feed["position_ids"] = np.full((1, 1), context, dtype=feed["position_ids"].dtype)
    feed.update(kv_cache.empty_cache(entries, 1, context))
    return feed


def describe_feed(feed: dict[str, np.ndarray]) -> dict[str, list[int]]:
    return {name: list(value.shape) for name, value in feed.items()}


def measure_pair(
    reference: Any,
    candidate: Any,
    feed: dict[str, np.ndarray],
    target: Target,
    *,
    threads: int | None = None,
    runs: int = 30,
    warmup: int = 5,
) -> dict[str, Any]:
    """Side-by-side latency of reference and candidate on ``target``, or why it was not measured."""
    from edgeprune.runtime.latency import measure_side_by_side

    if not is_available(target):
        return {"measured": False, "reason": f"{target.provider} is not installed in this onnxruntime build: not measured here"}
    results = measure_side_by_side({"reference": reference, "candidate": candidate}, feed, target, warmup=warmup, runs=runs, threads=threads)
    ref, cand = results["reference"], results["candidate"]
    return {
        "measured": True,
        "target": target.name,
        "threads": threads,
        "input_shapes": describe_feed(feed),
        "reference": ref.to_dict(),
        "candidate": cand.to_dict(),
        "p50_ratio": cand.p50_ms / ref.p50_ms,
        "p90_ratio": cand.p90_ms / ref.p90_ms,
        "speedup_p50": ref.p50_ms / cand.p50_ms,
    }


#: New tokens of the greedy generation that measures decode speed (issue 13's protocol: 128-token prompt, 64 new).
DECODE_TOKENS = 64


def measure_generation_pair(reference: Any, candidate: Any, feed: dict[str, np.ndarray], target: Target, *,
                            threads: int | None = None, new_tokens: int = DECODE_TOKENS, rounds: int = 3) -> dict[str, Any]:
    """Prefill and decode speed of two KV-cache decoders side by side: greedy generation after the latency feed's ids."""
    from edgeprune.runtime.generation import measure_generation, same_prefix

    if not is_available(target):
        return {"measured": False, "reason": f"{target.provider} is not installed in this onnxruntime build: not measured here"}
    prompt = feed["input_ids"][0]
    results = measure_generation({"reference": reference, "candidate": candidate}, prompt, new_tokens=new_tokens,
                                 target=target, rounds=rounds, threads=threads)  # fmt: skip
    ref, cand = results["reference"], results["candidate"]
    return {
        "measured": True,
        "prompt_tokens": int(prompt.size),
        "new_tokens": new_tokens,
        "reference": ref.to_dict(),
        "candidate": cand.to_dict(),
        "prefill_ratio": cand.prefill_ms / ref.prefill_ms,
        "decode_speedup": cand.decode_tokens_per_s / ref.decode_tokens_per_s,
        "same_tokens": same_prefix(ref.tokens, cand.tokens),
    }


@dataclasses.dataclass
class ValidationResult:
    reference: str
    candidate: str
    data: str
    samples: int
    fidelity: list[OutputFidelity]
    latency: dict[str, Any]
    size: dict[str, Any]
    generation: dict[str, Any] | None = None  # KV-cache decoders: measure_generation_pair
    cache: dict[str, Any] | None = None  # KV-cache decoders: fidelity.separate_cache

    @property
    def drop(self) -> float:
        return worst_drop(self.fidelity)

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "candidate": self.candidate,
            "data": self.data,
            "samples": self.samples,
            "drop": self.drop,
            "fidelity": [f.to_dict() for f in self.fidelity],
            "latency": self.latency,
            "size": self.size,
            "generation": self.generation,
            "kv_cache": self.cache,
        }


def find_tokenizer(model_path: str | pathlib.Path, given: str | pathlib.Path | None) -> pathlib.Path | None:
    """The tokenizer to use: the one given, else a tokenizer.json beside the model."""
    if given is not None:
        return pathlib.Path(given)
    beside = pathlib.Path(model_path).parent / "tokenizer.json"
    return beside if beside.is_file() else None


def _same_interface(reference: ir.Model, candidate: ir.Model) -> None:
    ref_in = {v.name for v in reference.graph.inputs}
    cand_in = {v.name for v in candidate.graph.inputs}
    ref_out = {v.name for v in reference.graph.outputs}
    cand_out = {v.name for v in candidate.graph.outputs}
    if ref_in != cand_in or not ref_out <= cand_out:
        raise BadInputError(
            "the candidate's inputs/outputs differ from the reference's "
            f"(inputs {sorted(cand_in)} vs {sorted(ref_in)}, outputs {sorted(cand_out)} vs {sorted(ref_out)}): "
            "compare two versions of the same model."
        )


def validate_models(
    reference_path: str | pathlib.Path,
    candidate_path: str | pathlib.Path,
    *,
    data: str | pathlib.Path | None = None,
    tokenizer: str | pathlib.Path | None = None,
    target: str = "cpu",
    threads: int | None = None,
    max_samples: int = 64,
    seq_len: int = LATENCY_SEQ_LEN,
    batch_size: int = 8,
    runs: int = 30,
    progress: Progress | None = None,
) -> ValidationResult:
    """Fidelity of candidate vs reference on ``data`` plus latency/size/memory ratios on ``target``."""
    progress = progress or Progress()
    target_profile = get_target(target)
    with progress.stage("load models"):
        reference = model_io.load_model(reference_path)
        candidate = model_io.load_model(candidate_path)
    _same_interface(reference, candidate)
    calib: CalibrationSet = load_calibration(
        data, reference, tokenizer=find_tokenizer(reference_path, tokenizer), max_samples=max_samples, seq_len=seq_len
    )
    batches = list(calib.batches(batch_size))
    with progress.stage(f"run both models on {len(calib)} samples"):
        ref_out = run_batches(model_io.to_proto(reference), batches, threads=threads)
        cand_out = run_batches(model_io.to_proto(candidate), batches, threads=threads)
    fidelity, cache = separate_cache(compare_outputs(ref_out, cand_out, batches))
    feed = latency_feed(calib.samples[0], reference, seq_len)
    with progress.stage(f"latency on {target_profile.name}, side by side"):
        latency = measure_pair(str(reference_path), str(candidate_path), feed, target_profile, threads=threads, runs=runs)
    generation = None
    if kv_cache.model_cache(reference):
        with progress.stage(f"greedy generation ({DECODE_TOKENS} new tokens) on {target_profile.name}, side by side"):
            generation = measure_generation_pair(str(reference_path), str(candidate_path), feed, target_profile, threads=threads)
    ref_size, cand_size = model_io.file_size(reference_path), model_io.file_size(candidate_path)
    size = {
        "reference_bytes": ref_size,
        "candidate_bytes": cand_size,
        "ratio": cand_size / ref_size,
        "reference_params": model_io.param_count(reference),
        "candidate_params": model_io.param_count(candidate),
    }
    return ValidationResult(str(reference_path), str(candidate_path), calib.source, len(calib), fidelity, latency, size,
                            generation, cache)
