"""Pre/post-processing in the graph (``--with-preprocessing``) through onnxruntime-extensions.

Text encoders: the tokenizer graph onnxruntime-extensions builds from the Hugging Face tokenizer
(``gen_processing_models``) goes in front, each token tensor gets its batch axis, and mean
pooling over the attention mask goes behind, so the model takes one string and returns the
sentence embedding.  The result is checked against edgeprune's Python pipeline
(``models.tasks.sentence_embeddings``: the same tokenizer.json, mean pooling) on real sentences.

Image classifiers are not covered yet: they are refused with a sentence saying so.
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
_TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclasses.dataclass
class Preprocessing:
    path: pathlib.Path  # the .onnx with the tokenizer in front
    library: pathlib.Path
    library_version: str
    main_model: pathlib.Path
    tokenizer_json: pathlib.Path
    sentences: list[str]
    rows: int = CHECK_SENTENCES
    _expected: list | None = None

    def check(self, ort_path: pathlib.Path, replay: bool) -> dict:
        """Run the .ort with preprocessing on real sentences; compare with the Python pipeline (cosine)."""
        from edgeprune.models.tasks import cosine_rows, sentence_embeddings
        from edgeprune.runtime.package import ort_format
        from edgeprune.runtime.session import make_session

        reference = sentence_embeddings(make_session(self.main_model, "cpu"), self.tokenizer_json, self.sentences)
        onnx_session = ort_format.open_session(self.path, libraries=(self.library,))
        ort_session = ort_format.open_session(ort_path, libraries=(self.library,), replay_runtime_optimizations=replay)
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
                "library": f"onnxruntime-extensions {self.library_version}"}

    def verify_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        arrays = {f"{prefix}in{i}/text": np.array([s]) for i, s in enumerate(self.sentences)}
        arrays.update({f"{prefix}out{i}/embedding": e for i, e in enumerate(self._expected or [])})
        return arrays


def _sentences() -> list[str]:
    """STS-B dev sentences when the shared data is there, else edgeprune's own calibration sentences."""
    try:
        from edgeprune.models.tasks import load_stsb

        s1, s2, _ = load_stsb()
        return (s1[: CHECK_SENTENCES // 2] + s2[: CHECK_SENTENCES // 2])[:CHECK_SENTENCES]
    except Exception:  # noqa: BLE001 - the shared data is optional
        text = (pathlib.Path(__file__).parents[2] / "edgeprune" / "data" / "calibration_sentences.txt")
        from edgeprune import calibration

        lines = [ln.strip() for ln in (pathlib.Path(calibration.__file__).parent / "data" / "calibration_sentences.txt").read_text(encoding="utf-8").splitlines() if ln.strip()]
        return lines[:CHECK_SENTENCES] if lines else [text.name]


def build(model_path: pathlib.Path, work: pathlib.Path, *, tokenizer: pathlib.Path | None) -> Preprocessing:
    """Write ``work/model_with_preprocessing.onnx``: string in, mean-pooled embedding out."""
    proto = onnx.load(str(model_path))
    names = [i.name for i in proto.graph.input]
    if not set(names) <= set(_TOKEN_INPUTS) or "input_ids" not in names:
        raise BadInputError(
            f"--with-preprocessing handles text encoders (inputs {', '.join(_TOKEN_INPUTS)}) for now; this model takes "
            f"{', '.join(names)}: package it without --with-preprocessing."
        )
    if tokenizer is None:
        raise BadInputError("--with-preprocessing on a text model needs its tokenizer: pass --tokenizer (tokenizer.json or its folder).")
    tokenizer = pathlib.Path(tokenizer)
    folder = tokenizer if tokenizer.is_dir() else tokenizer.parent
    try:
        import onnxruntime_extensions
        from onnxruntime_extensions import gen_processing_models
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise BadInputError(f"--with-preprocessing needs onnxruntime-extensions and transformers ({exc.name} is missing): pip install 'edgeprune[dev]'.") from exc
    try:
        hf = AutoTokenizer.from_pretrained(str(folder))
        pre, _ = gen_processing_models(hf, pre_kwargs={})
    except Exception as exc:  # noqa: BLE001 - transformers / extensions refuse many ways
        raise BadInputError(f"onnxruntime-extensions could not build a tokenizer graph from {folder} ({type(exc).__name__}: {exc}): "
                            "pass the folder of the model's Hugging Face tokenizer (tokenizer.json and tokenizer_config.json).") from exc
    merged = _merge(proto, pre, names)
    path = work / "model_with_preprocessing.onnx"
    onnx.save(merged, str(path))
    return Preprocessing(path, pathlib.Path(onnxruntime_extensions.get_library_path()), onnxruntime_extensions.__version__,
                         model_path, folder / "tokenizer.json", _sentences())


def _token_output(proto: onnx.ModelProto) -> str:
    outputs = [o.name for o in proto.graph.output]
    for name in ("token_embeddings", "last_hidden_state"):
        if name in outputs:
            return name
    for o in proto.graph.output:
        if len(o.type.tensor_type.shape.dim) == 3:
            return o.name
    raise BadInputError(f"the model has no per-token output (outputs: {', '.join(outputs)}): --with-preprocessing pools token_embeddings or last_hidden_state.")


def _merge(model: onnx.ModelProto, pre: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """Tokenizer nodes (names prefixed ``pre/``) + Unsqueeze to [1, T] + the model + mean pooling."""
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
    axes0 = helper.make_tensor("pre/axes0", onnx.TensorProto.INT64, [1], [0])
    for name in names:
        nodes.append(helper.make_node("Unsqueeze", [f"pre/{name}", "pre/axes0"], [name], name=f"pre/unsqueeze_{name}"))
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
                              initializer=list(model.graph.initializer) + [axes0, axis1, axis_last, tiny])
    opsets = [o for o in model.opset_import if o.domain != "ai.onnx.contrib"] + [helper.make_opsetid("ai.onnx.contrib", 1)]
    merged = helper.make_model(graph, opset_imports=opsets, ir_version=model.ir_version)
    merged.functions.extend(model.functions)
    if "attention_mask" not in names:
        raise BadInputError("--with-preprocessing pools over attention_mask, which this model does not take: package it without --with-preprocessing.")
    return merged
