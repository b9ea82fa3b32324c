"""TCP transport for peers on other hosts (and for local peers when COMMS_TRANSPORT=tcp).

One connection per pair of ranks: the lower rank connects, the higher accepts. The connector
opens with a hello (magic, communicator id, its rank); the acceptor drops any connection whose
hello is wrong (a stranger on the port) with a warning and keeps waiting for its real peers.
Established sockets are non-blocking with TCP_NODELAY and handed to native/tcp.c, which frames
messages and sends/receives them without copies (sendmsg of header + payload, recv straight into
the destination), pipelining large messages in chunks.

Addresses: COMMS_SOCKET_ADDR if set; loopback when every rank is on this host; otherwise the local
address of the route towards MASTER_ADDR.
"""
from __future__ import annotations

import os
import pickle
import select
import socket
import struct
import time

from .. import config
from .. import log as clog
from ..errors import CommTimeout, TransportError
from .base import Transport

log = clog.get("TRANSPORT")
HELLO = struct.Struct("!4s16sii")
MAGIC = b"CMTC"


def _local_address(all_local: bool) -> str:
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


def _tune(sock: socket.socket) -> None:
    """Options of a data socket: no Nagle delay, COMMS_TCP_BUFFER_BYTES of send and receive buffer, and
    at most COMMS_TCP_NOTSENT_LOWAT unsent bytes queued. Without that limit a bulk sender queues
    megabytes; the ACKs then release them from the softirq of the core that received the ACK, while
    the sending thread transmits from its own core, so the peer sees segments out of order, and its
    SACKs trigger spurious retransmits. On two simulated hosts (veth, unshaped) that cost about a
    tenth of the throughput (bench.tcp_p2p). An option the kernel refuses is logged and skipped."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = config.get("TCP_BUFFER_BYTES")
    opts = [("SO_SNDBUF", socket.SOL_SOCKET, socket.SO_SNDBUF, buffer),
            ("SO_RCVBUF", socket.SOL_SOCKET, socket.SO_RCVBUF, buffer),
            ("TCP_NOTSENT_LOWAT", socket.IPPROTO_TCP, getattr(socket, "TCP_NOTSENT_LOWAT", 25),
             config.get("TCP_NOTSENT_LOWAT"))]
    for name, level, opt, value in opts:
        if value > 0:
            try:
                sock.setsockopt(level, opt, value)
            except OSError as e:
                log.info("tcp: socket option %s=%d refused (%s); left at the kernel's default", name, value, e)


class TcpTransport(Transport):
    name = "tcp"

    def __init__(self, boot):
        super().__init__(boot)
        self.listener: socket.socket | None = None
        self.accepted: dict[int, socket.socket] = {}

    def can_connect(self, me, peer) -> bool:
        forced = self.boot.forced_transport
        return forced in (None, self.name)

    def listen(self) -> bytes:
        peers = self.boot.peers
        all_local = all(p.same_host(peers[self.boot.rank]) for p in peers)
        host = _local_address(all_local)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, 0))
        self.listener.listen(max(16, self.boot.size))
        return pickle.dumps(self.listener.getsockname()[:2])

    def _remaining(self) -> float:
        left = self.boot.deadline - time.monotonic()
        if left <= 0:
            raise CommTimeout(f"init: rank {self.boot.rank} timed out connecting tcp peers", op="init",
                              rank=self.boot.rank)
        return left

    def connect(self, peer: int, address: bytes) -> None:
        if peer > self.boot.rank:
            sock = self._dial(peer, pickle.loads(address))
        else:
            sock = self._accept(peer)
        _tune(sock)
        sock.setblocking(False)
        from .._native import lib
        rc = lib.cm_ctx_add_tcp_peer(self.boot.engine.ctx, peer, sock.fileno(), config.get("TCP_CHUNK_BYTES"))
        if rc != 0:
            sock.close()
            raise TransportError(f"tcp: native context rejected the socket of rank {peer} (code {rc})")
        sock.detach()                         # the engine owns and closes the fd now
        delay = config.get("TCP_DELAY_US")
        if delay > 0:
            lib.cm_ctx_set_tcp_delay(self.boot.engine.ctx, peer, int(delay * 1000))

    def _dial(self, peer: int, addr) -> socket.socket:
        last = None
        while True:
            try:
                sock = socket.create_connection(addr, timeout=min(5.0, self._remaining()))
                sock.sendall(HELLO.pack(MAGIC, self.boot.comm_key, self.boot.rank, self.boot.size))
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
            if magic != MAGIC or key != self.boot.comm_key or size != self.boot.size or not 0 <= rank < self.boot.rank \
                    or rank in self.accepted:
                log.warning("comms: rank %d rejected a connection from %s: not a peer of this communicator "
                            "(bad hello)", self.boot.rank, addr)
                sock.close()
                continue
            sock.settimeout(None)
            self.accepted[rank] = sock
        return self.accepted.pop(peer)

    def finish(self) -> None:
        self.close()

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        for s in self.accepted.values():
            s.close()
        self.accepted.clear()
