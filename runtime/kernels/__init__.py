"""C++ custom-op kernels built at install (setup.py) and where to find them.

``sparse_attention_library()`` is the shared library implementing ``edgeprune.DynamicSparseAttention``
(selection and attention in one node) and ``edgeprune.BlockSparseAttention`` on CPU, or None when this install has none (no compiler at install time): models then run the
op's portable ONNX-function body, with the same outputs, slower.
"""

from __future__ import annotations

import functools
import logging
import pathlib

logger = logging.getLogger(__name__)

DOMAIN = "edgeprune"
#: ops the library implements (their model-local functions are the fallback when it is not registered)
KERNEL_OPS = frozenset({"DynamicSparseAttention", "BlockSparseAttention", "DynamicSparseAttentionMasked", "BlockSparseAttentionMasked"})
MIN_ORT = (1, 13)  # the library's OrtCustomOp layout is C API version 13


@functools.cache
def sparse_attention_library() -> str | None:
    """Path of the built kernel library, or None (logged once) when it was not built."""
    here = pathlib.Path(__file__).parent
    found = sorted(here.glob("_sparse_attention*.so")) + sorted(here.glob("_sparse_attention*.pyd"))
    if not found:
        logger.info("the sparse-attention kernel was not built (no C++ compiler at install): the portable ONNX function runs instead")
        return None
    return str(found[0])
