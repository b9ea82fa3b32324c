"""Pairwise all_to_all (also all_to_all with uneven splits).

Step i (1 <= i < n) sends to rank + i and receives from rank - i, so no rank is hit by everyone at
once; all steps are posted together and each pair of ranks streams independently. The block for
oneself is a local copy. Splits are in bytes: ``send_splits[p]`` bytes of IN go to rank p, and
``recv_splits[p]`` bytes of OUT come from rank p, blocks laid out in rank order.
"""
from __future__ import annotations

from itertools import accumulate

from . import algorithm
from .plan import IN, OUT, Args, Builder, Plan


@algorithm("all_to_all", "pairwise", "n-1 pairwise exchanges (rank+i, rank-i), all in flight together")
def all_to_all_pairwise(a: Args) -> Plan:
    n, r = a.size, a.rank
    send, recv = a.send_splits, a.recv_splits
    soff = [0, *accumulate(send)][:n]
    roff = [0, *accumulate(recv)][:n]
    b = Builder("pairwise")
    b.copy(OUT, roff[r], IN, soff[r], send[r])
    for i in range(1, n):
        dst, src = (r + i) % n, (r - i) % n
        b.send(dst, IN, soff[dst], send[dst])
        b.recv(src, OUT, roff[src], recv[src])
    return b.build()
