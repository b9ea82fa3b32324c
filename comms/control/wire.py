"""The control plane's messages: fixed binary layouts, parsed strictly.

Every message is one zmq frame: a header (magic ``CMCP``, version, kind, the 16-byte key of the
plane's root communicator) and a body whose length the kind fixes. Anything else, whatever its
origin, is dropped by :func:`parse` (it returns None) before a field is used: a rank number out of
range, an unknown kind or cause, a frame of the wrong length. Nothing is unpickled; nothing is
decoded as text.

Kinds:

* ``FAIL``: ranks declared failed, each with its cause and the rank that detected it;
* ``REVOKE``: a communicator (named by an 8-byte token of its store prefix) was revoked by a rank;
* ``ABORT``: the same layout: a rank's communicator failed on an error it found itself (ranks that
  called different collectives, a timeout, a malformed message); its peers fail at once too, and
  read the reason it left in the store, even those that wait on third ranks or on nothing from it;
* ``BYE``: the sender closes its plane on purpose; a connection it drops afterwards is no failure.
"""
from __future__ import annotations

import hashlib
import struct
from typing import NamedTuple

MAGIC, VERSION = b"CMCP", 1
FAIL, REVOKE, BYE, ABORT = 1, 2, 3, 4
HEADER = struct.Struct("!4sBB16s")
ENTRY = struct.Struct("!iBi")          # failed rank, cause, detecting rank
COUNT = struct.Struct("!H")
REVOKE_BODY = struct.Struct("!8si")    # communicator token, revoking (aborting) rank (in plane ranks)
BYE_BODY = struct.Struct("!i")
MAX_ENTRIES = 4096

# causes of a failure, as the detecting rank saw it (the text ends "... (detected by rank N)")
GONE, ZOMBIE, STOPPED, LOST, SILENT = 1, 2, 3, 4, 5
CAUSES = {
    GONE: "its process exited or was killed",
    ZOMBIE: "its process was killed or exited (a zombie its parent has not reaped yet)",
    STOPPED: "its process is stopped (SIGSTOP or a debugger)",
    LOST: "its control connection was lost: the process died, hung past the heartbeat timeout, or its "
          "host or link went down",
    SILENT: "its control plane never answered",
}


class Message(NamedTuple):
    kind: int
    entries: tuple = ()        # FAIL: ((rank, cause, detector), ...)
    token: bytes = b""         # REVOKE, ABORT
    origin: int = -1           # REVOKE, ABORT, BYE


def token(prefix: str) -> bytes:
    """The 8-byte name of a communicator in REVOKE messages (from its store prefix)."""
    return hashlib.blake2b(prefix.encode(), digest_size=8).digest()


def fail(key: bytes, entries) -> bytes:
    entries = list(entries)[:MAX_ENTRIES]
    return HEADER.pack(MAGIC, VERSION, FAIL, key) + COUNT.pack(len(entries)) + \
        b"".join(ENTRY.pack(r, c, d) for r, c, d in entries)


def revoke(key: bytes, tok: bytes, origin: int, kind: int = REVOKE) -> bytes:
    """A REVOKE (or, with ``kind=ABORT``, an ABORT) of the communicator ``tok`` by ``origin``."""
    return HEADER.pack(MAGIC, VERSION, kind, key) + REVOKE_BODY.pack(tok, origin)


def bye(key: bytes, rank: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, BYE, key) + BYE_BODY.pack(rank)


def parse(frame: bytes, key: bytes, size: int) -> Message | None:
    """The message in ``frame`` if it is well formed, for this plane (``key``) and names only ranks
    below ``size``; else None."""
    if len(frame) < HEADER.size:
        return None
    magic, version, kind, k = HEADER.unpack_from(frame)
    if magic != MAGIC or version != VERSION or k != key:
        return None
    body = frame[HEADER.size:]
    if kind == FAIL:
        if len(body) < COUNT.size:
            return None
        (n,) = COUNT.unpack_from(body)
        if n > MAX_ENTRIES or len(body) != COUNT.size + n * ENTRY.size:
            return None
        entries = tuple(ENTRY.unpack_from(body, COUNT.size + i * ENTRY.size) for i in range(n))
        if any(not (0 <= r < size and 0 <= d < size and c in CAUSES) for r, c, d in entries):
            return None
        return Message(FAIL, entries=entries)
    if kind in (REVOKE, ABORT) and len(body) == REVOKE_BODY.size:
        tok, origin = REVOKE_BODY.unpack(body)
        return Message(kind, token=tok, origin=origin) if 0 <= origin < size else None
    if kind == BYE and len(body) == BYE_BODY.size:
        (origin,) = BYE_BODY.unpack(body)
        return Message(BYE, origin=origin) if 0 <= origin < size else None
    return None
