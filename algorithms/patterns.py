"""Rank arithmetic shared by every algorithm: ring neighbours, block partitions, binomial trees,
dissemination distances. Pure functions of (rank, size, ...); nothing here knows about transports.
"""
from __future__ import annotations


def ring_next(rank: int, size: int) -> int:
    return (rank + 1) % size


def ring_prev(rank: int, size: int) -> int:
    return (rank - 1) % size


def blocks(count: int, parts: int) -> list[tuple[int, int]]:
    """Split ``count`` elements into ``parts`` contiguous blocks as evenly as possible:
    a list of (first element, elements). The first ``count % parts`` blocks get one extra."""
    base, extra = divmod(count, parts)
    out, start = [], 0
    for i in range(parts):
        n = base + (1 if i < extra else 0)
        out.append((start, n))
        start += n
    return out


def segments(nbytes: int, seg_bytes: int, align: int) -> list[tuple[int, int]]:
    """Split ``nbytes`` into pieces of at most ``seg_bytes`` (multiples of ``align``): (offset, bytes)."""
    seg = max(align, seg_bytes // align * align)
    return [(off, min(seg, nbytes - off)) for off in range(0, nbytes, seg)] or [(0, 0)]


def vrank(rank: int, root: int, size: int) -> int:
    """Rank relative to ``root`` (the root becomes 0)."""
    return (rank - root) % size


def real_rank(vr: int, root: int, size: int) -> int:
    return (vr + root) % size


def binomial_parent(vr: int) -> int:
    """Parent of virtual rank ``vr`` > 0 in a binomial tree rooted at 0: clear the lowest set bit."""
    return vr & (vr - 1)


def binomial_children(vr: int, size: int) -> list[int]:
    """Children of ``vr``, largest subtree first: vr + 2^k for every 2^k below vr's lowest set bit."""
    low = vr & -vr if vr else 1 << max(size - 1, 1).bit_length()
    kids, k = [], 1
    while k < low and vr + k < size:
        kids.append(vr + k)
        k <<= 1
    return kids[::-1]


def dissemination_distances(size: int) -> list[int]:
    """Distances 1, 2, 4, ... below ``size``: the rounds of a dissemination barrier."""
    out, d = [], 1
    while d < size:
        out.append(d)
        d <<= 1
    return out


def crossing_first(p: int, hosts: tuple = ()) -> list[int]:
    """The distances d = 1, 2, 4, ... < ``p`` of exchanges with rank ^ d among ranks 0..p-1, those
    whose pairs cross hosts (``hosts``: ranks grouped by host) first, largest first, then the rest
    in ascending order (all ascending on one host). Every rank gets the same order."""
    host_of = {r: i for i, group in enumerate(hosts) for r in group}
    ds = dissemination_distances(p)
    crossing = [d for d in ds if any(host_of.get(r, 0) != host_of.get(r ^ d, 0) for r in range(p))]
    return crossing[::-1] + [d for d in ds if d not in crossing]


def skip_ring(rank: int, size: int) -> list[int]:
    """The ranks ``rank`` watches in the control plane's heartbeat graph: rank ± 1, 2, 4, ... (mod
    size), each once, never itself. The graph is symmetric (a watches b when b watches a), every
    rank has about 2·log2(size) neighbours, and any rank reaches any other in log2(size) hops, so a
    failure notice floods the survivors in a few hops even after some ranks died."""
    out: list[int] = []
    for d in dissemination_distances(size):
        for peer in ((rank + d) % size, (rank - d) % size):
            if peer != rank and peer not in out:
                out.append(peer)
    return out
