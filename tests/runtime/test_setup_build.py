"""setup.py's in-place build replaces the kernel library by a rename: a process that has the old
library mapped keeps reading the old bytes (setuptools' own copy rewrites the file in place)."""

from __future__ import annotations

import mmap
import os
import pathlib

import pytest
import setuptools
from setuptools.dist import Distribution

SETUP = pathlib.Path(__file__).parents[2] / "setup.py"


@pytest.fixture
def build_ext_class(monkeypatch):
    """setup.py's build_ext command, read without running setup()."""
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    exec(compile(SETUP.read_text(), str(SETUP), "exec"), {"__name__": "__main__", "__file__": str(SETUP)})  # noqa: S102
    assert [e.name for e in captured["ext_modules"]] == ["edgeprune.runtime.kernels._sparse_attention"]
    return captured["cmdclass"]["build_ext"]


def _command(cls, **options):
    command = cls(Distribution({"name": "probe"}))
    for key, value in options.items():
        setattr(command, key, value)
    return command


def test_inplace_copy_renames_over_a_mapped_library(build_ext_class, tmp_path):
    old, new = b"old library " * 512, b"the new build" * 700
    built, target = tmp_path / "built.so", tmp_path / "_sparse_attention.so"
    built.write_bytes(new)
    target.write_bytes(old)
    with open(target, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as loaded:
        inode = os.stat(target).st_ino
        dest, copied = _command(build_ext_class).copy_file(str(built), str(target))
        assert loaded[:] == old  # the loaded mapping still reads the old file, untruncated
    assert (dest, copied) == (str(target), True)
    assert target.read_bytes() == new and os.stat(target).st_ino != inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_sparse_attention.so", "built.so"]  # no temporary left


def test_copy_extensions_to_source_goes_through_the_atomic_copy(build_ext_class, tmp_path, monkeypatch):
    """setuptools' --inplace step calls copy_file: the override is on its path (guards a setuptools change)."""
    calls = []
    monkeypatch.setattr(build_ext_class, "copy_file", lambda self, src, dst, **kw: calls.append((src, dst)) or (dst, True))
    command = _command(build_ext_class)
    ext = setuptools.Extension("pkg._probe", sources=[])
    ext._needs_stub = False  # set by finalize_options, which this probe skips
    command.extensions, command.build_lib = [ext], str(tmp_path / "build")
    (tmp_path / "build" / "pkg").mkdir(parents=True)
    regular = tmp_path / "build" / command.get_ext_filename("pkg._probe")
    regular.write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    command.copy_extensions_to_source()
    assert calls == [(str(regular), os.path.join("pkg", regular.name))]
