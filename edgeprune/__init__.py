"""edgeprune: compile exported ONNX models into smaller, faster, verified models for edge targets."""

__version__ = "0.1.0"
