"""Export Mixtral-architecture MoE models to ONNX in optimum's loop form, with every expert in the graph.

transformers' Mixtral block loops only over the experts the tracing input hit (``expert_hit``), so
a traced export keeps those experts and silently drops the rest, and optimum 2.1 has no Mixtral
ONNX config.  ``MixtralLoopOnnxConfig`` is optimum's Llama config with a patcher that swaps in a
loop over *all* experts (optimum's own qwen3_moe patch, with Mixtral's always-on renormalisation),
so the graph routes every token the way torch does at any length.  ``export_mixtral(..., patched=False)``
exports the unpatched block, which edgeprune's analysis must refuse.
"""

from __future__ import annotations

import logging
from pathlib import Path

from edgeprune.errors import BadInputError

logger = logging.getLogger(__name__)

OPSET = 17


def _optimum():
    try:
        from optimum.exporters.onnx.convert import onnx_export_from_model
        from optimum.exporters.onnx.model_configs import LlamaOnnxConfig
        from optimum.exporters.onnx.model_patcher import ModelPatcher, qwen3_moe_forward_patched
    except ImportError as exc:  # pragma: no cover - the export extra is missing
        raise BadInputError('exporting an MoE model needs optimum, transformers and torch: run pip install "edgeprune[export]".') from exc
    return onnx_export_from_model, LlamaOnnxConfig, ModelPatcher, qwen3_moe_forward_patched


def _config_class(patched: bool):
    onnx_export_from_model, LlamaOnnxConfig, ModelPatcher, qwen3_forward = _optimum()
    from transformers.models.mixtral import modeling_mixtral

    def all_experts_forward(self, hidden_states):
        self.norm_topk_prob = True  # Mixtral always renormalises the top-k weights
        return qwen3_forward(self, hidden_states)

    class _Patcher(ModelPatcher):
        def __enter__(self):
            super().__enter__()
            self._moe_forward = modeling_mixtral.MixtralSparseMoeBlock.forward
            if patched:
                modeling_mixtral.MixtralSparseMoeBlock.forward = all_experts_forward

        def __exit__(self, *exc):
            super().__exit__(*exc)
            modeling_mixtral.MixtralSparseMoeBlock.forward = self._moe_forward

    class MixtralLoopOnnxConfig(LlamaOnnxConfig):
        _MODEL_PATCHER = _Patcher

    return onnx_export_from_model, MixtralLoopOnnxConfig


def export_mixtral(model, out_dir: str | Path, *, patched: bool = True, opset: int = OPSET) -> Path:
    """Export a ``MixtralForCausalLM`` (text-generation, no KV cache) to ``out_dir/model.onnx``; returns the path."""
    onnx_export_from_model, config_class = _config_class(patched)
    out_dir = Path(out_dir)
    onnx_config = config_class(model.config, task="text-generation", use_past=False, use_past_in_inputs=False)
    onnx_export_from_model(
        model, str(out_dir), task="text-generation", custom_onnx_configs={"model": onnx_config},
        opset=opset, do_validation=False, no_post_process=True,
    )  # fmt: skip
    return out_dir / "model.onnx"
