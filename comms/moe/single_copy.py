"""Single-copy token exchange between the ranks of one host (Linux cross-memory attach).

Moving rows through the communicator's all_to_all costs a gather into a staging buffer, a copy
into the shared-memory ring and a copy out of it. Here every rank writes the rows a peer needs
straight from its own tensors into the peer's output tensor (``process_vm_writev``: one copy by
the kernel, gathered by token index), so dispatch and combine touch each byte once.

Protocol of one exchange (every rank of the group, collectively):

1. every rank allocates where it will receive, and tells each source where that source's rows go
   (an ``all_to_all`` of addresses: the only message on the critical path besides the barrier);
2. every rank writes its rows into each peer (peers in rotated order, so no rank is hammered by
   all writers at once) and copies its own rows locally;
3. a barrier: after it every write into this rank's memory has landed (``process_vm_writev`` is
   synchronous), and no rank frees or reuses a receive buffer before it.

A receive buffer is only ever written after its owner announced it in step 1 of the same
exchange, and the owner does not touch it before step 3, so no call can write into memory that is
gone or in use. If a write fails (a peer died, attaching is forbidden) the writer aborts the
communicator with the reason, so every rank's barrier fails too, naming it.

Availability (:class:`SingleCopy`.enabled, the same on every rank): every rank is on this host
(the Dispatcher's host grouping), ``COMMS_MOE_SINGLE_COPY`` is on, and a collective probe works:
each rank reads a random word from every peer by pid and address and checks it, which fails for
processes in other pid namespaces, or where Yama/seccomp forbid attaching.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from .. import config, errors
from ..communicator import Communicator
from ..dtypes import ReduceOp
from ..diag.log import get as get_logger
from . import native
from .layout import offsets

log = get_logger("COLL")


class SingleCopy:
    """Cross-memory-attach exchange for ``comm`` (see the module docstring). Construction is
    collective: it probes every pair of ranks and agrees on ``enabled``."""

    def __init__(self, comm: Communicator, one_host: bool):
        self.comm, self.rank, self.world = comm, comm.rank, comm.size
        self.enabled, self.pids, self.reason = False, [], ""
        self.tx_bytes = 0                            # written into peers so far (link_stats: cma_tx_bytes)
        wanted = one_host and self.world > 1 and bool(config.get("MOE_SINGLE_COPY"))
        flag = np.array([1 if wanted else 0], np.int64)
        comm.all_reduce(flag, op=ReduceOp.MIN)              # every rank must want it, or nobody probes
        if not flag[0]:
            self.reason = ("off (COMMS_MOE_SINGLE_COPY=0)" if not config.get("MOE_SINGLE_COPY") else
                           "off (ranks on several hosts)" if not one_host else "off (one rank)")
            return
        native.allow_attach()
        word = np.frombuffer(os.urandom(8), np.int64).copy()
        mine = np.array([os.getpid(), word.ctypes.data, int(word[0])], np.int64)
        every = np.empty(3 * self.world, np.int64)
        comm.all_gather(every, mine)
        every = every.reshape(self.world, 3)
        seen = np.zeros(1, np.int64)
        ok = 1
        for p in range(self.world):
            if p == self.rank:
                continue
            rc = native.rows_read(int(every[p, 0]), seen.ctypes.data, int(every[p, 1]), 8)
            if rc != errors.OK or seen[0] != every[p, 2]:
                ok = 0
                self.reason = f"off (rank {self.rank} cannot attach to rank {p}: {errors.code_name(rc)})"
                break
        flag[0] = ok
        comm.all_reduce(flag, op=ReduceOp.MIN)              # also keeps every probe word alive until read
        del word
        self.enabled = bool(flag[0])
        if self.enabled:
            self.pids = every[:, 0].tolist()
            self.reason = "on (cross-memory attach)"
        elif not self.reason:
            self.reason = "off (another rank cannot attach to its peers)"
        log.info("comms.moe: single-copy exchange %s", self.reason)

    # -- the exchanges -------------------------------------------------------------------------
    def _addresses(self, offs: list[int], *bases: torch.Tensor) -> np.ndarray:
        """Step 1: tell every peer p where its rows go in each of ``bases`` (2-D, row offs[p]);
        returns [W, len(bases)]: where this rank's rows go in each peer."""
        mine = np.zeros((self.world, len(bases)), np.int64)
        for j, base in enumerate(bases):
            mine[:, j] = base.data_ptr() + np.asarray(offs, np.int64) * (base.shape[1] * base.element_size())
        theirs = np.empty_like(mine)
        self.comm.all_to_all(theirs, mine)
        return theirs

    def _write(self, what: str, jobs) -> None:
        """Step 2 for every peer in rotated order, then step 3. ``jobs(p)`` returns
        (src, index or None, remote address) or None when nothing goes to p."""
        try:
            for q in range(1, self.world):
                p = (self.rank + q) % self.world
                job = jobs(p)
                if job is not None:
                    src, index, raddr = job
                    native.rows_write(self.pids[p], src, index, raddr, what=what, rank=self.rank, peer=p)
                    self.tx_bytes += (src.shape[0] if index is None else index.numel()) * src.stride(0) * src.element_size()
        except errors.CommsError as e:
            self.comm.abort(f"{what}: rank {self.rank} failed to write into rank {e.peer}: {e}")
            raise
        self.comm.barrier()

    def dispatch(self, payload: torch.Tensor, send_idx: torch.Tensor, send_counts: list[int],
                 recv_counts: list[int], recv_payload: torch.Tensor, meta: torch.Tensor | None,
                 recv_meta: torch.Tensor | None) -> None:
        """Rows ``send_idx`` of ``payload`` (grouped by destination, ``send_counts`` each) land in
        the destinations' ``recv_payload`` (grouped by source, ``recv_counts`` each); ``meta`` (one
        packed row per sent row, already in send order) lands in ``recv_meta`` likewise."""
        so, ro = offsets(send_counts), offsets(recv_counts)
        where = self._addresses(ro, recv_payload, *([] if meta is None else [recv_meta]))
        me = self.rank
        if send_counts[me]:
            mine = send_idx[so[me]:so[me] + send_counts[me]]
            torch.index_select(payload, 0, mine, out=recv_payload[ro[me]:ro[me] + recv_counts[me]])
            if meta is not None:
                recv_meta[ro[me]:ro[me] + recv_counts[me]] = meta[so[me]:so[me] + send_counts[me]]

        def jobs(p):
            if not send_counts[p]:
                return None
            if meta is not None:
                native.rows_write(self.pids[p], meta[so[p]:so[p] + send_counts[p]], None, int(where[p, 1]),
                                  what="dispatch", rank=me, peer=p)
                self.tx_bytes += send_counts[p] * meta.shape[1] * meta.element_size()
            return payload, send_idx[so[p]:so[p] + send_counts[p]], int(where[p, 0])
        self._write("dispatch", jobs)

    def combine(self, y: torch.Tensor, send_counts: list[int], recv_counts: list[int],
                back: torch.Tensor) -> torch.Tensor:
        """Rows of ``y`` (grouped by source, ``recv_counts`` each) go back to their sources' ``back``
        (grouped by destination, ``send_counts`` each). Returns the address of every row of this
        rank's tokens in send order (int64): in ``back``, except the rows this rank sent itself,
        which are read from ``y`` where they are."""
        so, ro = offsets(send_counts), offsets(recv_counts)
        where = self._addresses(so, back)

        def jobs(p):
            if not recv_counts[p]:
                return None
            return y[ro[p]:ro[p] + recv_counts[p]], None, int(where[p, 0])
        self._write("combine", jobs)
        pointers = native.row_pointers(back, 0, sum(send_counts))
        me = self.rank
        if send_counts[me]:
            pointers[so[me]:so[me] + send_counts[me]] = native.row_pointers(y, ro[me], recv_counts[me])
        return pointers
