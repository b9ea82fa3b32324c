"""Ring algorithms: all_reduce (reduce-scatter then all-gather), all_gather, reduce_scatter, and
the pipelined chain broadcast; plus the ring passes that hierarchical algorithms reuse.

Vocabulary (as gloo's ring): the data is cut into one block per ring member; in each of the n - 1
steps of a pass, every member sends one block to its right neighbour and receives one from its
left. A block may be several byte ranges ("pieces"), which lets hierarchical algorithms run a ring
over strided data. Each step's messages stream through the transport in chunks and the receiver
reduces each chunk as it lands, so transfer and reduction overlap: the ring is pipelined within
every step. Every block is reduced along the ring in one fixed order and then copied around, so
all ranks end with the same bits.

The ring all_reduce goes further (as NCCL's ring does): it runs in rounds of small blocks with no
PHASE at all, each send of a block it reduced or received gated on that receive, so a chunk
travels on as soon as it lands, and a large buffer is read from memory once instead of once per
pass.
"""
from __future__ import annotations

from . import algorithm
from .patterns import blocks, segments
from .plan import IN, OUT, SCRATCH, Args, Builder, NotSupported, Plan

Pieces = list  # [(byte offset, bytes), ...]


def byte_blocks(count: int, parts: int, esize: int, base: int = 0) -> list[Pieces]:
    """``count`` elements cut into ``parts`` contiguous blocks, each as a one-piece list."""
    return [[(base + start * esize, n * esize)] for start, n in blocks(count, parts)]


def reduce_scatter_pass(b: Builder, group: list, me: int, blks: list[Pieces], buf: int, own: int) -> None:
    """Ring reduce-scatter over ``group`` (ranks in ring order) after which member i holds the
    reduction of block (i + own) mod n."""
    n = len(group)
    if n == 1:
        return
    i = group.index(me)
    right, left = group[(i + 1) % n], group[(i - 1) % n]
    for s in range(n - 1):
        b.send_pieces(right, buf, blks[(i + own - 1 - s) % n])
        b.recv_pieces(left, buf, blks[(i + own - 2 - s) % n], reduce=True)
        b.phase()


def all_gather_pass(b: Builder, group: list, me: int, blks: list[Pieces], buf: int, own: int) -> None:
    """Ring all-gather over ``group`` where member i starts with block (i + own) mod n."""
    n = len(group)
    if n == 1:
        return
    i = group.index(me)
    right, left = group[(i + 1) % n], group[(i - 1) % n]
    for s in range(n - 1):
        b.send_pieces(right, buf, blks[(i + own - s) % n])
        b.recv_pieces(left, buf, blks[(i + own - s - 1) % n])
        b.phase()


# The bytes of one rank's block in one round of the pipelined ring all_reduce: a block is forwarded
# while it is still in cache, instead of being read back from memory a pass later. 64 MiB float32
# SUM at 2 ranks over shm (bench, 3 launches each, the project's 2-vCPU Xeon VM): the phased passes
# 15.4 ms; blocks of 2 MiB 15.5, 512 KiB 14.8, 128 KiB 13.0-13.1, 64 KiB 12.4, 32 KiB 13.0 ms. At
# 512 KiB to 8 MiB (in cache either way) 64 KiB blocks are level with the phased passes.
RING_BLOCK_BYTES = 64 << 10
# At most this many rounds (blocks grow past RING_BLOCK_BYTES beyond 2 x 4096 x 64 KiB = 512 MiB at
# 2 ranks): a round is 4(n-1) steps, and building and encoding a plan costs about 4.6 us a step
# (1 GiB at 2 ranks in 64 KiB blocks: 32768 steps, 0.15 s, once per size).
RING_MAX_ROUNDS = 4096
# Rounds only where the host's buffers (the buffer times the ranks on this host) reach this many
# bytes: in cache, the phased passes' few large messages cost less than the rounds' many small ones
# and the waits between them. 2 ranks as above, forced ring, 2 launches of 3 each, phased against
# 64 KiB rounds: 4 MiB 619-642 against 626-666 us, 8 MiB 1355-1358 against 1498-1738 us; 16 MiB
# 3691-3783 against 3132-3351 us, 32 MiB 7770-7822 against 6494-6702 us. In bench.regret's
# interleaved rounds, though, 16 MiB in rounds took 3.85-4.72 ms against rhd's phased 3.59-3.88,
# so 16 MiB at 2 ranks stays phased; 32 MiB there: 7.66 against 7.58 ms, 64 MiB 15.9 against 15.5.
RING_PIPELINE_BYTES = 64 << 20


def _pipelined_round(b: Builder, n: int, r: int, blk: list) -> None:
    """One round of the ring all_reduce over the byte ranges ``blk`` (one (offset, bytes) per
    member) with no PHASE: each block a rank reduced (or received) goes on to its right neighbour
    by a send gated on that receive, so it leaves as it lands. Member r ends reduce-scatter owning
    block r + 1. Safe without phases: the bytes of a block this rank sent come back to it (in the
    all-gather) only after its right neighbour took them in, and sends read them in order."""
    right, left = (r + 1) % n, (r - 1) % n
    got = {}                     # block -> the index of its latest receive
    for s in range(n - 1):       # reduce-scatter
        k = (r - s) % n
        b.send(right, OUT, *blk[k], gate=got.get(k))
        got[(r - 1 - s) % n] = b.recv_reduce(left, OUT, *blk[(r - 1 - s) % n])
    for s in range(n - 1):       # all-gather
        k = (r + 1 - s) % n
        b.send(right, OUT, *blk[k], gate=got[k])
        got[(r - s) % n] = b.recv(left, OUT, *blk[(r - s) % n])


@algorithm("all_reduce", "ring", "ring reduce-scatter then ring all-gather: 2(n-1) steps, bandwidth-optimal")
def all_reduce_ring(a: Args) -> Plan:
    """Large buffers (RING_PIPELINE_BYTES) in rounds of about n x RING_BLOCK_BYTES, each a whole
    ring all_reduce of its part with gated sends; smaller ones, and the average (AVG, its owner
    dividing between the passes), in the phased passes."""
    n, r, es = a.size, a.rank, a.esize
    b = Builder("ring")
    if not a.inplace:
        b.copy(OUT, 0, IN, 0, a.count * es)
    if n == 1:
        return b.build()
    if a.count < n:
        raise NotSupported(f"ring all_reduce needs at least one element per rank ({a.count} < {n})")
    local = next((len(h) for h in a.hosts if r in h), n)
    if not a.avg and a.count * es * local >= RING_PIPELINE_BYTES:
        rounds = max(1, min(a.count // n, RING_MAX_ROUNDS, -(-a.count * es // (n * RING_BLOCK_BYTES))))
        for first, cnt in blocks(a.count, rounds):
            _pipelined_round(b, n, r, [blk[0] for blk in byte_blocks(cnt, n, es, first * es)])
        return b.build()
    blk = byte_blocks(a.count, n, es)
    group = list(range(n))
    reduce_scatter_pass(b, group, r, blk, OUT, own=1)
    if a.avg:
        for off, nb in blk[(r + 1) % n]:
            b.div(OUT, off, nb, n)
    all_gather_pass(b, group, r, blk, OUT, own=1)
    return b.build()


@algorithm("all_gather", "ring", "ring all-gather: n-1 steps, each forwarding the block received last")
def all_gather_ring(a: Args) -> Plan:
    n, r = a.size, a.rank
    nb = a.count * a.esize
    b = Builder("ring")
    if not a.inplace:
        b.copy(OUT, r * nb, IN, 0, nb)
    all_gather_pass(b, list(range(n)), r, [[(k * nb, nb)] for k in range(n)], OUT, own=0)
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
    reduce_scatter_pass(b, list(range(n)), r, [[(k * nb, nb)] for k in range(n)], SCRATCH, own=0)
    b.copy(OUT, 0, SCRATCH, r * nb, nb)
    if a.avg:
        b.div(OUT, 0, nb, n)
    return b.build()


CHAIN_SEGMENT_BYTES = 256 << 10


@algorithm("broadcast", "ring", "pipelined chain root -> root+1 -> ...: segments stream down the chain")
def broadcast_ring(a: Args) -> Plan:
    n, r = a.size, a.rank
    nb = a.count * a.esize
    b = Builder("ring")
    pos = (r - a.root) % n
    nxt = (r + 1) % n if pos < n - 1 else None
    prev = (r - 1) % n if pos > 0 else None
    segs = segments(nb, CHAIN_SEGMENT_BYTES, a.esize)
    if prev is None:
        if not a.inplace:
            b.copy(OUT, 0, IN, 0, nb)
        if nxt is not None:
            for seg in segs:
                b.send(nxt, OUT, *seg)
        return b.build()
    for i in range(len(segs) + 1):
        if i < len(segs):
            b.recv(prev, OUT, *segs[i])
        if i > 0 and nxt is not None:
            b.send(nxt, OUT, *segs[i - 1])
        b.phase()
    return b.build()
