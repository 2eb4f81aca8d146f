"""cffi build script for vmemdev.host._native (out-of-line API mode).

setup.py names it in ``cffi_modules``; build with ``pip install -e .`` (again
after changing the C code). No ``ffi.callback`` anywhere: it needs W+X
memory, which systemd's ``MemoryDenyWriteExecute=yes`` forbids.
"""

import os
import re

from cffi import FFI

NATIVE = os.path.dirname(os.path.abspath(__file__))


def _cdef_from_header() -> str:
    # The header is the single source of truth; cdef cannot take
    # preprocessor lines, and cffi already knows the stdint types.
    with open(os.path.join(NATIVE, "vmemshim.h")) as f:
        return "".join(line for line in f if not re.match(r"\s*#", line))


ffibuilder = FFI()
ffibuilder.cdef(_cdef_from_header())
ffibuilder.set_source(
    "vmemdev.host._native",
    '#include "vmemshim.h"',
    # Relative to setup.py's directory, the cwd of every setuptools build
    # (editable, wheel, sdist); setuptools rejects absolute source paths.
    sources=["native/vmemshim.c"],
    include_dirs=["native"],
    extra_compile_args=["-O2", "-Wall"],
)
