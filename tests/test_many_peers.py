"""A context with more tcp peers than any fixed table: a wait that sleeps in poll() must watch every
peer's socket, so a message from the last peer wakes it at once (a wait over a 512-rank all_to_all
across hosts slept out every nap when its pollfd table stopped at a fixed size).

The context is built directly over socketpairs: rank 0 of N, one tcp channel per peer, the test
writing the peers' frames (cm_hdr, then the payload) into the other ends."""
from __future__ import annotations

import resource
import socket
import statistics
import threading
import time

import numpy as np
import pytest

from comms import errors
from comms._native import ffi, lib

N = 600                         # peers: past the old fixed table of 512 descriptors
CHUNK = 4096
MAGIC = 0x436F6D6D
SLEEPS = 1                      # index of the sleeps counter (cm_ctx_counters)


@pytest.fixture
def wide_ctx():
    """Rank 0 of N with a tcp channel to every other rank; yields (ctx, peer sockets by rank)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * N + 256
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(need, 4096), hard), hard))
    ctx = lib.cm_ctx_new(0, N, 0, 0, 0, 0)
    assert ctx != ffi.NULL
    ends = {}
    try:
        for p in range(1, N):
            a, b = socket.socketpair()
            a.setblocking(False)
            assert lib.cm_ctx_add_tcp_peer(ctx, p, a.detach(), CHUNK) == errors.OK   # the context owns it now
            ends[p] = b
        yield ctx, ends
    finally:
        lib.cm_ctx_free(ctx)
        for b in ends.values():
            b.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def frame(src: int, tag: int, payload: bytes) -> bytes:
    h = ffi.new("cm_hdr *")
    h.magic, h.kind, h.src, h.tag, h.nbytes = MAGIC, 2, src, tag, len(payload)
    return bytes(ffi.buffer(h)) + payload


def sleeps(ctx) -> int:
    out = ffi.new("uint64_t[8]")
    lib.cm_ctx_counters(ctx, out, 8)
    return int(out[SLEEPS])


def receive_while_asleep(ctx, sock, src: int, tag: int) -> float:
    """Post a receive from ``src``, send its message once the wait sleeps; seconds from the send to
    the wait's return."""
    dst = np.zeros(8, np.uint8)
    steps = ffi.new("cm_step[1]")
    steps[0].kind, steps[0].peer, steps[0].buf, steps[0].nbytes = 2, src, 1, 8     # RECV into OUT
    bufs = ffi.new("uintptr_t[3]", [0, dst.ctypes.data, 0])
    sig = ffi.new("cm_hdr *")
    sig.kind, sig.tag, sig.dtype = 2, tag, 5
    out = ffi.new("cm_exec **")
    assert lib.cm_exec_start(ctx, steps, 1, bufs, 3, sig, lib.cm_now_ns() + 10_000_000_000, out) == errors.OK
    sent = []

    def sender():
        before = sleeps(ctx)
        while sleeps(ctx) == before:                # the wait announced its sleep: it is in poll()
            time.sleep(0.0002)
        time.sleep(0.002)
        sent.append(time.monotonic())
        sock.sendall(frame(src, tag, bytes(range(8))))

    t = threading.Thread(target=sender)
    t.start()
    st = ffi.new("cm_status *")
    rc = lib.cm_exec_wait(ctx, out[0], -1, st)      # releases the GIL: the sender runs meanwhile
    done = time.monotonic()
    t.join()
    lib.cm_exec_free(ctx, out[0])
    assert rc == errors.OK
    assert dst.tolist() == list(range(8))
    return done - sent[0]


def test_every_peer_is_polled(wide_ctx):
    ctx, ends = wide_ctx
    # the last peers lie past any small table; one early peer as a control
    lat = [receive_while_asleep(ctx, ends[p], p, tag) for tag, p in enumerate([N - 1, N - 2, 550, N - 1, 1])]
    # a wait that does not poll the socket sleeps out its whole nap (20 ms) before it looks again
    assert statistics.median(lat) < 0.010, [f"{x * 1e3:.1f} ms" for x in lat]


def test_many_peers_all_deliver(wide_ctx):
    """A receive from every peer in one plan, all messages already in the sockets."""
    ctx, ends = wide_ctx
    dst = np.zeros((N, 8), np.uint8)
    steps = ffi.new("cm_step[]", N - 1)
    for i, p in enumerate(range(1, N)):
        steps[i].kind, steps[i].peer, steps[i].buf, steps[i].off, steps[i].nbytes = 2, p, 1, 8 * p, 8
    for p in range(1, N):
        ends[p].sendall(frame(p, 7, bytes([p % 256]) * 8))
    bufs = ffi.new("uintptr_t[3]", [0, dst.ctypes.data, 0])
    sig = ffi.new("cm_hdr *")
    sig.kind, sig.tag, sig.dtype = 2, 7, 5
    st = ffi.new("cm_status *")
    assert lib.cm_exec_run(ctx, steps, N - 1, bufs, 3, sig, lib.cm_now_ns() + 10_000_000_000, st) == errors.OK
    assert all(dst[p].tolist() == [p % 256] * 8 for p in range(1, N))
