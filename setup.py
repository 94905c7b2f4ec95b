"""Build step for the C++ CPU kernels in runtime/kernels/ (metadata lives in pyproject.toml).

The kernel is a plain shared library that ONNX Runtime dlopens (``register_custom_ops_library``);
it is built as an optional extension, so a machine without a C++ compiler still installs and
runs the portable ONNX-function form of the op.  No ``-march=native``: the tile kernel is compiled
for AVX-512, AVX2+FMA and baseline x86-64 inside the one source (``#pragma GCC target``) and picked
at run time; ``-ffp-contract=fast`` lets the multiply-adds become FMAs where the ISA has them.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "edgeprune.runtime.kernels._sparse_attention",
            sources=["runtime/kernels/block_sparse_attention.cc"],
            depends=["runtime/kernels/ort_abi.h", "runtime/kernels/bsa_tile.inc"],
            language="c++",
            extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden", "-ffp-contract=fast"],
            extra_link_args=["-pthread"],
            optional=True,
        )
    ]
)
