"""Argument checks of the public operations: every one raises InvalidUsage, naming the operation,
before any byte moves, so a bad call leaves the communicator usable.

Buffers are resolved to (address, element count, dtype code) here too: :func:`fast` is the
latency-critical form for the single-buffer collectives and p2p, :func:`comms.dtypes.resolve` the
general one (shapes, torch tensors) for the rest.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .runtime.native import ffi
from .dtypes import _NUMPY_CODES, DTYPE_NAMES, View, resolve
from .errors import InvalidUsage


def addr(arr: np.ndarray) -> Any:
    """The address of a numpy array's data, as a value the engine's buffer table takes."""
    return ffi.cast("uintptr_t", ffi.from_buffer(arr))


def fast(buf: Any, what: str, writable: bool) -> tuple:
    """(address, element count, dtype code) of ``buf``, checked like :func:`resolve` but faster
    for the common case (a C-contiguous numpy array of a known dtype)."""
    if type(buf) is np.ndarray:
        code = _NUMPY_CODES.get(buf.dtype)
        if code is not None and buf.flags.c_contiguous and (buf.flags.writeable or not writable):
            return addr(buf), buf.size, code
    v = resolve(buf, what, writable)
    return v.ptr, v.count, v.dtype


def overlap(a: View, b: View) -> bool:
    """True when two non-empty buffers share a byte."""
    return a.nbytes > 0 and b.nbytes > 0 and a.ptr < b.ptr + b.nbytes and b.ptr < a.ptr + a.nbytes


def root(r: Any, size: int, what: str) -> int:
    """``r`` as a rank of a communicator of ``size`` ranks."""
    if not isinstance(r, (int, np.integer)) or not 0 <= r < size:
        raise InvalidUsage(f"{what}: root {r!r} is not a rank of this communicator (size {size})")
    return int(r)


def peer(p: Any, rank: int, size: int, what: str) -> int:
    """``p`` as a rank other than ``rank`` (point-to-point has no self-sends)."""
    if not isinstance(p, (int, np.integer)) or not 0 <= p < size:
        raise InvalidUsage(f"{what}: peer {p!r} is not a rank of this communicator (size {size})")
    if p == rank:
        raise InvalidUsage(f"{what}: rank {rank} cannot send to or receive from itself")
    return int(p)


def same_dtype(a: View, b: View, what: str) -> None:
    """Input and output of one element type (comms does not convert)."""
    if a.dtype != b.dtype:
        raise InvalidUsage(f"{what}: input is {DTYPE_NAMES[a.dtype]} but output is {DTYPE_NAMES[b.dtype]}")


def rows(v: View, what: str) -> tuple[int, int]:
    """(rows, elements per row) of an all_to_all buffer: its first dimension is split among ranks."""
    if not v.shape:
        raise InvalidUsage(f"all_to_all: the {what} must have at least one dimension")
    n = v.shape[0]
    return n, (v.count // n if n else int(np.prod(v.shape[1:], dtype=np.int64)))


def splits(given: Sequence[int] | None, nrows: int, size: int, what: str) -> tuple:
    """All_to_all's rows per rank: ``given`` checked against the buffer's ``nrows``, or an equal
    share of them where ``given`` is None."""
    if given is None:
        if nrows % size:
            raise InvalidUsage(f"all_to_all: {nrows} rows cannot be split equally among {size} ranks; pass {what}")
        return (nrows // size,) * size
    out = tuple(int(s) for s in given)
    if len(out) != size or any(s < 0 for s in out):
        raise InvalidUsage(f"all_to_all: {what} must hold {size} non-negative row counts, got {out}")
    if sum(out) != nrows:
        raise InvalidUsage(f"all_to_all: {what} add up to {sum(out)} rows but the buffer has {nrows}")
    return out
