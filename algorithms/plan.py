"""Plans: what an algorithm computes, and nothing else (sans-I/O, like h11).

An algorithm turns :class:`Args` into a :class:`Plan`, a flat list of :class:`Step`. The executor
(native/engine.c, or the in-memory simulator in :mod:`comms.algorithms.simulate`) runs the steps in
order:

- ``SEND``/``RECV``/``RECV_REDUCE`` post a message to/from ``peer`` on bytes
  ``[off, off + nbytes)`` of buffer ``buf``; consecutive ones are in flight together.
  ``RECV_REDUCE`` combines the incoming bytes into the buffer (``dst = dst op incoming``).
  A gated ``SEND`` (``aux`` = its gate's index + 1) forwards the bytes that an earlier receive of
  the same bytes in the same batch (its gate) delivers, as they arrive: a pipelined ring forwards
  each chunk it has just reduced while it is still in cache, with no PHASE in between. Sends to
  one peer leave in plan order, so a gated send holds back the later sends to its peer.
- ``PHASE`` waits until every posted message has completed.
- ``COPY`` (``buf[off:] = buf2[off2:]``), ``REDUCE`` (``buf[off:] op= buf2[off2:]``),
  ``REDUCE_SLOTS`` (``buf[off:] = op over k of buf2[off2 + k*aux:]`` for k < peer, in order k = 0,
  1, ..., with float32 accumulation for half types) and ``DIV`` (``buf[off:] /= aux``) run locally,
  and only after every earlier message completed.
- ``BOARD`` is an all_reduce of bytes ``[off, off + nbytes)`` of ``buf`` among every rank, which the
  transport runs by itself (shm: shared slots, native/shm_board.c): the result is ``REDUCE_SLOTS``
  over every rank's bytes in rank order. It runs after every earlier message completed, and the
  plan goes on once it has.

Buffers are numbered: ``IN`` (the caller's input), ``OUT`` (the caller's output; the same memory
as IN for in-place calls) and ``SCRATCH`` (``Plan.scratch_bytes`` of temporary memory).
Offsets and sizes are in bytes. Messages between two ranks are matched in order.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import NotSupported  # noqa: F401  (the one NotSupported: an algorithm declines a case)
from ..runtime.native import BUF_IN, BUF_OUT, BUF_SCRATCH, STEPS

# the step kinds and buffer ids, as native/_cdefs.h declares them
SEND, RECV, RECV_REDUCE, COPY, REDUCE, REDUCE_SLOTS, DIV, PHASE, BOARD = (
    STEPS[k] for k in ("send", "recv", "recv_reduce", "copy", "reduce", "reduce_slots", "div", "phase", "board"))
STEP_NAMES = {code: name for name, code in STEPS.items()}
COMM_KINDS = frozenset({SEND, RECV, RECV_REDUCE})
IN, OUT, SCRATCH = BUF_IN, BUF_OUT, BUF_SCRATCH

# collective ids carried in message headers
COLL_IDS = {"all_reduce": 1, "broadcast": 2, "reduce": 3, "all_gather": 4, "reduce_scatter": 5,
            "all_to_all": 6, "gather": 7, "scatter": 8, "barrier": 9}
COLL_NAMES = {v: k for k, v in COLL_IDS.items()}


@dataclass(frozen=True)
class Step:
    kind: int
    peer: int = -1
    buf: int = OUT
    off: int = 0
    nbytes: int = 0
    buf2: int = IN
    off2: int = 0
    aux: int = 0

    def __str__(self) -> str:
        name = STEP_NAMES[self.kind]
        if self.kind == PHASE:
            return name
        where = f"{'IN OUT SCRATCH'.split()[self.buf]}[{self.off}:+{self.nbytes}]"
        if self.kind in COMM_KINDS:
            gate = f" gate={self.aux - 1}" if self.kind == SEND and self.aux else ""
            return f"{name} peer={self.peer} {where}{gate}"
        return f"{name} {where} <- {'IN OUT SCRATCH'.split()[self.buf2]}[{self.off2}]"


@dataclass(frozen=True)
class Args:
    """Everything a plan may depend on. Counts are in elements, of ``esize`` bytes each.

    Per collective, ``count`` is: all_reduce, broadcast, reduce: the buffer; all_gather, gather:
    the per-rank input; reduce_scatter, scatter: the per-rank output; all_to_all: unused (the
    byte splits are in ``send_splits``/``recv_splits``); barrier: 0.
    """
    coll: str
    rank: int
    size: int
    count: int
    esize: int
    root: int = -1
    avg: bool = False
    inplace: bool = False
    send_splits: tuple = ()
    recv_splits: tuple = ()
    hosts: tuple = ()          # ranks grouped by host (comms.runtime.topology), for hierarchical algorithms
    deterministic: bool = False  # COMMS_DETERMINISTIC: reductions in canonical order (algorithms.deterministic)
    board: int = 0             # the largest all_reduce the transport runs by itself (BOARD; 0: none)
    crowded: bool = False      # some host has more ranks than cores (Communicator.oversubscription() > 1)


@dataclass(frozen=True)
class Plan:
    algorithm: str
    steps: tuple
    scratch_bytes: int = 0

    def __str__(self) -> str:
        return "\n".join([f"plan {self.algorithm} (scratch {self.scratch_bytes} B)"] + [f"  {s}" for s in self.steps])


@dataclass
class Builder:
    """Accumulates steps; PHASE is added only where a message group must end."""
    algorithm: str
    steps: list = field(default_factory=list)
    scratch_bytes: int = 0

    def _comm(self, kind: int, peer: int, buf: int, off: int, nbytes: int, aux: int = 0) -> int:
        self.steps.append(Step(kind, peer, buf, off, nbytes, aux=aux))
        return len(self.steps) - 1

    def send(self, peer: int, buf: int, off: int, nbytes: int, gate: int | None = None) -> int:
        """A send; ``gate``: the index of the receive of these bytes it forwards as they arrive."""
        return self._comm(SEND, peer, buf, off, nbytes, 0 if gate is None else gate + 1)

    def recv(self, peer: int, buf: int, off: int, nbytes: int) -> int:
        return self._comm(RECV, peer, buf, off, nbytes)

    def recv_reduce(self, peer: int, buf: int, off: int, nbytes: int) -> int:
        return self._comm(RECV_REDUCE, peer, buf, off, nbytes)

    def phase(self) -> None:
        if self.steps and self.steps[-1].kind in COMM_KINDS:
            self.steps.append(Step(PHASE))

    def copy(self, buf: int, off: int, buf2: int, off2: int, nbytes: int) -> None:
        if nbytes and (buf, off) != (buf2, off2):
            self.steps.append(Step(COPY, -1, buf, off, nbytes, buf2, off2))

    def reduce(self, buf: int, off: int, buf2: int, off2: int, nbytes: int) -> None:
        if nbytes:
            self.steps.append(Step(REDUCE, -1, buf, off, nbytes, buf2, off2))

    def reduce_slots(self, buf: int, off: int, buf2: int, off2: int, stride: int, nslots: int, nbytes: int) -> None:
        if nbytes:
            self.steps.append(Step(REDUCE_SLOTS, nslots, buf, off, nbytes, buf2, off2, stride))

    def div(self, buf: int, off: int, nbytes: int, divisor: int) -> None:
        if nbytes:
            self.steps.append(Step(DIV, -1, buf, off, nbytes, buf, off, divisor))

    def board(self, buf: int, off: int, nbytes: int) -> None:
        self.phase()
        self.steps.append(Step(BOARD, -1, buf, off, nbytes))

    def send_pieces(self, peer: int, buf: int, pieces) -> None:
        for off, n in pieces:
            self.send(peer, buf, off, n)

    def recv_pieces(self, peer: int, buf: int, pieces, reduce: bool = False) -> None:
        for off, n in pieces:
            (self.recv_reduce if reduce else self.recv)(peer, buf, off, n)

    def build(self) -> Plan:
        steps = list(self.steps)
        while steps and steps[-1].kind == PHASE:
            steps.pop()
        return Plan(self.algorithm, tuple(steps), self.scratch_bytes)
