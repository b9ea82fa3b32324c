"""Transports behind one contract (see :mod:`comms.transports.base`), tried in order: the first
whose ``can_connect`` says yes for a pair of ranks, and that both published an address for,
carries all traffic between them. Registering a transport is one line here (and one in
native/build_cffi.py).

``COMMS_TRANSPORT=<name>`` forces one transport for every peer.
"""
from __future__ import annotations

from .base import Endpoint, Request, Transport  # noqa: F401
from .rdma import RdmaTransport
from .shm import ShmTransport
from .tcp import TcpTransport

ORDER = (ShmTransport, RdmaTransport, TcpTransport)
NAMES = tuple(t.name for t in ORDER)
