"""Hierarchical algorithms: shared memory inside each host, one crossing of the network per block.

``Args.hosts`` groups the ranks by host (from comms.runtime.topology); these algorithms need at least two
hosts with the same number of ranks L each, and decline otherwise. Member j of a host is "local
index j"; the ranks with local index j on every host form column j. Columns give every rank its
own path across the network, so all NICs (and all cores) work at once.

- all_reduce: ring reduce-scatter inside each host (member j ends owning block (j+1) mod L), ring
  all-reduce of that block across the column, ring all-gather inside each host; large buffers are
  cut into segments that run these phases staggered (a software pipeline), so the network is busy
  while other segments are reduced and gathered over shared memory.
- reduce_scatter: ring reduce-scatter inside the host over column-sized pieces, then across the
  column; each byte crosses the network once.
- all_gather: ring all-gather across the column (each rank gets its column), then inside the host.
- broadcast: binomial tree over one entry rank per host (the root, or each host's leader), then a
  binomial tree inside every host.
- all_to_all (equal splits): blocks are first regrouped inside the host by destination column,
  then each rank exchanges one aggregated message per remote host along its column.
"""
from __future__ import annotations

from . import algorithm
from .patterns import binomial_children, binomial_parent, blocks
from .plan import COMM_KINDS, IN, OUT, PHASE, SCRATCH, Args, Builder, NotSupported, Plan
from .ring import all_gather_pass, byte_blocks, reduce_scatter_pass


class Layout:
    def __init__(self, a: Args):
        hosts = [list(h) for h in a.hosts]
        if len(hosts) < 2:
            raise NotSupported("hierarchical algorithms need at least two hosts")
        if len({len(h) for h in hosts}) != 1:
            raise NotSupported(f"hierarchical algorithms need the same number of ranks on every host, got "
                               f"{[len(h) for h in hosts]}")
        self.hosts = hosts
        self.H, self.L = len(hosts), len(hosts[0])
        self.h = next(i for i, g in enumerate(hosts) if a.rank in g)
        self.j = hosts[self.h].index(a.rank)
        self.local = hosts[self.h]
        self.column = [g[self.j] for g in hosts]

    def col(self, j: int) -> list[int]:
        return [g[j] for g in self.hosts]


# Segments of a pipelined hierarchical all_reduce: the buffer is cut into segments of about this
# many bytes (at most MAX_SEGMENTS), and segment s runs its phase k in round s + k, so the network
# phases of one segment overlap the shared-memory phases of its neighbours.
SEGMENT_BYTES = 2 << 20
MAX_SEGMENTS = 8


def segments_for(nbytes: int, min_count: int, count: int) -> int:
    """How many pipeline segments a buffer of ``nbytes`` (``count`` elements) is cut into: about
    one per SEGMENT_BYTES, at most MAX_SEGMENTS, each with at least ``min_count`` elements."""
    return max(1, min(MAX_SEGMENTS, nbytes // SEGMENT_BYTES, count // max(min_count, 1)))


def phases_of(steps) -> list[list]:
    """A step list cut at its PHASE markers (which are dropped): one list per message group,
    local steps first (a builder only puts them at the start of a group)."""
    out, cur = [], []
    for st in steps:
        if st.kind == PHASE:
            out.append(cur)
            cur = []
        else:
            cur.append(st)
    if cur:
        out.append(cur)
    return out


def pipeline(b: Builder, segments: list[list[list]]) -> None:
    """Append ``segments`` (each a list of phases, all of the same length) to ``b`` staggered by one
    round: round g holds phase g - s of every segment s. Within a round the local steps of all
    segments come first, then their messages in segment order, so every pair of ranks posts its
    sends and receives in the same order; each round ends with a PHASE."""
    nphase = max((len(p) for p in segments), default=0)
    for g in range(nphase + len(segments) - 1):
        local, comm = [], []
        for s, phases in enumerate(segments):
            k = g - s
            if 0 <= k < len(phases):
                for st in phases[k]:
                    (comm if st.kind in COMM_KINDS else local).append(st)
        b.steps.extend(local)
        b.steps.extend(comm)
        b.phase()


def _all_reduce_segment(t: "Layout", a: Args, start: int, count: int) -> list[list]:
    """The phases of one segment (elements [start, start + count)): ring reduce-scatter inside the
    host, ring reduce-scatter + all-gather of this rank's block across its column, ring all-gather
    inside the host. Every rank gets the same number of phases."""
    es = a.esize
    b = Builder("hierarchical")
    local_blocks = [(start + s, n) for s, n in blocks(count, t.L)]
    reduce_scatter_pass(b, t.local, a.rank, [[(s * es, n * es)] for s, n in local_blocks], OUT, own=1)
    mine_start, mine_n = local_blocks[(t.j + 1) % t.L]
    sub = byte_blocks(mine_n, t.H, es, base=mine_start * es)
    reduce_scatter_pass(b, t.column, a.rank, sub, OUT, own=1)
    if a.avg:
        for off, nb in sub[(t.h + 1) % t.H]:
            b.div(OUT, off, nb, a.size)
    all_gather_pass(b, t.column, a.rank, sub, OUT, own=1)
    all_gather_pass(b, t.local, a.rank, [[(s * es, n * es)] for s, n in local_blocks], OUT, own=1)
    b.phase()
    phases = phases_of(b.steps)
    assert len(phases) == 2 * (t.L - 1) + 2 * (t.H - 1), "every rank must have the same phases"
    return phases


@algorithm("all_reduce", "hierarchical", "reduce-scatter in each host, all-reduce across hosts per slice, "
                                          "all-gather in each host; pipelined in segments")
def all_reduce_hierarchical(a: Args) -> Plan:
    t = Layout(a)
    if a.count < t.L * t.H:
        raise NotSupported(f"hierarchical all_reduce needs at least one element per rank ({a.count} < {t.L * t.H})")
    b = Builder("hierarchical")
    if not a.inplace:
        b.copy(OUT, 0, IN, 0, a.count * a.esize)
    nseg = segments_for(a.count * a.esize, t.L * t.H, a.count)
    pipeline(b, [_all_reduce_segment(t, a, s, n) for s, n in blocks(a.count, nseg)])
    return b.build()


@algorithm("reduce_scatter", "hierarchical", "reduce-scatter in each host over column pieces, then across hosts")
def reduce_scatter_hierarchical(a: Args) -> Plan:
    t = Layout(a)
    nb = a.count * a.esize
    b = Builder("hierarchical")
    b.scratch_bytes = a.size * nb
    b.copy(SCRATCH, 0, IN, 0, a.size * nb)
    # inside the host: block j = the pieces of every rank in column j
    reduce_scatter_pass(b, t.local, a.rank, [[(r * nb, nb) for r in t.col(j)] for j in range(t.L)], SCRATCH, own=0)
    # across the column: block k = the piece of column member k
    reduce_scatter_pass(b, t.column, a.rank, [[(r * nb, nb)] for r in t.column], SCRATCH, own=0)
    b.copy(OUT, 0, SCRATCH, a.rank * nb, nb)
    if a.avg:
        b.div(OUT, 0, nb, a.size)
    return b.build()


@algorithm("all_gather", "hierarchical", "all-gather across hosts per column, then inside each host")
def all_gather_hierarchical(a: Args) -> Plan:
    t = Layout(a)
    nb = a.count * a.esize
    b = Builder("hierarchical")
    if not a.inplace:
        b.copy(OUT, a.rank * nb, IN, 0, nb)
    all_gather_pass(b, t.column, a.rank, [[(r * nb, nb)] for r in t.column], OUT, own=0)
    all_gather_pass(b, t.local, a.rank, [[(r * nb, nb) for r in t.col(j)] for j in range(t.L)], OUT, own=0)
    return b.build()


def _binomial(b: Builder, group: list, root: int, me: int, nb: int) -> None:
    n = len(group)
    rel = (group.index(me) - group.index(root)) % n
    at = lambda v: group[(v + group.index(root)) % n]   # noqa: E731
    if rel:
        b.recv(at(binomial_parent(rel)), OUT, 0, nb)
        b.phase()
    for c in binomial_children(rel, n):
        b.send(at(c), OUT, 0, nb)
    b.phase()


@algorithm("broadcast", "hierarchical", "binomial tree over one entry rank per host, then inside each host")
def broadcast_hierarchical(a: Args) -> Plan:
    t = Layout(a)
    nb = a.count * a.esize
    b = Builder("hierarchical")
    if a.rank == a.root and not a.inplace:
        b.copy(OUT, 0, IN, 0, nb)
    entries = [a.root if a.root in g else g[0] for g in t.hosts]
    entry = entries[t.h]
    if a.rank == entry:
        _binomial(b, entries, a.root, a.rank, nb)
    _binomial(b, t.local, entry, a.rank, nb)
    return b.build()


@algorithm("all_to_all", "hierarchical", "regroup blocks by destination column inside the host, then one "
                                          "message per remote host along the column")
def all_to_all_hierarchical(a: Args) -> Plan:
    t = Layout(a)
    send, recv = a.send_splits, a.recv_splits
    if len(set(send)) > 1 or len(set(recv)) > 1 or send[0] != recv[0]:
        raise NotSupported("hierarchical all_to_all needs equal splits")
    bs = send[0]
    H, L = t.H, t.L
    b = Builder("hierarchical")
    # SCRATCH[i][k]: the block from local source i (of my host) to rank (host k, my column j)
    b.scratch_bytes = L * H * bs

    def slot(i: int, k: int) -> int:
        return (i * H + k) * bs

    for k in range(H):                              # my own contribution to my column
        b.copy(SCRATCH, slot(t.j, k), IN, t.hosts[k][t.j] * bs, bs)
    for i, peer in enumerate(t.local):              # step 1: regroup inside the host
        if peer == a.rank:
            continue
        for k in range(H):
            b.send(peer, IN, t.hosts[k][i] * bs, bs)
        for k in range(H):
            b.recv(peer, SCRATCH, slot(i, k), bs)
    b.phase()
    for k in range(H):                              # step 2: one aggregated exchange per remote host
        if k == t.h:
            continue
        dst = t.hosts[k][t.j]
        for i in range(L):
            b.send(dst, SCRATCH, slot(i, k), bs)
        for i in range(L):
            b.recv(dst, OUT, t.hosts[k][i] * bs, bs)
    b.phase()
    for i in range(L):                              # what stays on this host
        b.copy(OUT, t.hosts[t.h][i] * bs, SCRATCH, slot(i, t.h), bs)
    return b.build()
