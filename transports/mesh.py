"""One TCP connection per pair of ranks, set up at init: what the tcp transport carries its data
on, and what the rdma transport watches for its peers' liveness.

The lower rank dials, the higher accepts. The dialer opens with a hello (a magic that names the
transport, the communicator's key, its rank and the size); the acceptor drops any connection whose
hello is wrong (a stranger on the port, a rank of another communicator, or one meant for another
transport) with a warning and keeps waiting for its real peers. Every wait has the init deadline.

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

from .. import config
from ..diag import log as clog
from ..errors import CommTimeout, TransportError

log = clog.get("TRANSPORT")
HELLO = struct.Struct("!4s16sii")
PORT = struct.Struct("!H")


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


class Mesh:
    """The listener and the per-peer connections of one transport during init."""

    def __init__(self, boot, magic: bytes, what: str):
        self.boot, self.magic, self.what = boot, magic, what
        self.listener: socket.socket | None = None
        self.accepted: dict[int, socket.socket] = {}

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

    def _dial(self, peer: int, addr) -> socket.socket:
        last = None
        while True:
            try:
                sock = socket.create_connection(addr, timeout=min(5.0, self._remaining()))
                sock.sendall(HELLO.pack(self.magic, self.boot.comm_key, self.boot.rank, self.boot.size))
                sock.settimeout(None)
                return sock
            except CommTimeout:
                raise CommTimeout(f"init: rank {self.boot.rank} could not connect to rank {peer} at {addr}: {last}",
                                  op="init", rank=self.boot.rank, peer=peer) from None
            except OSError as e:
                last = e
                time.sleep(0.05)

    def _accept(self, peer: int) -> socket.socket:
        while peer not in self.accepted:
            left = self._remaining()
            ready, _, _ = select.select([self.listener], [], [], min(left, 1.0))
            if not ready:
                continue
            sock, addr = self.listener.accept()
            sock.settimeout(min(5.0, left))
            try:
                data = b""
                while len(data) < HELLO.size:
                    chunk = sock.recv(HELLO.size - len(data))
                    if not chunk:
                        break
                    data += chunk
                magic, key, rank, size = HELLO.unpack(data) if len(data) == HELLO.size else (b"", b"", -1, -1)
            except (OSError, struct.error):
                magic, key, rank, size = b"", b"", -1, -1
            if magic != self.magic or key != self.boot.comm_key or size != self.boot.size \
                    or not 0 <= rank < self.boot.rank or rank in self.accepted:
                log.warning("comms: rank %d rejected a %s connection from %s: not a peer of this communicator "
                            "(bad hello)", self.boot.rank, self.what, addr)
                sock.close()
                continue
            sock.settimeout(None)
            self.accepted[rank] = sock
        return self.accepted.pop(peer)

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        for s in self.accepted.values():
            s.close()
        self.accepted.clear()
