"""ProcessGroupComms: a ``torch.distributed.ProcessGroup`` whose every operation runs on one
comms communicator.

Contract:

* Built by :func:`create` from the options c10d hands a backend creator registered with
  ``extended_api=True``: the group's store (a PrefixStore private to the group), its rank and
  size, the global ranks of its members (empty for the world group) and the default timeout.
  The communicator bootstraps through that store, under a generation prefix so that a group
  created again after ``destroy_process_group`` never reads the keys of its predecessor.
* Ranks are group ranks throughout (roots, peers, ``source_rank``), as c10d passes them.
* Every operation honours ``opts.timeout`` (unset when negative: the group's timeout applies) and
  ``opts.asyncOp``: False runs the operation before returning a :class:`DoneWork`; True (the
  default, and what C++ callers use) only starts it (the comms progress thread drives it) and
  returns a :class:`CommsWork`. Errors are comms errors, raised by the call (synchronous) or by
  ``wait()`` (asynchronous).
* Both names of every renamed c10d method are defined (``all_gather_single``/``_allgather_base``
  and so on) because torch's trampoline looks up one or the other depending on the caller.
* ``shutdown()`` (``destroy_process_group``) waits for started work, then closes the
  communicator; ``abort()`` fails started work on every rank first.

Collectives and point-to-point operations live in :mod:`.collectives`; this module holds the
group itself: construction, names, the completed-work cache, and teardown.
"""
from __future__ import annotations

import sys

import torch.distributed as dist

from ..api import create as create_communicator
from ..communicator import Communicator
from .collectives import Collectives
from .work import DoneWork


class ProcessGroupComms(Collectives, dist.ProcessGroup):
    """The torch.distributed face of a comms :class:`Communicator`."""

    def __init__(self, comm: Communicator, store, timeout: float, global_ranks: list[int]):
        super().__init__(comm.rank, comm.size)
        self._comm = comm
        self._store = store              # c10d's ProcessGroup keeps none for Python subclasses
        self._timeout = timeout
        self._global_ranks = list(global_ranks)
        self._group_name = ""
        self._group_desc = ""
        self._done_work = DoneWork(self)
        self._last_outputs: list = []
        self._hot_get = comm._hot.get    # for allreduce's hot path (the dict never changes)

    # -- identity (reached from C++ through the trampoline) ------------------------------------
    def getBackendName(self) -> str:
        return "comms"

    def getGroupName(self) -> str:
        return self._group_name

    def setGroupName(self, name: str) -> None:
        self._group_name = name

    def getGroupDesc(self) -> str:
        return self._group_desc

    def setGroupDesc(self, desc: str) -> None:
        self._group_desc = desc

    @property
    def comm(self) -> Communicator:
        """The comms communicator underneath (group ranks)."""
        return self._comm

    def get_group_store(self):
        return self._store

    # -- completed work ---------------------------------------------------------------------------
    def _done(self, outputs: list) -> DoneWork:
        """The handle of an operation that already completed. One instance is reused while no one
        else holds a reference to it (the usual case: ``dist.all_reduce`` waits and drops it), so
        the synchronous path allocates nothing."""
        w = self._done_work
        if sys.getrefcount(w) > 3:       # this attribute, ``w``, and getrefcount's argument
            w._outputs = self._last_outputs          # someone kept it: it keeps the outputs it had
            w = self._done_work = DoneWork(self)
        self._last_outputs = outputs     # what the shared instance reports (a plain attribute: cheaper
        return w                         # to set than one on the pybind Work object)

    # -- teardown -------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Wait for started work (up to the group's timeout), then release the communicator."""
        self._comm.close()

    def abort(self) -> None:
        """Fail started work here and on every peer, then release the communicator. Threads blocked
        in this group's operations (and the progress thread) are released at once."""
        comm = self._comm
        if not comm._closed:
            comm.abort("the process group was aborted")
        comm.close()

    def __repr__(self) -> str:
        return (f"<ProcessGroupComms rank {self.rank()} of {self.size()}, global ranks "
                f"{self._global_ranks}, name {self._group_name!r}>")


def create(dist_opts, backend_opts=None) -> ProcessGroupComms:
    """The backend creator (``extended_api=True``): a comms group over ``dist_opts.store``."""
    store = dist_opts.store
    rank, size = int(dist_opts.group_rank), int(dist_opts.group_size)
    timeout = dist_opts.timeout.total_seconds()
    global_ranks = list(dist_opts.global_ranks_in_group) or list(range(size))
    generation = (store.add("comms/generation", 1) - 1) // size
    comm = create_communicator(rank, size, store, f"comms/{generation}/", timeout, None, global_ranks)
    return ProcessGroupComms(comm, store, timeout, global_ranks)
