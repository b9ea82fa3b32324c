"""Transports behind one contract (see :mod:`comms.transports.base`), tried in order: the first
whose ``can_connect`` says yes for a pair of ranks, and that both published an address for,
carries all traffic between them.

Registering a transport is its entry in ``REGISTERED`` (its module here defines ``TRANSPORT``, the
class), and its files' line in native/build_cffi.py. ``COMMS_TRANSPORT=<name>[,<name>...]``
picks among them.
"""
from __future__ import annotations

from importlib import import_module

from .base import Endpoint, Request, Transport  # noqa: F401

REGISTERED = ("shm", "rdma", "tcp")          # the order transports are tried in, one entry each

ORDER: tuple = tuple(import_module(f"{__name__}.{name}").TRANSPORT for name in REGISTERED)
NAMES: tuple = tuple(t.name for t in ORDER)

from .rdma import RdmaTransport  # noqa: E402,F401  (by name, for callers that want one)
from .shm import ShmTransport  # noqa: E402,F401
from .tcp import TcpTransport  # noqa: E402,F401
