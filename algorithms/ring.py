"""Ring algorithms: all_reduce (reduce-scatter then all-gather), all_gather, reduce_scatter.

Vocabulary (as gloo's ring): the buffer is cut into one block per rank; in each of the size - 1
steps of a pass, every rank sends one block to its right neighbour and receives one from its left.
Each step's message streams through the transport in chunks (shm slots, tcp chunk buffers), and
the receiver reduces each chunk as it lands, so transfer and reduction overlap: the ring is
pipelined within every step. Every block is reduced along the ring in one fixed order and then
copied around, so all ranks end with the same bits.
"""
from __future__ import annotations

from . import algorithm
from .patterns import blocks, ring_next, ring_prev
from .plan import IN, OUT, SCRATCH, Args, Builder, NotSupported, Plan


def _byte_blocks(count: int, size: int, esize: int) -> list[tuple[int, int]]:
    return [(start * esize, n * esize) for start, n in blocks(count, size)]


@algorithm("all_reduce", "ring", "ring reduce-scatter then ring all-gather: 2(n-1) steps, bandwidth-optimal")
def all_reduce_ring(a: Args) -> Plan:
    n, r, es = a.size, a.rank, a.esize
    b = Builder("ring")
    if not a.inplace:
        b.copy(OUT, 0, IN, 0, a.count * es)
    if n == 1:
        return b.build()
    if a.count < n:
        raise NotSupported(f"ring all_reduce needs at least one element per rank ({a.count} < {n})")
    blk = _byte_blocks(a.count, n, es)
    right, left = ring_next(r, n), ring_prev(r, n)
    for s in range(n - 1):                       # reduce-scatter pass
        b.send(right, OUT, *blk[(r - s) % n])
        b.recv_reduce(left, OUT, *blk[(r - s - 1) % n])
        b.phase()
    if a.avg:
        b.div(OUT, *blk[(r + 1) % n], n)
    for s in range(n - 1):                       # all-gather pass
        b.send(right, OUT, *blk[(r + 1 - s) % n])
        b.recv(left, OUT, *blk[(r - s) % n])
        b.phase()
    return b.build()


@algorithm("all_gather", "ring", "ring all-gather: n-1 steps, each forwarding the block received last")
def all_gather_ring(a: Args) -> Plan:
    n, r = a.size, a.rank
    nb = a.count * a.esize
    b = Builder("ring")
    if not a.inplace:
        b.copy(OUT, r * nb, IN, 0, nb)
    right, left = ring_next(r, n), ring_prev(r, n)
    for s in range(n - 1):
        b.send(right, OUT, ((r - s) % n) * nb, nb)
        b.recv(left, OUT, ((r - s - 1) % n) * nb, nb)
        b.phase()
    return b.build()


@algorithm("reduce_scatter", "ring", "ring reduce-scatter over a scratch copy of the input: n-1 steps")
def reduce_scatter_ring(a: Args) -> Plan:
    n, r = a.size, a.rank
    nb = a.count * a.esize
    b = Builder("ring")
    if n == 1:
        b.copy(OUT, 0, IN, 0, nb)
        return b.build()
    b.scratch_bytes = n * nb
    b.copy(SCRATCH, 0, IN, 0, n * nb)
    right, left = ring_next(r, n), ring_prev(r, n)
    for s in range(n - 1):
        b.send(right, SCRATCH, ((r - s - 1) % n) * nb, nb)
        b.recv_reduce(left, SCRATCH, ((r - s - 2) % n) * nb, nb)
        b.phase()
    b.copy(OUT, 0, SCRATCH, r * nb, nb)
    if a.avg:
        b.div(OUT, 0, nb, n)
    return b.build()
