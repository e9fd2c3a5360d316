"""cffi builder for ``pyvmm._native``: the C parts of pyvmm, compiled at install time."""

from __future__ import annotations

import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent

ffibuilder = FFI()
ffibuilder.cdef((HERE / "native.h").read_text())
ffibuilder.set_source(
    "pyvmm._native",
    '#include "native.h"',
    sources=[str(p.relative_to(HERE.parent.parent)) for p in sorted(HERE.glob("*.c"))],
    include_dirs=[str(HERE.relative_to(HERE.parent.parent))],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall"],
    libraries=["zstd"],  # compressed page records (compress.c); Debian: libzstd-dev
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
