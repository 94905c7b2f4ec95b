"""Find passes by name: built-in ones and those other packages register.

Passes register through the entry-point group ``edgeprune.passes`` (name -> class). The
built-ins are registered the same way in pyproject.toml, and also listed here so a source
checkout without an installed distribution still finds them.
"""

from __future__ import annotations

import importlib.metadata
import logging

from edgeprune.errors import BadInputError
from edgeprune.passes.base import EdgePass

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "edgeprune.passes"

_BUILTIN = {
    "cleanup": "edgeprune.passes.cleanup:CleanupPass",
    "prune": "edgeprune.passes.prune:StructuredPruningPass",
    "bits": "edgeprune.passes.bits:BitAllocationPass",
    "sparse_attention": "edgeprune.passes.sparse_attention:SparseAttentionPass",
    "moe": "edgeprune.passes.moe:MoEExpertPruningPass",
    "fuse_attention": "edgeprune.passes.fused_attention:FusedAttentionPass",
    "fuse_norms": "edgeprune.passes.fused_attention:FusedNormsPass",
    "smooth": "edgeprune.passes.smooth:SmoothPass",
}


def _load(spec: str) -> type[EdgePass]:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def available_passes() -> dict[str, str]:
    """Pass name -> "module:Class" for every pass that can be named in a recipe."""
    found = dict(_BUILTIN)
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep.value)
    return found


def get_pass(name: str) -> type[EdgePass]:
    """The pass class registered as ``name``; BadInputError naming the known passes otherwise."""
    known = available_passes()
    if name not in known:
        raise BadInputError(
            f"unknown pass {name!r} in the recipe: known passes are {', '.join(sorted(known))}."
        )
    cls = _load(known[name])
    if not (isinstance(cls, type) and issubclass(cls, EdgePass)):
        raise BadInputError(f"pass {name!r} ({known[name]}) is not an edgeprune pass class.")
    return cls
