"""The job's join secret, and the keys derived from it.

Every rank of one job is given the same secret, by one of two knobs:

* ``COMMS_AUTH_TOKEN``: the token as text (its surrounding whitespace is stripped);
* ``COMMS_AUTH_TOKEN_FILE``: the path of a file holding it. The file must be a regular file owned
  by this process's effective user and readable by that user alone (``mode & 0o077 == 0``, e.g.
  ``chmod 600``); anything else is refused with :class:`~comms.errors.InvalidUsage`, since a token
  others can read authenticates nobody. Its surrounding whitespace (a trailing newline) is stripped.

Setting both, or setting either to nothing but whitespace, is an :class:`InvalidUsage` too: a job
that asked for authentication never silently runs without it. The token's value is never logged
or shown (the knob is declared ``secret``; see :mod:`comms.config`).

The secret itself is never used as a key and never crosses the wire: each purpose takes its own
key from :func:`derive`, ``HMAC-SHA256(secret, "comms/" + label)``, so that no two uses share a key
(``"store"``: the tags on store values, comms.security.store; ``"hello"``: the data-plane
handshake, comms/transports/mesh.py; the control plane picks its own label).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import stat

from .. import config
from ..errors import InvalidUsage

KEY_BYTES = 32

config.declare("AUTH_TOKEN", str, "", "The job's join secret, as text: store values are authenticated with keys "
               "derived from it and data-plane connections prove they hold it (never sent). Every rank needs the "
               "same one. Never logged or shown.", secret=True)
config.declare("AUTH_TOKEN_FILE", str, "", "A file holding the job's join secret (instead of COMMS_AUTH_TOKEN): "
               "a regular file owned by this user and readable only by it (chmod 600).")


def _read_file(path: str) -> bytes:
    """The stripped contents of the token file ``path``, after checking what the module docstring
    requires of it on the opened file itself (no window between the check and the read)."""
    knob = config.PARAMS["AUTH_TOKEN_FILE"].env
    try:
        # O_NONBLOCK: a FIFO placed at the path must not block the open; fstat then refuses it
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise InvalidUsage(f"{knob}={path!r}: cannot open the token file: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidUsage(f"{knob}={path!r} is not a regular file")
        if st.st_uid != os.geteuid():
            raise InvalidUsage(f"{knob}={path!r} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()}); "
                               "the token file must belong to the user running the job")
        if st.st_mode & 0o077:
            raise InvalidUsage(f"{knob}={path!r} has mode {stat.S_IMODE(st.st_mode):04o}: group or others may "
                               f"access it; make it readable by its owner alone (chmod 600 {path})")
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(fd)
    secret = b"".join(chunks).strip()
    if not secret:
        raise InvalidUsage(f"{knob}={path!r}: the token file is empty")
    return secret


def job_secret() -> bytes | None:
    """The job's join secret, read now from COMMS_AUTH_TOKEN or COMMS_AUTH_TOKEN_FILE; None when
    neither is set. Raises InvalidUsage for both set, an empty token, or a token file that is not
    a regular file owned by this user with ``mode & 0o077 == 0``."""
    token_set = config.source("AUTH_TOKEN") == "env"
    file_set = config.source("AUTH_TOKEN_FILE") == "env"
    if token_set and file_set:
        raise InvalidUsage("COMMS_AUTH_TOKEN and COMMS_AUTH_TOKEN_FILE are both set: set one of them")
    if token_set:
        secret = config.get("AUTH_TOKEN").strip().encode()
        if not secret:
            raise InvalidUsage("COMMS_AUTH_TOKEN is set but empty: give the job a token, or unset it")
        return secret
    if file_set:
        path = config.get("AUTH_TOKEN_FILE")
        if not path.strip():
            raise InvalidUsage("COMMS_AUTH_TOKEN_FILE is set but empty: give it the token file's path, or unset it")
        return _read_file(path)
    return None


def derive(secret: bytes, label: str) -> bytes:
    """A 32-byte key for one purpose: ``HMAC-SHA256(secret, "comms/" + label)``. Distinct labels
    give independent keys; the same (secret, label) always gives the same key."""
    if not isinstance(secret, (bytes, bytearray)) or not secret:
        raise InvalidUsage("derive(): the secret must be non-empty bytes")
    if not isinstance(label, str) or not label:
        raise InvalidUsage("derive(): the label must be a non-empty str")
    return hmac.new(bytes(secret), f"comms/{label}".encode(), hashlib.sha256).digest()


def authenticated() -> bool:
    """Whether this process runs an authenticated job (a secret is configured). Raises
    InvalidUsage like :func:`job_secret` when the configuration is wrong."""
    return job_secret() is not None
