"""Rank functions for the control-plane tests (failure detection, revoke, shrink, grow, join)."""
from __future__ import annotations

import os
import signal
import time

import numpy as np

import comms


def _err(exc: BaseException) -> tuple:
    return (type(exc).__name__, str(exc), getattr(exc, "peer", None), list(getattr(exc, "failed", ())))


def silent_victim(rank: int, size: int, how: str) -> tuple:
    """Rank ``size - 1`` is killed (SIGKILL) or stopped (SIGSTOP) after a first collective; the
    others meanwhile block in point-to-point receives from each other (not from the victim) at
    COMMS_TIMEOUT=300. They must be released with PeerError naming the victim within seconds.
    Rank 0 then kills a stopped victim, so that the run ends."""
    comm = comms.init()
    victim = size - 1
    x = np.ones(4, np.float32)
    comm.all_reduce(x)
    if rank == victim:
        os.kill(os.getpid(), signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        time.sleep(60)
    t0 = time.monotonic()
    try:
        if rank == 0:
            comm.recv(x, 1)
        else:
            comm.recv(x, 0)
        out = ("no error",)
    except comms.CommsError as e:
        out = _err(e) + (time.monotonic() - t0,)
    try:
        comm.all_reduce(x)
        out += ("later call worked",)
    except comms.PeerError as e:
        out += (type(e).__name__,)
    if rank == 0 and how == "stop":
        os.kill(comm._boot.peers[victim].pid, signal.SIGKILL)
    comm.close()
    return out


def revoke_then_shrink(rank: int, size: int) -> tuple:
    """Rank 0 revokes while the others wait for it in an all_reduce; everyone gets Revoked, then
    shrinks (nobody failed: the same ranks) and the new communicator works."""
    comm = comms.init()
    x = np.full(4, rank + 1.0, np.float32)
    t0 = time.monotonic()
    try:
        if rank == 0:
            time.sleep(0.5)
            comm.revoke()
            comm.all_reduce(x)
        else:
            comm.all_reduce(x)
        out = ("no error",)
    except comms.CommsError as e:
        out = _err(e) + (time.monotonic() - t0,)
    new = comm.shrink()
    y = np.full(4, rank + 1.0, np.float32)
    new.all_reduce(y)
    comm.close()
    res = out + (new.rank, new.size, y.tolist())
    new.close()
    return res


def shrink_after_kill(rank: int, size: int) -> tuple:
    """Rank 1 is killed; the survivors see PeerError, shrink, and the new communicator (ranks
    renumbered in order) gives correct results on every collective tried."""
    comm = comms.init()
    x = np.ones(1024, np.float32)
    comm.all_reduce(x)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        for _ in range(3):
            comm.all_reduce(x)
        first = ("no error",)
    except comms.PeerError as e:
        first = _err(e)
    new = comm.shrink()
    y = np.full(1 << 16, float(new.rank + 1), np.float32)
    new.all_reduce(y)
    g = np.empty(new.size, np.int64)
    new.all_gather(g, np.array([comm.rank], np.int64))
    out = first + (new.rank, new.size, new.members, float(y[0]), float(y[-1]), g.tolist())
    comm.close()
    new.close()
    return out


def grow_with_joiner(rank: int, size: int) -> tuple:
    """Ranks 0 .. size-2 form a group; the last process joins it later through comms.join, and the
    grown group runs collectives with correct results."""
    if rank == size - 1:
        time.sleep(0.3)
        comm = comms.join(timeout=60)
    else:
        comm = comms.init(rank=rank, world_size=size - 1, timeout=60)
        x = np.ones(4, np.float32)
        comm.all_reduce(x)
        while comm.joiners_waiting() < 1 and rank == 0:
            time.sleep(0.01)
        comm = comm.grow(1)
    y = np.full(8, float(comm.rank + 1), np.float32)
    comm.all_reduce(y)
    out = (comm.rank, comm.size, float(y[0]))
    comm.close()
    return out


def torch_abort(rank: int, size: int) -> tuple:
    """torch.distributed on "comms": rank 0 blocks in an all_reduce that rank 1 never joins (rank 1
    blocks in a recv from rank 0 instead); a thread of rank 0 aborts the process group. Both
    waiters are released with an error within seconds, at COMMS_TIMEOUT=300."""
    import threading

    import torch
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _abort_process_group

    dist.init_process_group("comms", rank=rank, world_size=size)
    t = torch.ones(4)
    dist.all_reduce(t)
    if rank == 0:
        threading.Timer(0.5, _abort_process_group).start()
    t0 = time.monotonic()
    try:
        if rank == 0:
            dist.all_reduce(t)
        else:
            dist.recv(t, 0)
        out = ("no error",)
    except Exception as e:          # torch may wrap the backend's error
        out = (type(e).__name__, str(e)[:300], time.monotonic() - t0)
    if rank == 1:
        dist.destroy_process_group()
    return out


def unreaped_main() -> None:
    """Entry point of a rank started by a test's own supervisor (subprocess.Popen, which does not
    reap the killed rank until the end: it stays a zombie). Prints its outcome as JSON."""
    import json
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    out = silent_victim(rank, size, "kill")
    print(json.dumps(out), flush=True)
