"""The kernel library: found when built, registered by make_session only for models that use it."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from edgeprune.runtime import kernels, session


def test_library_is_a_loadable_custom_op_library_when_built():
    library = kernels.sparse_attention_library()
    if library is None:
        pytest.skip("the kernel was not built (no C++ compiler at install): the portable op runs")
    so = ort.SessionOptions()
    so.register_custom_ops_library(library)  # raises if RegisterCustomOps fails


def test_too_old_onnxruntime_falls_back_to_the_portable_op(monkeypatch, caplog):
    if kernels.sparse_attention_library() is None:
        pytest.skip("the kernel was not built")
    monkeypatch.setattr(session.onnxruntime, "__version__", "1.12.1")
    assert session.register_kernels(ort.SessionOptions()) is False
    assert "onnxruntime 1.12.1 is too old for the sparse-attention kernel (needs >= 1.13): running the portable op" in caplog.text


def test_missing_library_means_no_registration(monkeypatch):
    monkeypatch.setattr(kernels, "sparse_attention_library", lambda: None)
    assert session.register_kernels(ort.SessionOptions()) is False
