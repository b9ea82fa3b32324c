"""cffi builder (API mode, out of line): compiles native/*.c into the extension ``comms._native``.

Used by setup.py's ``cffi_modules`` (paths relative to the project root, as setuptools wants);
``python native/build_cffi.py`` builds it in place for hacking (absolute paths: cffi compiles
inside its temporary directory).

The core's C surface is declared in _cdefs.h. Each transport is its own C file (or a few),
registered by one line in TRANSPORTS; the set-up functions its Python side calls are declared in
its files between ``CDEF-BEGIN`` and ``CDEF-END`` comment lines, which this builder hands to cffi
(and prepends to the generated module's source, so the prototypes are seen there).
"""
import os
import re
import shutil

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CORE = ["reduce.c", "wait.c", "ctx.c", "engine.c", "plan_check.c", "flight.c", "match.c", "rows.c", "peek.c"]
TRANSPORTS = {                        # one line each: the transport's own files
    "shm": ["shm.h", "shm.c", "shm_board.c"],
    "tcp": ["tcp.c"],
    "rdma": ["rdma.h", "rdma.c", "rdma_ops.c", "rdma_fabric.c", "rdma_mr.c"],
}
CDEF = re.compile(r"/\* CDEF-BEGIN[^\n]*\n(.*?)/\* CDEF-END \*/", re.S)


def transport_cdefs() -> str:
    """The declarations between the CDEF markers of every transport's C file."""
    out = []
    for transport, files in TRANSPORTS.items():
        found = []
        for name in files:
            with open(os.path.join(HERE, name)) as f:
                found += CDEF.findall(f.read())
        if not found:
            raise RuntimeError(f"the {transport} transport's files declare no CDEF-BEGIN/CDEF-END block")
        out.extend(found)
    return "\n".join(out)


def builder(where=os.path.relpath) -> FFI:
    """The FFI builder; ``where`` turns native/'s absolute paths into the ones the compiler gets."""
    ffi = FFI()
    with open(os.path.join(HERE, "_cdefs.h")) as f:
        ffi.cdef(f.read())
    ffi.cdef(transport_cdefs())
    ffi.set_source(
        "comms._native",
        '#include "comms_native.h"\n' + transport_cdefs(),     # the transports' prototypes, as cdef'd
        sources=[where(os.path.join(HERE, s)) for s in CORE + [f for files in TRANSPORTS.values() for f in files]
                 if s.endswith(".c")],
        include_dirs=[where(HERE)],
        extra_compile_args=["-O3", "-g", "-std=gnu11", "-fno-strict-aliasing", "-Wall", "-fvisibility=hidden", "-flto=auto"],
        extra_link_args=["-flto=auto", "-O3"],
        libraries=["rt", "dl"],
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
    shutil.copy(built, target + ".tmp")
    os.replace(target + ".tmp", target)       # a new inode: running processes keep the old mapping
    print("built", os.path.relpath(target, ROOT))
