"""Rank functions for tests/test_security.py: a store an attacker writes into, ranks that hold
different secrets, and strangers on a rank's tcp listener during init."""
from __future__ import annotations

import logging
import os
import socket
import threading
import time

import numpy as np

import comms
from comms.runtime.bootstrap import default_store
from comms.security import derive
from comms.security.store import TAG_BYTES, AuthenticatedStore


def _err(exc: BaseException) -> tuple:
    return (type(exc).__name__, str(exc))


class Warnings(logging.Handler):
    """Collects the text of every warning comms logs in this process."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []
        logging.getLogger("comms").addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class _Recorder:
    """A store that only remembers the last value set."""
    value = b""

    def set(self, key, value):
        self.value = value


class TamperingStore:
    """The job's store, but a value set under a key ending in ``victim`` is replaced by an
    attacker's before anyone reads it: ``flip`` changes one byte of the value and keeps the tag, ``untagged``
    writes the value without its tag, ``stranger`` tags it with another secret."""

    def __init__(self, store, victim: str, how: str):
        self._store, self.victim, self.how = store, victim, how

    def set(self, key, value):
        if not key.endswith(self.victim):
            self._store.set(key, value)
        else:        # the attacker's value is the only one anyone can read (no race with the real one)
            raw = bytes(value)
            body = raw[:-TAG_BYTES]
            if self.how == "flip":
                forged = body[:5] + bytes([body[5] ^ 0x01]) + body[6:] + raw[-TAG_BYTES:]
            elif self.how == "untagged":
                forged = body
            else:
                rec = _Recorder()
                AuthenticatedStore(rec, b"another job's token").set(key, body)
                forged = rec.value
            self._store.set(key, forged)

    def get(self, key):
        return self._store.get(key)

    def wait(self, keys, *timeout):
        return self._store.wait(keys, *timeout)

    def check(self, keys):
        return self._store.check(keys)

    def add(self, key, amount):
        return self._store.add(key, amount)

    def set_timeout(self, timeout):
        return self._store.set_timeout(timeout)


def tampered_store(rank: int, size: int, how: str) -> tuple:
    """Rank 1's info entry is overwritten by an attacker; every rank must refuse it."""
    os.environ["COMMS_AUTH_TOKEN"] = "the job's token"
    store = default_store(rank, size, 30)
    if rank == 1:
        store = TamperingStore(store, "/info/1", how)
    try:
        comms.init(store=store, timeout=30).close()
        return ("no error", "")
    except comms.CommsError as e:
        return _err(e)


def with_token(rank: int, size: int, tokens: list) -> tuple:
    """Init with ``tokens[rank]`` as COMMS_AUTH_TOKEN (None: unset), then one all_reduce."""
    if tokens[rank] is None:
        os.environ.pop("COMMS_AUTH_TOKEN", None)
    else:
        os.environ["COMMS_AUTH_TOKEN"] = tokens[rank]
    t0 = time.monotonic()
    try:
        comm = comms.init(timeout=30)
    except comms.CommsError as e:
        return _err(e) + (time.monotonic() - t0,)
    x = np.full(3, rank + 1.0)
    comm.all_reduce(x)
    comm.close()
    return ("ok", x.tolist(), time.monotonic() - t0)


def _stranger(kind: str, sock: socket.socket, comm_key: bytes, size: int, out: list) -> None:
    """One stranger on an accepting rank's listener (connected already): ``wrong-secret`` answers
    the challenge claiming rank 0 with another job's key; ``no-secret`` sends the plain hello
    claiming rank 0; ``garbage`` sends bytes; ``silent`` sends nothing. Records (kind, how the
    rank ended the connection, every byte it sent)."""
    from comms.transports.hello import NONCE_BYTES, Hello
    sock.settimeout(60)
    got, how = b"", "closed"
    try:
        if kind == "wrong-secret":
            while len(got) < NONCE_BYTES and (chunk := sock.recv(NONCE_BYTES - len(got))):
                got += chunk
            hello = Hello(b"CMTC", comm_key, 0, size, derive(b"another job's token", "hello"))
            sock.sendall(hello.answer(got)[0])
        elif kind == "no-secret":
            sock.sendall(Hello(b"CMTC", comm_key, 0, size, None).plain())
        elif kind == "garbage":
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n" + b"x" * 64)
        while chunk := sock.recv(4096):          # until the rank ends the connection
            got += chunk
    except ConnectionResetError:                 # closed with our unread bytes: the kernel resets
        how = "reset"
    except OSError as e:
        how = f"error {e}"
    finally:
        sock.close()
    out.append((kind, how, got))


def strangers(rank: int, size: int, kinds: list) -> tuple:
    """Strangers connect to the tcp listener of every rank but 0 (the ranks that accept) as soon as
    it listens, before any peer can dial it; init still succeeds, promptly, and the all_reduce is right."""
    import comms.transports.tcp as tcp
    orig = tcp.TcpTransport.listen
    outcomes: list = []
    threads: list = []

    def listen_and_poke(self):
        addr = orig(self)
        if self.boot.rank == 0:                  # accepts from nobody: its listener is never read
            return addr
        host, port = self.mesh.listener.getsockname()[:2]
        for kind in kinds:
            s = socket.create_connection((host, port))        # queued before the real peer's
            t = threading.Thread(target=_stranger, args=(kind, s, self.boot.comm_key, self.boot.size, outcomes),
                                 daemon=True)
            t.start()
            threads.append(t)
        return addr

    tcp.TcpTransport.listen = listen_and_poke
    warnings = Warnings()
    t0 = time.monotonic()
    comm = comms.init(timeout=60)
    took = time.monotonic() - t0
    x = np.full(3, rank + 1.0)
    comm.all_reduce(x)
    comm.close()
    for t in threads:
        t.join(30)
    return x.tolist(), took, warnings.lines, sorted(outcomes)


def calls_per_all_reduce(rank: int, size: int) -> dict:
    """The functions an 8 B all_reduce runs (Python ones as file:function, C ones, the native
    core's included, as c:name), on a communicator without the job secret and on one with it, in
    the same processes."""
    import sys
    x = np.ones(2, np.float32)
    out = {}
    for token in (None, "the job's token"):
        if token is None:
            os.environ.pop("COMMS_AUTH_TOKEN", None)
        else:
            os.environ["COMMS_AUTH_TOKEN"] = token
        comm = comms.init(timeout=30)
        for _ in range(20):
            comm.all_reduce(x)               # plans built, fast path warm
        seen: set = set()

        def hook(frame, event, arg):
            if event == "call":
                seen.add(f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_code.co_name}")
            elif event == "c_call":
                seen.add(f"c:{getattr(arg, '__qualname__', None) or getattr(arg, '__name__', repr(arg))}")
        comm.barrier()
        sys.setprofile(hook)
        for _ in range(50):
            comm.all_reduce(x)
        sys.setprofile(None)
        out["token" if token else "none"] = sorted(seen)
        comm.close()
    return out
