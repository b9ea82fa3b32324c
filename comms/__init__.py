"""comms: collective communication for distributed ML, fast on a host.

    import comms
    comm = comms.init()                       # torchrun-style env, or init(rank=, world_size=, store=)
    comm.all_reduce(buf, op=comms.SUM)

See README.md for the API, comms.errors for the exception tree, comms.config for the knobs.
"""
from __future__ import annotations

from . import config
from .api import create, init, join
from .communicator import Communicator
from .dtypes import AVG, BAND, BOR, BXOR, MAX, MIN, PROD, SUM, ReduceOp
from .errors import CommsError, CommTimeout, InvalidUsage, MismatchError, NotSupported, PeerError, Revoked, TransportError
from .work import Work

__version__ = "0.1.0"

__all__ = [
    "init", "create", "join", "Communicator", "Work", "ReduceOp",
    "SUM", "PROD", "MIN", "MAX", "AVG", "BAND", "BOR", "BXOR",
    "CommsError", "CommTimeout", "InvalidUsage", "MismatchError", "NotSupported", "PeerError", "Revoked", "TransportError",
    "config",
]


from .diag import log as _log

_log.setup()


from .torch_backend import register as _register_torch_backend  # noqa: E402

_register_torch_backend()       # the torch.distributed backend "comms"; a no-op without torch
