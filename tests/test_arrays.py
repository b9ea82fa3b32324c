"""comms.runtime.arrays: a numpy array's data pointer and flags read from its memory
(cm_array_data) agree with numpy's own answers for every kind of array, so that the all_reduce
fast path runs only on arrays it may write in place (tests/test_fast_path.py runs that path)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
from hypothesis import given, settings, strategies as st

from comms.runtime import arrays, native

DTYPES = [np.float32, np.float64, np.int8, np.uint8, np.int32, np.int64, np.bool_, np.float16]


def expected(a: np.ndarray) -> int:
    return a.ctypes.data if a.flags.c_contiguous and a.flags.writeable else 0


def test_the_probe_finds_the_layout_on_this_numpy():
    assert arrays.ON, "no ndarray layout found: the fast path would take ffi.from_buffer"
    data, flags = arrays.probe()
    assert data != flags and data % 8 == 0 and flags % 4 == 0


@settings(max_examples=300, deadline=None)
@given(dtype=st.sampled_from(DTYPES), shape=st.lists(st.integers(0, 5), min_size=0, max_size=3),
       start=st.integers(0, 2), step=st.sampled_from([1, 1, 2, -1]), transpose=st.booleans(),
       read_only=st.booleans(), order=st.sampled_from("CF"))
def test_cm_array_data_agrees_with_numpy(dtype, shape, start, step, transpose, read_only, order):
    a = np.zeros(shape, dtype, order=order)
    if a.ndim:
        a = a[start::step] if step > 0 else a[::step]
    if transpose:
        a = a.T
    if read_only:
        a.flags.writeable = False
    assert native.array_data(id(a)) == expected(a)


def test_changing_an_arrays_flags_changes_the_answer():
    a = np.arange(6, dtype=np.float32)
    assert native.array_data(id(a)) == a.ctypes.data
    a.flags.writeable = False
    assert native.array_data(id(a)) == 0
    a.flags.writeable = True
    assert native.array_data(id(a)) == a.ctypes.data
    v = a.reshape(2, 3)[:, :2]                     # a view that is not contiguous
    assert native.array_data(id(v)) == 0


def test_off_answers_zero_and_on_again():
    a = np.ones(3)
    data, flags = arrays.probe()
    try:
        native.array_layout(0, 0, 0, 0)
        assert native.array_data(id(a)) == 0
    finally:
        native.array_layout(1, data, flags, arrays._need())
    assert native.array_data(id(a)) == a.ctypes.data


def test_the_knob_turns_it_off():
    code = "from comms.runtime import arrays; from comms import operations; print(arrays.ON, operations._PEEK)"
    for value, want in (("0", "False False"), ("1", "True True")):
        out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, COMMS_NUMPY_PEEK=value),
                             capture_output=True, text=True, timeout=60, check=True)
        assert out.stdout.split() == want.split()
