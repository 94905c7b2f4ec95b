"""Tiny seeded random-init MoE models for the moe tests: a Mixtral (torch) and its ONNX forms.

``tiny_mixtral`` is a 2-layer, 8-expert, top-2 MixtralForCausalLM (a few hundred kB); the loop
form is exported by optimum with the all-experts patch (``edgeprune.models.moe_export``), the
traced hit-only form without it.  ``fused_moe_model`` writes one Mixtral block as
``com.microsoft.MoE`` (SwiGLU with gate/up rows interleaved, ``swiglu_fusion=1``, as ORT's CPU
kernel needs).  ``prune_torch_experts`` is the reference: the torch module with experts removed.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import TensorProto, helper

VOCAB, HIDDEN, INTER, EXPERTS, TOP_K, LAYERS = 64, 16, 32, 8, 2, 2


def tiny_mixtral(seed: int = 0):
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K, max_position_embeddings=64,
        use_cache=False, initializer_range=0.5,
    )  # fmt: skip
    return MixtralForCausalLM(config).eval()


def tiny_olmoe(seed: int = 0):
    """OLMoE: Mixtral's routing without renormalising the top-k weights."""
    import torch
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(seed)
    config = OlmoeConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, num_experts=EXPERTS, num_experts_per_tok=TOP_K, max_position_embeddings=64,
        use_cache=False, initializer_range=0.5,
    )  # fmt: skip
    return OlmoeForCausalLM(config).eval()


def tiny_qwen2_moe(seed: int = 0):
    """Qwen2-MoE: unnormalised top-k plus a sigmoid-gated shared expert beside the routed ones."""
    import torch
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, moe_intermediate_size=INTER,
        shared_expert_intermediate_size=24, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
        num_experts=EXPERTS, num_experts_per_tok=TOP_K, max_position_embeddings=64, use_cache=False,
        initializer_range=0.5, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
    )  # fmt: skip
    return Qwen2MoeForCausalLM(config).eval()


def tiny_gpt_oss(seed: int = 0):
    """gpt-oss: optimum exports it natively in the dense form (every expert on every token, stacked weights)."""
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    config = GptOssConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, head_dim=4, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K, max_position_embeddings=64,
        use_cache=False, initializer_range=0.5, layer_types=["full_attention"] * LAYERS, sliding_window=16,
        rope_scaling={"rope_type": "yarn", "factor": 1.0, "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0},
    )  # fmt: skip
    model = GptOssForCausalLM(config).eval()
    return model


def prune_torch_gpt_oss(model, keeps):
    """A copy of a GptOssForCausalLM with layer i keeping only the experts ``keeps[i]``."""
    import torch

    pruned = copy.deepcopy(model)
    for layer, keep in zip(pruned.model.layers, keeps):
        keep = torch.tensor([int(i) for i in keep])
        router, experts = layer.mlp.router, layer.mlp.experts
        router.weight = torch.nn.Parameter(router.weight.data[keep].clone())
        router.bias = torch.nn.Parameter(router.bias.data[keep].clone())
        router.num_experts = len(keep)
        router.top_k = min(router.top_k, len(keep))
        layer.mlp.router.top_k = router.top_k
        for name in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"):
            setattr(experts, name, torch.nn.Parameter(getattr(experts, name).data[keep].clone()))
        experts.num_experts = len(keep)
    return pruned


BUILDERS = {"mixtral": tiny_mixtral, "olmoe": tiny_olmoe, "qwen2_moe": tiny_qwen2_moe, "gpt_oss": tiny_gpt_oss}


def _block_attr(model) -> str:
    return "block_sparse_moe" if model.config.model_type == "mixtral" else "mlp"


def prune_torch_block(block, keep):
    """A copy of an MoE block (Mixtral, OLMoE, Qwen2-MoE) with only the experts ``keep`` (router rows too; k clamped)."""
    import torch

    pruned = copy.deepcopy(block)
    keep = [int(i) for i in keep]
    pruned.experts = torch.nn.ModuleList([pruned.experts[i] for i in keep])
    gate = torch.nn.Linear(block.gate.in_features, len(keep), bias=False)
    gate.weight.data = block.gate.weight.data[keep].clone()
    pruned.gate = gate
    pruned.num_experts = len(keep)
    pruned.top_k = min(block.top_k, len(keep))
    return pruned


def prune_torch_experts(model, keeps):
    """A copy of an MoE causal LM with layer i keeping only the experts ``keeps[i]``."""
    pruned = copy.deepcopy(model)
    attr = _block_attr(model)
    for layer, keep in zip(pruned.model.layers, keeps):
        setattr(layer, attr, prune_torch_block(getattr(layer, attr), keep))
    return pruned


def torch_logits(model, feed) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(feed["input_ids"]), attention_mask=torch.from_numpy(feed["attention_mask"]))
    return out.logits.numpy()


def token_feed(rng: np.random.Generator, batch: int, length: int) -> dict[str, np.ndarray]:
    ids = rng.integers(0, VOCAB, (batch, length)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.tile(np.arange(length, dtype=np.int64), (batch, 1))}


def fused_moe_model(block) -> onnx.ModelProto:
    """One Mixtral block as router MatMul -> com.microsoft.MoE, weights taken from ``block``."""
    router = block.gate.weight.detach().numpy().T.astype(np.float32)  # [H, E]
    fc1, fc2 = [], []
    for expert in block.experts:
        w1, w3 = expert.w1.weight.detach().numpy(), expert.w3.weight.detach().numpy()  # [I, H]
        fused = np.empty((2 * w1.shape[0], w1.shape[1]), dtype=np.float32)
        fused[0::2], fused[1::2] = w1, w3  # gate and up interleaved row by row
        fc1.append(fused)
        fc2.append(expert.w2.weight.detach().numpy())  # [H, I]
    inits = [
        helper.make_tensor("router.weight", TensorProto.FLOAT, router.shape, router.ravel()),
        helper.make_tensor("fc1", TensorProto.FLOAT, (len(fc1), *fc1[0].shape), np.stack(fc1).ravel()),
        helper.make_tensor("fc2", TensorProto.FLOAT, (len(fc2), *fc2[0].shape), np.stack(fc2).ravel()),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "router.weight"], ["logits"], name="router"),
        helper.make_node(
            "MoE", ["x", "logits", "fc1", "", "fc2"], ["y"], name="moe", domain="com.microsoft", k=block.top_k,
            activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0, normalize_routing_weights=1,
        ),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes, "fused_moe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["tokens", router.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["tokens", router.shape[0]])], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], ir_version=10)


def _int8_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8 as QMoE stores it: uint8 codes (offset 128) and one float scale per row."""
    scale = np.maximum(np.abs(w).max(axis=-1), 1e-8) / 127.0
    q = np.clip(np.round(w / scale[..., None]), -127, 127) + 128
    return q.astype(np.uint8), scale.astype(np.float32)


def qmoe_model(block, keep=None, bits: int = 8, block_size: int = 16) -> onnx.ModelProto:
    """One Mixtral block as router MatMul -> com.microsoft.QMoE: int8 with per-row scales, or ``bits=4`` with
    block-wise scales of ``block_size``; ``keep`` builds it from those experts only."""
    keep = list(range(len(block.experts))) if keep is None else [int(i) for i in keep]
    quantize = _int8_rows if bits == 8 else (lambda w: _int4_blocks(w, block_size))
    router = block.gate.weight.detach().numpy()[keep].T.astype(np.float32)
    fc1, s1, fc2, s2 = [], [], [], []
    for e in keep:
        expert = block.experts[e]
        w1, w3 = expert.w1.weight.detach().numpy(), expert.w3.weight.detach().numpy()
        fused = np.empty((2 * w1.shape[0], w1.shape[1]), dtype=np.float32)
        fused[0::2], fused[1::2] = w1, w3
        q, sc = quantize(fused)
        fc1.append(q), s1.append(sc)
        q, sc = quantize(expert.w2.weight.detach().numpy())
        fc2.append(q), s2.append(sc)
    arrays = {"router.weight": router, "fc1": np.stack(fc1), "fc1_scales": np.stack(s1), "fc2": np.stack(fc2), "fc2_scales": np.stack(s2)}
    inits = [onnx.numpy_helper.from_array(a, name) for name, a in arrays.items()]
    blocked = {} if bits == 8 else {"block_size": block_size}
    nodes = [
        helper.make_node("MatMul", ["x", "router.weight"], ["logits"], name="router"),
        helper.make_node(
            "QMoE", ["x", "logits", "fc1", "fc1_scales", "", "fc2", "fc2_scales"], ["y"], name="qmoe", domain="com.microsoft",
            k=block.top_k, expert_weight_bits=bits, **blocked, activation_type="swiglu", swiglu_fusion=1,
            activation_alpha=1.0, activation_beta=0.0, normalize_routing_weights=1,
        ),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes, "qmoe" if bits == 8 else "qmoe_int4",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["tokens", router.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["tokens", router.shape[0]])], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], ir_version=10)


def _int4_blocks(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric block-wise int4 as QMoE stores it: codes offset by 8, two per byte (low nibble first), one scale per block."""
    n, k = w.shape
    blocks = w.reshape(n, k // block, block)
    scale = np.maximum(np.abs(blocks).max(axis=-1), 1e-8) / 7.0
    q = (np.clip(np.round(blocks / scale[..., None]), -8, 7) + 8).astype(np.uint8).reshape(n, k)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8), scale.astype(np.float32)


def qmoe_int4_model(block, block_size: int = 16) -> onnx.ModelProto:
    """One Mixtral block as router MatMul -> com.microsoft.QMoE with int4 weights and block-wise scales."""
    return qmoe_model(block, bits=4, block_size=block_size)
