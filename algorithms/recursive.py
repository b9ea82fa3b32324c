"""Recursive doubling (tiny all_reduce) and recursive halving-doubling (Rabenseifner, medium).

Both run on the largest power of two p <= n. The n - p "extra" ranks first fold their data into a
partner (rank - p), sit out, and get the result back at the end (the usual MPICH treatment).

- recursive_doubling: log2(p) steps; in step d every rank swaps its whole buffer with rank ^ d and
  reduces. Latency-optimal, moves the whole buffer every step. Where every host has a core per
  rank, the steps that cross hosts come first (patterns.crossing_first) and a call ends on the
  fast link; where a host has more ranks than cores (``Args.crowded``), the steps go in ascending
  distance, intra-host first. On 2 simulated hosts x 2 ranks (2 Gbit/s tbf, bench.regret, 3
  launches, 8 B-4 KiB): with the hosts sharing both CPUs (each sees a core per rank), crossing
  first took 84-106 us against 186-199 us; with each host pinned to one CPU, ascending took 37-48
  us against 58-75 us.
- rhd: reduce-scatter by recursive halving (each step swaps half of the current range with
  rank ^ d, d = p/2 .. 1, and reduces the incoming half on arrival, chunk by chunk, as the ring
  does) so rank i ends owning block i, then all-gather by recursive doubling. 2 log2(p) steps and
  the ring's bytes.
"""
from __future__ import annotations

from . import algorithm
from .patterns import blocks, crossing_first, dissemination_distances
from .plan import IN, OUT, SCRATCH, Args, Builder, NotSupported, Plan


def _fold(b: Builder, a: Args, nb: int) -> tuple[int, bool]:
    """Fold extra ranks into the power-of-two core. Returns (p, whether this rank is in the core)."""
    p = 1 << (a.size.bit_length() - 1)
    r = a.rank
    if not a.inplace:
        b.copy(OUT, 0, IN, 0, nb)
    if r >= p:
        b.send(r - p, OUT, 0, nb)
        b.phase()
        b.recv(r - p, OUT, 0, nb)
        return p, False
    if r < a.size - p:
        b.recv(r + p, SCRATCH, 0, nb)
        b.phase()
        b.reduce(OUT, 0, SCRATCH, 0, nb)
    return p, True


def _unfold(b: Builder, a: Args, p: int, nb: int) -> None:
    if a.rank < a.size - p:
        b.phase()
        b.send(a.rank + p, OUT, 0, nb)


@algorithm("all_reduce", "recursive_doubling", "log2(n) whole-buffer swaps with rank ^ 2^k: fewest steps")
def all_reduce_recursive_doubling(a: Args) -> Plan:
    nb = a.count * a.esize
    b = Builder("recursive_doubling")
    b.scratch_bytes = nb
    p, core = _fold(b, a, nb)
    if core:
        for d in dissemination_distances(p) if a.crowded else crossing_first(p, a.hosts):
            partner = a.rank ^ d
            b.send(partner, OUT, 0, nb)
            b.recv(partner, SCRATCH, 0, nb)
            b.phase()
            b.reduce(OUT, 0, SCRATCH, 0, nb)
        if a.avg:
            b.div(OUT, 0, nb, a.size)
        _unfold(b, a, p, nb)
    return b.build()


@algorithm("all_reduce", "rhd", "recursive halving reduce-scatter + recursive doubling all-gather (Rabenseifner)")
def all_reduce_rhd(a: Args) -> Plan:
    nb, es, r = a.count * a.esize, a.esize, a.rank
    p = 1 << (a.size.bit_length() - 1)
    if a.count < p:
        raise NotSupported(f"rhd needs at least one element per rank of the power-of-two core ({a.count} < {p})")
    b = Builder("rhd")
    b.scratch_bytes = nb if a.size != p else 0      # only the fold of the extra ranks receives aside
    p, core = _fold(b, a, nb)
    if not core:
        return b.build()
    blk = [(start * es, n * es) for start, n in blocks(a.count, p)]

    def span(lo: int, hi: int) -> tuple[int, int]:
        return blk[lo][0], sum(n for _, n in blk[lo:hi])

    lo, hi, d = 0, p, p >> 1
    while d >= 1:                                 # reduce-scatter by recursive halving
        partner, mid = r ^ d, (lo + hi) // 2
        keep, give = ((lo, mid), (mid, hi)) if not r & d else ((mid, hi), (lo, mid))
        b.send(partner, OUT, *span(*give))
        b.recv_reduce(partner, OUT, *span(*keep))     # reduced as it lands: the kept half is not being sent
        b.phase()
        lo, hi = keep
        d >>= 1
    if a.avg:
        b.div(OUT, *span(lo, hi), a.size)
    d = 1
    while d < p:                                  # all-gather by recursive doubling
        partner = r ^ d
        size = hi - lo
        other = (lo + size, hi + size) if not r & d else (lo - size, hi - size)
        b.send(partner, OUT, *span(lo, hi))
        b.recv(partner, OUT, *span(*other))
        b.phase()
        lo, hi = min(lo, other[0]), max(hi, other[1])
        d <<= 1
    _unfold(b, a, p, nb)
    return b.build()


@algorithm("reduce_scatter", "recursive_halving", "log2(n) halvings, each swapping half the remaining blocks "
                                                   "with rank ^ 2^k (power-of-two sizes)")
def reduce_scatter_recursive_halving(a: Args) -> Plan:
    n, r = a.size, a.rank
    if n & (n - 1):
        raise NotSupported(f"recursive halving needs a power-of-two number of ranks, not {n}")
    nb = a.count * a.esize
    b = Builder("recursive_halving")
    b.scratch_bytes = 2 * n * nb                 # the working copy, then what partners send
    work, incoming = 0, n * nb
    b.copy(SCRATCH, work, IN, 0, n * nb)
    lo, hi, d = 0, n, n >> 1
    while d >= 1:
        partner, mid = r ^ d, (lo + hi) // 2
        keep, give = ((lo, mid), (mid, hi)) if not r & d else ((mid, hi), (lo, mid))
        b.send(partner, SCRATCH, work + give[0] * nb, (give[1] - give[0]) * nb)
        b.recv(partner, SCRATCH, incoming + keep[0] * nb, (keep[1] - keep[0]) * nb)
        b.phase()
        b.reduce(SCRATCH, work + keep[0] * nb, SCRATCH, incoming + keep[0] * nb, (keep[1] - keep[0]) * nb)
        lo, hi = keep
        d >>= 1
    b.copy(OUT, 0, SCRATCH, work + r * nb, nb)
    if a.avg:
        b.div(OUT, 0, nb, n)
    return b.build()
