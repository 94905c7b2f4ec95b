"""Pre/post-processing in the graph (``--with-preprocessing``) through onnxruntime-extensions.

Text encoders: the tokenizer graph onnxruntime-extensions builds from the Hugging Face tokenizer
(``gen_processing_models``, truncating to the model's maximum tokens: 128 as the Python pipeline
does, or a smaller fixed sequence length) goes in front, each token tensor gets its batch axis
(and, where the sequence length was fixed, padding up to it), and mean pooling over the attention
mask goes behind, so the model takes one string and returns the sentence embedding.  The result
is checked against edgeprune's Python pipeline (``models.tasks.sentence_embeddings``: the same
tokenizer.json, mean pooling) on real sentences: cosine >= 0.999 on each.

Image classifiers (one NCHW float input): see ``image_preprocessing``: encoded bytes in, top-k
out, checked against ``models.tasks.imagenet_pixels`` + the model's argmax: the same top-1 class
on every check image given the same decoded pixels (the gate), and the agreement with Pillow's
decoder reported beside it (JPEG decoders differ).
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib

import numpy as np
import onnx
from onnx import helper

from edgeprune.errors import BadInputError, VerificationError

logger = logging.getLogger(__name__)

MIN_PIPELINE_COSINE = 0.999
CHECK_SENTENCES = 8
CHECK_IMAGES = 10
#: Tokens the Python pipeline keeps (``sentence_embeddings(max_length=128)``).
MAX_TOKENS = 128
_TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_DECODABLE = (".jpg", ".jpeg", ".png")  # what DecodeImage reads


@dataclasses.dataclass
class Preprocessing:
    """A text model with the tokenizer in front and mean pooling behind."""

    path: pathlib.Path  # the .onnx with the tokenizer in front
    library: pathlib.Path
    library_version: str
    main_model: pathlib.Path  # what the Python pipeline runs
    tokenizer_json: pathlib.Path
    sentences: list[str]
    max_tokens: int = MAX_TOKENS
    padded_to: int | None = None
    rows: int = CHECK_SENTENCES
    domains: tuple[str, ...] = ("ai.onnx.contrib",)
    _expected: list | None = None

    def check(self, ort_path: pathlib.Path, replay: bool) -> dict:
        """Run the .ort with preprocessing on real sentences; compare with the Python pipeline (cosine)."""
        from edgeprune.models.tasks import cosine_rows, sentence_embeddings
        from edgeprune.runtime.session import make_session

        reference = sentence_embeddings(make_session(self.main_model, "cpu"), self.tokenizer_json, self.sentences, max_length=self.max_tokens)
        onnx_session = make_session(self.path, "cpu", custom_op_libraries=(self.library,))
        ort_session = make_session(ort_path, "cpu", custom_op_libraries=(self.library,), config=_replay(replay))
        self._expected = [onnx_session.run(None, {"text": np.array([s])})[0] for s in self.sentences]
        got = np.concatenate([ort_session.run(None, {"text": np.array([s])})[0] for s in self.sentences]).astype(np.float64)
        cos = cosine_rows(reference, got)
        if cos.min() < MIN_PIPELINE_COSINE:
            worst = int(cos.argmin())
            raise VerificationError(
                f"the preprocessing model's embedding differs from the Python pipeline's on {self.sentences[worst]!r} "
                f"(cosine {cos.min():.6f} < {MIN_PIPELINE_COSINE}): the bundle was refused; check that --tokenizer is the model's own."
            )
        return {"kind": "text", "against": "edgeprune.models.tasks.sentence_embeddings (tokenizers + mean pooling)",
                "sentences": len(self.sentences), "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
                "max_tokens": self.max_tokens, "padded_to": self.padded_to,
                "library": f"onnxruntime-extensions {self.library_version}"}

    def verify_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        arrays = {f"{prefix}in{i}/text": np.array([s]) for i, s in enumerate(self.sentences)}
        arrays.update({f"{prefix}out{i}/embedding": e for i, e in enumerate(self._expected or [])})
        return arrays

    def sample(self) -> tuple[dict[str, np.ndarray], str]:
        """One feed for the end-to-end timing, and what it is."""
        return {"text": np.array([self.sentences[0]])}, self.sentences[0]


@dataclasses.dataclass
class ImagePreprocessing:
    """An image classifier with decoding + ImageNet preprocessing in front and top-k behind."""

    path: pathlib.Path
    library: pathlib.Path
    library_version: str
    main_model: pathlib.Path
    size: int
    images: list[pathlib.Path]
    labels: pathlib.Path | None
    domains: tuple[str, ...] = ("com.microsoft.extensions",)
    _expected: list | None = None

    @property
    def rows(self) -> int:
        return len(self.images)

    def check(self, ort_path: pathlib.Path, replay: bool) -> dict:
        """The .ort on the images' bytes against the Python pipeline + the model, top-1 class by top-1 class.

        The gate: given the pixels the extensions' decoder produced (saved losslessly as PNG), the
        Python pipeline (``models.tasks.imagenet_pixels``: Pillow resize/crop/normalize) + the model
        must pick the bundle's top-1 on every image, else the bundle is refused.  Reported beside
        it: agreement with the full Python pipeline, Pillow's JPEG decoder included, and the images
        where only the decoder makes the two differ.
        """
        import tempfile

        from PIL import Image

        from edgeprune.models.tasks import image_logits, imagenet_pixels
        from edgeprune.runtime.package import image_preprocessing
        from edgeprune.runtime.session import make_session

        main = make_session(self.main_model, "cpu")
        onnx_session = make_session(self.path, "cpu", custom_op_libraries=(self.library,))
        ort_session = make_session(ort_path, "cpu", custom_op_libraries=(self.library,), config=_replay(replay))
        decoder = make_session(image_preprocessing.decode_model(), "cpu", custom_op_libraries=(self.library,))
        names = [o.name for o in ort_session.get_outputs()]
        self._expected = [dict(zip(names, onnx_session.run(None, self._feed(f)))) for f in self.images]
        got = [dict(zip(names, ort_session.run(None, self._feed(f)))) for f in self.images]
        top1 = np.array([g["class_index"][0, 0] for g in got])
        with tempfile.TemporaryDirectory(prefix="edgeprune_decoded_") as tmp:
            decoded = []
            for i, f in enumerate(self.images):
                (rgb,) = decoder.run(None, self._feed(f))
                decoded.append(pathlib.Path(tmp) / f"{i}.png")
                Image.fromarray(rgb).save(decoded[-1])
            same_pixels = image_logits(main, imagenet_pixels(decoded, self.size), batch_size=1).argmax(axis=1)
        for i, (want, have) in enumerate(zip(same_pixels, top1)):
            if want != have:
                raise VerificationError(
                    f"the preprocessing model's top-1 class on {self.images[i].name} is {have}, and the Python pipeline's "
                    f"(models.tasks.imagenet_pixels) on the same decoded pixels is {want}: the bundle was refused; "
                    "the in-graph resize/crop/normalize does not reproduce the pipeline: report this with --debug output."
                )
        logits = image_logits(main, imagenet_pixels(self.images, self.size), batch_size=1)
        pillow = logits.argmax(axis=1)
        flips = [f.name for f, a, b in zip(self.images, pillow, top1) if a != b]
        if flips:
            logger.warning("the JPEG decoder changes the top-1 class against Pillow's on %d of %d check images (%s); "
                           "with the same decoded pixels every top-1 matches", len(flips), len(self.images), ", ".join(flips))
        return {"kind": "image",
                "against": "edgeprune.models.tasks.imagenet_pixels + the model's argmax, on the extensions' decoded pixels (gate) "
                           "and on Pillow's (reported)",
                "images": [f.name for f in self.images], "top1_agreement_same_pixels": 1.0,
                "top1_agreement_pillow_decode": float(np.mean(pillow == top1)), "decoder_changes_top1": flips,
                "size": self.size, "labels": self.labels.name if self.labels else None,
                "library": f"onnxruntime-extensions {self.library_version}"}

    @staticmethod
    def _feed(path: pathlib.Path) -> dict[str, np.ndarray]:
        return {"image": np.frombuffer(pathlib.Path(path).read_bytes(), dtype=np.uint8)}

    def verify_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        arrays = {f"{prefix}in{i}/image": self._feed(f)["image"] for i, f in enumerate(self.images)}
        for i, outs in enumerate(self._expected or []):
            arrays.update({f"{prefix}out{i}/{k}": v for k, v in outs.items() if v.dtype != object})
            if "label" in outs:  # npz without pickles: strings as fixed-width unicode
                arrays[f"{prefix}out{i}/label"] = outs["label"].astype(str)
        return arrays

    def sample(self) -> tuple[dict[str, np.ndarray], str]:
        return self._feed(self.images[0]), self.images[0].name


def _replay(replay: bool) -> dict[str, str]:
    return {"session.enable_saved_runtime_optimizations": "1"} if replay else {}


def _sentences() -> list[str]:
    """STS-B dev sentences when the shared data is there, else edgeprune's own calibration sentences."""
    try:
        from edgeprune.models.tasks import load_stsb

        s1, s2, _ = load_stsb()
        return (s1[: CHECK_SENTENCES // 2] + s2[: CHECK_SENTENCES // 2])[:CHECK_SENTENCES]
    except Exception:  # noqa: BLE001 - the shared data is optional
        from edgeprune.calibration import BUNDLED_SENTENCES

        lines = [ln.strip() for ln in BUNDLED_SENTENCES.read_text(encoding="utf-8").splitlines() if ln.strip()]
        return lines[:CHECK_SENTENCES]


def _extensions():
    try:
        import onnxruntime_extensions
    except ImportError as exc:
        raise BadInputError(f"--with-preprocessing needs onnxruntime-extensions ({exc.name} is missing): pip install 'edgeprune[package]'.") from exc
    return onnxruntime_extensions


def build(model_path: pathlib.Path, work: pathlib.Path, *, tokenizer: pathlib.Path | None, calib: pathlib.Path | None = None,
          labels: pathlib.Path | None = None, reference: pathlib.Path | None = None) -> Preprocessing | ImagePreprocessing:
    """Write ``work/model_with_preprocessing.onnx`` for a text encoder or an image classifier; refuse anything else.

    ``model_path`` is the model as packaged (shapes fixed); ``reference`` the model the Python
    pipeline runs for the check (default: the same), which keeps its own dynamic shapes.
    """
    reference = reference or model_path
    from edgeprune.runtime.package import image_preprocessing

    proto = onnx.load(str(model_path))
    image = image_preprocessing.image_input(proto)
    if image is not None:
        return _build_image(proto, reference, work, image, calib, labels)
    names = [i.name for i in proto.graph.input]
    if not set(names) <= set(_TOKEN_INPUTS) or "input_ids" not in names:
        raise BadInputError(
            f"--with-preprocessing handles text encoders (inputs {', '.join(_TOKEN_INPUTS)}) and image classifiers "
            f"(one float [N, 3, H, W] input); this model takes {', '.join(names)}: package it without --with-preprocessing."
        )
    if tokenizer is None:
        raise BadInputError("--with-preprocessing on a text model needs its tokenizer: pass --tokenizer (tokenizer.json or its folder).")
    if "attention_mask" not in names:
        raise BadInputError("--with-preprocessing pools over attention_mask, which this model does not take: package it without --with-preprocessing.")
    tokenizer = pathlib.Path(tokenizer)
    folder = tokenizer if tokenizer.is_dir() else tokenizer.parent
    max_tokens, pad_to = _sequence_limits(proto, names)
    onnxruntime_extensions = _extensions()
    try:
        from onnxruntime_extensions import gen_processing_models
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise BadInputError(f"--with-preprocessing needs onnxruntime-extensions and transformers ({exc.name} is missing): pip install 'edgeprune[package]'.") from exc
    try:
        hf = AutoTokenizer.from_pretrained(str(folder))
        pre, _ = gen_processing_models(hf, pre_kwargs={"max_length": max_tokens})
    except Exception as exc:
        raise BadInputError(f"onnxruntime-extensions could not build a tokenizer graph from {folder} ({type(exc).__name__}: {exc}): "
                            "pass the folder of the model's Hugging Face tokenizer (tokenizer.json and tokenizer_config.json).") from exc
    pad_id = hf.pad_token_id if hf.pad_token_id is not None else 0
    merged = _merge(proto, pre, names, pad_to=pad_to, pad_id=int(pad_id))
    path = work / "model_with_preprocessing.onnx"
    onnx.save(merged, str(path))
    return Preprocessing(path, pathlib.Path(onnxruntime_extensions.get_library_path()), onnxruntime_extensions.__version__,
                         reference, folder / "tokenizer.json", _sentences(), max_tokens=max_tokens, padded_to=pad_to)


def _sequence_limits(proto: onnx.ModelProto, names: list[str]) -> tuple[int, int | None]:
    """(tokens kept, fixed sequence length to pad to or None) from the token inputs' [batch, sequence] shape.

    A fixed batch other than 1 is refused: the in-graph tokenizer reads one string.
    """
    batches, lengths = set(), set()
    for value in proto.graph.input:
        if value.name not in names:
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims) != 2:
            raise BadInputError(f"--with-preprocessing feeds token inputs of shape [batch, sequence], but {value.name} has {len(dims)} axes: package it without --with-preprocessing.")
        batches.add(dims[0].dim_value if dims[0].HasField("dim_value") and dims[0].dim_value > 0 else None)
        lengths.add(dims[1].dim_value if dims[1].HasField("dim_value") and dims[1].dim_value > 0 else None)
    fixed_batch = {b for b in batches if b is not None}
    if fixed_batch - {1}:
        raise BadInputError(
            f"--with-preprocessing feeds one sentence at a time, but the model's batch is fixed at {min(fixed_batch)}: "
            "fix the batch to 1 (--fix-shapes <batch dim>=1) or package without --with-preprocessing."
        )
    fixed_len = {n for n in lengths if n is not None}
    if len(fixed_len) > 1 or (fixed_len and None in lengths):
        raise BadInputError("the token inputs have different sequence lengths: fix them all to one size (--fix-shapes) or package without --with-preprocessing.")
    if not fixed_len:
        return MAX_TOKENS, None
    length = fixed_len.pop()
    return min(length, MAX_TOKENS), length


def _build_image(proto: onnx.ModelProto, reference: pathlib.Path, work: pathlib.Path, image: tuple[str, int],
                 calib: pathlib.Path | None, labels: pathlib.Path | None) -> ImagePreprocessing:
    from edgeprune.runtime.package import image_preprocessing

    name, size = image
    classes = image_preprocessing.classes_of(proto)
    label_names = image_preprocessing.read_labels(labels, classes) if labels is not None else None
    images = _check_images(calib)
    onnxruntime_extensions = _extensions()
    merged = image_preprocessing.merge(proto, name, size, label_names)
    path = work / "model_with_preprocessing.onnx"
    onnx.save(merged, str(path))
    return ImagePreprocessing(path, pathlib.Path(onnxruntime_extensions.get_library_path()), onnxruntime_extensions.__version__,
                              reference, size, images, labels)


def _check_images(calib: pathlib.Path | None) -> list[pathlib.Path]:
    """The first CHECK_IMAGES JPEG/PNG files of a --calib folder, else of the shared ImageNet sample."""
    if calib is not None and pathlib.Path(calib).is_dir():
        files = sorted(p for p in pathlib.Path(calib).iterdir() if p.is_file() and p.suffix.lower() in _DECODABLE)
        if files:
            return files[:CHECK_IMAGES]
    try:
        from edgeprune.models.tasks import load_imagenet

        files, _ = load_imagenet()
    except BadInputError:
        files = []
    if not files:
        raise BadInputError(
            "--with-preprocessing checks an image model against the Python pipeline on real images, and there are none: "
            "pass --calib with a folder of JPEG or PNG images."
        )
    return files[:CHECK_IMAGES]


def _token_output(proto: onnx.ModelProto) -> str:
    outputs = [o.name for o in proto.graph.output]
    for name in ("token_embeddings", "last_hidden_state"):
        if name in outputs:
            return name
    for o in proto.graph.output:
        if len(o.type.tensor_type.shape.dim) == 3:
            return o.name
    raise BadInputError(f"the model has no per-token output (outputs: {', '.join(outputs)}): --with-preprocessing pools token_embeddings or last_hidden_state.")


def _merge(model: onnx.ModelProto, pre: onnx.ModelProto, names: list[str], *, pad_to: int | None = None, pad_id: int = 0) -> onnx.ModelProto:
    """Tokenizer nodes (names prefixed ``pre/``) + Unsqueeze to [1, T] (+ padding to [1, pad_to]) + the model + mean pooling."""
    rename = {v.name: f"pre/{v.name}" for v in list(pre.graph.output)}
    for node in pre.graph.node:
        for i, name in enumerate(node.output):
            node.output[i] = rename.get(name, f"pre/{name}")
        for i, name in enumerate(node.input):
            if name != pre.graph.input[0].name:
                node.input[i] = rename.get(name, f"pre/{name}")
            else:
                node.input[i] = "text"
    nodes = list(pre.graph.node)
    extra = [helper.make_tensor("pre/axes0", onnx.TensorProto.INT64, [1], [0])]
    if pad_to is not None:
        extra.append(helper.make_tensor("pre/pad_to", onnx.TensorProto.INT64, [1], [pad_to]))
        extra.append(helper.make_tensor("pre/zero1", onnx.TensorProto.INT64, [1], [0]))
        nodes += [helper.make_node("Shape", [f"pre/{names[0]}"], ["pre/len"], name="pre/len"),
                  helper.make_node("Sub", ["pre/pad_to", "pre/len"], ["pre/missing"], name="pre/missing"),
                  helper.make_node("Concat", ["pre/zero1", "pre/zero1", "pre/zero1", "pre/missing"], ["pre/pads"], axis=0, name="pre/pads")]
    for name in names:
        if pad_to is None:
            nodes.append(helper.make_node("Unsqueeze", [f"pre/{name}", "pre/axes0"], [name], name=f"pre/unsqueeze_{name}"))
            continue
        value = pad_id if name == "input_ids" else 0  # attention_mask 0 and token_type_ids 0 on padding, as the pipeline pads
        extra.append(helper.make_tensor(f"pre/pad_value_{name}", onnx.TensorProto.INT64, [], [value]))
        nodes.append(helper.make_node("Unsqueeze", [f"pre/{name}", "pre/axes0"], [f"pre/{name}_1t"], name=f"pre/unsqueeze_{name}"))
        nodes.append(helper.make_node("Pad", [f"pre/{name}_1t", "pre/pads", f"pre/pad_value_{name}"], [name], mode="constant", name=f"pre/pad_{name}"))
    nodes.extend(model.graph.node)
    token = _token_output(model)
    axis1 = helper.make_tensor("post/axis1", onnx.TensorProto.INT64, [1], [1])
    axis_last = helper.make_tensor("post/axis_last", onnx.TensorProto.INT64, [1], [-1])
    tiny = helper.make_tensor("post/tiny", onnx.TensorProto.FLOAT, [], [1e-9])
    nodes += [
        helper.make_node("Cast", ["attention_mask"], ["post/mask_f"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["post/mask_f", "post/axis_last"], ["post/mask3"]),
        helper.make_node("Mul", [token, "post/mask3"], ["post/masked"]),
        helper.make_node("ReduceSum", ["post/masked", "post/axis1"], ["post/summed"], keepdims=0),
        helper.make_node("ReduceSum", ["post/mask3", "post/axis1"], ["post/count"], keepdims=0),
        helper.make_node("Max", ["post/count", "post/tiny"], ["post/count_safe"]),
        helper.make_node("Div", ["post/summed", "post/count_safe"], ["embedding"]),
    ]
    hidden = model.graph.output[[o.name for o in model.graph.output].index(token)]
    width = hidden.type.tensor_type.shape.dim[2]
    out = helper.make_tensor_value_info("embedding", onnx.TensorProto.FLOAT, [1, width.dim_value if width.HasField("dim_value") else "hidden"])
    text = helper.make_tensor_value_info("text", onnx.TensorProto.STRING, [1])
    graph = helper.make_graph(nodes, f"{model.graph.name or 'model'}_with_preprocessing", [text], [out],
                              initializer=list(model.graph.initializer) + extra + [axis1, axis_last, tiny])
    opsets = [o for o in model.opset_import if o.domain != "ai.onnx.contrib"] + [helper.make_opsetid("ai.onnx.contrib", 1)]
    merged = helper.make_model(graph, opset_imports=opsets, ir_version=model.ir_version)
    merged.functions.extend(model.functions)
    return merged
