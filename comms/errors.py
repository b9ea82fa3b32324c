"""One exception tree for every failure comms reports.

    CommsError
    ├── InvalidUsage        the caller misused the API (bad root, wrong dtype, BAND on floats...)
    │   └── MismatchError   ranks called a collective differently (detected from the message header)
    ├── PeerError           a peer failed: it died, hung, was cut off, closed its connection, or aborted
    │   └── Revoked         a rank revoked the communicator (comm.revoke()); shrink() still works
    ├── CommTimeout         a wait passed its deadline (also a ``TimeoutError``)
    └── TransportError      a transport broke or could not be set up, a peer sent a malformed message,
                            or more early messages than the limits allow; the communicator is unusable

After any error other than ``InvalidUsage`` raised before a byte moved, the communicator is
aborted: the peers are told, and every later operation raises. Native return codes are mapped to
these classes in exactly one place, :func:`check_status`.
"""
from __future__ import annotations


class CommsError(RuntimeError):
    """Base of every comms error. ``op``, ``seq``, ``rank`` and ``peer`` are set when known."""

    def __init__(self, msg: str, *, op: str | None = None, seq: int | None = None,
                 rank: int | None = None, peer: int | None = None):
        super().__init__(msg)
        self.op, self.seq, self.rank, self.peer = op, seq, rank, peer


class InvalidUsage(CommsError, ValueError):
    """The caller's mistake; raised before any data moved, the communicator stays usable."""


class MismatchError(InvalidUsage):
    """Ranks disagree about a collective (op, dtype, count, root or sequence number)."""


class PeerError(CommsError):
    """A remote rank died, hung, was cut off, closed its connection, or aborted the communicator.
    ``failed``: the ranks known to have failed (empty where the error names only ``peer``)."""

    def __init__(self, msg: str, *, failed: tuple = (), **kw):
        super().__init__(msg, **kw)
        self.failed = tuple(failed)


class Revoked(PeerError):
    """A rank revoked the communicator: every pending and later operation fails with this error,
    on every rank, until the survivors ``shrink()`` it into a new one."""


class CommTimeout(CommsError, TimeoutError):
    """A blocking wait passed its deadline."""


class TransportError(CommsError):
    """A transport is broken or could not be set up (system error, /dev/shm full, bad peer)."""


class NotSupported(CommsError):
    """An optional feature (a transport's put/get, an algorithm for a case) is not available."""


# Native return codes, as native/_cdefs.h declares them (read through comms.runtime.native)
from .runtime.native import (E_ABORTED, E_INVALID, E_LIMIT, E_MISMATCH, E_NOMEM, E_PEER_ABORTED,  # noqa: E402
                             E_PEER_CLOSED, E_PEER_DEAD, E_REVOKED, E_SYS, E_TIMEOUT, E_TRUNCATE, EAGAIN, OK)

_CODE_NAMES = {
    E_TIMEOUT: "timeout", E_PEER_CLOSED: "peer closed", E_PEER_DEAD: "peer died",
    E_PEER_ABORTED: "peer aborted", E_MISMATCH: "mismatch", E_TRUNCATE: "size mismatch",
    E_SYS: "system error", E_INVALID: "invalid argument", E_NOMEM: "out of memory",
    E_ABORTED: "communicator aborted", E_REVOKED: "communicator revoked",
    E_LIMIT: "unexpected-message limit exceeded",
}


def error_class(code: int) -> type[CommsError]:
    """The exception class for a native return code."""
    if code == E_TIMEOUT:
        return CommTimeout
    if code in (E_MISMATCH, E_TRUNCATE):
        return MismatchError
    if code == E_REVOKED:
        return Revoked
    if code in (E_PEER_CLOSED, E_PEER_DEAD, E_PEER_ABORTED):
        return PeerError
    if code == E_INVALID:
        return InvalidUsage
    return TransportError


def code_name(code: int) -> str:
    return _CODE_NAMES.get(code, f"error {code}")
