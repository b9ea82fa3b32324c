"""numpy reference results of every collective, computed from all ranks' inputs (for tests).

Floats are reduced in rank order with float32 accumulation for half types, which is what the
direct algorithm does; other algorithms may differ in the last bits and are compared with a
dtype tolerance.
"""
from __future__ import annotations

import numpy as np

from comms.testing import reference
from comms.dtypes import BF16, BOOL, DTYPE_SIZES, F16, FLOATING, NUMPY_STORAGE


def reduce_all(inputs: list[np.ndarray], dtype: int, kernel_op: int, avg: bool) -> np.ndarray:
    """Element-wise reduction of equal-length typed arrays (storage dtypes), in rank order."""
    n = len(inputs)
    count = inputs[0].size
    stacked = np.concatenate([np.ascontiguousarray(x).view(np.uint8) for x in inputs])
    out = np.empty(count * DTYPE_SIZES[dtype], np.uint8)
    reference.reduce_slots(out, stacked, count * DTYPE_SIZES[dtype], n, count, dtype, kernel_op)
    if avg:
        reference.div(out, count, dtype, n)
    return out.view(NUMPY_STORAGE[dtype])


def as_float(x: np.ndarray, dtype: int) -> np.ndarray:
    if dtype == BF16:
        return reference.bf16_to_f32(x).astype(np.float64)
    return x.astype(np.float64)


def assert_close(got: np.ndarray, want: np.ndarray, dtype: int, nranks: int, what: str) -> None:
    """Integers and bool exactly; floats within a tolerance that grows with the number of ranks."""
    if dtype not in FLOATING:
        if dtype == BOOL:
            got, want = got.astype(bool), want.astype(bool)
        np.testing.assert_array_equal(got, want, err_msg=what)
        return
    eps = {F16: 2.0 ** -10, BF16: 2.0 ** -7}[dtype] if dtype in (F16, BF16) else np.finfo(NUMPY_STORAGE[dtype]).eps
    g, w = as_float(got, dtype), as_float(want, dtype)
    np.testing.assert_allclose(g, w, rtol=4 * nranks * eps, atol=4 * nranks * eps, err_msg=what)


def random_input(rng: np.random.Generator, dtype: int, count: int, op_name: str) -> np.ndarray:
    """Values for which the reference result is exact in floats (small integers; PROD of +-1/2)."""
    storage = NUMPY_STORAGE[dtype]
    if dtype == BOOL:
        return rng.integers(0, 2, count).astype(np.bool_)
    if dtype in FLOATING:
        if op_name == "PROD":
            vals = rng.choice([-1.0, 1.0, 0.5, 2.0], count).astype(np.float32)
        else:
            vals = rng.integers(-8, 9, count).astype(np.float32)
        if dtype == BF16:
            return reference.f32_to_bf16(vals)
        return vals.astype(storage)
    info = np.iinfo(storage)
    lo, hi = (max(info.min, -3), min(info.max, 4)) if op_name == "PROD" else (info.min, info.max)
    return rng.integers(lo, hi, count, dtype=storage, endpoint=True)
