"""Linear (root-centred) gather and scatter, and the two barriers.

gather/scatter: the root exchanges one message with every other rank, all in flight at once.
barrier "linear": everyone reports to rank 0, which then releases everyone (2 message latencies).
barrier "dissemination": in round k every rank signals rank + 2^k and waits for rank - 2^k
(ceil(log2 n) latencies, no hot spot).
"""
from __future__ import annotations

from . import algorithm
from .patterns import dissemination_distances
from .plan import IN, OUT, Args, Builder, Plan


@algorithm("gather", "linear", "every rank sends its block straight to the root")
def gather_linear(a: Args) -> Plan:
    nb = a.count * a.esize
    b = Builder("linear")
    if a.rank != a.root:
        b.send(a.root, IN, 0, nb)
        return b.build()
    if not a.inplace:
        b.copy(OUT, a.root * nb, IN, 0, nb)
    for p in range(a.size):
        if p != a.root:
            b.recv(p, OUT, p * nb, nb)
    return b.build()


@algorithm("scatter", "linear", "the root sends each rank its block directly")
def scatter_linear(a: Args) -> Plan:
    nb = a.count * a.esize
    b = Builder("linear")
    if a.rank != a.root:
        b.recv(a.root, OUT, 0, nb)
        return b.build()
    if not a.inplace:
        b.copy(OUT, 0, IN, a.root * nb, nb)
    for p in range(a.size):
        if p != a.root:
            b.send(p, IN, p * nb, nb)
    return b.build()


@algorithm("barrier", "dissemination", "log2(n) rounds of zero-byte messages at distance 2^k")
def barrier_dissemination(a: Args) -> Plan:
    b = Builder("dissemination")
    for d in dissemination_distances(a.size):
        b.send((a.rank + d) % a.size, OUT, 0, 0)
        b.recv((a.rank - d) % a.size, OUT, 0, 0)
        b.phase()
    return b.build()


@algorithm("barrier", "linear", "all ranks check in with rank 0, which then releases them")
def barrier_linear(a: Args) -> Plan:
    b = Builder("linear")
    if a.size == 1:
        return b.build()
    if a.rank == 0:
        for p in range(1, a.size):
            b.recv(p, OUT, 0, 0)
        b.phase()
        for p in range(1, a.size):
            b.send(p, OUT, 0, 0)
    else:
        b.send(0, OUT, 0, 0)
        b.phase()
        b.recv(0, OUT, 0, 0)
    return b.build()
