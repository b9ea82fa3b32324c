"""Mixed collectives with checksummed payloads, for bench.soak and tests/chaos.py.

Operation ``k`` of a communicator of ``size`` ranks is a deterministic function of ``k``: which
collective (all_reduce, all_gather, broadcast, reduce_scatter, all_to_all), the element type, the
block length and, for broadcast, the root. Rank ``j``'s input is :func:`payload` ``(k, j, n)``, a
function of ``k``, ``j`` and the length alone, whose values are small integers, so that every sum is
exact in float32 as in int64. Every rank can thus compute every other rank's input, hence the exact
expected result, and checks the whole output against it (:func:`run_op` returns whether it matched).
Both sides of a membership change agree on ``k`` with :func:`agree`.
"""
from __future__ import annotations

import numpy as np

OPS = ("all_reduce", "all_gather", "broadcast", "reduce_scatter", "all_to_all")
DTYPES = (np.float32, np.int64, np.float64, np.int32)
BLOCKS = (1, 3, 64, 257, 1024, 4096, 16384)        # elements per rank's block


def _mix(k: int) -> int:
    return (k * 2654435761 + 0x9E3779B9) % (1 << 32)


def shape(k: int, big: bool = True) -> tuple[str, type, int]:
    """Operation ``k``: (collective, dtype, elements per block). ``big=False`` keeps blocks to 1024."""
    h = _mix(k)
    blocks = BLOCKS if big else BLOCKS[:5]
    return OPS[h % len(OPS)], DTYPES[(h >> 8) % len(DTYPES)], blocks[(h >> 16) % len(blocks)]


def payload(k: int, rank: int, n: int, dtype) -> np.ndarray:
    """Rank ``rank``'s input to operation ``k``: ``n`` values in [-1019, 1019], distinct per rank and per k."""
    i = np.arange(n, dtype=np.int64)
    return ((i * (2 * rank + 3) + (k % 100003) * 7919 + rank * 104729) % 2039 - 1019).astype(dtype)


def _all(k: int, size: int, n: int, dtype) -> np.ndarray:
    return np.stack([payload(k, j, n, dtype) for j in range(size)])


def run_op(comm, k: int, big: bool = True) -> tuple[bool, str]:
    """Run operation ``k`` on ``comm`` and check its result: (matched, collective). A PeerError (or any
    other error of the call) propagates."""
    op, dtype, block = shape(k, big)
    size, rank = comm.size, comm.rank
    n = block * size
    mine = payload(k, rank, n, dtype)
    if op == "all_reduce":
        out = mine.copy()
        comm.all_reduce(out)
        ref = _all(k, size, n, dtype).sum(axis=0, dtype=dtype)
    elif op == "all_gather":
        out = np.empty(size * n, dtype)
        comm.all_gather(out, mine)
        ref = _all(k, size, n, dtype).reshape(-1)
    elif op == "broadcast":
        root = k % size
        out = mine.copy() if rank == root else np.zeros(n, dtype)
        comm.broadcast(out, root=root)
        ref = payload(k, root, n, dtype)
    elif op == "reduce_scatter":
        out = np.empty(block, dtype)
        comm.reduce_scatter(out, mine)
        ref = _all(k, size, n, dtype).sum(axis=0, dtype=dtype)[rank * block:(rank + 1) * block]
    else:                                            # all_to_all: block j of rank p's input goes to rank j
        out = np.empty(n, dtype)
        comm.all_to_all(out, mine)
        ref = _all(k, size, n, dtype)[:, rank * block:(rank + 1) * block].reshape(-1)
    return bool(np.array_equal(out, ref)), op


def agree(comm, k: int) -> int:
    """After a membership change: the next operation number, the same on every rank (the largest any
    rank reached; a newcomer brings 0)."""
    x = np.array([k], np.int64)
    comm.all_reduce(x, op="max")
    return int(x[0])


def vm(pid: int | str = "self") -> tuple[int, int]:
    """(VmRSS in KiB, open fds) of a process."""
    import os
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))
