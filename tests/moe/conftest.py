"""Session fixtures: the tiny Mixtral and its exports, built once (a few seconds, no downloads)."""

from __future__ import annotations

import warnings

import pytest


@pytest.fixture(scope="session")
def mixtral():
    pytest.importorskip("transformers")
    from moe_models import tiny_mixtral

    return tiny_mixtral()


@pytest.fixture(scope="session")
def mixtral_loop_onnx(mixtral, tmp_path_factory):
    """optimum's export with the all-experts loop (edgeprune.models.moe_export)."""
    pytest.importorskip("optimum.exporters.onnx")
    from edgeprune.models.moe_export import export_mixtral

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_mixtral(mixtral, tmp_path_factory.mktemp("mixtral_loop"))


@pytest.fixture(scope="session")
def mixtral_traced_onnx(mixtral, tmp_path_factory):
    """The same model exported without the patch: transformers' loop over the experts the tracing input hit."""
    pytest.importorskip("optimum.exporters.onnx")
    from edgeprune.models.moe_export import export_mixtral

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_mixtral(mixtral, tmp_path_factory.mktemp("mixtral_traced"), patched=False)


@pytest.fixture(scope="session")
def moe_export(mixtral, mixtral_loop_onnx, tmp_path_factory):
    """``moe_export(arch)`` -> (torch model, loop-form ONNX path) for mixtral, olmoe or qwen2_moe; each built once."""
    pytest.importorskip("optimum.exporters.onnx")
    from moe_models import BUILDERS

    from edgeprune.models.moe_export import export_moe

    built = {"mixtral": (mixtral, mixtral_loop_onnx)}

    def get(arch: str):
        if arch not in built:
            model = BUILDERS[arch]()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                built[arch] = (model, export_moe(model, tmp_path_factory.mktemp(arch)))
        return built[arch]

    return get


@pytest.fixture(scope="session")
def gpt_oss(tmp_path_factory):
    """(torch model, ONNX path) of a tiny gpt-oss exported by optimum natively (the dense form)."""
    pytest.importorskip("optimum.exporters.onnx")
    from moe_models import tiny_gpt_oss
    from optimum.exporters.onnx import main_export

    model = tiny_gpt_oss()
    hf = tmp_path_factory.mktemp("gpt_oss_hf")
    model.save_pretrained(hf)
    out = tmp_path_factory.mktemp("gpt_oss_onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main_export(str(hf), output=str(out), task="text-generation", opset=17, do_validation=False, no_post_process=True)
    return model, out / "model.onnx"
