"""One TCP connection per pair of ranks, set up at init: what the tcp transport carries its data
on, and what the rdma transport watches for its peers' liveness.

The lower rank dials, the higher accepts. Every connection opens with a hello (transports/hello.py:
a magic that names the transport, the communicator's key, the dialer's rank and the size; with a
job secret, a mutual challenge-response over it). The acceptor drops any connection whose hello
is wrong (a stranger on the port, a rank of another communicator or of another job, or one meant
for another transport) with a warning and keeps waiting for its real peers; a dialer whose peer
does not prove the secret fails init rather than send it anything.

The acceptor never blocks on one connection: it waits with select() on its listener and every
connection whose hello is still due, reads each without blocking, and drops one that has not sent
its hello within HELLO_WAIT_S (or the init deadline, if sooner), or that would hold more than
MAX_PENDING connections open. So a stranger that connects and stays silent (or trickles bytes)
delays no real peer. It reads exactly a hello's length, never into the data that follows. Every
read and wait of both sides has the init deadline.

Addresses: COMMS_SOCKET_ADDR if set; loopback when every rank is on this host; otherwise the local
address of the route towards MASTER_ADDR. An address is the port (2 bytes, network order) then
the host as text, parsed strictly by :meth:`Mesh.parse` (it comes from the store).
"""
from __future__ import annotations

import ipaddress
import os
import select
import socket
import struct
import time
from dataclasses import dataclass, field

from .. import config
from ..diag import log as clog
from ..errors import CommTimeout, TransportError
from ..security.token import derive
from .hello import MAC_BYTES, NONCE_BYTES, Hello, Refused

log = clog.get("TRANSPORT")
PORT = struct.Struct("!H")
HELLO_WAIT_S = 10.0         # the longest an accepted connection may take to send its hello
MAX_PENDING = 64            # accepted connections whose hello is still due, at most (the oldest goes)


def local_address(all_local: bool) -> str:
    """The address this rank's listeners bind: see the module docstring."""
    addr = config.get("SOCKET_ADDR")
    if addr:
        return addr
    if all_local:
        return "127.0.0.1"
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master, 9))          # no packet is sent: this only picks a route
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


@dataclass
class _Pending:
    """An accepted connection whose hello is still due."""
    sock: socket.socket
    addr: tuple
    nonce: bytes
    expires: float
    data: bytearray = field(default_factory=bytearray)


class Mesh:
    """The listener and the per-peer connections of one transport during init."""

    def __init__(self, boot, magic: bytes, what: str):
        self.boot, self.magic, self.what = boot, magic, what
        secret = getattr(boot, "secret", None)
        self.hello = Hello(magic, boot.comm_key, boot.rank, boot.size,
                           derive(secret, "hello") if secret is not None else None)
        self.listener: socket.socket | None = None
        self.accepted: dict[int, socket.socket] = {}
        self.pending: dict[socket.socket, _Pending] = {}

    def all_local(self) -> bool:
        peers = self.boot.peers
        return all(p.same_host(peers[self.boot.rank]) for p in peers)

    def listen(self) -> bytes:
        host = local_address(self.all_local())
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, 0))
        self.listener.listen(max(16, self.boot.size))
        self.listener.setblocking(False)          # accept() after select() must not block on a vanished client
        host, port = self.listener.getsockname()[:2]
        return PORT.pack(port) + host.encode()

    def parse(self, peer: int, address: bytes) -> tuple[str, int]:
        try:
            host = str(ipaddress.ip_address(address[PORT.size:].decode("ascii")))
            (port,) = PORT.unpack_from(address)
        except (ValueError, UnicodeDecodeError, struct.error):
            raise TransportError(f"{self.what}: rank {peer} published a malformed address ({len(address)} bytes)",
                                 rank=self.boot.rank, peer=peer) from None
        return host, port

    def connection(self, peer: int, address: bytes) -> socket.socket:
        """The connected, hello-checked socket to ``peer`` (blocking mode)."""
        if peer > self.boot.rank:
            return self._dial(peer, self.parse(peer, address))
        return self._accept(peer)

    def _remaining(self) -> float:
        left = self.boot.deadline - time.monotonic()
        if left <= 0:
            raise CommTimeout(f"init: rank {self.boot.rank} timed out connecting {self.what} peers", op="init",
                              rank=self.boot.rank)
        return left

    # -- the dialer ----------------------------------------------------------------------------
    def _recv_exact(self, sock: socket.socket, n: int) -> bytes:
        """``n`` bytes from ``sock``, each read under the init deadline; ConnectionError at EOF."""
        data = b""
        while len(data) < n:
            sock.settimeout(self._remaining())
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError(f"closed after {len(data)} of {n} bytes")
            data += chunk
        return data

    def _dial(self, peer: int, addr) -> socket.socket:
        last = None
        while True:
            sock = None
            try:
                sock = socket.create_connection(addr, timeout=min(5.0, self._remaining()))
                if self.hello.key is None:
                    sock.sendall(self.hello.plain())
                else:
                    nonce_a = self._recv_exact(sock, NONCE_BYTES)
                    answer, nonce_d = self.hello.answer(nonce_a)
                    sock.settimeout(self._remaining())
                    sock.sendall(answer)
                    if not self.hello.verify(self._recv_exact(sock, MAC_BYTES), nonce_a, nonce_d, peer):
                        raise TransportError(f"init: rank {self.boot.rank}'s {self.what} connection to rank {peer} at "
                                             f"{addr} failed authentication: what answers there does not hold this "
                                             "job's secret (an impostor?); nothing was sent to it",
                                             op="init", rank=self.boot.rank, peer=peer)
                sock.settimeout(None)
                return sock
            except CommTimeout:
                if sock is not None:
                    sock.close()
                raise CommTimeout(f"init: rank {self.boot.rank} could not connect to rank {peer} at {addr}: "
                                  f"{last or 'its hello did not complete'}", op="init", rank=self.boot.rank,
                                  peer=peer) from None
            except TransportError:
                sock.close()
                raise
            except OSError as e:                  # refused, reset, closed by the acceptor, timed out: again
                if sock is not None:
                    sock.close()
                last = e
                time.sleep(0.05)

    # -- the acceptor --------------------------------------------------------------------------
    def _accept(self, peer: int) -> socket.socket:
        while peer not in self.accepted:
            left = self._remaining()
            now = time.monotonic()
            for p in [p for p in self.pending.values() if p.expires <= now]:
                self._drop(p, f"sent {len(p.data)} of {self.hello.expected} hello bytes in "
                              f"{min(HELLO_WAIT_S, self.boot.timeout):g} s")
            wait = min([left, 1.0] + [p.expires - now for p in self.pending.values()])
            ready, _, _ = select.select([self.listener, *self.pending], [], [], max(wait, 0.0))
            for sock in ready:
                if sock is self.listener:
                    self._take()
                elif sock in self.pending:
                    self._read(self.pending[sock])
        return self.accepted.pop(peer)

    def _take(self) -> None:
        """Accept one connection, send it the challenge, and wait for its hello with the others."""
        try:
            sock, addr = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionError):
            return
        except OSError as e:                      # out of descriptors: the oldest pending one makes room
            log.warning("comms: rank %d could not accept a %s connection: %s", self.boot.rank, self.what, e)
            if self.pending:
                self._drop(next(iter(self.pending.values())), "dropped to make room")
            return
        sock.setblocking(False)
        p = _Pending(sock, addr, self.hello.challenge(),
                     time.monotonic() + min(HELLO_WAIT_S, self.boot.timeout))
        if len(self.pending) >= MAX_PENDING:
            self._drop(next(iter(self.pending.values())), f"one of more than {MAX_PENDING} connections without "
                                                          "a hello (the oldest)")
        self.pending[sock] = p
        if p.nonce:
            try:
                sent = sock.send(p.nonce)     # 16 bytes into an empty send buffer: all of them or an error
            except OSError as e:
                sent = e
            if sent != len(p.nonce):
                self._drop(p, f"could not be sent the challenge ({sent})")

    def _read(self, p: _Pending) -> None:
        try:
            chunk = p.sock.recv(self.hello.expected - len(p.data))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._drop(p, f"connection error after {len(p.data)} hello bytes ({e})")
            return
        if not chunk:
            self._drop(p, f"closed after {len(p.data)} of {self.hello.expected} hello bytes")
            return
        p.data += chunk
        if len(p.data) < self.hello.expected:
            return
        try:
            rank, proof = self.hello.check(bytes(p.data), p.nonce)
            if rank in self.accepted:
                raise Refused(f"a second connection claiming rank {rank}")
            if proof:
                p.sock.setblocking(True)
                p.sock.settimeout(self._remaining())
                p.sock.sendall(proof)
        except (Refused, OSError) as e:
            self._drop(p, str(e))
            return
        del self.pending[p.sock]
        p.sock.settimeout(None)
        self.accepted[rank] = p.sock

    def _drop(self, p: _Pending, why: str) -> None:
        log.warning("comms: rank %d refused a %s connection from %s: not a peer of this communicator: %s",
                    self.boot.rank, self.what, p.addr, why)
        self.pending.pop(p.sock, None)
        p.sock.close()

    def close(self) -> None:
        for p in list(self.pending.values()):
            self._drop(p, f"no complete hello by the end of init ({len(p.data)} bytes)")
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        for s in self.accepted.values():
            s.close()
        self.accepted.clear()
