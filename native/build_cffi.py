"""cffi builder (API mode, out of line): compiles native/*.c into the extension ``comms._native``.

Used by setup.py's ``cffi_modules`` (paths relative to the project root, as setuptools wants);
``python native/build_cffi.py`` builds it in place for hacking (absolute paths: cffi compiles
inside its temporary directory).
"""
import os
import shutil

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SOURCES = ["reduce.c", "shm.c", "tcp.c", "bell.c", "ctx.c", "engine.c", "flight.c", "match.c", "rows.c"]


def builder(where=os.path.relpath) -> FFI:
    """The FFI builder; ``where`` turns native/'s absolute paths into the ones the compiler gets."""
    ffi = FFI()
    with open(os.path.join(HERE, "_cdefs.h")) as f:
        ffi.cdef(f.read())
    ffi.set_source(
        "comms._native",
        '#include "comms_native.h"',
        sources=[where(os.path.join(HERE, s)) for s in SOURCES],
        include_dirs=[where(HERE)],
        extra_compile_args=["-O3", "-std=gnu11", "-fno-strict-aliasing", "-Wall"],
        libraries=["rt"],
    )
    return ffi


ffibuilder = builder()

if __name__ == "__main__":
    import glob
    built = builder(os.path.abspath).compile(tmpdir=os.path.join(ROOT, "build", "cffi"), verbose=False)
    # replace the installed module in place, under its own name: a second comms/_native*.so would
    # shadow (or be shadowed by) the next editable install's
    have = glob.glob(os.path.join(ROOT, "comms", "_native*.so"))
    target = have[0] if len(have) == 1 else os.path.join(ROOT, "comms", os.path.basename(built))
    for stale in have:
        if stale != target:
            os.remove(stale)
    shutil.copy(built, target)
    print("built", os.path.relpath(target, ROOT))
