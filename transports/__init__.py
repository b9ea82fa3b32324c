"""Transports behind one contract (see :mod:`comms.transports.base`), tried in order: the first
whose ``can_connect`` says yes for a peer carries all traffic with that peer.

``COMMS_TRANSPORT=tcp`` (or ``shm``) forces one transport for every peer.
"""
from __future__ import annotations

from .base import Endpoint, Request, Transport  # noqa: F401
from .shm import ShmTransport
from .tcp import TcpTransport

ORDER = (ShmTransport, TcpTransport)
