"""Layer-wise bit allocation: measure each weight's error per format, solve a budget, emit through ORT.

``bits_pass`` drives it over ``config`` (options), ``units`` (what gets a format), ``measure``
(errors and importance; ``sensitivity`` and ``gptq`` simulate the formats), ``solve`` (the budget
as a ``knapsack``), ``latency`` (``microbench`` timings and the measured check) and ``emit``
(ONNX Runtime's quantizers).
"""

from edgeprune.passes.bits.bits_pass import BitAllocationConfig, BitAllocationPass

__all__ = ["BitAllocationConfig", "BitAllocationPass"]
