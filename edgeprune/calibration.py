"""Calibration data: turn a user's .npz / text / image folder into validated feed dicts for the model.

Every sample is a feed dict with a leading batch axis of 1, checked against the model's inputs at
load time so a bad file fails here with one sentence instead of deep inside ORT.  Samples keep
their natural shapes (text is not padded at load); ``CalibrationSet.batches`` stacks samples of
equal shape and right-pads token inputs to the longest in a batch when the model has an
``attention_mask`` (pad value 0, mask 0), so statistics can leave padding out.

When there are more samples than ``max_samples``, a seeded random subset is taken (kept in source
order), so the first lines of a file (often headers) do not dominate.

Without data, a text model with a tokenizer gets the bundled sentences; anything else gets random
inputs (token ids across its embedding table) in shapes ORT has run the model on. Either way the
set is marked synthetic. Dims written -1, 0 or without a value are dynamic.
"""

from __future__ import annotations

import json
import logging
import pathlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import onnx_ir as ir

from edgeprune import kv_cache
from edgeprune.errors import BadInputError, CalibrationDataError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
TEXT_SUFFIXES = (".txt", ".jsonl")
_TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


@dataclass(frozen=True)
class InputSpec:
    """One graph input the model needs: name, numpy dtype and shape (a positive int, or str/None when dynamic)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": str(self.dtype), "shape": None if self.shape is None else list(self.shape)}


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The inputs a caller must feed (graph inputs without an initializer behind them).

    A KV cache's head count and size, when declared as symbols, are taken from the fused attention reading it.
    """
    cache_dims = kv_cache.fused_cache_shapes(model)
    specs = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        dtype = np.dtype(value.dtype.numpy()) if value.dtype is not None else np.dtype(np.float32)
        shape = None
        if value.shape is not None:
            shape = tuple(static_dim(d) if isinstance(d, int) else (d.value if d.value else None) for d in value.shape)
            if value.name in cache_dims and len(shape) == 4:
                shape = (shape[0], cache_dims[value.name][0], shape[2], cache_dims[value.name][1])
        specs.append(InputSpec(value.name, dtype, shape))
    return specs


def static_dim(dim: object) -> int | None:
    """A dimension's fixed size, or None when it is dynamic.

    Exporters write an unknown size as -1 (Paddle), as 0, or with no value at all; taking those
    literally makes negative synthetic shapes and refuses correctly shaped data.
    """
    return dim if isinstance(dim, int) and dim > 0 else None


# --------------------------------------------------------------------------------------------
# The calibration set


@dataclass
class CalibrationSet:
    """Samples (feed dicts, batch axis 1) plus where they came from.

    ``max_batch`` is set when the model's batch dimension is fixed (e.g. 1), so ``batches``
    never stacks more than the model accepts.
    """

    samples: list[dict[str, np.ndarray]]
    source: str
    synthetic: bool = False  # not the user's data: random inputs, or the bundled sentences
    max_batch: int | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def to_dict(self) -> dict:
        return {"source": self.source, "samples": len(self.samples), "synthetic": self.synthetic}

    def _subset(self, indices: Sequence[int], label: str) -> CalibrationSet:
        return CalibrationSet(
            [self.samples[i] for i in indices], f"{self.source} [{label}]", self.synthetic, self.max_batch
        )

    def split(self, holdout: float = 0.25, seed: int = 0) -> tuple[CalibrationSet, CalibrationSet]:
        """(statistics part, held-back verification part) after a seeded shuffle.

        Each part gets at least one sample when there are two or more, so verification never
        runs on the very rows the statistics came from.
        """
        if not 0.0 <= holdout < 1.0:
            raise BadInputError(f"holdout must be in [0, 1), got {holdout}: e.g. 0.25 holds back a quarter of the rows.")
        n = len(self.samples)
        if n < 2:
            return self._subset(range(n), "stats"), self._subset([], "holdout")
        n_hold = min(max(int(round(n * holdout)), 1), n - 1)
        order = np.random.default_rng(seed).permutation(n)
        hold = sorted(int(i) for i in order[:n_hold])
        keep = sorted(int(i) for i in order[n_hold:])
        return self._subset(keep, "stats"), self._subset(hold, "holdout")

    def batches(self, batch_size: int = 8) -> Iterator[dict[str, np.ndarray]]:
        """Stack samples into feed dicts of up to ``batch_size`` rows.

        Samples are grouped by shape signature (groups in order of first appearance, samples in
        source order).  With an ``attention_mask`` among the inputs, inputs whose axis 1 follows the
        mask's length are right-padded with 0 to the longest sample in the batch.
        """
        if batch_size < 1:
            raise BadInputError(f"batch_size must be >= 1, got {batch_size}: e.g. batch_size=8.")
        if self.max_batch is not None:
            batch_size = min(batch_size, self.max_batch)
        padded = _paddable_inputs(self.samples)
        groups: dict[tuple, list[dict[str, np.ndarray]]] = {}
        for sample in self.samples:
            groups.setdefault(_signature(sample, padded), []).append(sample)
        for members in groups.values():
            for start in range(0, len(members), batch_size):
                yield _stack(members[start : start + batch_size], padded)


def _paddable_inputs(samples: list[dict[str, np.ndarray]]) -> frozenset[str]:
    """Inputs whose axis 1 is the token axis (same length as attention_mask in every sample)."""
    if not samples or not all("attention_mask" in s and s["attention_mask"].ndim == 2 for s in samples):
        return frozenset()
    names = {n for n in samples[0] if not kv_cache.is_cache_input(n)}
    for sample in samples:
        length = sample["attention_mask"].shape[1]
        names &= {k for k, v in sample.items() if v.ndim >= 2 and v.shape[1] == length}
    return frozenset(names)


def _signature(sample: dict[str, np.ndarray], padded: frozenset[str]) -> tuple:
    items = []
    for name in sorted(sample):
        shape = list(sample[name].shape)
        if name in padded:
            shape[1] = -1
        items.append((name, str(sample[name].dtype), tuple(shape)))
    return tuple(items)


def _stack(members: list[dict[str, np.ndarray]], padded: frozenset[str]) -> dict[str, np.ndarray]:
    feed = {}
    for name in members[0]:
        arrays = [m[name] for m in members]
        if name in padded:
            longest = max(a.shape[1] for a in arrays)
            arrays = [_pad_axis1(a, longest) for a in arrays]
        feed[name] = np.concatenate(arrays, axis=0)
    return feed


def _pad_axis1(array: np.ndarray, length: int) -> np.ndarray:
    if array.shape[1] == length:
        return array
    widths = [(0, 0)] * array.ndim
    widths[1] = (0, length - array.shape[1])
    return np.pad(array, widths, constant_values=0)


# --------------------------------------------------------------------------------------------
# Validation


def _fix_for_dtype(name: str, expected: np.dtype) -> str:
    return f"save '{name}' as {expected} (e.g. array.astype(np.{expected}))"


def validate_feeds(sample: dict[str, np.ndarray], specs: Sequence[InputSpec]) -> None:
    """Check names, dtypes, ranks and static dims of one feed dict; raise CalibrationDataError.

    Dtypes must match exactly here; the loader has already applied the exact casts it allows.
    Symbolic dims with the same name must agree across inputs (e.g. ``sequence_length``).
    """
    by_name = {s.name: s for s in specs}
    unknown = sorted(set(sample) - set(by_name))
    if unknown:
        raise CalibrationDataError(
            f"calibration data has input {unknown[0]!r}, which is not a model input (the model's inputs are "
            f"{', '.join(by_name) or 'none'}): rename or drop it."
        )
    missing = [n for n in by_name if n not in sample]
    if missing:
        raise CalibrationDataError(
            f"calibration data lacks the model input {missing[0]!r} (expected {by_name[missing[0]].dtype} "
            f"with shape {_shape_text(by_name[missing[0]].shape)}, got nothing): add an array named {missing[0]!r}."
        )
    bound: dict[str, tuple[int, str]] = {}
    for name, spec in by_name.items():
        array = sample[name]
        if not isinstance(array, np.ndarray):
            raise CalibrationDataError(
                f"calibration input {name!r} is a {type(array).__name__}, not a numpy array: pass numpy arrays."
            )
        if array.dtype != spec.dtype:
            raise CalibrationDataError(
                f"calibration input {name!r} has dtype {array.dtype} but the model expects {spec.dtype}: "
                f"{_fix_for_dtype(name, spec.dtype)}."
            )
        if spec.shape is None:
            continue
        if array.ndim != len(spec.shape):
            raise CalibrationDataError(
                f"calibration input {name!r} has shape {list(array.shape)} (rank {array.ndim}) but the model "
                f"expects rank {len(spec.shape)} {_shape_text(spec.shape)}: reshape it (axis 0 is the sample axis)."
            )
        for axis, (want, got) in enumerate(zip(spec.shape, array.shape)):
            if isinstance(want, int) and want != got:
                raise CalibrationDataError(
                    f"calibration input {name!r} has size {got} on axis {axis} but the model expects {want} "
                    f"{_shape_text(spec.shape)}: resize or re-export the data to match."
                )
            if isinstance(want, str):
                if want in bound and bound[want][0] != got:
                    size, other = bound[want]
                    raise CalibrationDataError(
                        f"calibration input {name!r} has {want}={got} on axis {axis} but input {other!r} has "
                        f"{want}={size}: give both the same length."
                    )
                bound.setdefault(want, (got, name))


def _shape_text(shape: tuple | None) -> str:
    if shape is None:
        return "[any]"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _coerce(sample: dict[str, np.ndarray], specs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
    """Apply only value-exact dtype casts (e.g. int32 -> int64); refuse the rest in validate_feeds."""
    by_name = {s.name: s for s in specs}
    out = {}
    for name, array in sample.items():
        array = np.asarray(array)
        spec = by_name.get(name)
        if spec is not None and array.dtype != spec.dtype and _exact_cast(array, spec.dtype):
            logger.debug("calibration input %r cast from %s to %s (value-exact)", name, array.dtype, spec.dtype)
            array = array.astype(spec.dtype)
        out[name] = array
    return out


def _exact_cast(array: np.ndarray, dtype: np.dtype) -> bool:
    if np.can_cast(array.dtype, dtype, casting="safe"):
        return True
    kinds = {array.dtype.kind, dtype.kind}
    if kinds <= {"i", "u", "b"} and array.size:
        cast = array.astype(dtype)
        return bool(np.array_equal(cast.astype(array.dtype), array))
    return False


def _finish(
    samples: list[dict[str, np.ndarray]], specs: Sequence[InputSpec], source: str, synthetic: bool = False
) -> CalibrationSet:
    samples = [_with_empty_cache(_coerce(s, specs), specs) for s in samples]
    for index, sample in enumerate(samples):
        try:
            validate_feeds(sample, specs)
        except CalibrationDataError as exc:
            raise CalibrationDataError(f"{source}, sample {index}: {exc}") from None
    return CalibrationSet(samples, source, synthetic, _static_batch(specs))


def _with_empty_cache(sample: dict[str, np.ndarray], specs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
    """A KV-cache model calibrates on prefills: cache inputs the data does not give start empty."""
    cache = [e for e in kv_cache.spec_cache(specs) if e.past not in sample]
    if not cache:
        return sample
    batch = next(iter(sample.values())).shape[0] if sample else 1
    return {**sample, **kv_cache.empty_cache(cache, batch)}


def _static_batch(specs: Sequence[InputSpec]) -> int | None:
    sizes = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int)}
    if not sizes:
        return None
    if sizes != {1}:
        raise CalibrationDataError(
            f"the model has a fixed batch size of {sorted(sizes)[-1]}, but calibration feeds one sample at a time "
            "and batches of any size: re-export the model with a dynamic (or 1) batch dimension."
        )
    return 1


def _pick(count: int, max_samples: int, seed: int) -> list[int]:
    if max_samples < 1:
        raise CalibrationDataError(f"max_samples is {max_samples}: ask for at least 1 calibration sample.")
    if count <= max_samples:
        return list(range(count))
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(count, size=max_samples, replace=False))


# --------------------------------------------------------------------------------------------
# Loading


def load_calibration(
    source: str | pathlib.Path | None,
    model: ir.Model,
    *,
    tokenizer: str | pathlib.Path | None = None,
    max_samples: int = 64,
    seq_len: int = 128,
    image_size: int = 224,
    layout: str = "NCHW",
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    seed: int = 0,
) -> CalibrationSet:
    """Load calibration samples for ``model`` from a .npz file/folder, text, images, or synthesize them."""
    specs = input_specs(model)
    if source is None:
        if tokenizer is not None and _is_text_model(specs):
            return _bundled_sentences(specs, tokenizer, max_samples, seq_len, seed)
        return _synthetic(model, specs, max_samples, seq_len, image_size, seed)
    path = pathlib.Path(source)
    if not path.exists():
        raise CalibrationDataError(f"calibration data {path} does not exist: check the --calib path.")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        npz = [p for p in files if p.suffix.lower() == ".npz"]
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        if npz:
            if images:
                logger.warning("%s holds .npz and image files; using the %d .npz files", path, len(npz))
            return _load_npz(npz, specs, max_samples, seed, f"{len(npz)} .npz files in {path}")
        if images:
            return _load_images(images, specs, image_size, layout, mean, std, max_samples, seed, str(path))
        raise CalibrationDataError(
            f"calibration folder {path} holds no .npz or image ({', '.join(IMAGE_SUFFIXES)}) files: "
            "point --calib at a .npz file, a .txt/.jsonl file, or a folder of .npz or images."
        )
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise CalibrationDataError(f"calibration file {path} is empty: write samples into it or pass another file.")
    if suffix == ".npz":
        return _load_npz([path], specs, max_samples, seed, str(path))
    if suffix in TEXT_SUFFIXES:
        return _load_text(path, specs, tokenizer, max_samples, seq_len, seed)
    if suffix in IMAGE_SUFFIXES:
        return _load_images([path], specs, image_size, layout, mean, std, max_samples, seed, str(path))
    raise CalibrationDataError(
        f"calibration file {path} has an unsupported type {suffix or '(no suffix)'!r}: use .npz, .txt, .jsonl, "
        "an image, or a folder of .npz files or images."
    )


def _load_npz(
    files: list[pathlib.Path], specs: Sequence[InputSpec], max_samples: int, seed: int, source: str
) -> CalibrationSet:
    samples: list[dict[str, np.ndarray]] = []
    for file in files:
        samples.extend(_read_npz(file))
    picked = _pick(len(samples), max_samples, seed)
    return _finish([samples[i] for i in picked], specs, f"{source} ({len(picked)} of {len(samples)} samples)")


def _read_npz(file: pathlib.Path) -> list[dict[str, np.ndarray]]:
    """Split one .npz into samples along axis 0 (each keeps a batch axis of 1)."""
    if file.stat().st_size == 0:
        raise CalibrationDataError(f"calibration file {file} is empty: write arrays into it with np.savez.")
    try:
        with np.load(file, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as exc:  # zipfile.BadZipFile, ValueError (pickled objects), OSError
        raise CalibrationDataError(
            f"calibration file {file} is not a readable .npz ({type(exc).__name__}: {exc}): write it with np.savez."
        ) from exc
    if not arrays:
        raise CalibrationDataError(f"calibration file {file} holds no arrays: save one array per model input.")
    counts = {}
    for name, array in arrays.items():
        if array.ndim == 0:
            raise CalibrationDataError(
                f"array {name!r} in {file} is a scalar, but axis 0 must be the sample axis: save it with shape [samples, ...]."
            )
        counts[name] = array.shape[0]
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{k}: {v}" for k, v in counts.items())
        raise CalibrationDataError(
            f"arrays in {file} have different sample counts on axis 0 ({detail}): give every input the same number of samples."
        )
    n = next(iter(counts.values()))
    if n == 0:
        raise CalibrationDataError(f"calibration file {file} has 0 samples on axis 0: add samples.")
    return [{k: a[i : i + 1] for k, a in arrays.items()} for i in range(n)]


# ---- text


def _load_text(
    path: pathlib.Path,
    specs: Sequence[InputSpec],
    tokenizer: str | pathlib.Path | None,
    max_samples: int,
    seq_len: int,
    seed: int,
) -> CalibrationSet:
    by_name = {s.name: s for s in specs}
    if "input_ids" not in by_name:
        raise CalibrationDataError(
            f"text calibration data {path.name} needs a model with an 'input_ids' input, but its inputs are "
            f"{', '.join(by_name) or 'none'}: pass a .npz with arrays named after the inputs instead."
        )
    if tokenizer is None:
        raise CalibrationDataError(
            f"text calibration data {path.name} needs a tokenizer: pass --tokenizer with a tokenizer.json "
            "file or the folder that holds it."
        )
    texts = _read_texts(path)
    if not texts:
        raise CalibrationDataError(f"calibration file {path} has no non-blank text: add one sample per line.")
    tok = load_tokenizer(tokenizer)
    tok.no_padding()
    tok.no_truncation()
    picked = _pick(len(texts), max_samples, seed)
    seq_spec = by_name["input_ids"].shape
    static_len = seq_spec[1] if seq_spec is not None and len(seq_spec) == 2 and isinstance(seq_spec[1], int) else None
    length = static_len or seq_len
    samples = [_text_sample(tok.encode(texts[i]).ids[:length], by_name, static_len, tok) for i in picked]
    if static_len and "attention_mask" not in by_name:
        logger.warning("model has a fixed sequence length %d and no attention_mask: padding tokens are seen as text", static_len)
    source = f"{path} ({len(picked)} of {len(texts)} texts, tokenizer {pathlib.Path(tokenizer).name}, max {length} tokens)"
    return _finish(samples, specs, source)


def _read_texts(path: pathlib.Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix.lower() == ".txt":
        return [line for line in lines if line.strip()]
    texts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationDataError(
                f"line {number} of {path} is not valid JSON ({exc.msg}): write one JSON object per line."
            ) from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CalibrationDataError(
                f"line {number} of {path} has no string field \"text\": write lines like {{\"text\": \"...\"}}."
            )
        if record["text"].strip():
            texts.append(record["text"])
    return texts


def load_tokenizer(tokenizer: str | pathlib.Path):
    """A tokenizers ``Tokenizer`` from a tokenizer.json file or a folder holding one."""
    from tokenizers import Tokenizer

    path = pathlib.Path(tokenizer)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise CalibrationDataError(
            f"tokenizer {path} does not exist: pass --tokenizer with a tokenizer.json file or a folder that holds one."
        )
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:
        raise CalibrationDataError(
            f"tokenizer {path} could not be read ({exc}): pass a Hugging Face tokenizers tokenizer.json."
        ) from exc


def _text_sample(ids: list[int], by_name: dict[str, InputSpec], static_len: int | None, tok) -> dict[str, np.ndarray]:
    """Feed dict for one text: ids plus the mask / type / position inputs the model has."""
    length = len(ids)
    total = static_len or length
    pad_id = _pad_id(tok)
    input_ids = np.full((1, total), pad_id, dtype=np.int64)
    input_ids[0, :length] = ids
    mask = np.zeros((1, total), dtype=np.int64)
    mask[0, :length] = 1
    sample = {"input_ids": input_ids}
    generated = {
        "attention_mask": mask,
        "token_type_ids": np.zeros((1, total), dtype=np.int64),
        "position_ids": np.arange(total, dtype=np.int64)[None, :],
    }
    for name, array in generated.items():
        if name in by_name:
            sample[name] = array
    return sample


def _pad_id(tok) -> int:
    padding = tok.padding
    if padding and padding.get("pad_id") is not None:
        return int(padding["pad_id"])
    for token in ("[PAD]", "<pad>", "<|endoftext|>"):
        token_id = tok.token_to_id(token)
        if token_id is not None:
            return int(token_id)
    return 0


# ---- images


def _load_images(
    files: list[pathlib.Path],
    specs: Sequence[InputSpec],
    image_size: int,
    layout: str,
    mean: Sequence[float],
    std: Sequence[float],
    max_samples: int,
    seed: int,
    source: str,
) -> CalibrationSet:
    images = [s for s in specs if s.shape is None or len(s.shape) == 4]
    if len(images) != 1:
        names = ", ".join(f"{s.name}{_shape_text(s.shape)}" for s in specs) or "none"
        raise CalibrationDataError(
            f"image calibration data needs a model with exactly one 4-D image input, but its inputs are {names}: "
            "pass a .npz with arrays named after the inputs instead."
        )
    spec = images[0]
    layout = _image_layout(spec, layout)
    height, width = _image_hw(spec, layout, image_size)
    picked = _pick(len(files), max_samples, seed)
    samples = []
    for i in picked:
        pixels = _read_image(files[i], height, width)  # HWC float32 in [0, 255]
        samples.append({spec.name: _to_input(pixels, spec.dtype, layout, mean, std)})
    text = f"{source} ({len(picked)} of {len(files)} images, {layout} {height}x{width})"
    return _finish(samples, specs, text)


def _image_layout(spec: InputSpec, layout: str) -> str:
    """NCHW or NHWC: the model's static channel axis (size 3) wins over the ``layout`` argument."""
    layout = layout.upper()
    if layout not in ("NCHW", "NHWC"):
        raise CalibrationDataError(f"image layout {layout!r} is not supported: use NCHW or NHWC.")
    if spec.shape is not None:
        if spec.shape[1] == 3 and spec.shape[3] != 3:
            return "NCHW"
        if spec.shape[3] == 3 and spec.shape[1] != 3:
            return "NHWC"
        channels = spec.shape[1] if layout == "NCHW" else spec.shape[3]
        if isinstance(channels, int) and channels != 3:
            raise CalibrationDataError(
                f"image input {spec.name!r} has {channels} channels {_shape_text(spec.shape)} but images are RGB: "
                "pass a .npz with the input's arrays instead."
            )
    return layout


def _image_hw(spec: InputSpec, layout: str, image_size: int) -> tuple[int, int]:
    if spec.shape is None:
        return image_size, image_size
    h, w = (spec.shape[2], spec.shape[3]) if layout == "NCHW" else (spec.shape[1], spec.shape[2])
    return (h if isinstance(h, int) else image_size), (w if isinstance(w, int) else image_size)


def _read_image(path: pathlib.Path, height: int, width: int) -> np.ndarray:
    """Resize the shorter side to crop*256/224 (ImageNet eval), then center-crop to height x width."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except Exception as exc:
        raise CalibrationDataError(f"image {path} could not be read ({exc}): remove it or convert it to JPEG/PNG.") from exc
    short = int(round(max(height, width) * 256 / 224))
    scale = short / min(img.size)
    new_w, new_h = max(width, int(round(img.size[0] * scale))), max(height, int(round(img.size[1] * scale)))
    img = img.resize((new_w, new_h), Image.BILINEAR)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    img = img.crop((left, top, left + width, top + height))
    return np.asarray(img, dtype=np.float32)


def _to_input(pixels: np.ndarray, dtype: np.dtype, layout: str, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    if dtype.kind == "f":
        array = (pixels / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    elif dtype == np.uint8:
        logger.debug("image input is uint8: feeding raw 0..255 pixels without mean/std normalization")
        array = pixels
    else:
        raise CalibrationDataError(
            f"the image input has dtype {dtype}, which images cannot fill: pass a .npz with the input's arrays instead."
        )
    if layout == "NCHW":
        array = array.transpose(2, 0, 1)
    return np.ascontiguousarray(array[None]).astype(dtype)


# ---- synthetic

#: Sentences calibrated on when a text model comes without --calib but with a tokenizer.
BUNDLED_SENTENCES = pathlib.Path(__file__).parent / "data" / "calibration_sentences.txt"
#: Sizes tried for a dynamic dimension after the model's own constants.
_COMMON_IMAGE_SIZES = (224, 48, 32, 64, 96, 112, 128, 160, 192, 256, 320, 384, 416, 512, 640)  # 48, 32: OCR line heights
_COMMON_SEQ_LENS = (128, 64, 32, 16, 8, 256, 512)
_MAX_DIM = 4096
_MAX_PROBE_ELEMENTS = 1 << 24  # per input: a candidate shape bigger than this is not tried
_MAX_PROBES = 64
#: Ops that pass token ids through unchanged on their way to an embedding Gather.
_ID_PASSTHROUGH = ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand")


def _is_text_model(specs: Sequence[InputSpec]) -> bool:
    names = {s.name for s in specs if not kv_cache.is_cache_input(s.name)}
    return "input_ids" in names and names <= set(_TOKEN_INPUTS)


def _bundled_sentences(
    specs: Sequence[InputSpec], tokenizer: str | pathlib.Path, max_samples: int, seq_len: int, seed: int
) -> CalibrationSet:
    """Real sentences through the model's own tokenizer: random ids hit padding and unused tokens.

    MiniLM on ids 0-999 (BERT's padding and unused tokens) gave cosine 0.998 where real sentences
    gave 0.921, so random ids overstate fidelity for a text model.
    """
    calib = _load_text(BUNDLED_SENTENCES, specs, tokenizer, max_samples, seq_len, seed)
    total = len(_read_texts(BUNDLED_SENTENCES))
    logger.warning(
        "NO CALIBRATION DATA: calibrating on %d of the %d bundled English sentences through %s; fidelity on them "
        "says little about your inputs. Pass --calib with real data.",
        len(calib), total, tokenizer,
    )  # fmt: skip
    return CalibrationSet(calib.samples, f"bundled sentences {calib.source}", True, calib.max_batch)


def _synthetic(
    model: ir.Model, specs: Sequence[InputSpec], max_samples: int, seq_len: int, image_size: int, seed: int
) -> CalibrationSet:
    count = max(1, max_samples)
    highs = _id_ranges(model, specs)
    shapes = _fitting_shapes(model, specs, highs, seq_len, image_size, seed)
    logger.warning(
        "NO CALIBRATION DATA: using %d synthetic random samples (%s); statistics and accuracy checks on random "
        "inputs say little about real use. Pass --calib with real data.",
        count, _shapes_text(shapes),
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    samples = [{s.name: _synthetic_array(s, shapes[s.name], highs.get(s.name), rng) for s in specs} for _ in range(count)]
    return _finish(samples, specs, f"{count} synthetic random samples", synthetic=True)


def _is_image(spec: InputSpec) -> bool:
    return spec.shape is not None and len(spec.shape) == 4 and spec.dtype.kind == "f"


def _synthetic_shape(spec: InputSpec, seq_len: int, image_size: int) -> tuple[int, ...]:
    """The first guess: batch 1, 3 channels, ``image_size`` for image axes, ``seq_len`` for the rest."""
    if spec.shape is None:
        return (1, seq_len)
    if kv_cache.is_cache_input(spec.name) and len(spec.shape) == 4:  # an empty cache: a prefill
        return tuple(0 if axis == kv_cache.SEQ_AXIS else d if isinstance(d, int) else 1 for axis, d in enumerate(spec.shape))
    image = _is_image(spec)
    channel_axis = 3 if image and spec.shape[3] == 3 else 1
    dims = []
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, int):
            dims.append(dim)
        elif axis == 0:
            dims.append(1)
        elif image:
            dims.append(3 if axis == channel_axis else image_size)
        else:
            dims.append(seq_len)
    return tuple(dims)


def _slots(specs: Sequence[InputSpec]) -> dict[object, list[tuple[str, int]]]:
    """The dynamic non-batch dims to choose, as (input, axis) lists; inputs sharing a dim name share a slot."""
    batch_names = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], str)}
    slots: dict[object, list[tuple[str, int]]] = {}
    for spec in specs:
        if kv_cache.is_cache_input(spec.name):
            continue  # always empty (see _synthetic_shape)
        for axis, dim in enumerate(spec.shape or ()):
            if axis == 0 or isinstance(dim, int) or dim in batch_names:
                continue
            slots.setdefault(dim if isinstance(dim, str) else (spec.name, axis), []).append((spec.name, axis))
    return slots


def _graph_sizes(model: ir.Model) -> list[int]:
    """Sizes the graph's constants fix, in graph order: Reshape targets (or their Concat's constant parts), MatMul/Gemm weight dims.

    Weights may be initializers or Constant nodes (Paddle exports write them as Constant nodes).
    """
    from edgeprune.analysis.graph import constant

    sizes: list[int] = []
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Reshape", "MatMul", "Gemm"):
            continue
        if node.op_type == "Reshape":
            target = node.inputs[1] if len(node.inputs) > 1 else None
            producer = None if target is None else target.producer()
            parts = list(producer.inputs) if producer is not None and producer.op_type == "Concat" else [target]
            tensors = [constant(v) for v in parts]
            dims = [int(d) for t in tensors if t is not None for d in t.numpy().reshape(-1).tolist()]
        else:
            dims = [int(d) for v in node.inputs[:2] if (t := constant(v)) is not None for d in t.shape]
        sizes.extend(d for d in dims if 1 < d <= _MAX_DIM)
    return sizes


def _candidates(slot_axes: list[tuple[str, int]], by_name: dict[str, InputSpec], default: int, graph_sizes: list[int],
                image_size: int) -> list[int]:
    """Values to try for one dynamic dim: the first guess, the input's static dims, the graph's constants, common sizes.

    An image's channel count is not offered for its height or width.
    """
    spec = by_name[slot_axes[0][0]]
    image = _is_image(spec)
    channel_axis = (3 if spec.shape[3] == 3 else 1) if image else None
    static = [d for axis, d in enumerate(spec.shape) if isinstance(d, int) and 1 < d <= _MAX_DIM and axis not in (0, channel_axis)]
    common = (image_size, *_COMMON_IMAGE_SIZES) if image else _COMMON_SEQ_LENS
    return list(dict.fromkeys([default, *static, *graph_sizes, *common]))


def _fitting_shapes(
    model: ir.Model, specs: Sequence[InputSpec], highs: dict[str, int], seq_len: int, image_size: int, seed: int
) -> dict[str, tuple[int, ...]]:
    """Synthetic shapes the model runs on: the first guess, else the first candidate that runs.

    A dynamic input can still be fixed inside the graph (PaddleOCR rec: any width, height 48, set by
    the weights after its conv stack), so a guess is only kept once ORT has run the model on it.
    """
    first = {s.name: _synthetic_shape(s, seq_len, image_size) for s in specs}
    slots = _slots(specs)
    if not slots:
        return first  # every dim is fixed: nothing to choose
    by_name = {s.name: s for s in specs}
    defaults = {key: first[axes[0][0]][axes[0][1]] for key, axes in slots.items()}
    graph_sizes = _graph_sizes(model)
    options = {key: _candidates(axes, by_name, defaults[key], graph_sizes, image_size) for key, axes in slots.items()}

    def shapes_for(choice: dict) -> dict[str, tuple[int, ...]]:
        shapes = {name: list(shape) for name, shape in first.items()}
        for key, value in choice.items():
            for name, axis in slots[key]:
                shapes[name][axis] = value
        return {name: tuple(shape) for name, shape in shapes.items()}

    tries = [dict(defaults)]
    for key in slots:
        tries += [{**defaults, key: value} for value in options[key][1:]]
    for value in dict.fromkeys(v for values in options.values() for v in values):
        tries.append({key: value for key in slots})
    from edgeprune.runtime.session import make_session

    session = make_session(model, "cpu", threads=1)
    seen: set[tuple] = set()
    for choice in tries:
        shapes = shapes_for(choice)
        signature = tuple(sorted(shapes.items()))
        if signature in seen or any(np.prod(shape) > _MAX_PROBE_ELEMENTS for shape in shapes.values()):
            continue
        seen.add(signature)
        if len(seen) > _MAX_PROBES:
            break
        if _runs(session, specs, shapes, highs, seed):
            if len(seen) > 1:
                logger.info("synthetic inputs: the first guess does not run; using %s", _shapes_text(shapes))
            return shapes
    zero = [(v.name, axis) for v in model.graph.inputs if v.shape is not None for axis, d in enumerate(v.shape) if d == 0]
    if zero:  # read as dynamic here, but onnxruntime holds the model to a literal 0
        raise CalibrationDataError(
            f"input {zero[0][0]!r} declares size 0 on axis {zero[0][1]}, which onnxruntime enforces literally, so no "
            "non-empty input runs: re-export the model with that axis dynamic (a name or -1)."
        )
    known = ", ".join(f"{s.name} {_shape_text(s.shape)}" for s in specs)
    raise CalibrationDataError(
        f"the model rejects synthetic inputs of every shape tried from its own constants and common sizes "
        f"(first {_shapes_text(shapes_for(defaults))}): pass --calib with inputs of shape {known} that the model accepts."
    )


def _shapes_text(shapes: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{name} {list(shape)}" for name, shape in shapes.items())


def _runs(session, specs: Sequence[InputSpec], shapes: dict[str, tuple[int, ...]], highs: dict[str, int], seed: int) -> bool:
    import onnxruntime

    rng = np.random.default_rng(seed)
    feed = {s.name: _synthetic_array(s, shapes[s.name], highs.get(s.name), rng) for s in specs}
    quiet = onnxruntime.RunOptions()
    quiet.log_severity_level = 4  # a refused guess is expected here, not an error to show
    try:
        session.run(None, feed, quiet)
    except Exception as exc:  # noqa: BLE001 - ORT raises Fail, InvalidArgument, RuntimeException...; any means "does not run"
        logger.debug("synthetic shape %s does not run: %s", _shapes_text(shapes), str(exc).splitlines()[0] if str(exc) else exc)
        return False
    return True


def _id_ranges(model: ir.Model, specs: Sequence[InputSpec]) -> dict[str, int]:
    """Per token-id input, the vocabulary size of the embedding tables it indexes (the smallest when several).

    Ids are drawn across the whole table: the first ids of a vocabulary are padding and unused
    tokens in BERT, and a table smaller than the old fixed range 0-999 made synthetic ids invalid.
    """
    from edgeprune.analysis.embeddings import find_embeddings

    tables: dict[str, list[int]] = {}
    for emb in find_embeddings(model.graph, []):
        tables.setdefault(emb.input, []).append(emb.vocab)
    if not tables:
        return {}
    consumers: dict[str, list[ir.Node]] = {}
    for node in model.graph:
        for value in node.inputs:
            if value is not None and value.name:
                consumers.setdefault(value.name, []).append(node)
    highs = {}
    for spec in specs:
        if spec.dtype.kind not in "iu" or "mask" in spec.name.lower() or spec.name in ("token_type_ids", "position_ids"):
            continue
        reached, frontier, vocabs = {spec.name}, [spec.name], []
        while frontier:
            name = frontier.pop()
            vocabs += tables.get(name, [])
            for node in consumers.get(name, []):
                if node.op_type in _ID_PASSTHROUGH and node.inputs[0] is not None and node.inputs[0].name == name:
                    for out in node.outputs:
                        if out.name and out.name not in reached:
                            reached.add(out.name)
                            frontier.append(out.name)
        if vocabs:
            highs[spec.name] = min(vocabs)
    return highs


def _synthetic_array(spec: InputSpec, shape: tuple[int, ...], high: int | None, rng: np.random.Generator) -> np.ndarray:
    name = spec.name.lower()
    if spec.dtype.kind == "b":
        return np.ones(shape, dtype=spec.dtype)
    if spec.dtype.kind in "iu":
        if "mask" in name:
            return np.ones(shape, dtype=spec.dtype)
        if name == "token_type_ids":
            return np.zeros(shape, dtype=spec.dtype)
        if name == "position_ids" and len(shape) >= 1:
            return np.broadcast_to(np.arange(shape[-1]), shape).astype(spec.dtype)
        return rng.integers(0, high or 1000, size=shape).astype(spec.dtype)
    return rng.standard_normal(shape).astype(spec.dtype)
