"""How a shared-memory peer learns that the other one is gone.

Its process exited: the liveness check names the process, not its pid: the context opens a pidfd of
the peer when it connects it and a wait polls that (POLLIN: the process exited). kill(pid, 0) only
says that some process has the pid: it passes for a pid reused after the peer died, and for the
peer's own zombie, which is how these tests show the difference without racing for a pid.

It aborted: the abort word in the peer's segment, then a wake; the peer's waker (its futex word
and its `waiting` announcement, which only its owner writes) is left as it was.

The contexts are built directly: rank 0 of 2 with its segment, rank 1's segment in plain memory,
rank 1 "run" by a child process whose pid is the one given at connect time."""
from __future__ import annotations

import mmap
import os
import signal
import struct
import subprocess
import threading
import time

import numpy as np
import pytest

from comms import errors
from comms._native import ffi, lib

NSLOTS, SLOT_BYTES = 2, 256


def fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


class ShmPair:
    """Rank ``rank``'s context with an shm channel to the other rank of two, whose process is
    ``pid``; the segments are given (shared with the other rank's ShmPair) or made here."""

    def __init__(self, pid: int, rank: int = 0, segments=None):
        self.ctx = lib.cm_ctx_new(rank, 2, 0, 0, 0, 0)
        nbytes = lib.cm_shm_segment_bytes(2, NSLOTS, SLOT_BYTES, 0)
        if segments is None:
            segments = mmap.mmap(-1, nbytes), mmap.mmap(-1, nbytes)
            for m in segments:
                lib.cm_shm_init_segment(ffi.from_buffer(m), 2, NSLOTS, SLOT_BYTES, 0)
        self.mine, self.theirs = segments
        pm, pt = ffi.from_buffer(self.mine), ffi.from_buffer(self.theirs)
        assert lib.cm_ctx_set_shm(self.ctx, pm, rank, 2, NSLOTS, SLOT_BYTES, 0) == errors.OK
        assert lib.cm_ctx_add_shm_peer(self.ctx, 1 - rank, pt, 1 - rank, pid) == errors.OK
        self.peer = 1 - rank

    def receive(self, timeout_s: float) -> tuple[int, int]:
        """Wait for a message from rank 1 that never comes: (code, blamed peer)."""
        dst = np.zeros(8, np.uint8)
        steps = ffi.new("cm_step[1]")
        steps[0].kind, steps[0].peer, steps[0].buf, steps[0].nbytes = 2, self.peer, 1, 8
        bufs = ffi.new("uintptr_t[3]", [0, dst.ctypes.data, 0])
        sig = ffi.new("cm_hdr *")
        sig.kind, sig.dtype = 2, 5
        st = ffi.new("cm_status *")
        rc = lib.cm_exec_run(self.ctx, steps, 1, bufs, 3, sig, lib.cm_now_ns() + int(timeout_s * 1e9), st)
        return rc, st.peer

    def free(self) -> None:
        lib.cm_ctx_free(self.ctx)


@pytest.fixture
def child():
    """A child process (sleep), reaped at the end whatever became of it."""
    p = subprocess.Popen(["sleep", "60"])
    yield p
    p.kill()
    p.wait()


def test_a_dead_peer_whose_pid_still_exists_is_dead(child):
    pair = ShmPair(child.pid)
    try:
        os.kill(child.pid, signal.SIGKILL)
        for _ in range(500):                      # dead, not reaped: its pid still answers kill(pid, 0)
            if state(child.pid) == "Z":
                break
            time.sleep(0.01)
        assert state(child.pid) == "Z"
        os.kill(child.pid, 0)
        t0 = time.monotonic()
        rc, peer = pair.receive(timeout_s=3.0)
        assert (rc, peer) == (errors.E_PEER_DEAD, 1)
        assert time.monotonic() - t0 < 2.0        # known at a liveness check, not at the deadline
    finally:
        pair.free()


def test_a_live_peer_is_alive_and_its_pidfd_is_closed_on_free(child):
    before = fds()
    pair = ShmPair(child.pid)
    opened = fds() - before
    links = {os.readlink(f"/proc/self/fd/{fd}") for fd in opened if os.path.exists(f"/proc/self/fd/{fd}")}
    assert "anon_inode:[pidfd]" in links          # one pidfd for the peer
    rc, _ = pair.receive(timeout_s=0.2)
    assert rc == errors.E_TIMEOUT                  # alive: the wait ends at its deadline
    pair.free()
    assert not (fds() - before)


def test_a_peer_gone_before_the_connect_is_dead():
    p = subprocess.Popen(["true"])
    p.wait()                                       # reaped: nothing has its pid now
    pair = ShmPair(p.pid)
    try:
        assert pair.receive(timeout_s=3.0) == (errors.E_PEER_DEAD, 1)
    finally:
        pair.free()


def test_no_pid_means_no_liveness_check():
    """A peer in another pid namespace is connected with pid 0: only the deadline ends a wait."""
    before = fds()
    pair = ShmPair(0)
    try:
        assert pair.receive(timeout_s=0.1)[0] == errors.E_TIMEOUT
    finally:
        pair.free()
    assert not (fds() - before)


# the waker in a segment's header (native/shm.h: cm_seg_hdr; native/comms_native.h: cm_waker)
ABORT_AT, WORD_AT, WAITING_AT = 64, 128, 192


def u32(m, at: int) -> int:
    return struct.unpack_from("<I", m, at)[0]


def test_an_abort_signals_without_touching_the_peers_waiting_word():
    pair = ShmPair(0)
    try:
        for waiting in (0, 1, 2):                  # none, asleep on the futex word, asleep in poll()
            struct.pack_into("<I", pair.theirs, WAITING_AT, waiting)
            struct.pack_into("<Q", pair.theirs, ABORT_AT, 0)
            word = u32(pair.theirs, WORD_AT)
            lib.cm_ctx_abort(pair.ctx)
            assert struct.unpack_from("<Q", pair.theirs, ABORT_AT)[0] == 1     # rank 0 + 1
            assert u32(pair.theirs, WAITING_AT) == waiting                     # the owner's to write
            assert u32(pair.theirs, WORD_AT) == word + 1                       # the wake
    finally:
        pair.free()


def test_an_abort_wakes_a_sleeping_peer():
    nbytes = lib.cm_shm_segment_bytes(2, NSLOTS, SLOT_BYTES, 0)
    segs = mmap.mmap(-1, nbytes), mmap.mmap(-1, nbytes)
    for m in segs:
        lib.cm_shm_init_segment(ffi.from_buffer(m), 2, NSLOTS, SLOT_BYTES, 0)
    a, b = ShmPair(0, 0, segs), ShmPair(0, 1, segs[::-1])
    try:
        got = []
        t = threading.Thread(target=lambda: got.append(b.receive(timeout_s=20.0)))
        t0 = time.monotonic()
        t.start()
        while u32(segs[1], WAITING_AT) == 0 and time.monotonic() - t0 < 10:   # b sleeps on its futex word
            time.sleep(0.001)
        lib.cm_ctx_abort(a.ctx)
        t.join(20)
        assert got == [(errors.E_PEER_ABORTED, 0)]
        assert time.monotonic() - t0 < 10          # woken, not at the deadline
        assert u32(segs[1], WAITING_AT) == 0       # b announced the end of its sleep itself
    finally:
        a.free()
        b.free()
