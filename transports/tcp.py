"""TCP transport for peers on other hosts (and for local peers when COMMS_TRANSPORT=tcp).

One connection per pair of ranks (transports/mesh.py: the lower rank dials, a hello keeps
strangers out). Established sockets are non-blocking with TCP_NODELAY and handed to native/tcp.c,
which frames messages and sends/receives them without copies (sendmsg of header + payload, recv
straight into the destination), pipelining large messages in chunks.
"""
from __future__ import annotations

import socket

from .. import config
from ..diag import log as clog
from ..errors import TransportError
from ..selection.model import Link
from .base import Endpoint, Transport
from .mesh import Mesh

log = clog.get("TRANSPORT")

config.declare("TCP_DELAY_US", float, 0.0, "Test hook: hold every TCP message this many microseconds before "
               "sending (emulates network latency; netem is not available everywhere).")
config.declare("TCP_CHUNK_BYTES", "size", 256 << 10, "Bytes per receive chunk when TCP data is reduced on arrival.")
config.declare("TCP_BUFFER_BYTES", "size", 4 << 20, "SO_SNDBUF and SO_RCVBUF of each TCP data socket (the kernel "
               "doubles them); 0 leaves both to the kernel's autotuning.")
config.declare("TCP_NOTSENT_LOWAT", "size", 512 << 10, "TCP_NOTSENT_LOWAT of each TCP data socket: the most bytes "
               "queued in the kernel but not yet sent; 0 leaves the kernel's default (no limit). A limit keeps the "
               "sender's transmissions in its own thread instead of the softirq that handles incoming ACKs (on "
               "another core, which reorders segments and triggers spurious retransmits).")

config.declare("TCP_CONGESTION", str, "cubic,reno", "Congestion control of each TCP data socket: the first of these "
               "(comma-separated) that the kernel lets this process set (root may set any it has loaded, others "
               "those in net.ipv4.tcp_allowed_congestion_control); empty: the system's default. Not bbr by "
               "default: its pacing held a collective's segments back 10-120 ms at a time (below).")
TCP_CONGESTION = getattr(socket, "TCP_CONGESTION", 13)


def _congestion(sock: socket.socket) -> None:
    """Set the first congestion control of COMMS_TCP_CONGESTION the kernel accepts. Collectives send
    bursts and then wait: bbr (a common system default, and this VM's) paces every burst at a rate it
    estimated from the last, application-limited ones. On 2 simulated hosts x 2 ranks (2 Gbit/s htb or
    tbf), 1 in 10-30 hierarchical all_reduces of 256 KiB stalled 10-120 ms with the link idle: a kernel
    trace showed each held segment sent from tcp's pacing timer, no retransmission. With cubic or reno
    the stalls were gone (mean 1.39-1.78 ms against bbr's 3.28-3.43, 300 calls), and 16 MiB ran at the
    same speed (hierarchical 70-81 ms, ring 106-115 ms, with either)."""
    names = [n.strip() for n in config.get("TCP_CONGESTION").split(",") if n.strip()]
    for name in names:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_CONGESTION, name.encode())
            return
        except OSError as e:
            log.debug("tcp: congestion control %s refused (%s)", name, e)
    if names:
        log.info("tcp: none of the congestion controls %s is allowed here; the system's default stays", names)


def _tune(sock: socket.socket) -> None:
    """Options of a data socket: no Nagle delay, COMMS_TCP_BUFFER_BYTES of send and receive buffer, and
    at most COMMS_TCP_NOTSENT_LOWAT unsent bytes queued. Without that limit a bulk sender queues
    megabytes; the ACKs then release them from the softirq of the core that received the ACK, while
    the sending thread transmits from its own core, so the peer sees segments out of order, and its
    SACKs trigger spurious retransmits. On two simulated hosts (veth, unshaped) that cost about a
    tenth of the throughput (bench.tcp_p2p). The congestion control as :func:`_congestion` says. An
    option the kernel refuses is logged and skipped."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _congestion(sock)
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
    link = Link(40.0, 1.5)           # until calibration measures them: 37-41 us a step over loopback (3 fits,
    #                                  COMMS_TRANSPORT=tcp, 1x2); 1.5 GB/s is a 10-25 Gbit/s NIC's (loopback: 9.1-9.4)
    waits_together = False           # every exchange costs its own syscalls and wake-ups

    def __init__(self, boot):
        super().__init__(boot)
        self.mesh = Mesh(boot, b"CMTC", self.name)

    def can_connect(self, me, peer) -> bool:
        return True                          # any pair that an earlier transport did not take

    def listen(self) -> bytes:
        return self.mesh.listen()

    def connect(self, peer: int, address: bytes) -> Endpoint:
        sock = self.mesh.connection(peer, address)
        _tune(sock)
        sock.setblocking(False)
        from ..runtime import native
        rc = native.ctx_add_tcp_peer(self.boot.engine.ctx, peer, sock.fileno(), config.get("TCP_CHUNK_BYTES"))
        if rc != 0:
            sock.close()
            raise TransportError(f"tcp: native context rejected the socket of rank {peer} (code {rc})")
        sock.detach()                         # the engine owns and closes the fd now
        delay = config.get("TCP_DELAY_US")
        if delay > 0:
            native.ctx_set_tcp_delay(self.boot.engine.ctx, peer, int(delay * 1000))
        return Endpoint(peer, self)

    def finish(self) -> None:
        self.mesh.close()

    def close(self) -> None:
        self.mesh.close()

TRANSPORT = TcpTransport
