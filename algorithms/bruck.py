"""Bruck's algorithms: all_gather and all_to_all in ceil(log2 n) steps, for small messages.

all_gather: SCRATCH holds blocks in the order rank, rank+1, ...; in step k (d = 2^k) every rank
sends its first min(d, n - d) blocks to rank - d and appends what rank + d sends; a final rotation
puts the blocks in rank order.

all_to_all (equal splits): rotate so that slot i holds the block for rank + i; in step k every
rank sends the slots whose index has bit k set to rank + 2^k (packed into one message) and takes
the same slots from rank - 2^k; a final rotation (and reversal) puts the received blocks in order.
Few messages, but each byte moves up to log2(n) times: good below a few KiB per block.
"""
from __future__ import annotations

from . import algorithm
from .plan import IN, OUT, SCRATCH, Args, Builder, NotSupported, Plan


@algorithm("all_gather", "bruck", "ceil(log2 n) steps of doubling block runs, then one rotation")
def all_gather_bruck(a: Args) -> Plan:
    n, r = a.size, a.rank
    nb = a.count * a.esize
    b = Builder("bruck")
    b.scratch_bytes = n * nb
    src, src_off = (OUT, r * nb) if a.inplace else (IN, 0)
    b.copy(SCRATCH, 0, src, src_off, nb)
    d = 1
    while d < n:
        cnt = min(d, n - d)
        b.send((r - d) % n, SCRATCH, 0, cnt * nb)
        b.recv((r + d) % n, SCRATCH, d * nb, cnt * nb)
        b.phase()
        d <<= 1
    # SCRATCH[i] is the block of rank (r + i) mod n
    b.copy(OUT, r * nb, SCRATCH, 0, (n - r) * nb)
    b.copy(OUT, 0, SCRATCH, (n - r) * nb, r * nb)
    return b.build()


@algorithm("all_to_all", "bruck", "ceil(log2 n) packed exchanges at distance 2^k (equal splits, small blocks)")
def all_to_all_bruck(a: Args) -> Plan:
    n, r = a.size, a.rank
    send, recv = a.send_splits, a.recv_splits
    if len(set(send)) > 1 or len(set(recv)) > 1 or send[0] != recv[0]:
        raise NotSupported("bruck all_to_all needs equal splits")
    bs = send[0]
    b = Builder("bruck")
    half = (n + 1) // 2
    tmp, pack, got = 0, n * bs, (n + half) * bs        # SCRATCH regions
    b.scratch_bytes = (n + 2 * half) * bs
    for i in range(n):                                  # slot i: the block for rank r + i
        b.copy(SCRATCH, tmp + i * bs, IN, ((r + i) % n) * bs, bs)
    d = 1
    while d < n:
        slots = [i for i in range(n) if i & d]
        for k, i in enumerate(slots):
            b.copy(SCRATCH, pack + k * bs, SCRATCH, tmp + i * bs, bs)
        b.send((r + d) % n, SCRATCH, pack, len(slots) * bs)
        b.recv((r - d) % n, SCRATCH, got, len(slots) * bs)
        b.phase()
        for k, i in enumerate(slots):
            b.copy(SCRATCH, tmp + i * bs, SCRATCH, got + k * bs, bs)
        d <<= 1
    for i in range(n):                                  # slot i now holds the block from rank r - i
        b.copy(OUT, ((r - i) % n) * bs, SCRATCH, tmp + i * bs, bs)
    return b.build()
