"""Fused attention: causal self-attention subgraphs -> ONNX Runtime's ``com.microsoft.GroupQueryAttention``.

One pass module (``fused_attention_pass``); the attention patterns it matches are shared with the
sparse-attention pass (``edgeprune.analysis.attention_patterns``), so both act on the same blocks.
"""

from edgeprune.passes.fused_attention.fused_attention_pass import FusedAttentionConfig, FusedAttentionPass

__all__ = ["FusedAttentionConfig", "FusedAttentionPass"]
