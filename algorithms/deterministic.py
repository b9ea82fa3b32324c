"""Deterministic mode (COMMS_DETERMINISTIC=1): reductions whose bits do not depend on the
algorithm, the message size, the number of hosts or the timing.

Every element is reduced exactly once, by reduce_slots over all n contributions in rank order
(0, 1, ..., n-1) with float32 accumulation for half types: the same function of the same inputs
in the same order, whichever plan carried the data. So each reduction is rewritten as:

- a canonical reduce-scatter: every rank sends block b of its input straight to rank b, which
  reduces the n copies in rank order (bandwidth (n-1)/n of the buffer, like a ring's);
- then the chosen algorithm's way of spreading the reduced blocks (hierarchical: across the
  column, then inside the host; every other algorithm: a ring all-gather). Spreading copies bits,
  it never changes them.

``reduce`` sends every contribution to the root; ``reduce_scatter`` is the canonical reduce-scatter
itself. The "direct" all_reduce is already canonical and is used as is. Partial sums (trees,
recursive halving, hierarchical reduction) are never formed in this mode: they would fix a
different order of operations.
"""
from __future__ import annotations

from .hierarchical import Layout
from .plan import IN, OUT, SCRATCH, Args, Builder, NotSupported, Plan
from .ring import all_gather_pass, byte_blocks


def canonical_reduce_scatter(b: Builder, a: Args, blocks: list, src: int, dst: int, dst_offs: list) -> None:
    """Rank r gets block r (``blocks[k]`` = (offset in src, bytes)) reduced in rank order, written
    at ``dst_offs[r]`` of ``dst``. Uses SCRATCH[0 : n * stride]."""
    n, r = a.size, a.rank
    stride = max((nb for _, nb in blocks), default=0)
    b.scratch_bytes = max(b.scratch_bytes, n * stride)
    off, nb = blocks[r]
    b.copy(SCRATCH, r * stride, src, off, nb)
    for i in range(1, n):
        dst_rank, src_rank = (r + i) % n, (r - i) % n
        b.send(dst_rank, src, *blocks[dst_rank])
        b.recv(src_rank, SCRATCH, src_rank * stride, nb)
    b.phase()
    b.reduce_slots(dst, dst_offs[r], SCRATCH, 0, stride, n, nb)


def all_reduce(a: Args, algorithm: str) -> Plan:
    n, r, es = a.size, a.rank, a.esize
    b = Builder(f"{algorithm}+deterministic")
    blk = [pieces[0] for pieces in byte_blocks(a.count, n, es)]
    src = OUT if a.inplace else IN
    canonical_reduce_scatter(b, a, blk, src, OUT, [off for off, _ in blk])
    if a.avg:
        b.div(OUT, *blk[r], n)
    spread = [[x] for x in blk]
    layout = None
    if algorithm == "hierarchical":
        try:
            layout = Layout(a)
        except NotSupported:
            layout = None
    if layout is not None:
        all_gather_pass(b, layout.column, r, [spread[k] for k in layout.column], OUT, own=0)
        all_gather_pass(b, layout.local, r, [[blk[x] for x in layout.col(j)] for j in range(layout.L)], OUT, own=0)
    else:
        all_gather_pass(b, list(range(n)), r, spread, OUT, own=0)
    return b.build()


def reduce(a: Args) -> Plan:
    nb = a.count * a.esize
    b = Builder("linear+deterministic")
    if a.rank != a.root:
        b.send(a.root, IN, 0, nb)
        return b.build()
    b.scratch_bytes = a.size * nb
    b.copy(SCRATCH, a.rank * nb, IN, 0, nb)
    for p in range(a.size):
        if p != a.root:
            b.recv(p, SCRATCH, p * nb, nb)
    b.phase()
    b.reduce_slots(OUT, 0, SCRATCH, 0, nb, a.size, nb)
    if a.avg:
        b.div(OUT, 0, nb, a.size)
    return b.build()


def reduce_scatter(a: Args) -> Plan:
    nb = a.count * a.esize
    b = Builder("canonical+deterministic")
    canonical_reduce_scatter(b, a, [(k * nb, nb) for k in range(a.size)], IN, OUT, [0] * a.size)
    if a.avg:
        b.div(OUT, 0, nb, a.size)
    return b.build()


def plan(a: Args, algorithm: str) -> Plan | None:
    """The deterministic form of ``algorithm`` for a reduction, or None when the plan is already
    canonical (or the collective does not reduce)."""
    if a.coll == "all_reduce":
        return None if algorithm in ("direct", "board") else all_reduce(a, algorithm)   # rank order already
    if a.coll == "reduce":
        return reduce(a)
    if a.coll == "reduce_scatter":
        return reduce_scatter(a)
    return None
