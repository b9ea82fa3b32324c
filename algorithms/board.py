"""All_reduce through the transport's shared slots (the BOARD step; native/shm_board.c): every
rank publishes its buffer in a slot of its shared-memory segment, reads every other rank's slot,
and reduces all n contributions in rank order. No message headers, rings or matching: one store
to publish, one load per peer to see theirs.

It serves ranks that all share one host, with one transport (shm) between every pair, up to the
transport's slot size (``Args.board``: COMMS_SHM_BOARD_BYTES); it declines anything else. The
reduction is direct's (REDUCE_SLOTS in rank order, float32 accumulation for half types), so it
gives the same bits as direct, on every rank.
"""
from __future__ import annotations

from . import algorithm
from .plan import IN, OUT, Args, Builder, NotSupported, Plan


@algorithm("all_reduce", "board", "shared-memory slots on one host: publish, read every rank's, reduce in rank order")
def all_reduce_board(a: Args) -> Plan:
    nb = a.count * a.esize
    b = Builder("board")
    if a.size == 1:
        if not a.inplace:
            b.copy(OUT, 0, IN, 0, nb)
        return b.build()
    if not a.board or nb > a.board:
        raise NotSupported(f"board: {nb} B all_reduce, the transport's slots take {a.board} B")
    if not a.inplace:
        b.copy(OUT, 0, IN, 0, nb)
    b.board(OUT, 0, nb)
    if a.avg:
        b.div(OUT, 0, nb, a.size)
    return b.build()
