"""A few recent results of an expensive function of arrays, keyed by the arrays' bytes.

The options of one weight (accuracy levels, a tied lookup), the nodes reading one input and emit ask for the same
grid or Hessian factor again; keeping the last few pays each once.  Shared by ``rounding``, ``offsets`` and ``gptq``.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Any, Callable

import numpy as np


class Memo:
    """The last ``size`` results, least recently used first out."""

    def __init__(self, size: int = 4):
        self.size = size
        self._hits: collections.OrderedDict = collections.OrderedDict()

    def get(self, make: Callable[[], Any], text: str, *arrays: np.ndarray | None) -> Any:
        """``make()``'s result for (``text``, ``arrays``): computed once while among the last ``size`` asked."""
        h = hashlib.blake2b(text.encode(), digest_size=16)
        for a in arrays:
            if a is not None:
                h.update(f"{a.dtype}{a.shape}".encode())
                h.update(np.ascontiguousarray(a).tobytes())
        key = h.hexdigest()
        if key not in self._hits:
            self._hits[key] = make()
            while len(self._hits) > self.size:
                self._hits.popitem(last=False)
        self._hits.move_to_end(key)
        return self._hits[key]
