"""Run the plans of all ranks in one process over an in-memory transport (for tests).

The in-memory transport keeps one FIFO of messages per ordered pair of ranks. The simulator
steps the ranks round-robin with the same semantics as native/engine.c: consecutive
communication steps are posted together; sends deliver at once, except a gated send, which
delivers its bytes once its gate (a receive of them) has completed and holds the later sends to
its peer until then; a local step or PHASE waits for every posted receive and send; receives
match in order. Reductions use :mod:`comms.testing.reference`. A plan set
that can make no progress raises :class:`Deadlock`, naming the stuck steps. Before anything runs,
each plan is encoded as the engine would run it (comms.runtime.engine.Encoded), which checks every
step against the buffers' lengths (native/plan_check.c): a step past a buffer raises InvalidUsage
here, where numpy's slices would silently clip it.
"""
from __future__ import annotations

from collections import deque

import numpy as np

from . import reference
from ..runtime.engine import Encoded
from ..runtime.native import MSG_COLL
from ..algorithms.plan import (BOARD, COMM_KINDS, COPY, DIV, IN, OUT, PHASE, RECV, REDUCE, REDUCE_SLOTS, SCRATCH, SEND, Plan)


class Deadlock(RuntimeError):
    pass


def run(plans: list[Plan], inputs: list[np.ndarray], outputs: list[np.ndarray], dtype: int, op: int) -> None:
    """Execute ``plans[r]`` with IN = ``inputs[r]``, OUT = ``outputs[r]`` (uint8 views; they may be
    the same array for in-place calls) and a fresh scratch buffer per rank."""
    n = len(plans)
    for r in range(n):
        Encoded(plans[r], "simulate", MSG_COLL, 0, dtype, 0, -1, 0, lens=(inputs[r].nbytes, outputs[r].nbytes))
    bufs = [{IN: inputs[r], OUT: outputs[r], SCRATCH: np.zeros(plans[r].scratch_bytes, np.uint8)} for r in range(n)]
    fifo = {(s, d): deque() for s in range(n) for d in range(n)}
    pc = [0] * n
    pending: list[list] = [[] for _ in range(n)]   # posted receives not yet matched: (index, step)
    received: list[set] = [set() for _ in range(n)]  # the indices of completed receives
    outbox = {(s, d): deque() for s in range(n) for d in range(n)}   # posted sends not yet delivered
    boards: list[dict] = []                          # the k-th BOARD step: rank -> its bytes
    nboard = [0] * n                                 # BOARD steps each rank has begun

    def try_recvs(r: int) -> bool:
        moved = False
        still = []
        for i, st in pending[r]:
            q = fifo[(st.peer, r)]
            if q and not any(p.peer == st.peer for _, p in still):
                data = q.popleft()
                if len(data) != st.nbytes:
                    raise AssertionError(f"rank {r}: message of {len(data)} B from {st.peer}, expected {st.nbytes}")
                dst = bufs[r][st.buf][st.off:st.off + st.nbytes]
                if st.kind == RECV:
                    dst[...] = data
                else:
                    esize = np.dtype(reference.NUMPY_STORAGE[dtype]).itemsize
                    reference.reduce(dst, data, st.nbytes // esize, dtype, op)
                received[r].add(i)
                moved = True
            else:
                still.append((i, st))
        pending[r] = still
        return flush(r) or moved

    def held(r: int) -> bool:
        """Whether rank r has posted sends not delivered yet (gated, or behind a gated one)."""
        return any(outbox[(r, d)] for d in range(n))

    def flush(r: int) -> bool:
        """Deliver rank r's posted sends, in order per peer, as far as their gates allow."""
        moved = False
        for d in range(n):
            box = outbox[(r, d)]
            while box and (not box[0].aux or box[0].aux - 1 in received[r]):
                st = box.popleft()
                fifo[(r, d)].append(bufs[r][st.buf][st.off:st.off + st.nbytes].copy())
                moved = True
        return moved

    def local(r: int, st) -> None:
        b = bufs[r]
        esize = np.dtype(reference.NUMPY_STORAGE[dtype]).itemsize
        dst = b[st.buf][st.off:st.off + st.nbytes]
        if st.kind == COPY:
            dst[...] = b[st.buf2][st.off2:st.off2 + st.nbytes].copy()
        elif st.kind == REDUCE:
            reference.reduce(dst, b[st.buf2][st.off2:st.off2 + st.nbytes], st.nbytes // esize, dtype, op)
        elif st.kind == REDUCE_SLOTS:
            reference.reduce_slots(dst, b[st.buf2][st.off2:], st.aux, st.peer, st.nbytes // esize, dtype, op)
        elif st.kind == DIV:
            reference.div(dst, st.nbytes // esize, dtype, st.aux)

    while True:
        moved = False
        for r in range(n):
            moved |= try_recvs(r)
            steps = plans[r].steps
            while pc[r] < len(steps):
                st = steps[pc[r]]
                if st.kind in COMM_KINDS:
                    if st.kind == SEND:
                        outbox[(r, st.peer)].append(st)
                        flush(r)
                    else:
                        pending[r].append((pc[r], st))
                    pc[r] += 1
                    moved = True
                    continue
                try_recvs(r)
                if pending[r] or held(r):
                    break
                if st.kind == BOARD:                 # publish, then wait until every rank has
                    k = nboard[r]
                    if len(boards) <= k:
                        boards.append({})
                    if r not in boards[k]:
                        boards[k][r] = bufs[r][st.buf][st.off:st.off + st.nbytes].copy()
                        moved = True
                    if len(boards[k]) < n:
                        break
                    esize = np.dtype(reference.NUMPY_STORAGE[dtype]).itemsize
                    stacked = np.concatenate([boards[k][q] for q in range(n)])
                    reference.reduce_slots(bufs[r][st.buf][st.off:st.off + st.nbytes], stacked, st.nbytes, n,
                                           st.nbytes // esize, dtype, op)
                    nboard[r] += 1
                elif st.kind != PHASE:
                    local(r, st)
                pc[r] += 1
                moved = True
            moved |= try_recvs(r)
        if all(pc[r] == len(plans[r].steps) and not pending[r] and not held(r) for r in range(n)):
            break
        if not moved:
            stuck = {r: [str(s) for _, s in pending[r]] + [str(s) for d in range(n) for s in outbox[(r, d)]]
                     for r in range(n) if pending[r] or held(r)}
            raise Deadlock(f"plans cannot progress; waiting receives and gated sends: {stuck}")
    left = {k: len(q) for k, q in fifo.items() if q}
    if left:
        raise AssertionError(f"messages never received: {left}")
