"""The flight recorder read while the engine writes it: a reader on another thread (a SIGUSR1 dump
while a collective hangs, comms.diag.flight) gets whole entries, in order, even while the ring wraps
onto the very slots it copies (each slot's version, a seqlock: native/flight.c).

The ring is written at C speed by a small helper compiled here, which runs empty collectives on a
one-rank context through the core's own cm_exec_run (a Python loop could not overlap a reader's
copy), numbering them so that a torn entry shows: count and tag both carry the plan's number, and a
collective's seq and its entry's id advance together."""
from __future__ import annotations

import subprocess
import threading
import time

import cffi
import pytest

from comms import errors
from comms._native import ffi, lib

HAMMER = r"""
#include <stdint.h>
typedef int (*run_fn)(void *, const void *, int, const uintptr_t *, int, const void *, int64_t, void *);
long hammer(uintptr_t fn, void *ctx, char *sig, long off_count, long off_tag, long n, volatile int *stop) {
    run_fn run = (run_fn)fn;
    long i;
    for (i = 0; i < n && !*stop; i++) {
        *(uint64_t *)(sig + off_count) = (uint64_t)i;
        *(uint64_t *)(sig + off_tag) = (uint64_t)i;
        if (run(ctx, 0, 0, 0, 0, sig, INT64_MAX, 0) != 0) return -1 - i;
    }
    return i;
}
"""


@pytest.fixture(scope="module")
def hammer(tmp_path_factory):
    d = tmp_path_factory.mktemp("hammer")
    (d / "hammer.c").write_text(HAMMER)
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(d / "hammer.so"), str(d / "hammer.c")], check=True)
    h = cffi.FFI()
    h.cdef("long hammer(uintptr_t fn, void *ctx, char *sig, long off_count, long off_tag, long n, volatile int *stop);")
    return h, h.dlopen(str(d / "hammer.so"))


def check(entries) -> list[str]:
    """What is wrong with a copy of the ring: torn entries, or entries out of order."""
    bad = []
    last = -1
    for e in entries:
        if e.count != e.tag or e.seq != e.id + 1 or e.kind != 1 or e.state not in (1, 2):
            bad.append(f"torn: id {e.id} seq {e.seq} count {e.count} tag {e.tag} state {e.state}")
        if e.state == 2 and not (0 < e.t_start_ns <= e.t_end_ns):
            bad.append(f"torn times: id {e.id} start {e.t_start_ns} end {e.t_end_ns}")
        if e.id <= last:
            bad.append(f"out of order: id {e.id} after {last}")
        last = e.id
    return bad


@pytest.mark.parametrize("cap", [4, 64])
def test_a_wrapping_ring_reads_whole_entries(hammer, cap):
    h, hl = hammer
    ctx = lib.cm_ctx_new(0, 1, 0, 0, 0, 0)
    assert lib.cm_ctx_flight_capacity(ctx, cap) == errors.OK
    sig = ffi.new("cm_hdr *")
    sig.kind, sig.dtype = 1, 2                        # an (empty) collective on f32
    stop = h.new("int *", 0)
    done = []
    fn = int(ffi.cast("uintptr_t", ffi.addressof(lib, "cm_exec_run")))
    writer = threading.Thread(target=lambda: done.append(hl.hammer(
        fn, h.cast("void *", int(ffi.cast("uintptr_t", ctx))), h.cast("char *", int(ffi.cast("uintptr_t", sig))),
        ffi.offsetof("cm_hdr", "count"), ffi.offsetof("cm_hdr", "tag"), 1 << 40, stop)))
    buf = ffi.new("cm_fr_entry[]", cap)
    bad, reads, seen = [], 0, 0
    writer.start()
    try:
        end = time.monotonic() + 1.5
        while time.monotonic() < end and len(bad) < 5:
            n = lib.cm_ctx_flight(ctx, buf, cap)
            reads += 1
            seen += n
            bad += check(buf[i] for i in range(n))
    finally:
        stop[0] = 1
        writer.join()
        lib.cm_ctx_free(ctx)
    assert done and done[0] > 0, done
    assert not bad, f"{len(bad)} bad entries in {reads} reads: {bad[:5]}"
    assert seen > reads                               # the reads did see entries (not all left out)


def test_the_newest_entries_of_a_quiet_ring_are_all_there():
    ctx = lib.cm_ctx_new(0, 1, 0, 0, 0, 0)
    try:
        assert lib.cm_ctx_flight_capacity(ctx, 8) == errors.OK
        sig = ffi.new("cm_hdr *")
        sig.kind, sig.dtype = 1, 2
        for i in range(11):
            sig.count = sig.tag = i
            assert lib.cm_exec_run(ctx, ffi.NULL, 0, ffi.NULL, 0, sig, lib.cm_now_ns() + 10**9, ffi.NULL) == 0
        buf = ffi.new("cm_fr_entry[]", 8)
        n = lib.cm_ctx_flight(ctx, buf, 8)
        assert [buf[i].id for i in range(n)] == list(range(3, 11))
        assert [buf[i].count for i in range(n)] == list(range(3, 11))
        assert all(buf[i].state == 2 for i in range(n)) and not check(buf[i] for i in range(n))
        assert lib.cm_ctx_flight(ctx, buf, 3) == 3 and [buf[i].id for i in range(3)] == [8, 9, 10]
    finally:
        lib.cm_ctx_free(ctx)
