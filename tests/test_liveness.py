"""A shared-memory peer's liveness names its process, not its pid: the context opens a pidfd of the
peer when it connects it and a wait polls that (POLLIN: the process exited). kill(pid, 0) only
says that some process has the pid: it passes for a pid reused after the peer died, and for the
peer's own zombie, which is how these tests show the difference without racing for a pid.

The contexts are built directly: rank 0 of 2 with its segment, rank 1's segment in plain memory,
rank 1 "run" by a child process whose pid is the one given at connect time."""
from __future__ import annotations

import mmap
import os
import signal
import subprocess
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
    """Rank 0's context with an shm channel to rank 1, whose process is ``pid``."""

    def __init__(self, pid: int):
        self.ctx = lib.cm_ctx_new(0, 2, 0, 0, 0, 0)
        nbytes = lib.cm_shm_segment_bytes(2, NSLOTS, SLOT_BYTES, 0)
        self.mine, self.theirs = mmap.mmap(-1, nbytes), mmap.mmap(-1, nbytes)
        pm, pt = ffi.from_buffer(self.mine), ffi.from_buffer(self.theirs)
        lib.cm_shm_init_segment(pm, 2, NSLOTS, SLOT_BYTES, 0)
        lib.cm_shm_init_segment(pt, 2, NSLOTS, SLOT_BYTES, 0)
        assert lib.cm_ctx_set_shm(self.ctx, pm, 0, 2, NSLOTS, SLOT_BYTES, 0) == errors.OK
        assert lib.cm_ctx_add_shm_peer(self.ctx, 1, pt, 1, pid) == errors.OK

    def receive(self, timeout_s: float) -> tuple[int, int]:
        """Wait for a message from rank 1 that never comes: (code, blamed peer)."""
        dst = np.zeros(8, np.uint8)
        steps = ffi.new("cm_step[1]")
        steps[0].kind, steps[0].peer, steps[0].buf, steps[0].nbytes = 2, 1, 1, 8
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
