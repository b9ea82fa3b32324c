"""Rank functions for the rdma transport's tests (tests/test_rdma.py)."""
from __future__ import annotations

import gc
import mmap
import os
import signal
import time

import numpy as np

import comms

MiB = 1 << 20


def _mr(comm) -> dict:
    st = comm.stats()
    return {k: st[k] for k in ("rdma_registrations", "rdma_cache_hits", "rdma_one_use_registrations",
                                "rdma_forgets", "rdma_pinned")}


def _delta(a: dict, b: dict) -> dict:
    return {k.removeprefix("rdma_"): b[k] - a[k] for k in a}


def _addr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def registration_cache(rank: int, size: int) -> dict:
    """The same buffer is registered once over many calls; a buffer freed (or resized in place) is
    forgotten before its memory can be used again, and what then sits there is registered afresh."""
    comm = comms.init(timeout=60, algo="all_reduce:ring")
    n = MiB                                           # 4 MiB of float32: far above the eager size
    out = {}
    region = mmap.mmap(-1, 4 * n)                      # memory of its own mapping: freeing it unmaps it
    buf = np.frombuffer(region, np.float32)
    buf[:] = rank + 1.0
    a = _mr(comm)
    comm.all_reduce(buf)
    out["first_call"] = _delta(a, _mr(comm))
    a = _mr(comm)
    for i in range(4):
        buf[:] = rank + 1.0
        comm.all_reduce(buf)
    out["same_buffer"] = _delta(a, _mr(comm))
    out["sum_ok"] = bool((buf == size * (size + 1) / 2).all())
    out["pinned"] = _mr(comm)["rdma_pinned"]
    old = _addr(buf)
    a = _mr(comm)
    del buf                                           # its memory goes back to the kernel (munmap)...
    gc.collect()
    region.close()
    region = mmap.mmap(-1, 4 * n)                      # ...and the kernel hands the same addresses out again
    buf = np.frombuffer(region, np.float32)
    buf[:] = 2.0 * (rank + 1)
    out["same_address"] = _addr(buf) == old
    comm.all_reduce(buf)
    out["after_free"] = _delta(a, _mr(comm))
    out["after_free_ok"] = bool((buf == size * (size + 1)).all())
    del buf
    import torch
    t = torch.ones(n)
    a = _mr(comm)
    for _ in range(3):
        t.fill_(1.0)
        comm.all_reduce(t)
    out["torch"] = _delta(a, _mr(comm))
    out["torch_ok"] = bool((t == size).all())
    a = _mr(comm)
    before = t.untyped_storage().data_ptr()
    t.resize_(3 * n)                                  # the storage lives on, its memory moves
    out["moved"] = t.untyped_storage().data_ptr() != before
    t.fill_(1.0)
    comm.all_reduce(t)
    out["after_resize"] = _delta(a, _mr(comm))
    out["after_resize_ok"] = bool((t == size).all())
    a = _mr(comm)
    del t
    gc.collect()
    comm.barrier()                                    # any operation applies the forgets
    out["torch_freed"] = _delta(a, _mr(comm))
    comm.close()
    return out


def endpoints(rank: int, size: int) -> dict:
    """The endpoint init's connect returned: isend/irecv over the rdma channel, small and large."""
    comm = comms.init(timeout=60)
    peer = (rank + 1) % size
    src = (rank - 1) % size
    ep_out, ep_in = comm.endpoint(peer), comm.endpoint(src)
    small, big = np.full(5, float(rank)), np.arange(3 * MiB, dtype=np.float32) + rank
    got_small, got_big = np.zeros(5), np.zeros(3 * MiB, np.float32)
    reqs = [ep_in.irecv(got_small, tag=1), ep_in.irecv(got_big, tag=2), ep_out.isend(small, tag=1),
            ep_out.isend(big, tag=2)]
    for r in reqs:
        r.wait(30)
    st = comm.stats()
    out = {"transport": ep_out.transport.name, "small": got_small.tolist() == [float(src)] * 5,
           "big": bool(np.array_equal(got_big, np.arange(3 * MiB, dtype=np.float32) + src)),
           "rdma_bytes": st["rdma_tx_bytes"], "other_bytes": st["shm_tx_bytes"] + st["tcp_tx_bytes"]}
    comm.close()
    return out


def victim_mid_transfer(rank: int, size: int, mid: bool = True) -> tuple:
    """Rank 1 is killed with SIGKILL while its part of a 64 MiB all_reduce is on the wire (``mid``:
    the second one, or the first where a survivor is still in it), or between the two."""
    comm = comms.init(timeout=60, algo="all_reduce:ring")
    x = np.ones(16 * MiB, np.float32)
    t0 = time.monotonic()
    try:
        # a survivor may still be in this one when rank 1 dies: rank 1's last message can be out of its
        # hands (its send complete) and not yet delivered
        comm.all_reduce(x)
        if rank == 1:
            if mid:
                comm.all_reduce(x, async_op=True)
                time.sleep(0.02)
            os.kill(os.getpid(), signal.SIGKILL)
        for _ in range(3):
            comm.all_reduce(x)
        return ("no error",)
    except comms.CommsError as e:
        return (type(e).__name__, str(e), e.seq, e.peer, time.monotonic() - t0)
    finally:
        comm.close()


def open_error(rank: int, size: int) -> tuple:
    try:
        comms.init(timeout=30).close()
        return ("no error",)
    except comms.CommsError as e:
        return (type(e).__name__, str(e))


def nothing_left_open(rank: int, size: int) -> dict:
    """Communicators over rdma opened, used (eager and rendezvous, a sub-communicator) and closed
    leave no descriptor behind: endpoints, completion queues, liveness sockets, registrations."""
    def fds() -> set:
        return set(os.listdir("/proc/self/fd"))
    comm = comms.init(timeout=60)                     # the first: libfabric loads its providers once
    comm.all_reduce(np.ones(4))
    comm.close()
    gc.collect()
    before = fds()
    for _ in range(3):
        comm = comms.init(timeout=60)
        x = np.ones(2 * MiB, np.float32)
        comm.all_reduce(x)
        sub = comm.split(rank % 2)
        sub.all_reduce(x[:10])
        sub.close()
        comm.close()
        del comm, sub, x
        gc.collect()
    after = fds()
    return {"leaked": sorted(after - before), "shm": sorted(n for n in os.listdir("/dev/shm")
                                                            if n.startswith(f"comms.{os.getuid()}.{os.getpid()}."))}
