"""numpy twins of the native reduction kernels (native/reduce.c), behind the same signatures.

Used by the in-memory plan simulator and by tests that check the C kernels bit for bit. Buffers
are numpy arrays of bytes (uint8), exactly what the native code sees.
"""
from __future__ import annotations

import numpy as np

from ..dtypes import BF16, BOOL, F16, FLOATING, NUMPY_STORAGE

# kernel op codes (ReduceOp.kernel)
SUM, PROD, MIN, MAX, BAND, BOR, BXOR = range(7)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even, NaN stays (quiet) NaN: the rule of native/reduce.c."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(nan, ((u >> 16) | 0x40).astype(np.uint16), rounded)


def _typed(buf: np.ndarray, dtype: int) -> np.ndarray:
    return buf.view(NUMPY_STORAGE[dtype])


def _widen(x: np.ndarray, dtype: int) -> np.ndarray:
    if dtype == BF16:
        return bf16_to_f32(x)
    if dtype == F16:
        return x.astype(np.float32)
    return x


def _narrow(x: np.ndarray, dtype: int) -> np.ndarray:
    if dtype == BF16:
        return f32_to_bf16(x)
    if dtype == F16:
        with np.errstate(over="ignore"):
            return x.astype(np.float16)
    return x


def _combine(a: np.ndarray, b: np.ndarray, dtype: int, op: int) -> np.ndarray:
    if dtype == BOOL:
        a, b = a.astype(bool), b.astype(bool)
        if op in (SUM, MAX, BOR):
            return a | b
        if op in (PROD, MIN, BAND):
            return a & b
        return a ^ b
    if op == SUM:
        return a + b
    if op == PROD:
        return a * b
    if op in (MIN, MAX):
        if dtype in FLOATING:   # the C rule: a NaN wins (a's first); on a tie (0 vs -0) a is kept
            pick_b = (b < a) if op == MIN else (b > a)
            return np.where(np.isnan(a), a, np.where(np.isnan(b), b, np.where(pick_b, b, a)))
        return np.minimum(a, b) if op == MIN else np.maximum(a, b)
    if op == BAND:
        return a & b
    if op == BOR:
        return a | b
    return a ^ b


def reduce(dst: np.ndarray, src: np.ndarray, count: int, dtype: int, op: int) -> None:
    """dst[:count] = dst op src, element-wise; half types computed in float32."""
    if not count:
        return
    d, s = _typed(dst, dtype)[:count], _typed(src, dtype)[:count]
    with np.errstate(all="ignore"):
        d[...] = _narrow(_combine(_widen(d, dtype), _widen(s, dtype), dtype, op), dtype)


def reduce_slots(dst: np.ndarray, base: np.ndarray, stride: int, nslots: int, count: int, dtype: int, op: int) -> None:
    """dst = slot0 op slot1 op ... in slot order, accumulating half types in float32."""
    if not count:
        return
    esize = NUMPY_STORAGE[dtype]().itemsize
    slots = [_typed(base[k * stride:k * stride + count * esize], dtype) for k in range(nslots)]
    with np.errstate(all="ignore"):
        acc = _widen(slots[0], dtype).copy()
        for s in slots[1:]:
            acc = _combine(acc, _widen(s, dtype), dtype, op)
    _typed(dst, dtype)[:count] = _narrow(acc, dtype)


def div(buf: np.ndarray, count: int, dtype: int, divisor: int) -> None:
    v = _typed(buf, dtype)[:count]
    with np.errstate(all="ignore"):
        if dtype in (F16, BF16):
            v[...] = _narrow(_widen(v, dtype) / np.float32(divisor), dtype)
        else:
            v[...] = v / v.dtype.type(divisor)
