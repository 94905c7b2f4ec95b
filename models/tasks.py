"""Task metrics for the benchmark models: STS-B dev Spearman (encoders) and WikiText-2 perplexity (LMs).

Both run an ONNX model through onnxruntime and read the shared evaluation data (see
``../shared/data/SOURCES.md``), so every figure in a model card or in BENCHMARKS.md comes from
the exported graph itself, not from the PyTorch model it was exported from.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgeprune import kv_cache
from edgeprune.errors import BadInputError, CalibrationDataError
from edgeprune.fidelity import token_nll

logger = logging.getLogger(__name__)

#: Rows of logits turned into float64 at a time (bounds memory at ~64 x vocab x 8 bytes).


# ----------------------------------------------------------------------------------------- data


def data_dir() -> Path:
    """The shared evaluation data folder: $EDGEPRUNE_DATA, else ``<repo>/../shared/data``."""
    env = os.environ.get("EDGEPRUNE_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        raise BadInputError(
            f"the evaluation data folder {path} does not exist: set EDGEPRUNE_DATA to the folder "
            "that holds stsb/ and wikitext-2/."
        )
    return path


def _data_file(path: str | os.PathLike | None, default: str) -> Path:
    path = Path(path) if path is not None else data_dir() / default
    if not path.is_file():
        raise BadInputError(f"the evaluation file {path} does not exist: check EDGEPRUNE_DATA or the path given.")
    return path


def load_stsb(path: str | os.PathLike | None = None) -> tuple[list[str], list[str], np.ndarray]:
    """Read STS-B (tab-separated, no quoting): columns 4, 5, 6 are score, sentence1, sentence2.

    Some rows carry extra trailing columns, so the line is split on tabs by hand instead of
    trusting a CSV dialect.  Returns (sentences1, sentences2, gold scores as float64).
    """
    path = _data_file(path, "stsb/sts-dev.csv")
    s1: list[str] = []
    s2: list[str] = []
    gold: list[float] = []
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            cols = line.split("\t")
            try:
                score = float(cols[4])
                a, b = cols[5], cols[6]
            except (IndexError, ValueError) as exc:
                raise CalibrationDataError(
                    f"{path} line {lineno} is not an STS-B row (need score, sentence1, sentence2 in "
                    "tab-separated columns 4-6): fix or replace the file."
                ) from exc
            s1.append(a)
            s2.append(b)
            gold.append(score)
    if not gold:
        raise CalibrationDataError(f"{path} holds no STS-B rows: replace it with the STS-B dev file.")
    return s1, s2, np.asarray(gold, dtype=np.float64)


def load_wikitext(path: str | os.PathLike | None = None) -> str:
    """The WikiText-2 validation text exactly as the file holds it (lines joined as they are)."""
    return _data_file(path, "wikitext-2/valid.txt").read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------- sessions


def _as_session(model: Any, threads: int | None):
    """Accept an InferenceSession as is; build one on the CPU target for anything else."""
    import onnxruntime as ort

    if isinstance(model, ort.InferenceSession):
        return model
    from edgeprune.runtime.session import make_session

    return make_session(model, "cpu", threads=threads)


def _load_tokenizer(tokenizer_path: str | os.PathLike):
    from edgeprune.calibration import load_tokenizer

    return load_tokenizer(tokenizer_path)


def _feeds(session, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keep the arrays the session declares as inputs; fail clearly on one we cannot provide."""
    feeds = {}
    for spec in session.get_inputs():
        if spec.name not in arrays:
            raise BadInputError(
                f"the model needs input {spec.name!r}, which this task does not provide (it provides "
                f"{', '.join(sorted(arrays))}): evaluate a model with standard text inputs."
            )
        feeds[spec.name] = arrays[spec.name]
    return feeds


# ---------------------------------------------------------------------------------------- STS-B


def _token_output(session) -> str:
    """The per-token hidden-state output: token_embeddings / last_hidden_state, else the first rank-3 one."""
    outputs = session.get_outputs()
    names = [o.name for o in outputs]
    for preferred in ("token_embeddings", "last_hidden_state"):
        if preferred in names:
            return preferred
    for out in outputs:
        if out.shape is not None and len(out.shape) == 3:
            return out.name
    raise BadInputError(
        f"the model has no per-token output (outputs: {', '.join(names)}): STS-B needs an encoder "
        "that returns token_embeddings or last_hidden_state."
    )


def sentence_embeddings(
    session_or_model: Any,
    tokenizer_path: str | os.PathLike,
    sentences: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int = 128,
    threads: int | None = None,
) -> np.ndarray:
    """Mean-pool the per-token output over the attention mask; one float64 row per sentence.

    We pool ``token_embeddings`` ourselves rather than read a ``sentence_embedding`` output:
    every encoder (and every pruned or quantized variant of it) keeps the per-token output,
    and cosine similarity does not care about the L2 normalisation the sentence output adds.
    Sentences are batched by token length (less padding), then put back in order.
    """
    session = _as_session(session_or_model, threads)
    tok = _load_tokenizer(tokenizer_path)
    # tokenizer.json files often carry fixed padding to 128; pad per batch ourselves instead.
    pad_id = tok.padding["pad_id"] if tok.padding else (tok.token_to_id("[PAD]") or 0)
    tok.no_padding()
    tok.enable_truncation(max_length)
    output = _token_output(session)
    encodings = tok.encode_batch(list(sentences))
    order = np.argsort([len(e.ids) for e in encodings], kind="stable")
    result = np.zeros((len(sentences), 0))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(encodings[i].ids) for i in idx)
        ids = np.full((len(idx), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(idx), width), dtype=np.int64)
        types = np.zeros((len(idx), width), dtype=np.int64)
        for row, i in enumerate(idx):
            enc = encodings[i]
            ids[row, : len(enc.ids)] = enc.ids
            mask[row, : len(enc.ids)] = 1
            types[row, : len(enc.ids)] = enc.type_ids
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        hidden = session.run([output], _feeds(session, arrays))[0].astype(np.float64)
        weights = mask[:, :, None].astype(np.float64)
        pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        if result.shape[1] == 0:
            result = np.zeros((len(sentences), pooled.shape[1]))
        result[idx] = pooled
    return result


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity (0 where a row is all zeros)."""
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def stsb_spearman(
    session_or_model: Any,
    tokenizer_path: str | os.PathLike,
    *,
    limit: int | None = None,
    batch_size: int = 32,
    max_length: int = 128,
    path: str | os.PathLike | None = None,
    threads: int | None = None,
) -> float:
    """Spearman correlation between gold STS-B scores and cosine of mean-pooled embeddings.

    ``limit`` keeps the first N pairs (for quick checks); the reported metric uses all 1500.
    """
    from scipy.stats import spearmanr

    s1, s2, gold = load_stsb(path)
    if limit is not None:
        s1, s2, gold = s1[:limit], s2[:limit], gold[:limit]
    emb = sentence_embeddings(
        session_or_model, tokenizer_path, s1 + s2, batch_size=batch_size, max_length=max_length, threads=threads
    )
    cos = cosine_rows(emb[: len(s1)], emb[len(s1) :])
    return float(spearmanr(cos, gold).statistic)


# ------------------------------------------------------------------------------------ WikiText-2


def wikitext_tokens(tokenizer_path: str | os.PathLike, *, path: str | os.PathLike | None = None) -> list[int]:
    """Token ids of the whole WikiText-2 validation text (no special tokens added)."""
    tok = _load_tokenizer(tokenizer_path)
    tok.no_truncation()
    tok.no_padding()
    return tok.encode(load_wikitext(path), add_special_tokens=False).ids


def wikitext_perplexity(
    session_or_model: Any,
    tokenizer_path: str | os.PathLike,
    *,
    context: int = 512,
    max_tokens: int | None = None,
    stride: int | None = None,
    path: str | os.PathLike | None = None,
    threads: int | None = None,
) -> float:
    """Perplexity on WikiText-2 valid: exp(mean NLL over predicted tokens).

    Protocol: the file's text as is, tokenized with the model's tokenizer.json (no special
    tokens), truncated to ``max_tokens``; windows of ``context`` tokens every ``stride``
    tokens (default ``context``: non-overlapping).  Each window predicts only tokens no earlier
    window predicted, so with the default every window scores its last ``context - 1`` tokens.
    """
    stride = context if stride is None else stride
    if context < 2 or not 0 < stride <= context:
        raise BadInputError(f"context {context} / stride {stride} is invalid: need context >= 2 and 0 < stride <= context.")
    session = _as_session(session_or_model, threads)
    ids = np.asarray(wikitext_tokens(tokenizer_path, path=path), dtype=np.int64)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise CalibrationDataError("the WikiText-2 text gave fewer than 2 tokens: check the file and max_tokens.")
    empty_cache = kv_cache.empty_cache(kv_cache.session_cache(session), 1)  # a KV-cache model: each window a prefill from scratch
    total, count, scored_until = 0.0, 0, 1  # token 0 is never predicted
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + context, len(ids))
        first = max(scored_until, begin + 1)
        if first >= end:
            break
        window = ids[begin:end][None, :]
        arrays = {
            "input_ids": window,
            "attention_mask": np.ones_like(window),
            "position_ids": np.arange(end - begin, dtype=np.int64)[None, :],
            **empty_cache,
        }
        logits = session.run(["logits"] if _has_output(session, "logits") else None, _feeds(session, arrays))[0][0]
        # logits[t] predicts token begin + t + 1
        nll = token_nll(logits[first - begin - 1 : end - begin - 1], ids[first:end])
        total += float(nll.sum())
        count += len(nll)
        scored_until = end
        if end == len(ids):
            break
    logger.info("wikitext-2: %d tokens scored, mean NLL %.4f", count, total / count)
    return math.exp(total / count)


def _has_output(session, name: str) -> bool:
    return any(o.name == name for o in session.get_outputs())


# ------------------------------------------------------------------------------------- ImageNet

#: ImageNet evaluation preprocessing (also what image calibration folders get): shorter side to
#: 256, center crop 224, RGB, ImageNet mean/std, NCHW float32.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_imagenet(folder: str | os.PathLike | None = None) -> tuple[list[Path], np.ndarray]:
    """The shared ImageNet sample: image paths in labels.tsv order and their ILSVRC class indices."""
    folder = Path(folder) if folder is not None else data_dir() / "imagenet-100"
    table = _data_file(folder / "labels.tsv", "imagenet-100/labels.tsv")
    files, labels = [], []
    for lineno, line in enumerate(table.read_text(encoding="utf-8").splitlines(), 1):
        cols = line.split("\t")
        if lineno == 1 or not line.strip():
            continue  # header: file, wnid, class_index, name
        try:
            files.append(folder / cols[0])
            labels.append(int(cols[2]))
        except (IndexError, ValueError) as exc:
            raise CalibrationDataError(f"{table} line {lineno} is not 'file<TAB>wnid<TAB>class_index<TAB>name': fix the file.") from exc
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise BadInputError(f"{len(missing)} images listed in {table} are missing (e.g. {missing[0]}): restore the folder.")
    return files, np.asarray(labels, dtype=np.int64)


def imagenet_pixels(files: Sequence[str | os.PathLike], size: int = 224) -> np.ndarray:
    """[N, 3, size, size] float32 inputs, preprocessed as the ImageNet evaluation protocol does."""
    from edgeprune.calibration import _read_image, _to_input

    return np.concatenate(
        [_to_input(_read_image(Path(f), size, size), np.dtype(np.float32), "NCHW", IMAGENET_MEAN, IMAGENET_STD) for f in files]
    )


def image_logits(model: Any, pixels: np.ndarray, *, batch_size: int = 16, threads: int | None = None) -> np.ndarray:
    """Run an image classifier (one NCHW input, logits first output) over ``pixels`` in batches."""
    session = _as_session(model, threads)
    name = session.get_inputs()[0].name
    out = [session.run(None, {name: pixels[i : i + batch_size]})[0] for i in range(0, len(pixels), batch_size)]
    return np.concatenate(out).reshape(len(pixels), -1)


def imagenet_top1(model: Any, *, indices: Sequence[int] | None = None, threads: int | None = None) -> float:
    """Top-1 accuracy on the shared ImageNet images (all 100, or ``indices`` of them) vs labels.tsv."""
    files, labels = load_imagenet()
    idx = np.arange(len(files)) if indices is None else np.asarray(indices)
    logits = image_logits(model, imagenet_pixels([files[i] for i in idx]), threads=threads)
    return float(np.mean(logits.argmax(axis=1) == labels[idx]))


def top1_agreement(reference_logits: np.ndarray, candidate_logits: np.ndarray) -> float:
    """Share of images where the candidate's top-1 class equals the reference's."""
    a, b = np.asarray(reference_logits), np.asarray(candidate_logits)
    if a.shape != b.shape:
        raise BadInputError(f"logits of shape {a.shape} and {b.shape} cannot be compared: evaluate both models on the same images.")
    return float(np.mean(a.argmax(axis=1) == b.argmax(axis=1)))
