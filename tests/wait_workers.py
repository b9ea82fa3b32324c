"""Workers for tests/test_waiting.py: how much CPU a waiting rank burns (comms.testing.spawn)."""
from __future__ import annotations

import resource
import time

import numpy as np

import comms


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def idle_wait(rank: int, size: int, async_op: bool, seconds: float = 1.0) -> dict:
    """Rank 1 sends ``seconds`` late; rank 0 waits for it, blocking in recv or (``async_op``) with
    the receive left to the progress thread while the caller sleeps. Returns rank 0's CPU seconds
    over the wait, the wait's length, and the engine's sleep counter."""
    comm = comms.init(timeout=60)
    buf = np.zeros(16, np.float32)
    comm.barrier()
    out = {}
    if rank == 0:
        st0 = comm.stats()["sleeps"]
        c0, t0 = _cpu(), time.monotonic()
        if async_op:
            work = comm.recv(buf, 1, tag=3, async_op=True)
            time.sleep(seconds + 0.2)
            work.wait()
        else:
            comm.recv(buf, 1, tag=3)
        out = {"cpu": _cpu() - c0, "wall": time.monotonic() - t0, "sleeps": comm.stats()["sleeps"] - st0,
               "got": buf.tolist() == [1.0] * 16}
    else:
        time.sleep(seconds)
        comm.send(np.ones(16, np.float32), 0, tag=3)
    comm.barrier()
    comm.close()
    return out
