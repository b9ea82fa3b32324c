"""Dtypes, reduction ops, and the buffers comms accepts.

Accepted buffers: C-contiguous numpy arrays, and contiguous torch CPU tensors. :func:`resolve`
turns one into a :class:`View` (pointer, element count, dtype code) without copying; the caller
keeps the object alive while the operation runs.

Dtypes: float16, bfloat16 (torch only: numpy has none), float32, float64, int8, uint8, int32,
int64, bool. Ops: SUM, PROD, MIN, MAX, AVG (floating types), BAND, BOR, BXOR (integers and bool).
"""
from __future__ import annotations

import enum
import sys
from typing import Any, NamedTuple

import numpy as np

from .errors import InvalidUsage
from .runtime.native import DTYPES, OPS

# dtype codes, as native/_cdefs.h declares them
F16, BF16, F32, F64, I8, U8, I32, I64, BOOL = DTYPES
DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64", "int8", "uint8", "int32", "int64", "bool")
DTYPE_SIZES = (2, 2, 4, 8, 1, 1, 4, 8, 1)
FLOATING = frozenset({F16, BF16, F32, F64})

_NUMPY_CODES = {
    np.dtype(np.float16): F16, np.dtype(np.float32): F32, np.dtype(np.float64): F64,
    np.dtype(np.int8): I8, np.dtype(np.uint8): U8, np.dtype(np.int32): I32, np.dtype(np.int64): I64,
    np.dtype(np.bool_): BOOL,
}
# numpy dtype with the same bytes, for every code (bfloat16 is carried as uint16 bits)
NUMPY_STORAGE = (np.float16, np.uint16, np.float32, np.float64, np.int8, np.uint8, np.int32, np.int64, np.bool_)
_TORCH_CODES: dict[Any, int] = {}
# (torch.Tensor, torch.strided) once a torch tensor was resolved: the fast paths compare a
# buffer's type and layout with these without importing torch themselves
TORCH_FAST: list = [None, None]


class ReduceOp(enum.IntEnum):
    """Reduction ops. The value is the wire code; the native kernel op is ``kernel``."""
    SUM = OPS["SUM"]
    PROD = OPS["PROD"]
    MIN = OPS["MIN"]
    MAX = OPS["MAX"]
    BAND = OPS["BAND"]
    BOR = OPS["BOR"]
    BXOR = OPS["BXOR"]
    AVG = 0x10          # API only (above native/_cdefs.h's CM_REDOP_MASK): SUM, then divide by the ranks

    @property
    def kernel(self) -> int:
        return OPS["SUM"] if self is ReduceOp.AVG else int(self)

    @property
    def bitwise(self) -> bool:
        return self in (ReduceOp.BAND, ReduceOp.BOR, ReduceOp.BXOR)


SUM, PROD, MIN, MAX, AVG = ReduceOp.SUM, ReduceOp.PROD, ReduceOp.MIN, ReduceOp.MAX, ReduceOp.AVG
BAND, BOR, BXOR = ReduceOp.BAND, ReduceOp.BOR, ReduceOp.BXOR


def as_op(op: Any) -> ReduceOp:
    """Accept a ReduceOp, its name, or a torch.distributed.ReduceOp."""
    if isinstance(op, ReduceOp):
        return op
    if isinstance(op, str):
        try:
            return ReduceOp[op.upper()]
        except KeyError:
            raise InvalidUsage(f"unknown reduction op {op!r}") from None
    name = getattr(op, "name", None) or str(op).rsplit(".", 1)[-1]
    try:
        return ReduceOp[str(name).upper()]
    except KeyError:
        raise InvalidUsage(f"unsupported reduction op {op!r}") from None


def check_op(op: ReduceOp, dtype: int, what: str) -> None:
    if op.bitwise and dtype in FLOATING:
        raise InvalidUsage(f"{what}: {op.name} needs an integer or bool buffer, got {DTYPE_NAMES[dtype]}")
    if op is ReduceOp.AVG and dtype not in FLOATING:
        raise InvalidUsage(f"{what}: AVG needs a floating-point buffer, got {DTYPE_NAMES[dtype]}")


class View(NamedTuple):
    ptr: int
    count: int          # elements
    dtype: int          # dtype code
    nbytes: int
    shape: tuple
    writable: bool


def _torch_codes() -> dict:
    if not _TORCH_CODES:
        import torch
        _TORCH_CODES.update({
            torch.float16: F16, torch.bfloat16: BF16, torch.float32: F32, torch.float64: F64,
            torch.int8: I8, torch.uint8: U8, torch.int32: I32, torch.int64: I64, torch.bool: BOOL,
        })
        TORCH_FAST[:] = [torch.Tensor, torch.strided]
    return _TORCH_CODES


def resolve(buf: Any, what: str = "buffer", writable: bool = False) -> View:
    """A :class:`View` of ``buf``; raises InvalidUsage for anything comms cannot use in place."""
    if isinstance(buf, np.ndarray):
        code = _NUMPY_CODES.get(buf.dtype)
        if code is None:
            raise InvalidUsage(f"{what}: unsupported dtype {buf.dtype}")
        if not buf.flags.c_contiguous:
            raise InvalidUsage(f"{what}: the array is not C-contiguous")
        if writable and not buf.flags.writeable:
            raise InvalidUsage(f"{what}: the array is read-only")
        return View(buf.__array_interface__["data"][0], buf.size, code, buf.nbytes, buf.shape, buf.flags.writeable)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(buf, torch.Tensor):
        code = _torch_codes().get(buf.dtype)
        if code is None:
            raise InvalidUsage(f"{what}: unsupported dtype {buf.dtype}")
        if buf.device.type != "cpu":
            raise InvalidUsage(f"{what}: comms moves host memory; the tensor is on {buf.device}")
        if not buf.is_contiguous():
            raise InvalidUsage(f"{what}: the tensor is not contiguous")
        if buf.is_sparse or buf.is_quantized:
            raise InvalidUsage(f"{what}: sparse and quantized tensors are not supported")
        n = buf.numel()
        return View(buf.data_ptr(), n, code, n * DTYPE_SIZES[code], tuple(buf.shape), True)
    raise InvalidUsage(f"{what}: expected a numpy array or a torch CPU tensor, got {type(buf).__name__}")


def as_numpy(buf: Any) -> np.ndarray:
    """A numpy view sharing memory with ``buf`` (bfloat16 appears as its uint16 bits)."""
    if isinstance(buf, np.ndarray):
        return buf
    import torch
    if buf.dtype == torch.bfloat16:
        return buf.view(torch.int16).numpy().view(np.uint16)
    return buf.numpy()
