"""Binomial-tree broadcast and reduce, pipelined in segments.

The message is cut into segments; in phase i a rank receives segment i from its parent while
forwarding segment i - 1 to its children (broadcast), or reduces segment i from its children in a
fixed order while sending segment i - 1 to its parent (reduce). Large messages thus stream down
(or up) the tree instead of hopping it whole. Children are served largest subtree first.
"""
from __future__ import annotations

from . import algorithm
from .patterns import binomial_children, binomial_parent, real_rank, segments, vrank
from .plan import IN, OUT, SCRATCH, Args, Builder, Plan

SEGMENT_BYTES = 1 << 20


def _tree(a: Args) -> tuple[int | None, list[int]]:
    vr = vrank(a.rank, a.root, a.size)
    parent = real_rank(binomial_parent(vr), a.root, a.size) if vr else None
    kids = [real_rank(c, a.root, a.size) for c in binomial_children(vr, a.size)]
    return parent, kids


@algorithm("broadcast", "binomial", "binomial tree from the root, segmented so that levels overlap")
def broadcast_binomial(a: Args) -> Plan:
    nb = a.count * a.esize
    parent, kids = _tree(a)
    b = Builder("binomial")
    segs = segments(nb, SEGMENT_BYTES, a.esize)
    if parent is None:
        if not a.inplace:
            b.copy(OUT, 0, IN, 0, nb)
        for off, n in segs:
            for k in kids:
                b.send(k, OUT, off, n)
        return b.build()
    for i in range(len(segs) + 1):
        if i < len(segs):
            b.recv(parent, OUT, *segs[i])
        if i > 0:
            for k in kids:
                b.send(k, OUT, *segs[i - 1])
        b.phase()
    return b.build()


@algorithm("reduce", "binomial", "binomial tree towards the root, children reduced in a fixed order")
def reduce_binomial(a: Args) -> Plan:
    nb = a.count * a.esize
    parent, kids = _tree(a)
    b = Builder("binomial")
    if parent is None:
        acc = OUT
        if not a.inplace:
            b.copy(OUT, 0, IN, 0, nb)
    else:
        acc = SCRATCH
        b.scratch_bytes = nb
        b.copy(SCRATCH, 0, IN, 0, nb)
    segs = segments(nb, SEGMENT_BYTES, a.esize)
    if not kids and parent is not None:           # a leaf only sends
        for seg in segs:
            b.send(parent, acc, *seg)
        return b.build()
    for i in range(len(segs) + 1):
        forward = parent is not None and i > 0    # segment i-1 goes up while segment i comes in
        if i < len(segs):
            for j, k in enumerate(reversed(kids)):
                b.recv_reduce(k, acc, *segs[i])
                if j == 0 and forward:
                    b.send(parent, acc, *segs[i - 1])
                b.phase()
        elif forward:
            b.send(parent, acc, *segs[i - 1])
    if parent is None and a.avg:
        b.div(OUT, 0, nb, a.size)
    return b.build()


@algorithm("all_reduce", "tree", "pipelined binomial reduce to rank 0, then pipelined binomial broadcast")
def all_reduce_tree(a: Args) -> Plan:
    up = reduce_binomial(Args("reduce", a.rank, a.size, a.count, a.esize, root=0, avg=a.avg, inplace=a.inplace))
    down = broadcast_binomial(Args("broadcast", a.rank, a.size, a.count, a.esize, root=0, inplace=True))
    from .plan import PHASE, Step
    return Plan("tree", up.steps + (Step(PHASE),) + down.steps, max(up.scratch_bytes, down.scratch_bytes))
