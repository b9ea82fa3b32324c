"""Rank functions for the failure tests (misuse, mismatches, timeouts, dead peers, strangers)."""
from __future__ import annotations

import os
import signal
import socket
import time
from datetime import timedelta

import numpy as np

import comms


def _err(exc: BaseException) -> tuple:
    return (type(exc).__name__, str(exc), getattr(exc, "seq", None), getattr(exc, "peer", None))


def bad_arguments(rank: int, size: int) -> list:
    """Each misuse raises InvalidUsage at once, and the communicator keeps working."""
    comm = comms.init(timeout=30)
    caught = []
    x = np.ones(8, np.float32)
    cases = [
        lambda: comm.broadcast(x, root=size),
        lambda: comm.reduce(x, root=-1),
        lambda: comm.all_reduce(np.ones((4, 4), np.float32)[:, 1]),
        lambda: comm.all_reduce(x, op=comms.BAND),
        lambda: comm.all_reduce(np.ones(3, np.int32), op=comms.AVG),
        lambda: comm.all_gather(np.ones(8 * size + 1, np.float32), x),
        lambda: comm.all_gather(np.ones(8 * size, np.float64), x),
        lambda: comm.reduce_scatter(np.ones(3, np.float32), x),
        lambda: comm.all_to_all(np.ones(8, np.float32), x, in_splits=[1] * size),
        lambda: comm.all_to_all(np.ones(8 * size, np.float32), np.ones(8 * size, np.float32).reshape(-1)[::1],
                                in_splits=[9] * size),
        lambda: comm.send(x, rank),
        lambda: comm.send(x, size + 3),
        lambda: comm.recv(x, (rank + 1) % size, tag=-1),
        lambda: comm.all_reduce([1.0, 2.0]),
        lambda: comm.all_reduce(np.ones(3, np.complex64)),
        lambda: comm.all_reduce(np.ones(3, np.float32)[::2]),
    ]
    for case in cases:
        try:
            case()
            caught.append(None)
        except comms.InvalidUsage as e:
            caught.append(type(e).__name__)
    ro = np.ones(4, np.float32)
    ro.flags.writeable = False
    try:
        comm.all_reduce(ro)
        caught.append(None)
    except comms.InvalidUsage as e:
        caught.append(type(e).__name__)
    y = np.full(5, rank + 1.0)
    comm.all_reduce(y)                      # still usable
    comm.close()
    return [caught, y.tolist()]


def mismatched_count(rank: int, size: int) -> tuple:
    comm = comms.init(timeout=20)
    comm.barrier()
    x = np.ones(10 + 10 * (rank == 1), np.float32)
    try:
        comm.all_reduce(x)
        comm.all_reduce(np.ones(4, np.float32))    # a rank whose part completed learns at its next call
        return ("no error",)
    except comms.CommsError as e:
        return _err(e)
    finally:
        comm.close()


def mismatched_op(rank: int, size: int) -> tuple:
    comm = comms.init(timeout=20)
    try:
        if rank == 0:
            comm.broadcast(np.ones(6, np.int64), root=0)
        else:
            comm.all_reduce(np.ones(6, np.int64))
        comm.barrier()
        return ("no error",)
    except comms.CommsError as e:
        return _err(e)
    finally:
        comm.close()


def mismatch_among_four(rank: int, size: int, transport: str) -> tuple:
    """Rank 3 calls all_gather where the others broadcast: rank 3 waits for rank 0, which sends it
    nothing; the broadcast reaches rank 3 from another rank, whose message no receive of rank 3
    wants. Every rank must fail with the mismatch, long before the 60 s deadline. The barrier before
    is inside the try: a rank descheduled in it (4 ranks, 2 cores) may find the abort of a rank that
    already saw the mismatch before it reads its last barrier message, and fails there, naming it."""
    comm = comms.init(timeout=60)
    t0 = time.monotonic()
    try:
        comm.barrier()
        if rank == 3:
            comm.all_gather(np.zeros((size, 6), np.float32), np.ones(6, np.float32))
        else:
            comm.broadcast(np.ones(6, np.float32), root=0)
        comm.barrier()
        return ("no error", "", None, None, time.monotonic() - t0)
    except comms.CommsError as e:
        return (*_err(e), time.monotonic() - t0)
    finally:
        # every rank stays until all have their error: the one that found the mismatch exiting
        # at once would make the others' error a race between its abort and its exit notice
        # (either names it; this test asks for the mismatch, so it keeps the exit out of it)
        comm._store.set(f"test/mismatch_among_four/{rank}", b"1")
        comm._store.wait([f"test/mismatch_among_four/{r}" for r in range(size)], timedelta(seconds=30))
        comm.close()


def skipped_collective(rank: int, size: int) -> tuple:
    """Rank 2 skips one all_reduce and stays away past the deadline: every other rank times out
    (or hears of a timeout) naming the operation and sequence number; rank 2 fails when it returns."""
    comm = comms.init(timeout=3)
    t0 = time.monotonic()
    try:
        comm.all_reduce(np.ones(4, np.float32))
        if rank != 2:
            comm.all_reduce(np.ones(4, np.float32))
        else:
            time.sleep(5)
        comm.barrier()
        return ("no error", time.monotonic() - t0)
    except comms.CommsError as e:
        return _err(e) + (time.monotonic() - t0,)
    finally:
        comm.close()


def victim(rank: int, size: int, big: bool) -> tuple:
    """Rank 1 is killed with SIGKILL in the middle of a collective; the survivors must fail fast."""
    comm = comms.init(timeout=60)
    n = (8 << 20) if big else 4
    x = np.ones(n, np.float32)
    comm.all_reduce(x)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    t0 = time.monotonic()
    try:
        for _ in range(3):
            comm.all_reduce(x)
        return ("no error",)
    except comms.CommsError as e:
        return _err(e) + (time.monotonic() - t0,)
    finally:
        comm.close()


def stranger(rank: int, size: int) -> list:
    """A stranger connects to every tcp listener during init; init still succeeds and works."""
    import comms.transports.tcp as tcp
    orig = tcp.TcpTransport.listen

    def listen_and_poke(self):
        addr = orig(self)
        host, port = self.mesh.listener.getsockname()[:2]
        s = socket.create_connection((host, port))
        s.sendall(b"GET / HTTP/1.0\r\n\r\n" + b"x" * 64)
        self._stranger = s
        return addr

    tcp.TcpTransport.listen = listen_and_poke
    comm = comms.init(timeout=20)
    x = np.full(3, rank + 1.0)
    comm.all_reduce(x)
    comm.close()
    return x.tolist()


def async_ops(rank: int, size: int) -> list:
    comm = comms.init(timeout=30)
    peer = 1 - rank
    big = np.full(4 << 20, rank + 1.0, np.float32)          # larger than any transport buffer
    got = np.zeros_like(big)
    s = comm.send(big, peer, tag=7, async_op=True)
    r = comm.recv(got, peer, tag=7, async_op=True)
    r.wait(timeout=30)
    s.wait(timeout=30)
    out = [bool((got == peer + 1.0).all()), s.is_completed(), s.exception() is None]
    works = [comm.all_reduce(np.full(1000, float(i + rank)), async_op=True) for i in range(5)]
    res = [w.result()[0] for w in works]
    out.append(res)
    pending = comm.recv(np.zeros(4), peer, tag=99, async_op=True)   # never sent: times out on wait
    try:
        pending.wait(timeout=0.3)
        out.append("no timeout")
    except comms.CommTimeout:
        out.append("CommTimeout")
    comm.barrier()                            # nobody sends before both have seen the timeout
    comm.send(np.zeros(4), peer, tag=99)
    pending.wait()
    out.append(pending.is_completed())
    # tags are matched out of order
    a, b = np.zeros(3), np.zeros(3)
    if rank == 0:
        comm.send(np.full(3, 1.0), 1, tag=1)
        comm.send(np.full(3, 2.0), 1, tag=2)
    else:
        comm.recv(b, 0, tag=2)
        comm.recv(a, 0, tag=1)
    out.append([a.tolist(), b.tolist()])
    # receive from any source, sync and async; the source is reported
    c = np.zeros(2)
    if rank == 0:
        comm.send(np.full(2, 5.0), 1, tag=11)
        comm.send(np.full(2, 6.0), 1, tag=12)
    else:
        w = comm.recv(c, None, tag=12, async_op=True)
        src = comm.recv(a[:2], None, tag=11)
        w.wait()
        out.append([src, w.source, a[:2].tolist(), c.tolist()])
    comm.barrier()
    # a per-operation timeout overrides the communicator's (30 s) deadline
    t0 = time.monotonic()
    if rank == 1:
        try:
            comm.recv(np.zeros(1), peer, tag=1234, timeout=0.5)
            out.append("no timeout")
        except comms.CommTimeout as e:
            out.append(["0.5 s" in str(e), time.monotonic() - t0 < 5])
    else:
        time.sleep(1.5)
    comm.close()
    return out


def split_groups(rank: int, size: int) -> list:
    comm = comms.init(timeout=30)
    sub = comm.split(rank % 2, key=-rank)
    x = np.array([float(rank)])
    sub.all_reduce(x)
    none = comm.split(None if rank == 0 else 1)
    res = [sub.rank, sub.size, sub.members, x.tolist(), none is None]
    if none is not None:
        y = np.ones(2)
        none.all_reduce(y)
        res.append(y.tolist())
        none.close()
    sub.close()
    comm.close()
    return res


def app_abort(rank: int, size: int) -> tuple:
    comm = comms.init(timeout=20)
    try:
        # inside the try: rank 0 may finish this first all_reduce and abort while a peer still
        # completes its own part of it, and that peer then gets the abort here
        comm.all_reduce(np.ones(2))
        if rank == 0:
            comm.abort("the scheduler preempted this job")
        comm.all_reduce(np.ones(2))
        return ("no error",)
    except comms.CommsError as e:
        return _err(e)
    finally:
        comm.close()
