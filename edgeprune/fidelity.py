"""Fidelity of a candidate's outputs against a reference's, on the same inputs.

Pure numpy on already-computed outputs, so compile's verify step and ``edgeprune validate``
share one definition of "how close":

- cosine similarity per sample (flattened over all but the batch axis; a per-token output of a
  padded text batch counts only the real tokens of ``attention_mask``): mean and min;
- max absolute error, and relative error = max |cand - ref| / max |ref|;
- top-1 agreement for outputs that are class scores or token logits (by name: logit, score,
  prob, class, label; or any rank-2 output that is not an embedding/hidden/pooled feature);
- perplexity ratio for LM logits (rank 3, name contains "logit") when the inputs hold
  ``input_ids``: next-token NLL under each model, padded positions excluded.

``drop`` (what ``--max-drop`` bounds) is the worst fidelity loss over outputs and measures:
1 - mean cosine, 1 - top-1 agreement where that applies, perplexity ratio - 1 for LM logits.
Without ``--max-drop`` a compile keeps the *default floor* of each output's kind instead
(``default_floor``): perplexity ratio <= 1.05 for LM logits, top-1 agreement >= 0.95 for class
scores, cosine mean >= 0.99 for everything else; the reports flag any figure under it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterable

import numpy as np

from edgeprune import kv_cache

_CLASS_NAME = re.compile(r"logit|score|prob|class|label", re.IGNORECASE)
_FEATURE_NAME = re.compile(r"embed|hidden|pool|feature|state", re.IGNORECASE)


def is_class_scores(name: str, rank: int) -> bool:
    """Whether an output's last axis holds class/token scores, so top-1 agreement means something."""
    if _CLASS_NAME.search(name):
        return rank >= 2
    return rank == 2 and not _FEATURE_NAME.search(name)


def is_lm_logits(name: str, rank: int) -> bool:
    return rank == 3 and "logit" in name.lower()


def _token_mask(feed: dict[str, np.ndarray], out: np.ndarray) -> np.ndarray | None:
    """[batch, seq, 1...] mask of the real tokens when ``out`` is per token of a padded batch, else None.

    A text model's padded positions carry values nothing downstream reads (pooling and heads
    mask them): comparing them would charge a format for noise no user sees.
    """
    mask = feed.get("attention_mask")
    if mask is None or out.ndim < 2:
        return None
    mask = np.asarray(mask)
    if mask.ndim != 2 or out.shape[:2] != mask.shape or mask.all():
        return None
    return (mask > 0).reshape(mask.shape + (1,) * (out.ndim - 2))


def _cosine_per_sample(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    a = ref.reshape(ref.shape[0], -1).astype(np.float64)
    b = cand.reshape(cand.shape[0], -1).astype(np.float64)
    norm_a, norm_b = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    den = norm_a * norm_b
    cos = (a * b).sum(axis=1) / np.where(den == 0, 1.0, den)
    # Two zero vectors agree; a zero against a non-zero does not.
    return np.where(den == 0, np.where((norm_a == 0) & (norm_b == 0), 1.0, 0.0), cos)


#: Rows of logits turned into float64 at a time (a 512 x 49152 window would be 200 MB at once).
_LOGSOFTMAX_CHUNK = 64


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of ``targets`` under ``logits`` [n, vocab], in float64.

    Log-softmax is taken as ``x - max - log(sum(exp(x - max)))`` (no overflow), a chunk of
    rows at a time so memory stays bounded for large vocabularies.
    """
    logits = np.asarray(logits)
    targets = np.asarray(targets, dtype=np.int64)
    out = np.empty(len(targets), dtype=np.float64)
    for start in range(0, len(targets), _LOGSOFTMAX_CHUNK):
        rows = logits[start : start + _LOGSOFTMAX_CHUNK].astype(np.float64)
        top = rows.max(axis=1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(rows - top).sum(axis=1))
        picked = rows[np.arange(len(rows)), targets[start : start + _LOGSOFTMAX_CHUNK]]
        out[start : start + len(rows)] = lse - picked
    return out


def next_token_nll(logits: np.ndarray, input_ids: np.ndarray, mask: np.ndarray | None) -> tuple[float, int]:
    """Sum of next-token NLL and the count of predicted tokens; padded positions are skipped."""
    total, count = 0.0, 0
    for b in range(logits.shape[0]):
        target = input_ids[b, 1:]
        keep = np.ones(target.shape, dtype=bool) if mask is None else (mask[b, 1:] > 0) & (mask[b, :-1] > 0)
        if keep.any():
            total += float(token_nll(logits[b, :-1][keep], target[keep]).sum())
            count += int(keep.sum())
    return total, count


@dataclasses.dataclass
class OutputFidelity:
    """How close one output of the candidate is to the reference's, over all samples."""

    name: str
    samples: int
    cosine_mean: float
    cosine_min: float
    max_abs_error: float
    max_rel_error: float
    top1_agreement: float | None = None
    perplexity_reference: float | None = None
    perplexity_candidate: float | None = None

    @property
    def perplexity_ratio(self) -> float | None:
        if self.perplexity_reference is None or self.perplexity_candidate is None:
            return None
        return self.perplexity_candidate / self.perplexity_reference

    @property
    def drop(self) -> float:
        """Fidelity loss in [0, inf): the worst of the measures that apply to this output."""
        losses = [1.0 - self.cosine_mean]
        if self.top1_agreement is not None:
            losses.append(1.0 - self.top1_agreement)
        if self.perplexity_ratio is not None:
            losses.append(self.perplexity_ratio - 1.0)
        return max(0.0, *losses)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["perplexity_ratio"] = self.perplexity_ratio
        out["drop"] = self.drop
        return out


def compare_outputs(
    reference: Iterable[dict[str, np.ndarray]],
    candidate: Iterable[dict[str, np.ndarray]],
    feeds: Iterable[dict[str, np.ndarray]] | None = None,
) -> list[OutputFidelity]:
    """Fidelity per output over aligned lists of per-batch outputs (and the feeds that made them)."""
    reference, candidate = list(reference), list(candidate)
    feeds = list(feeds) if feeds is not None else [{} for _ in reference]
    if len(reference) != len(candidate) or len(reference) != len(feeds):
        raise ValueError("reference, candidate and feeds must have one entry per batch")
    if not reference:
        raise ValueError("no batches to compare")
    results = []
    for name in reference[0]:
        if name not in candidate[0]:
            raise ValueError(f"candidate has no output {name!r}")
        cos, max_abs, ref_absmax, agree, n_top1 = [], 0.0, 0.0, 0, 0
        nll = {"ref": [0.0, 0], "cand": [0.0, 0]}
        rank = reference[0][name].ndim
        for ref_b, cand_b, feed in zip(reference, candidate, feeds):
            r, c = np.asarray(ref_b[name]), np.asarray(cand_b[name])
            if r.shape != c.shape:
                raise ValueError(f"output {name!r} has shape {c.shape} in the candidate but {r.shape} in the reference")
            if not np.issubdtype(r.dtype, np.floating):
                r, c = r.astype(np.float64), c.astype(np.float64)
            keep = _token_mask(feed, r)
            if keep is not None:  # padded positions compared as equal zeros
                r, c = np.where(keep, r, 0), np.where(keep, c, 0)
            cos.append(_cosine_per_sample(r, c) if r.ndim else np.array([1.0 if r == c else 0.0]))
            diff = np.abs(r.astype(np.float64) - c.astype(np.float64))
            max_abs = max(max_abs, float(diff.max(initial=0.0)))
            ref_absmax = max(ref_absmax, float(np.abs(r).max(initial=0.0)))
            if is_class_scores(name, rank) and r.shape[-1] > 1:
                same = r.argmax(-1) == c.argmax(-1)
                counted = np.ones(same.shape, dtype=bool) if keep is None else np.broadcast_to(keep[..., 0], same.shape)
                agree += int((same & counted).sum())
                n_top1 += int(counted.sum())
            if is_lm_logits(name, rank) and "input_ids" in feed:
                mask = feed.get("attention_mask")
                for key, out in (("ref", r), ("cand", c)):
                    s, n = next_token_nll(out, np.asarray(feed["input_ids"]), mask)
                    nll[key][0] += s
                    nll[key][1] += n
        cos_all = np.concatenate(cos)
        fid = OutputFidelity(
            name=name,
            samples=int(cos_all.size),
            cosine_mean=float(cos_all.mean()),
            cosine_min=float(cos_all.min()),
            max_abs_error=max_abs,
            max_rel_error=max_abs / ref_absmax if ref_absmax > 0 else (0.0 if max_abs == 0 else math.inf),
            top1_agreement=agree / n_top1 if n_top1 else None,
        )
        if nll["ref"][1]:
            fid.perplexity_reference = math.exp(nll["ref"][0] / nll["ref"][1])
            fid.perplexity_candidate = math.exp(nll["cand"][0] / nll["cand"][1])
        results.append(fid)
    return results


def separate_cache(fidelity: list[OutputFidelity]) -> tuple[list[OutputFidelity], dict[str, Any] | None]:
    """(the outputs floors apply to, one summary of a KV-cache model's ``present.*`` outputs or None).

    The cache is the model's state, not its answer: verification runs prefills, whose logits
    already attend over the very keys and values returned, so their error is in the logits' fidelity.
    Gating each of 2 x layers cache tensors on its own would only add noise to the summary.
    """
    cache = [f for f in fidelity if kv_cache.is_present_output(f.name)]
    if not cache:
        return fidelity, None
    worst = min(cache, key=lambda f: f.cosine_mean)
    summary = {"outputs": len(cache), "cosine_mean_worst": worst.cosine_mean, "worst_output": worst.name,
               "cosine_min": min(f.cosine_min for f in cache)}  # fmt: skip
    return [f for f in fidelity if not kv_cache.is_present_output(f.name)], summary


def worst_drop(fidelity: list[OutputFidelity]) -> float:
    """The number ``--max-drop`` bounds: the largest fidelity loss over the model's outputs."""
    return max((f.drop for f in fidelity), default=0.0)


# --------------------------------------------------------------------------- the floor a compile keeps

#: The default fidelity floor, per output kind: what compile keeps when no --max-drop is given.
#: From BENCHMARKS.md: MiniLM's per-channel dynamic int8 keeps cosine 0.993 (STS-B -0.001) where
#: per-tensor int8 falls to 0.964; EfficientNet-Lite0's static int8 keeps top-1 agreement 0.952;
#: perplexity within 5% of the float model's is the usual bar for a "same quality" 4-bit LLM.
FLOOR_COSINE = 0.99
FLOOR_TOP1 = 0.95
FLOOR_PERPLEXITY_RATIO = 1.05


@dataclasses.dataclass(frozen=True)
class Floor:
    """The least fidelity one output may keep: ``measure`` against ``limit`` (an upper bound for losses, a lower one otherwise)."""

    output: str
    measure: str  # "cosine mean", "top-1 agreement", "perplexity ratio" or "drop" (--max-drop's worst loss)
    limit: float

    @property
    def upper(self) -> bool:
        return self.measure in ("perplexity ratio", "drop")

    def value(self, f: OutputFidelity) -> float:
        return {"cosine mean": f.cosine_mean, "top-1 agreement": f.top1_agreement,
                "perplexity ratio": f.perplexity_ratio, "drop": f.drop}[self.measure]  # fmt: skip

    def holds(self, f: OutputFidelity) -> bool:
        v = self.value(f)
        return v <= self.limit if self.upper else v >= self.limit

    def describe(self, f: OutputFidelity) -> str:
        """E.g. ``y cosine mean 0.9581 < 0.99``."""
        return f"{f.name} {self.measure} {self.value(f):.4f} {'>' if self.upper else '<'} {self.limit:g}"

    def to_dict(self, f: OutputFidelity) -> dict[str, Any]:
        return {"output": f.name, "measure": self.measure, "limit": self.limit, "value": self.value(f), "ok": self.holds(f)}


def default_floor(f: OutputFidelity) -> Floor:
    """The default floor of one output, by its kind: perplexity ratio for LM logits (when measured), top-1
    agreement for class scores, cosine mean for everything else (embeddings, features, detection maps)."""
    if f.perplexity_ratio is not None:
        return Floor(f.name, "perplexity ratio", FLOOR_PERPLEXITY_RATIO)
    if f.top1_agreement is not None:
        return Floor(f.name, "top-1 agreement", FLOOR_TOP1)
    return Floor(f.name, "cosine mean", FLOOR_COSINE)


def floors(fidelity: list[OutputFidelity], max_drop: float | None = None) -> list[Floor]:
    """The floor each output must keep: its default floor, or ``drop <= max_drop`` when --max-drop replaces it."""
    return [default_floor(f) if max_drop is None else Floor(f.name, "drop", max_drop) for f in fidelity]


def below_default_floor(fidelity: list[OutputFidelity]) -> list[tuple[Floor, OutputFidelity]]:
    """The outputs whose fidelity is under their default floor (what the reports flag, whatever floor was in force)."""
    return [(fl, f) for f in fidelity if not (fl := default_floor(f)).holds(f)]
