"""Single-copy token exchange between the ranks of one host, through shared-memory receive windows.

Moving rows through the communicator's all_to_all costs a gather into a staging buffer, a copy
into the shared-memory ring and a copy out of it. Here every rank receives in one of its windows
(:mod:`comms.moe.windows`: a /dev/shm segment of this user that its peers map) and every writer
gathers the rows a peer needs, by token index, straight from its own tensors into the peer's
window, so dispatch and combine touch each byte once. Dispatch's ``recv_x`` is a view of the
window (no copy out); the window is not handed out again while any view of it is alive.

Nothing beyond shared memory is asked of the kernel: no cross-memory attach and no ptrace
permission (no ``PR_SET_PTRACER``), so the process is exactly as protected from the other
processes of its user as it was before the first exchange.

Protocol of one exchange (every rank of the group, collectively):

1. every rank takes a window for what it will receive, and tells each source the window's
   generation, where that source's rows go in it, and a window it retires (an ``all_to_all`` of a
   few int64s: the only message on the critical path besides the barrier);
2. every rank maps each window newly announced to it (while it still has a name), forgets the
   retired ones, writes its rows into each peer's window (peers in rotated order, so no rank is
   hammered by all writers at once) and copies its own rows into its own window;
3. a barrier: after it every write into this rank's window has landed, and the names of the
   windows made in step 1 are unlinked (also when the exchange failed).

A window is written only after its owner announced it in step 1 of the same exchange, and is not
announced while a caller still holds a view of it, so no write can land in memory in use. If a
rank cannot create or map a window, or a write fails, it aborts the communicator with the reason,
so every rank's barrier fails too, naming it.

Availability (:class:`SingleCopy`.enabled, the same on every rank): every rank is on this host
(the Dispatcher's host grouping), ``COMMS_MOE_SINGLE_COPY`` is on, and a collective probe works:
each rank makes a small window holding a random word and every peer maps it by name and checks
the word, which fails where the ranks do not share /dev/shm (other IPC or mount namespaces,
another user). Otherwise the dispatcher uses its all_to_all path, and the reason is logged.
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
from .windows import PeerWindows, Windows, map_window, window_name

log = get_logger("COLL")

PROBE_BYTES = 4096


def _align(n: int, a: int = 64) -> int:
    return (n + a - 1) // a * a


class SingleCopy:
    """Shared-memory-window exchange for ``comm`` (see the module docstring). Construction is
    collective: it probes every pair of ranks and agrees on ``enabled``."""

    def __init__(self, comm: Communicator, one_host: bool):
        self.comm, self.rank, self.world = comm, comm.rank, comm.size
        self.enabled, self.reason = False, ""
        self.tx_bytes = 0                            # written into peers so far (link_stats: window_tx_bytes)
        self.windows, self.peers = Windows(), PeerWindows(self.world)
        wanted = one_host and self.world > 1 and bool(config.get("MOE_SINGLE_COPY"))
        flag = np.array([1 if wanted else 0], np.int64)
        comm.all_reduce(flag, op=ReduceOp.MIN)              # every rank must want it, or nobody probes
        if not flag[0]:
            self.reason = ("off (COMMS_MOE_SINGLE_COPY=0)" if not config.get("MOE_SINGLE_COPY") else
                           "off (ranks on several hosts)" if not one_host else "off (one rank)")
            return
        self.enabled = self._probe()
        if self.enabled:
            self.reason = "on (shared-memory windows)"
            log.info("comms.moe: single-copy exchange %s", self.reason)
        else:
            log.warning("comms.moe: single-copy exchange %s; dispatch and combine use all_to_all", self.reason)

    def _probe(self) -> bool:
        """Every rank maps every peer's probe window and checks its word; True on every rank or
        on none. The probe windows are unlinked before this returns, whatever happened."""
        word = int.from_bytes(os.urandom(8), "little") >> 1
        w = self.windows
        mine = np.array([w.uid, w.pid, w.token, word, 1], np.int64)
        every = np.empty(5 * self.world, np.int64)
        seg = None
        try:
            try:
                seg = w.create(0, PROBE_BYTES)
                seg[:8].view(np.int64)[0] = word
            except errors.CommsError as e:
                mine[4], self.reason = 0, f"off (rank {self.rank}: {e})"
            self.comm.all_gather(every, mine)
            every = every.reshape(self.world, 5)
            ok = int(mine[4])
            for p in range(self.world):
                if p == self.rank or not ok:
                    continue
                if not every[p, 4]:
                    ok, self.reason = 0, f"off (rank {p} cannot create a shared-memory window)"
                    break
                name = window_name(*(int(v) for v in every[p, :3]), 0)
                try:
                    seen = int(map_window(name, 8, create=False)[:8].view(np.int64)[0])
                except errors.CommsError as e:
                    ok, self.reason = 0, f"off (rank {self.rank} cannot map rank {p}'s window: {e})"
                    break
                if seen != every[p, 3]:
                    ok, self.reason = 0, f"off (rank {self.rank} sees another segment under rank {p}'s name)"
                    break
            flag = np.array([ok], np.int64)
            self.comm.all_reduce(flag, op=ReduceOp.MIN)     # also keeps every probe window named until read
        finally:
            w.unlink_fresh()
            del seg
        if flag[0]:
            self.peers.ident = [tuple(int(v) for v in every[p, :3]) for p in range(self.world)]
        elif not self.reason:
            self.reason = "off (another rank cannot map its peers' windows)"
        return bool(flag[0])

    # -- the exchanges -------------------------------------------------------------------------
    def _fail(self, what: str, e: errors.CommsError, peer: int | None = None):
        who = f"rank {self.rank}" + (f" (writing into rank {peer})" if peer is not None else "")
        self.comm.abort(f"{what}: {who} failed: {e}")
        raise e

    def _open(self, what: str, nbytes: int, offs: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """Steps 1 and 2's mapping: take a window of ``nbytes`` and announce, to every source p,
        where its rows go (``offs[p]``: one byte offset per region). Returns this rank's window
        as a uint8 tensor (keep it, or a view of it, exactly while the rows are in use) and, by
        peer, what it announced: [generation, retired generation, offsets...]."""
        try:
            win, view, drop = self.windows.take(nbytes)
        except errors.CommsError as e:
            self._fail(what, e)
        mine = np.empty((self.world, 2 + offs.shape[1]), np.int64)
        mine[:, 0], mine[:, 1], mine[:, 2:] = win.gen, drop, offs
        theirs = np.empty_like(mine)
        self.comm.all_to_all(theirs, mine)
        for q in range(1, self.world):
            p = (self.rank + q) % self.world
            try:
                self.peers.update(p, int(theirs[p, 0]), int(theirs[p, 1]))
            except errors.CommsError as e:
                self._fail(what, e, p)
        return torch.from_numpy(view), theirs

    def _write(self, what: str, gens: np.ndarray, jobs) -> None:
        """Step 2's writes for every peer in rotated order, then step 3's barrier. ``gens[p]``:
        the window peer p announced; ``jobs(p)`` returns [(src rows, index or None, offset in
        that window)] for peer p."""
        for q in range(1, self.world):
            p = (self.rank + q) % self.world
            for src, index, offset in jobs(p):
                n = src.shape[0] if index is None else index.numel()
                if not n:
                    continue
                row = src.shape[1] * src.element_size()
                try:
                    region = self.peers.region(p, int(gens[p]), offset, n * row)
                except errors.CommsError as e:
                    self._fail(what, e, p)
                dst = torch.from_numpy(region).view(src.dtype).view(n, src.shape[1])
                if index is None:
                    dst.copy_(src)
                else:
                    torch.index_select(src, 0, index, out=dst)
                self.tx_bytes += n * row
        self.comm.barrier()

    def dispatch(self, payload: torch.Tensor, send_idx: torch.Tensor, send_counts: list[int],
                 recv_counts: list[int], meta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows ``send_idx`` of ``payload`` (grouped by destination, ``send_counts`` each) land in
        the destinations' receive rows (grouped by source, ``recv_counts`` each); ``meta`` (one
        int32 row per sent row, already in send order) likewise. Returns (recv_payload, a view of
        this rank's window that stays reserved while it is alive; recv_meta, a copy, or None)."""
        H, es = payload.shape[1], payload.element_size()
        row, mrow, R = H * es, 0 if meta is None else meta.shape[1] * 4, sum(recv_counts)
        so, ro = offsets(send_counts), np.asarray(offsets(recv_counts), np.int64)
        moff = _align(R * row)
        offs = np.stack([ro * row, moff + ro * mrow], axis=1)
        try:
            win, theirs = self._open("dispatch", moff + R * mrow, offs)
            me = self.rank
            recv_payload = win[:R * row].view(payload.dtype).view(R, H)
            recv_meta = None if meta is None else win[moff:moff + R * mrow].view(torch.int32).view(R, meta.shape[1])
            if send_counts[me]:
                mine = slice(so[me], so[me] + send_counts[me])
                torch.index_select(payload, 0, send_idx[mine], out=recv_payload[ro[me]:ro[me] + recv_counts[me]])
                if meta is not None:
                    recv_meta[ro[me]:ro[me] + recv_counts[me]] = meta[mine]

            def jobs(p):
                if not send_counts[p]:
                    return []
                part = slice(so[p], so[p] + send_counts[p])
                out = [(payload, send_idx[part], int(theirs[p, 2]))]
                return out + ([] if meta is None else [(meta[part], None, int(theirs[p, 3]))])
            self._write("dispatch", theirs[:, 0], jobs)
        finally:
            self.windows.unlink_fresh()
        return recv_payload, None if recv_meta is None else recv_meta.clone()

    def combine(self, y: torch.Tensor, send_counts: list[int], recv_counts: list[int], send_idx: torch.Tensor,
                out: torch.Tensor) -> torch.Tensor:
        """Rows of ``y`` (grouped by source, ``recv_counts`` each) go back to their sources
        (grouped by destination, ``send_counts`` each); every source sums its rows per token into
        ``out`` (:func:`comms.moe.native.sum_rows` over ``send_idx``) and returns it. The rows
        this rank sent itself are read from ``y`` where they are."""
        H, row, S = y.shape[1], y.shape[1] * y.element_size(), sum(send_counts)
        so, ro = offsets(send_counts), offsets(recv_counts)
        try:
            win, theirs = self._open("combine", S * row, np.asarray(so, np.int64).reshape(-1, 1) * row)
            self._write("combine", theirs[:, 0], lambda p: [(y[ro[p]:ro[p] + recv_counts[p]], None, int(theirs[p, 2]))]
                        if recv_counts[p] else [])
        finally:
            self.windows.unlink_fresh()
        back = win[:S * row].view(y.dtype).view(S, H)
        pointers = native.row_pointers(back, 0, S)
        me = self.rank
        if send_counts[me]:
            pointers[so[me]:so[me] + send_counts[me]] = native.row_pointers(y, ro[me], recv_counts[me])
        return native.sum_rows(out, pointers, send_idx)

    def close(self) -> None:
        """Forget every window of this rank and every mapping of the peers' (views a caller still
        holds keep their memory until dropped)."""
        self.windows.close()
        self.peers.close()
