"""Layer-wise bit allocation: measure each weight's error per format, solve a budget, emit through ORT.

``bits_pass`` drives it; ``sensitivity`` and ``gptq`` give each option's error, ``knapsack``
solves the budget, ``microbench`` times formats per shape, ``emit`` writes the chosen formats
through ONNX Runtime's quantizers.
"""

from edgeprune.passes.bits.bits_pass import BitAllocationConfig, BitAllocationPass

__all__ = ["BitAllocationConfig", "BitAllocationPass"]
