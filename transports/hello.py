"""The hello that opens every data-plane connection of the mesh (transports/mesh.py), in its two
forms, and the checks of each. Pure functions of bytes: no sockets here.

Without a job secret (the plain hello, as before authentication existed), the dialer sends

    PLAIN = magic (4 s) | communicator key (16 s) | dialer rank (i32) | size (i32)      28 bytes

and the acceptor sends nothing back.

With a job secret (comms.security.token), a mutual challenge-response in three messages, with
``K = derive(secret, "hello")``; the secret itself never crosses the wire:

1. acceptor -> dialer: ``nonce_a`` (16 random bytes), as soon as it accepts the connection;
2. dialer -> acceptor: ``AUTH = PLAIN fields | nonce_d (16 s) | mac_d (32 s)`` (76 bytes), where
   ``mac_d = HMAC-SHA256(K, "dial" | nonce_a | PLAIN fields | nonce_d)``;
3. acceptor -> dialer: ``mac_a = HMAC-SHA256(K, "accept" | nonce_d | nonce_a | PLAIN fields |
   acceptor rank (i32))`` (32 bytes), only once ``mac_d`` checked out.

The acceptor takes a connection only with a correct ``mac_d`` over its own fresh nonce (so a
recorded hello cannot be replayed); the dialer sends nothing more until ``mac_a`` over its own
fresh nonce checks out, so a rank never sends data to an impostor at its peer's address. The
labels "dial" and "accept" keep a message of one side from being reflected as the other's. This
authenticates who opens a connection, not what flows on it afterwards: the data is neither
encrypted nor tagged (an attacker on the path could still take over an established connection).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import struct

PLAIN = struct.Struct("!4s16sii")
NONCE_BYTES = 16
MAC_BYTES = 32
AUTH = struct.Struct(f"!4s16sii{NONCE_BYTES}s{MAC_BYTES}s")
RANK = struct.Struct("!i")


class Refused(Exception):
    """A hello that does not open a connection; the message says why (for the log, no secret in it)."""


class Hello:
    """The hello of one transport (``magic``) of one communicator (``comm_key``), seen from rank
    ``rank`` of ``size``; ``key`` is derive(secret, "hello"), or None for the plain hello."""

    def __init__(self, magic: bytes, comm_key: bytes, rank: int, size: int, key: bytes | None):
        self.magic, self.comm_key, self.rank, self.size, self.key = magic, comm_key, rank, size, key

    def _mac(self, *parts: bytes) -> bytes:
        return hmac.new(self.key, b"".join(parts), hashlib.sha256).digest()

    # -- the acceptor's side -------------------------------------------------------------------
    def challenge(self) -> bytes:
        """Message 1 (a fresh nonce_a); b"" for the plain hello."""
        return os.urandom(NONCE_BYTES) if self.key is not None else b""

    @property
    def expected(self) -> int:
        """How many bytes the acceptor reads from a dialer: exactly its hello, never more."""
        return PLAIN.size if self.key is None else AUTH.size

    def check(self, data: bytes, nonce_a: bytes) -> tuple[int, bytes]:
        """(the dialer's rank, message 3 to send it: b"" for the plain hello) from the dialer's
        hello ``data`` (exactly :attr:`expected` bytes); Refused when it is not a lower rank of
        this communicator and transport that proved the secret over ``nonce_a``."""
        if len(data) != self.expected:
            raise Refused(f"a hello of {len(data)} bytes where {self.expected} were expected")
        if self.key is None:
            magic, comm_key, rank, size = PLAIN.unpack(data)
        else:
            magic, comm_key, rank, size, nonce_d, mac_d = AUTH.unpack(data)
        if magic != self.magic:
            raise Refused("wrong magic (not comms, or another transport)")
        if comm_key != self.comm_key:
            raise Refused("a hello for another communicator")
        if size != self.size:
            raise Refused(f"a hello for a communicator of {size} ranks, not {self.size}")
        if not 0 <= rank < self.rank:
            raise Refused(f"a hello from rank {rank}, which does not dial rank {self.rank}")
        if self.key is None:
            return rank, b""
        fields = data[:PLAIN.size]
        if not hmac.compare_digest(mac_d, self._mac(b"dial", nonce_a, fields, nonce_d)):
            raise Refused(f"a hello claiming rank {rank} failed authentication (a stranger, or a rank of another "
                          "job with another COMMS_AUTH_TOKEN)")
        return rank, self._mac(b"accept", nonce_d, nonce_a, fields, RANK.pack(self.rank))

    # -- the dialer's side ---------------------------------------------------------------------
    def plain(self) -> bytes:
        return PLAIN.pack(self.magic, self.comm_key, self.rank, self.size)

    def answer(self, nonce_a: bytes) -> tuple[bytes, bytes]:
        """(message 2, the nonce_d it carries) in answer to the acceptor's ``nonce_a``."""
        if len(nonce_a) != NONCE_BYTES:
            raise Refused(f"a challenge of {len(nonce_a)} bytes")
        nonce_d = os.urandom(NONCE_BYTES)
        fields = self.plain()
        return AUTH.pack(*PLAIN.unpack(fields), nonce_d, self._mac(b"dial", nonce_a, fields, nonce_d)), nonce_d

    def verify(self, proof: bytes, nonce_a: bytes, nonce_d: bytes, peer: int) -> bool:
        """Whether ``proof`` (message 3) shows that rank ``peer`` holds the secret, for this
        connection (our ``nonce_d``, its ``nonce_a``)."""
        expect = self._mac(b"accept", nonce_d, nonce_a, self.plain(), RANK.pack(peer))
        return len(proof) == MAC_BYTES and hmac.compare_digest(proof, expect)
