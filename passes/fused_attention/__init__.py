"""Fused attention: causal self-attention subgraphs -> ONNX Runtime's ``com.microsoft.GroupQueryAttention``.

One pass module (``fused_attention_pass``); the attention patterns it matches are the ones the
sparse-attention pass matches (``passes.sparse_attention.rules``), so both act on the same blocks.
"""

from edgeprune.passes.fused_attention.fused_attention_pass import FusedAttentionConfig, FusedAttentionPass

__all__ = ["FusedAttentionConfig", "FusedAttentionPass"]
