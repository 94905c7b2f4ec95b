"""Build step for the C++ CPU kernels in runtime/kernels/ (metadata lives in pyproject.toml).

The kernel is a plain shared library that ONNX Runtime dlopens (``register_custom_ops_library``);
it is built as an optional extension, so a machine without a C++ compiler still installs and
runs the portable ONNX-function form of the op.  No ``-march=native``: the tile kernel is compiled
for AVX-512, AVX2+FMA and baseline x86-64 inside the one source (``#pragma GCC target``) and picked
at run time; ``-ffp-contract=fast`` lets the multiply-adds become FMAs where the ISA has them.

``build_ext --inplace`` (and an editable install) copies the built library into runtime/kernels/
under a temporary name and renames it over the old one: setuptools' own copy truncates and
rewrites the file in place, which crashes every process that has the old library loaded.
"""

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class AtomicBuildExt(build_ext):
    """build_ext whose in-place copy replaces the library by a rename, never by rewriting it."""

    def copy_file(self, infile, outfile, *args, **kwargs):
        """Copy beside ``outfile`` under a hidden temporary name, then ``os.replace`` it over ``outfile``.

        A process that mapped the old library keeps its inode; new loads get the new file.
        """
        directory, name = os.path.split(os.fspath(outfile))
        tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp")  # hidden: the kernel finder globs _sparse_attention*.so
        try:
            _, copied = super().copy_file(infile, tmp, *args, **kwargs)
            if os.path.exists(tmp):  # a copy was made (not a dry run)
                os.replace(tmp, outfile)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return outfile, copied


setup(
    cmdclass={"build_ext": AtomicBuildExt},
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
    ],
)
