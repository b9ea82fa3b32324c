"""Rank functions of tests/test_board.py: all_reduce through the shm transport's board."""
from __future__ import annotations

import time

import numpy as np

import comms


def mixed_kinds(rank: int, size: int, how: str) -> dict:
    """Rank 0 runs a board all_reduce while the others run another collective at the same sequence
    number (``broadcast``: a broadcast from rank 0; ``count``: a board all_reduce of another
    count; ``ring``: an all_reduce too large for the board). Every rank must raise, long before
    the deadline."""
    with comms.init(timeout=20) as comm:
        for _ in range(3):
            comm.all_reduce(np.ones(2, np.float32))
        t0 = time.monotonic()
        try:
            if rank == 0:
                comm.all_reduce(np.ones(2, np.float32))
            elif how == "broadcast":
                comm.broadcast(np.ones(2, np.float32), root=0)
            elif how == "count":
                comm.all_reduce(np.ones(3, np.float32))
            else:
                comm.all_reduce(np.ones(1 << 16, np.float32))
            return {"error": None}
        except comms.CommsError as e:
            return {"error": type(e).__name__, "op": e.op, "seq": e.seq, "elapsed": time.monotonic() - t0,
                    "text": str(e)}


def interleaved(rank: int, size: int, rounds: int) -> dict:
    """Board all_reduces mixed with collectives that run on messages (so a board slot is reused
    after other kinds of collective), synchronous and asynchronous, every result checked."""
    rng = np.random.default_rng(5)                 # the same choices on every rank
    ran = set()
    with comms.init(timeout=30) as comm:
        for i in range(rounds):
            kind = rng.integers(6)
            n = int(rng.integers(1, 64))
            if kind == 0:
                x = np.full(n, rank + i, np.float64)
                comm.all_reduce(x)
                assert (x == sum(r + i for r in range(size))).all()
            elif kind == 1:
                x = np.full(n, rank + 1, np.float32)
                w = comm.all_reduce(x, async_op=True)
                w.wait()
                assert (x == size * (size + 1) // 2).all()
            elif kind == 2:
                x = np.full(1 << 14, rank, np.int64)       # 128 KiB: messages, not the board
                comm.all_reduce(x, comms.MAX)
                assert (x == size - 1).all()
            elif kind == 3:
                x = np.full(n, rank, np.int32)
                comm.broadcast(x, root=i % size)
                assert (x == i % size).all()
            elif kind == 4:
                comm.barrier()
            else:
                x, y = np.full(n, rank, np.int32), np.full(n, rank, np.int32)
                w = comm.all_reduce(x, async_op=True)       # two in flight, then a synchronous one
                v = comm.all_reduce(y, comms.MAX, async_op=True)
                z = np.full(n, 1, np.int8)
                comm.all_reduce(z)
                w.wait()
                v.wait()
                assert (x == sum(range(size))).all() and (y == size - 1).all() and (z == size).all()
            ran.add(comm.algorithm_ran("all_reduce", n * 8) or "")
        return {"board": "board" in ran, "stats": comm.stats()}


def same_bits_as_direct(rank: int, size: int) -> dict:
    """Board and direct reduce in rank order with the same kernel: the same bits, for arbitrary floats."""
    import torch
    out = {}
    with comms.init(timeout=30) as comm:
        for name, make in (("float32", lambda g: torch.randn(300, generator=g)),
                           ("float16", lambda g: torch.randn(300, generator=g).half()),
                           ("bfloat16", lambda g: torch.randn(300, generator=g).bfloat16())):
            got = []
            for algo in ("board", "direct"):
                comm.set_algo(f"all_reduce:{algo}")
                t = make(torch.Generator().manual_seed(rank))
                comm.all_reduce(t, comms.AVG)
                got.append((comm.algorithm_ran("all_reduce", t.numel() * t.element_size()), t.view(torch.uint8).numpy().tobytes()))
            out[name] = [g[0] for g in got] + [got[0][1] == got[1][1], got[0][1].hex()]
    return out


def across_a_sequence_reset(rank: int, size: int) -> dict:
    """Calibration numbers its probes, then sets the sequence back to 0 on every rank (the user's
    first collective is 1). Board all_reduces before and after the reset, at both slots' parities
    and with other collectives between, must all complete with the right sums."""
    sums = []
    with comms.init(timeout=20) as comm:
        for k in range(20):                                 # numbers 1..20 on the board
            x = np.full(3, rank + k, np.float32)
            comm.all_reduce(x)
            sums.append(float(x[0]))
        comm.barrier()
        comm._engine.seq = 0                                # what calibration does
        for k, kind in enumerate("abbaaba"):                # a: board all_reduce, b: broadcast
            if kind == "b":
                comm.broadcast(np.zeros(4, np.int32), root=0)
                continue
            x = np.full(3, rank * 10 + k, np.float32)
            comm.all_reduce(x)
            sums.append(float(x[0]))
        return {"sums": sums, "seq": comm._engine.seq}
