"""Build step for the C++ CPU kernels in runtime/kernels/ (metadata lives in pyproject.toml).

The kernel is a plain shared library that ONNX Runtime dlopens (``register_custom_ops_library``);
it is built as an optional extension, so a machine without a C++ compiler still installs and
runs the portable ONNX-function form of the op.  No ``-march=native``: the hot loop carries its
own AVX-512/AVX2 clones, chosen at load time.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "edgeprune.runtime.kernels._sparse_attention",
            sources=["runtime/kernels/block_sparse_attention.cc"],
            depends=["runtime/kernels/ort_abi.h"],
            language="c++",
            extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden"],
            extra_link_args=["-pthread"],
            optional=True,
        )
    ]
)
