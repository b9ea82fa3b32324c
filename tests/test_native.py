"""The native kernels against their numpy twins (comms.testing.reference), bit for bit, and the native
return codes against comms.errors."""
from __future__ import annotations

import os
import re

import numpy as np
from hypothesis import given, settings, strategies as st

from comms import errors
from comms.testing import reference
from comms._native import ffi, lib
from comms.dtypes import BF16, DTYPE_SIZES, F16, FLOATING, NUMPY_STORAGE, ReduceOp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ptr(a: np.ndarray):
    return ffi.cast("void *", a.__array_interface__["data"][0])


def random_bytes(rng, dtype: int, count: int, specials: bool) -> np.ndarray:
    if dtype in FLOATING:
        x = rng.standard_normal(count).astype(np.float32) * rng.choice([1e-3, 1.0, 1e3])
        if specials and count:
            x[rng.integers(0, count, max(1, count // 8))] = rng.choice([np.inf, -np.inf, np.nan, 0.0, -0.0])
        if dtype == BF16:
            return reference.f32_to_bf16(x).view(np.uint8)
        return x.astype(NUMPY_STORAGE[dtype]).view(np.uint8)
    return rng.integers(0, 256, count * DTYPE_SIZES[dtype], dtype=np.uint8)


def same(a: np.ndarray, b: np.ndarray, dtype: int) -> bool:
    """Bitwise equal, except that any NaN equals any NaN."""
    if dtype in FLOATING:
        fa = reference.bf16_to_f32(a.view(np.uint16)) if dtype == BF16 else a.view(NUMPY_STORAGE[dtype])
        fb = reference.bf16_to_f32(b.view(np.uint16)) if dtype == BF16 else b.view(NUMPY_STORAGE[dtype])
        nan = np.isnan(fa)
        if not np.array_equal(nan, np.isnan(fb)):
            return False
        return a.reshape(-1, DTYPE_SIZES[dtype])[~nan].tobytes() == b.reshape(-1, DTYPE_SIZES[dtype])[~nan].tobytes()
    if dtype == 8:   # bool: compare truth values
        return np.array_equal(a != 0, b != 0)
    return a.tobytes() == b.tobytes()


@settings(max_examples=400, deadline=None)
@given(dtype=st.integers(0, 8), op=st.sampled_from([o for o in ReduceOp if o is not ReduceOp.AVG]),
       count=st.integers(0, 300), seed=st.integers(0, 2**32 - 1), specials=st.booleans())
def test_reduce_matches_reference(dtype, op, count, seed, specials):
    if op.bitwise and dtype in FLOATING:
        assert lib.cm_reduce(ffi.NULL, ffi.NULL, 1, dtype, op.kernel) == errors.E_INVALID
        return
    rng = np.random.default_rng(seed)
    a, b = random_bytes(rng, dtype, count, specials), random_bytes(rng, dtype, count, specials)
    if dtype == 8:
        a, b = (a & 1), (b & 1)
    want = a.copy()
    reference.reduce(want, b, count, dtype, op.kernel)
    got = a.copy()
    assert lib.cm_reduce(ptr(got), ptr(b), count, dtype, op.kernel) == 0
    assert same(got, want, dtype)


@settings(max_examples=200, deadline=None)
@given(dtype=st.integers(0, 8), op=st.sampled_from([ReduceOp.SUM, ReduceOp.MIN, ReduceOp.MAX, ReduceOp.PROD]),
       nslots=st.integers(1, 6), count=st.integers(0, 1200), seed=st.integers(0, 2**32 - 1), specials=st.booleans())
def test_reduce_slots_matches_reference(dtype, op, nslots, count, seed, specials):
    rng = np.random.default_rng(seed)
    stride = count * DTYPE_SIZES[dtype] + 16
    base = np.concatenate([np.concatenate([random_bytes(rng, dtype, count, specials), np.zeros(16, np.uint8)])
                           for _ in range(nslots)])
    if dtype == 8:
        base &= 1
    want = np.zeros(count * DTYPE_SIZES[dtype], np.uint8)
    reference.reduce_slots(want, base, stride, nslots, count, dtype, op.kernel)
    got = np.zeros_like(want)
    assert lib.cm_reduce_slots(ptr(got), ptr(base), stride, nslots, count, dtype, op.kernel) == 0
    assert same(got, want, dtype)


def test_half_slots_accumulate_in_float32():
    """1 + 2^-11 + 2^-11 rounds to 1 pairwise in float16 but to 1 + 2^-10 with float32 accumulation."""
    base = np.array([1.0, 2.0 ** -11, 2.0 ** -11], np.float16)
    out = np.zeros(1, np.float16)
    assert lib.cm_reduce_slots(ptr(out), ptr(base), 2, 3, 1, F16, 0) == 0
    assert out[0] == np.float16(1.0 + 2.0 ** -10)


def test_half_kernels_match_the_reference_bit_for_bit_with_every_special():
    """Every float16 and bfloat16 bit pattern against every other class of value, through both kernels
    (8 at a time where the CPU has AVX2 and F16C, the rest one by one): NaNs, infinities, zeros,
    subnormals, and sums that round up into infinity or land half way; and a sample of them one
    element a call, which must give what 8 at a time gave. (Any NaN equals any NaN: which of two
    NaNs an x86 float op passes on follows the operand order, which C leaves to the compiler.)"""
    rng = np.random.default_rng(7)
    a16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)          # every pattern
    for dtype in (F16, BF16):
        for op in (ReduceOp.SUM, ReduceOp.PROD, ReduceOp.MIN, ReduceOp.MAX):
            for b16 in (rng.permutation(a16), a16[::-1].copy(), np.full(1 << 16, 0x7c00 if dtype == F16 else 0x7f80,
                                                                             np.uint16)):
                a, b = a16.view(np.uint8).copy(), b16.view(np.uint8)
                want = a.copy()
                reference.reduce(want, b, 1 << 16, dtype, op.kernel)
                assert lib.cm_reduce(ptr(a), ptr(b), 1 << 16, dtype, op.kernel) == 0
                assert same(a, want, dtype), (dtype, op)
                # one element a call (no 8 to take together) gives what 8 at a time gave
                for i in range(0, 1 << 16, 61):
                    one = a16[i:i + 1].copy()
                    assert lib.cm_reduce(ptr(one), ptr(b16[i:i + 1]), 1, dtype, op.kernel) == 0
                    assert same(one.view(np.uint8), a[2 * i:2 * i + 2], dtype), (dtype, op, hex(a16[i]), hex(b16[i]))
                slots = np.concatenate([a16.view(np.uint8), b16.view(np.uint8), b.copy()])
                want = np.zeros(1 << 17, np.uint8)
                reference.reduce_slots(want, slots, 1 << 17, 3, 1 << 16, dtype, op.kernel)
                got = np.zeros_like(want)
                assert lib.cm_reduce_slots(ptr(got), ptr(slots), 1 << 17, 3, 1 << 16, dtype, op.kernel) == 0
                assert same(got, want, dtype), ("slots", dtype, op)


@given(dtype=st.sampled_from([0, 1, 2, 3]), divisor=st.integers(1, 9), seed=st.integers(0, 2**32 - 1))
def test_div_matches_reference(dtype, divisor, seed):
    x = random_bytes(np.random.default_rng(seed), dtype, 50, False)
    want, got = x.copy(), x.copy()
    reference.div(want, 50, dtype, divisor)
    assert lib.cm_div(ptr(got), 50, dtype, divisor) == 0
    assert same(got, want, dtype)


def test_div_rejects_integers():
    x = np.arange(4, dtype=np.int32)
    assert lib.cm_div(ptr(x), 4, 6, 2) == errors.E_INVALID


def _reaches_the_core(source: str) -> list[str]:
    """What in ``source`` goes around comms.runtime.native's named calls: an import of
    comms._native, any binding of the wrapper's ``lib`` (``from ...native import lib``,
    ``native.lib``, ``getattr(native, "lib")``), and any C name (``cm_*``, ``CM_*``) reached as an
    attribute, whatever object it is reached on."""
    import ast
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("_native") \
                or isinstance(node, ast.Import) and any(a.name.endswith("_native") for a in node.names):
            found.append(f"line {node.lineno}: imports comms._native")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1] == "native" \
                and any(a.name == "lib" for a in node.names):
            found.append(f"line {node.lineno}: imports the wrapper's lib")
        elif isinstance(node, ast.Attribute) and (node.attr == "lib" or node.attr.lower().startswith("cm_")):
            found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "getattr" and len(node.args) > 1 \
                and isinstance(node.args[1], ast.Constant) and str(node.args[1].value) in ("lib", "_native"):
            found.append(f"line {node.lineno}: getattr(..., {node.args[1].value!r})")
    return found


def test_the_core_check_catches_each_way_around_the_wrapper():
    assert _reaches_the_core("from ..runtime import native\nnative.exec_run(1)\nx = native.OK") == []
    for bad in ("from comms._native import ffi", "import comms._native", "from ..runtime.native import ffi, lib",
                "from ..runtime import native\nnative.lib.cm_exec_run(1)", "x.cm_exec_run(1)", "y = core.CM_F32",
                "getattr(native, 'lib')"):
        assert _reaches_the_core(bad), bad


def test_only_the_native_wrapper_reaches_the_core():
    """comms.runtime.native is the one module that imports comms._native and makes its calls; every
    other module of the package reaches the core, and the codes it shares with Python, through its
    named functions and constants (parsed, so a comment or a string naming them does not count)."""
    found = []
    for d in ("comms", "transports", "algorithms"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, d)):
            for f in files:
                path = os.path.join(dirpath, f)
                if not f.endswith(".py") or path.endswith(os.path.join("comms", "runtime", "native.py")):
                    continue
                with open(path) as fh:
                    found += [f"{os.path.relpath(path, ROOT)} {w}" for w in _reaches_the_core(fh.read())]
    assert not found, f"modules going around comms.runtime.native: {found}"


def test_every_native_error_code_has_a_name_and_an_exception():
    """Every CM_E_* code the header declares maps to its own message and an exception class (one
    function, errors.error_class), read from the compiled core, not from a copy."""
    with open(os.path.join(ROOT, "native", "_cdefs.h")) as f:
        names = re.findall(r"\bCM_E_([A-Z_]+) =", f.read())
    assert len(names) >= 10
    for name in names:
        code = getattr(lib, f"CM_E_{name}")
        assert getattr(errors, f"E_{name}") == code < 0
        assert not errors.code_name(code).startswith("error "), name
        assert issubclass(errors.error_class(code), errors.CommsError)

