"""Fusions into ONNX Runtime's contrib ops: causal self-attention -> ``com.microsoft.GroupQueryAttention``
(``fuse_attention``, rotary embedding included), residual Add + RMSNorm -> ``SkipSimplifiedLayerNormalization``
(``fuse_norms``).

The attention patterns are shared with the sparse-attention pass (``edgeprune.analysis.attention_patterns``),
so both act on the same blocks; ``graph_forms`` reads what surrounds a block (rotary, head split and merge).
"""

from edgeprune.passes.fused_attention.fused_attention_pass import FusedAttentionConfig, FusedAttentionPass
from edgeprune.passes.fused_attention.fused_norms import FusedNormsConfig, FusedNormsPass

__all__ = ["FusedAttentionConfig", "FusedAttentionPass", "FusedNormsConfig", "FusedNormsPass"]
