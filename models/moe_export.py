"""Export Mixtral, OLMoE and Qwen2-MoE models to ONNX in optimum's loop form, with every expert in the graph.

transformers' MoE blocks loop only over the experts the tracing input hit (``expert_hit``), so a
traced export keeps those experts and silently drops the rest, and optimum 2.1 has no ONNX config
for these three.  The config here is optimum's Llama config with a patcher that swaps in a loop over
*all* experts (optimum's own qwen3_moe patch; Mixtral renormalises always, Qwen2-MoE adds its
sigmoid-gated shared expert), so the graph routes every token the way torch does at any length.
``patched=False`` exports the unpatched block, which edgeprune's analysis must refuse.
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


def _all_experts_forward(model_type: str, qwen3_forward):
    """The block's forward with the expert loop over all experts (optimum's qwen3_moe patch, plus each model's extras)."""
    import torch

    if model_type == "mixtral":

        def forward(self, hidden_states):
            self.norm_topk_prob = True  # Mixtral always renormalises the top-k weights
            return qwen3_forward(self, hidden_states)

    elif model_type == "olmoe":
        forward = qwen3_forward  # the same block, norm_topk_prob from the config
    elif model_type == "qwen2_moe":

        def forward(self, hidden_states):
            routed, router_logits = qwen3_forward(self, hidden_states)
            flat = hidden_states.view(-1, hidden_states.shape[-1])
            shared = torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
            return routed + shared.view(routed.shape), router_logits

    else:
        raise BadInputError(f"no all-experts export patch for model type {model_type!r}: mixtral, olmoe and qwen2_moe have one.")
    return forward


def _block_class(model_type: str):
    if model_type == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as block
    elif model_type == "olmoe":
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock as block
    elif model_type == "qwen2_moe":
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock as block
    else:
        raise BadInputError(f"no all-experts export patch for model type {model_type!r}: mixtral, olmoe and qwen2_moe have one.")
    return block


def _config_class(model_type: str, patched: bool):
    onnx_export_from_model, LlamaOnnxConfig, ModelPatcher, qwen3_forward = _optimum()
    from optimum.utils import NormalizedTextConfigWithGQA

    block = _block_class(model_type)
    forward = _all_experts_forward(model_type, qwen3_forward)

    class _Patcher(ModelPatcher):
        def __enter__(self):
            super().__enter__()
            self._moe_forward = block.forward
            if patched:
                block.forward = forward

        def __exit__(self, *exc):
            super().__exit__(*exc)
            block.forward = self._moe_forward

    class MoELoopOnnxConfig(LlamaOnnxConfig):
        NORMALIZED_CONFIG_CLASS = NormalizedTextConfigWithGQA
        _MODEL_PATCHER = _Patcher

    return onnx_export_from_model, MoELoopOnnxConfig


def export_moe(model, out_dir: str | Path, *, patched: bool = True, opset: int = OPSET) -> Path:
    """Export a Mixtral, OLMoE or Qwen2-MoE causal LM (text-generation, no KV cache) to ``out_dir/model.onnx``."""
    onnx_export_from_model, config_class = _config_class(model.config.model_type, patched)
    out_dir = Path(out_dir)
    onnx_config = config_class(model.config, task="text-generation", use_past=False, use_past_in_inputs=False)
    onnx_export_from_model(
        model, str(out_dir), task="text-generation", custom_onnx_configs={"model": onnx_config},
        opset=opset, do_validation=False, no_post_process=True,
    )  # fmt: skip
    return out_dir / "model.onnx"


def export_mixtral(model, out_dir: str | Path, *, patched: bool = True, opset: int = OPSET) -> Path:
    """``export_moe`` for a ``MixtralForCausalLM``."""
    return export_moe(model, out_dir, patched=patched, opset=opset)
