"""edgeprune: compile exported ONNX models into smaller, faster, verified models for edge targets.

The Python API mirrors the CLI: ``compile``, ``validate``, ``profile``, ``inspect``.
"""

from __future__ import annotations

__version__ = "0.1.0"


def compile(model, out, *, progress=None, **options):  # noqa: A001 - mirrors the CLI verb
    """Compile ``model`` into folder ``out``; options are ``pipeline.CompileOptions`` fields."""
    from edgeprune.pipeline import CompileOptions, compile_model

    return compile_model(model, out, CompileOptions(**options), progress=progress)


def validate(reference, candidate, **options):
    """Fidelity, latency, size and memory of ``candidate`` against ``reference``."""
    from edgeprune.validation import validate_models

    return validate_models(reference, candidate, **options)


def profile(model, feeds, target="cpu", **options):
    """Per-op-type and per-node time of ``model`` on ``feeds`` from ONNX Runtime's profiler."""
    from edgeprune.runtime.profiler import profile_model

    return profile_model(model, feeds, target, **options)


def inspect(model):
    """Interface, weights by op type and structures of the model at path ``model``."""
    from edgeprune.inspection import inspect_model

    return inspect_model(model)
