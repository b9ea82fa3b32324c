"""Authenticated store values: :class:`AuthenticatedStore` and :func:`secure`.

When the job has a secret (comms.security.token), comms talks to the torch.distributed Store only
through :class:`AuthenticatedStore`, which :func:`secure` puts around the store where it enters
comms (``comms.api.create``: init, split and the torch.distributed backend all come through it).

Format: a value ``v`` set under key ``k`` is stored as ``v || tag``, where

    tag = HMAC-SHA256(derive(secret, "store"), len(k) as 8 bytes big-endian || k (UTF-8) || v)

(32 bytes). :meth:`AuthenticatedStore.get` checks the tag in constant time and returns ``v``; a
value too short to hold a tag, or whose tag does not match, raises :class:`TransportError` naming
the key: it was written by a stranger, by a rank of another job (another secret), or by a rank
without the secret. The tag binds the key, so a value cannot be moved from one key to another.
It does not bind the job instance: a job that reuses both its secret and its store could read an
earlier run's values under the same keys (comms puts a generation counter in every prefix, and a
job normally starts a fresh store).

``add`` counters cannot carry a tag and pass through unchanged. comms uses them for one thing
only, the generation number that makes each communicator's key prefix distinct; a stranger who
bumps one can make the ranks disagree on the prefix, so that init times out (a denial of service,
which a stranger who reaches the store can cause anyway by deleting keys), but every value read
under any prefix is still authenticated. Nothing security-relevant may be decided from a counter,
and :meth:`get` on a counter's key fails authentication.

Without a secret, :func:`secure` returns the store untouched: comms behaves exactly as before.
Values are authenticated, not encrypted: anyone who reaches the store can read them (addresses,
host names, pids); none of them is a secret.
"""
from __future__ import annotations

import hashlib
import hmac
from typing import Any

from ..errors import TransportError
from .token import derive, job_secret

TAG_BYTES = 32


class AuthenticatedStore:
    """A torch.distributed Store seen through HMAC tags (see the module docstring). Offers the
    operations comms uses: ``set``, ``get``, ``claim``, ``wait``, ``check``, ``add``, ``set_timeout``; any
    other attribute is absent on purpose, so that no value bypasses the tags."""

    def __init__(self, store: Any, secret: bytes, rank: int | None = None):
        if isinstance(store, AuthenticatedStore):
            raise TypeError("AuthenticatedStore: the store is already authenticated")
        self._store = store
        self._secret = bytes(secret)
        self._key = derive(self._secret, "store")
        self.rank = rank

    @property
    def secret(self) -> bytes:
        return self._secret

    def _tag(self, key: str, value: bytes) -> bytes:
        k = key.encode()
        return hmac.new(self._key, len(k).to_bytes(8, "big") + k + value, hashlib.sha256).digest()

    def set(self, key: str, value: str | bytes) -> None:
        """Store ``value`` under ``key`` with its tag."""
        data = value.encode() if isinstance(value, str) else bytes(value)
        self._store.set(key, data + self._tag(key, data))

    def get(self, key: str) -> bytes:
        """The value under ``key`` (blocking as the store's own get), once its tag is checked;
        TransportError when it does not authenticate."""
        return self._open(key, bytes(self._store.get(key)))

    def claim(self, key: str, value: str | bytes) -> bytes:
        """Set ``key`` to ``value`` unless it holds a value already (the store's compare-and-set:
        one writer wins); the value in place afterwards, checked as :meth:`get` checks it."""
        data = value.encode() if isinstance(value, str) else bytes(value)
        return self._open(key, bytes(self._store.compare_set(key, "", data + self._tag(key, data))))

    def _open(self, key: str, raw: bytes) -> bytes:
        data, tag = raw[:-TAG_BYTES], raw[-TAG_BYTES:]
        if len(raw) < TAG_BYTES or not hmac.compare_digest(tag, self._tag(key, data)):
            where = f" (read by rank {self.rank})" if self.rank is not None else ""
            raise TransportError(f"store: the value under key {key!r}{where} failed authentication: it was not "
                                 "written by a rank of this job (a stranger, a rank of another job with another "
                                 "COMMS_AUTH_TOKEN, or a rank without one wrote it)", rank=self.rank)
        return data

    def wait(self, keys, *timeout) -> None:
        """Wait for ``keys`` to exist (their values are checked when read)."""
        self._store.wait(keys, *timeout)

    def check(self, keys) -> bool:
        """Whether ``keys`` exist (existence is not authenticated; reading a value is)."""
        return self._store.check(keys)

    def add(self, key: str, amount: int) -> int:
        """The store's counter, untagged: see the module docstring for why nothing trusts it."""
        return self._store.add(key, amount)

    def set_timeout(self, timeout) -> None:
        self._store.set_timeout(timeout)


def secure(store: Any, rank: int | None = None) -> tuple[Any, bytes | None]:
    """(the store comms should use, the job's secret or None). A store that is already an
    AuthenticatedStore (a parent communicator's, given to split) keeps its secret; otherwise the
    secret is read now (comms.security.token.job_secret) and, when there is one, the store is
    wrapped; without one it is returned as it is."""
    if isinstance(store, AuthenticatedStore):
        return store, store.secret
    secret = job_secret()
    if secret is None:
        return store, None
    return AuthenticatedStore(store, secret, rank), secret


def claim(store: Any, key: str, value: str) -> bytes:
    """First write wins: set ``key`` to ``value`` unless it has a value, and return the value in
    place (authenticated when ``store`` is an AuthenticatedStore)."""
    if isinstance(store, AuthenticatedStore):
        return store.claim(key, value)
    return bytes(store.compare_set(key, "", value.encode()))
