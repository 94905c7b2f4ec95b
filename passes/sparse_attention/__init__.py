"""Dynamic sparse attention: rewrite rules, the op's ONNX function definitions, the pass.

``functions`` defines ``edgeprune.DynamicSparseAttention``/``BlockSparseAttention`` as model-local
functions; ``rules`` matches causal self-attention; ``sparse_attention_pass`` drives them.  The C++
kernel for BlockSparseAttention lives in runtime/kernels/ (the runtime never imports this package).
"""

from edgeprune.passes.sparse_attention.sparse_attention_pass import SparseAttentionConfig, SparseAttentionPass

__all__ = ["SparseAttentionConfig", "SparseAttentionPass"]
