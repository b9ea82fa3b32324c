"""Options of the TCP transport's data sockets (transports/tcp.py ``_tune``), read back from the kernel."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest

from comms.transports.tcp import _tune

LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)


@pytest.fixture
def sock():
    """One end of a connected loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        try:
            yield client
        finally:
            client.close()
            peer.close()


def test_data_socket_has_nodelay_buffers_and_an_unsent_limit(sock, monkeypatch):
    for knob in ("COMMS_TCP_BUFFER_BYTES", "COMMS_TCP_NOTSENT_LOWAT"):
        monkeypatch.delenv(knob, raising=False)
    default_sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    _tune(sock)
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, LOWAT) == 512 << 10
    # the kernel caps the request at net.core.wmem_max and doubles it for its bookkeeping
    cap = int(Path("/proc/sys/net/core/wmem_max").read_text())
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * min(4 << 20, cap)
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) != default_sndbuf


def test_knobs_override_the_options(sock, monkeypatch):
    monkeypatch.setenv("COMMS_TCP_NOTSENT_LOWAT", "128K")
    monkeypatch.setenv("COMMS_TCP_BUFFER_BYTES", "256K")
    _tune(sock)
    assert sock.getsockopt(socket.IPPROTO_TCP, LOWAT) == 128 << 10
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * (256 << 10)


def test_zero_leaves_the_kernel_defaults(sock, monkeypatch):
    kernel_lowat = sock.getsockopt(socket.IPPROTO_TCP, LOWAT)
    kernel_sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    monkeypatch.setenv("COMMS_TCP_NOTSENT_LOWAT", "0")
    monkeypatch.setenv("COMMS_TCP_BUFFER_BYTES", "0")
    _tune(sock)
    assert sock.getsockopt(socket.IPPROTO_TCP, LOWAT) == kernel_lowat
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == kernel_sndbuf


def _congestion_of(sock) -> str:
    from comms.transports.tcp import TCP_CONGESTION
    return sock.getsockopt(socket.IPPROTO_TCP, TCP_CONGESTION, 16).split(b"\0")[0].decode()


def _allowed() -> set[str]:
    return set(Path("/proc/sys/net/ipv4/tcp_allowed_congestion_control").read_text().split())


def test_congestion_control_is_the_first_the_kernel_accepts(sock, monkeypatch):
    """cubic where this process may set it (root, or allowed), else reno, which is always allowed; a
    name the kernel does not know is skipped."""
    monkeypatch.delenv("COMMS_TCP_CONGESTION", raising=False)
    _tune(sock)
    import os
    loaded = set(Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text().split())
    may_cubic = "cubic" in _allowed() or ("cubic" in loaded and os.geteuid() == 0)
    assert _congestion_of(sock) == ("cubic" if may_cubic else "reno")
    monkeypatch.setenv("COMMS_TCP_CONGESTION", "no-such-cc,reno")
    _tune(sock)
    assert _congestion_of(sock) == "reno"


def test_empty_congestion_knob_leaves_the_system_default(monkeypatch):
    default = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    monkeypatch.setenv("COMMS_TCP_CONGESTION", "")
    with socket.create_server(("127.0.0.1", 0)) as server, socket.create_connection(server.getsockname()) as c:
        server.accept()[0].close()
        _tune(c)
        assert _congestion_of(c) == default
