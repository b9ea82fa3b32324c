"""The transport contract (shaped like NCCL's net plugin and gloo's pairs and unbound buffers).

A transport is built per communicator during init, in three calls:

1. ``can_connect(me, peer) -> bool``: can this transport reach ``peer`` (two PeerInfo)?
2. ``listen() -> bytes``: open whatever the peers need to reach us; returns an opaque address that
   init publishes through the store.
3. ``connect(peer, address) -> Endpoint``, for every peer that chose this transport, then
   ``finish()`` once every rank connected (a store barrier has passed).

Data moves through the native engine, which drives every transport's channels without the GIL;
an :class:`Endpoint` gives the non-blocking point-to-point view of one peer: ``isend``/``irecv``
return a :class:`Request` with ``test()`` and ``wait(timeout)``. ``register``/``put``/``get``
(one-sided access) are optional and raise NotSupported unless a transport provides them.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from ..errors import NotSupported


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
    """Point-to-point view of one peer over an established channel."""

    def __init__(self, comm, peer: int, transport: "Transport"):
        self.comm, self.peer, self.transport = comm, peer, transport

    def isend(self, buf: Any, tag: int = 0) -> Request:
        return Request(self.comm.send(buf, self.peer, tag=tag, async_op=True))

    def irecv(self, buf: Any, tag: int = 0) -> Request:
        return Request(self.comm.recv(buf, self.peer, tag=tag, async_op=True))

    def __repr__(self) -> str:
        return f"<Endpoint rank {self.comm.rank} -> {self.peer} over {self.transport.name}>"


class Transport(ABC):
    """One way of moving bytes between two ranks; see the module docstring for the call order."""

    name = "abstract"

    def __init__(self, boot):
        """``boot`` is the init-time context (rank, size, PeerInfo of all ranks, the native engine,
        the store, the deadline); see :class:`comms.bootstrap.Bootstrap`."""
        self.boot = boot

    @abstractmethod
    def can_connect(self, me, peer) -> bool: ...

    @abstractmethod
    def listen(self) -> bytes: ...

    @abstractmethod
    def connect(self, peer: int, address: bytes) -> None:
        """Establish the channel to ``peer`` inside the native engine."""

    def finish(self) -> None:
        """Called once every rank has connected every peer."""

    def close(self) -> None:
        """Release what listen()/connect() acquired (the engine closes its channels itself)."""

    def register(self, buf: Any):
        raise NotSupported(f"the {self.name} transport has no memory registration")

    def put(self, *args, **kwargs):
        raise NotSupported(f"the {self.name} transport has no one-sided put")

    def get(self, *args, **kwargs):
        raise NotSupported(f"the {self.name} transport has no one-sided get")
