"""Thin wrappers over the native row kernels (native/rows.c) used by :mod:`comms.moe`.

- :func:`sum_rows`: combine's reduction, ``out[t]`` = the rows listed for token t summed in the
  listed order, widened to float32 and rounded once (the same bits as the torch reference
  :func:`comms.moe.layout.sum_blocks_reference`).
- :func:`row_pointers`: the addresses of a tensor's rows, as :func:`sum_rows` takes them.

(The receive windows of the single-copy exchange are mapped in :mod:`comms.moe.windows`.)

Failures raise from the one exception tree (comms.runtime.native.check).
"""
from __future__ import annotations

import torch

from .. import errors
from ..runtime import native as core
from ..runtime.native import check, ffi
from ..dtypes import BF16, F16, F32, F64

_SUM_CODES = {torch.bfloat16: BF16, torch.float16: F16, torch.float32: F32, torch.float64: F64}


def sum_rows(out: torch.Tensor, pointers: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """``out`` [T, H] (bfloat16, float16, float32 or float64, contiguous) gets, for every token t,
    the float32 sum of the rows at ``pointers[i]`` (addresses of H-element rows of out's dtype)
    for which ``token[i] == t``, in increasing i; tokens without rows get zeros."""
    code = _SUM_CODES.get(out.dtype)
    if code is None:
        raise errors.InvalidUsage(f"combine: cannot sum rows of {out.dtype}; use a floating dtype")
    T, H = out.shape
    if not T:
        return out
    start = torch.zeros(T + 1, dtype=torch.int64)
    order = pointers
    if token.numel():
        torch.cumsum(torch.bincount(token, minlength=T), 0, out=start[1:])
        order = pointers.index_select(0, torch.argsort(token, stable=True)).contiguous()
    rc = core.sum_rows(ffi.cast("void *", out.data_ptr()), code, H, T,
                       ffi.cast("int64_t *", start.data_ptr()), ffi.cast("uint64_t *", order.data_ptr()))
    check(rc, "combine: summing rows")
    return out


def row_pointers(rows: torch.Tensor, first: int = 0, count: int | None = None) -> torch.Tensor:
    """Addresses (int64) of rows ``first .. first + count`` of a contiguous 2-D tensor."""
    count = rows.shape[0] - first if count is None else count
    stride = rows.shape[1] * rows.element_size()
    return torch.arange(first, first + count, dtype=torch.int64).mul_(stride).add_(rows.data_ptr())
