"""cffi builder (API mode, out of line): compiles native/*.c into the extension ``comms._native``.

Used by setup.py's ``cffi_modules``; ``python native/build_cffi.py`` builds it in place for hacking.
"""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ["reduce.c", "shm.c", "tcp.c", "bell.c", "engine.c", "rows.c"]

ffibuilder = FFI()
with open(os.path.join(HERE, "_cdefs.h")) as f:
    ffibuilder.cdef(f.read())

ffibuilder.set_source(
    "comms._native",
    '#include "comms_native.h"',
    sources=[os.path.relpath(os.path.join(HERE, s)) for s in SOURCES],
    include_dirs=[os.path.relpath(HERE)],
    extra_compile_args=["-O3", "-std=gnu11", "-fno-strict-aliasing", "-Wall"],
    libraries=["rt"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=os.path.join(HERE, "..", "build", "cffi"), verbose=False)
