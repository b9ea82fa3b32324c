"""The transport contract (shaped like NCCL's net plugin and gloo's pairs).

A transport is two files: a C file in native/ that fills the engine's table of operations
(native/comms_native.h: progress send and receive, the descriptor a sleeping wait polls, liveness,
abort, free) and attaches one channel per peer, and a Python class here that sets the channels up.
Registering it takes one line in each place: ``TRANSPORTS`` in native/build_cffi.py and
``REGISTERED`` in comms/transports/__init__.py (its module names its class ``TRANSPORT``). Nothing
else names transports: ``COMMS_TRANSPORT``'s choices, the cost model's link classes,
``comm.stats()``'s byte counters and ``comms.info`` come from ``ORDER``.

A transport is built per communicator during init, in three calls:

1. ``listen() -> bytes``: open whatever the peers need to reach us; returns an opaque address
   (b"" when this rank cannot serve the transport) that init publishes through the store. The
   address is parsed only by the same transport's :meth:`connect`, strictly: it comes from the
   store, so it is checked, never unpickled.
2. ``can_connect(me, peer) -> bool`` for each pair (two PeerInfo): may this transport carry the
   traffic between them? Init gives a pair to the first transport in ``ORDER`` that says yes and
   for which both ranks published an address. The answer depends only on the two PeerInfo and the
   configuration, so every rank computes the same choice for every pair (:func:`comms.runtime.bootstrap`
   uses that for the cost model's route).
3. ``connect(peer, address) -> Endpoint`` for every peer that chose this transport: the channel
   is then attached to the native engine. Then ``finish()`` once every rank connected (a store
   barrier has passed), and ``close()`` when the communicator goes.

Data moves through the native engine, which drives every channel without the GIL; an
:class:`Endpoint` is the point-to-point view of one peer's channel: ``isend``/``irecv`` post a
message on it and return a :class:`Request` with ``test()`` and ``wait(timeout)``. There is no
one-sided put/get in the contract: no code path would serve it (the rdma transport's RMA writes
are its own rendezvous protocol, inside the engine).

Class attributes the cost model reads (comms.selection.model): ``link``, the default latency and
bandwidth of one stream over the transport until calibration measures them, and
``waits_together``, whether the exchanges of one plan step with several peers wait as one (one
pass over shared-memory rings serves them all) or each costs its own syscalls and wake-up.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from ..selection.model import Link


class Request:
    """A non-blocking operation in flight. Wraps the Work the engine returns."""

    def __init__(self, work):
        self._work = work

    def test(self) -> bool:
        """True once the operation completed; raises its error if it failed. Never blocks."""
        if self._work.is_completed():
            self._work.wait()
            return True
        return False

    def wait(self, timeout: float | None = None) -> None:
        """Block until completion; raises CommTimeout after ``timeout`` seconds, or the op's error."""
        self._work.wait(timeout)


class Endpoint:
    """Point-to-point view of the channel to one peer, as :meth:`Transport.connect` attached it.

    ``isend``/``irecv`` post a p2p message on that channel through the communicator's engine (the
    communicator's checks, sequence numbers and error reporting apply); messages with the same
    tag between the same two ranks arrive in the order they were sent."""

    def __init__(self, peer: int, transport: "Transport"):
        self.peer, self.transport = peer, transport
        self.comm = None                     # bound by the communicator once init is over

    def isend(self, buf: Any, tag: int = 0) -> Request:
        return Request(self._bound().send(buf, self.peer, tag=tag, async_op=True))

    def irecv(self, buf: Any, tag: int = 0) -> Request:
        return Request(self._bound().recv(buf, self.peer, tag=tag, async_op=True))

    def _bound(self):
        if self.comm is None:
            from ..errors import InvalidUsage
            raise InvalidUsage(f"endpoint to rank {self.peer}: its communicator is not initialised yet")
        return self.comm

    def __repr__(self) -> str:
        me = self.comm.rank if self.comm is not None else "?"
        return f"<Endpoint rank {me} -> {self.peer} over {self.transport.name}>"


class Transport(ABC):
    """One way of moving bytes between two ranks; see the module docstring for the call order."""

    name = "abstract"
    link = Link(40.0, 1.5)           # a transport that declares no figures is priced as tcp
    waits_together = False

    def __init__(self, boot):
        """``boot`` is the init-time context (rank, size, PeerInfo of all ranks, the native engine,
        the store, the deadline, the transports COMMS_TRANSPORT lists); see
        :class:`comms.runtime.bootstrap.Bootstrap`. Only listed transports are built when it lists some."""
        self.boot = boot

    @property
    def listed(self) -> bool:
        """Whether COMMS_TRANSPORT names this transport (rather than auto choosing it)."""
        return self.boot.allowed is not None

    @classmethod
    def describe(cls) -> dict:
        """What ``comms.info`` shows about this transport on this host (without a communicator)."""
        return {}

    @abstractmethod
    def can_connect(self, me, peer) -> bool: ...

    @abstractmethod
    def listen(self) -> bytes: ...

    @abstractmethod
    def connect(self, peer: int, address: bytes) -> Endpoint:
        """Attach the channel to ``peer`` to the native engine; returns its endpoint."""

    def finish(self) -> None:
        """Called once every rank has connected every peer."""

    def close(self) -> None:
        """Release what listen()/connect() acquired (the engine frees its channels itself)."""

    def buffer_hook(self):
        """A callable the communicator hands every operation's buffers before it runs (the rdma
        transport's registration cache tracks their owners), or None."""
        return None

    def stats(self) -> dict:
        """Counters of this transport's own, merged into ``comm.stats()``."""
        return {}

    def coll_bytes(self) -> int:
        """The largest all_reduce this transport runs by itself (the BOARD step: its C ops table's
        coll_post) when it carries every pair of ranks of the communicator; 0: none."""
        return 0
