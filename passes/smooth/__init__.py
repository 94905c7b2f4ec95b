"""Activation smoothing (SmoothQuant): per-channel scales moved from activations into the weights that read them.

``groups`` finds where a scale can be absorbed exactly; ``smooth_pass`` measures the activation ranges and
rescales.  It runs before ``bits``, whose dynamic int8 option it makes accurate on transformers.
"""

from edgeprune.passes.smooth.smooth_pass import SmoothConfig, SmoothPass

__all__ = ["SmoothConfig", "SmoothPass"]
