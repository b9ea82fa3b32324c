"""The torch.distributed backend "comms": switch from Gloo by changing one word.

    import comms                                  # registers the backend
    import torch.distributed as dist
    dist.init_process_group("comms")              # under torchrun or python -m comms.run
    g = dist.new_group([0, 1], backend="comms")

:func:`register` (called by ``import comms``) registers the backend with
``dist.Backend.register_backend("comms", create, extended_api=True, devices=["cpu"])``. It imports
only ``torch.distributed``; the process group (:mod:`.process_group`, with its operations in
:mod:`.collectives`, its work objects in :mod:`.work`, argument plumbing in :mod:`.ops` and the
hot path's reading of all_reduce options in :mod:`.peek`) is imported when the first group is
created.

Each group is one comms communicator, bootstrapped through the store c10d hands the backend
(``extended_api=True`` also passes the global ranks of a subgroup). Every c10d operation is
supported, synchronously and asynchronously, on CPU tensors; see :mod:`.process_group` for the
contract.
"""
from __future__ import annotations

import importlib.util

NAME = "comms"
_registered = False


def _create(dist_opts, backend_opts=None):
    from .process_group import create
    return create(dist_opts, backend_opts)


def register() -> bool:
    """Register the "comms" backend with torch.distributed (idempotent). Returns False, doing
    nothing, where torch or its distributed package is not available."""
    global _registered
    if _registered:
        return True
    if importlib.util.find_spec("torch") is None:
        return False
    import torch.distributed as dist
    if not dist.is_available():
        return False
    dist.Backend.register_backend(NAME, _create, extended_api=True, devices=["cpu"])
    _registered = True
    return True


__all__ = ["register", "NAME"]
