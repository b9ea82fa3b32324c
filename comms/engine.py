"""The Python side of the native engine: one native context per communicator, plan encoding, and
the progress thread that drives operations started with ``async_op=True``.

Threading contract: every native call on a context happens under ``Engine.lock`` (the native code
is not thread-safe; it releases the GIL, so Python threads keep running). A synchronous operation
takes the lock, starts its plan and waits for it in one native call (which also progresses any
asynchronous ones). Asynchronous operations are started under the lock and then driven by the
progress thread, which waits in short native slices so other callers get the lock in between.
Collectives run one at a time, in the order they were started on the context.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable

from ._native import ffi, lib
from .algorithms.plan import Plan
from .errors import EAGAIN, TransportError
from .work import Work

SLICE_NS = 2_000_000        # how long the progress thread waits natively before releasing the lock


class Encoded:
    """A plan in the native step layout, ready to run (cached by the communicator)."""
    __slots__ = ("plan", "steps", "nsteps", "scratch_bytes")

    def __init__(self, plan: Plan):
        self.plan = plan
        self.nsteps = len(plan.steps)
        self.steps = ffi.new("cm_step[]", max(1, self.nsteps))
        for i, s in enumerate(plan.steps):
            c = self.steps[i]
            c.kind, c.peer, c.buf, c.buf2 = s.kind, s.peer, s.buf, s.buf2
            c.off, c.off2, c.nbytes, c.aux = s.off, s.off2, s.nbytes, s.aux
        self.scratch_bytes = plan.scratch_bytes


class Engine:
    def __init__(self, rank: int, size: int, spin: int, yields: int):
        self.ctx = lib.cm_ctx_new(rank, size, spin, yields)
        if self.ctx == ffi.NULL:
            raise TransportError(f"cannot create the native context for rank {rank} of {size}")
        self.rank = rank
        self.lock = threading.Lock()
        self.status = ffi.new("cm_status *")
        self.bufs = ffi.new("uintptr_t[4]")
        self.sig = ffi.new("cm_hdr *")
        self._inflight: deque[tuple[Work, object, Callable]] = deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- one operation ------------------------------------------------------------------------
    def _prepare(self, ptrs, kind: int, coll: int, dtype: int, redop: int, root: int, seq: int, count: int,
                 tag: int) -> None:
        b = self.bufs
        b[0], b[1], b[2], b[3] = ptrs
        s = self.sig
        s.kind, s.coll, s.dtype, s.redop, s.root = kind, coll, dtype, redop, root
        s.seq, s.count, s.tag = seq, count, tag

    def run(self, enc: Encoded, ptrs, deadline_ns: int, *sig) -> tuple[int, object]:
        """Run a plan to completion. Returns (code, status copy); code 0 on success."""
        with self.lock:
            self._prepare(ptrs, *sig)
            rc = lib.cm_exec_run(self.ctx, enc.steps, enc.nsteps, self.bufs, 3, self.sig, deadline_ns, self.status)
            return rc, (ffi.new("cm_status *", self.status[0]) if rc else None)

    def start(self, enc: Encoded, ptrs, deadline_ns: int, work: Work, on_done: Callable, *sig) -> None:
        """Start a plan and hand it to the progress thread; ``on_done(work, code, status)`` runs
        when it ends."""
        out = ffi.new("cm_exec **")
        with self.lock:
            self._prepare(ptrs, *sig)
            rc = lib.cm_exec_start(self.ctx, enc.steps, enc.nsteps, self.bufs, 3, self.sig, deadline_ns, out)
            if out[0] == ffi.NULL:
                st = ffi.new("cm_status *", self.status[0])
                st.code = rc
                on_done(work, rc, st)
                return
            work._handle = out[0]
        with self._cv:
            self._inflight.append((work, out[0], on_done))
            if self._thread is None:
                self._thread = threading.Thread(target=self._progress_loop, name=f"comms-progress-{self.rank}",
                                                daemon=True)
                self._thread.start()
            self._cv.notify()

    # -- the progress thread -------------------------------------------------------------------
    def _progress_loop(self) -> None:
        st = ffi.new("cm_status *")
        while True:
            with self._cv:
                while not self._inflight and not self._closed:
                    self._cv.wait()
                if not self._inflight:
                    return
                work, handle, on_done = self._inflight[0]
            with self.lock:
                rc = lib.cm_exec_wait(self.ctx, handle, SLICE_NS, st)
                if rc != EAGAIN:
                    status = ffi.new("cm_status *", st[0])
                    lib.cm_exec_free(self.ctx, handle)
            if rc == EAGAIN:
                continue
            with self._cv:
                self._inflight.popleft()
                self._cv.notify_all()
            work._handle = None
            on_done(work, rc, status)

    def drain(self, timeout: float) -> bool:
        """Wait until every asynchronous operation has ended; False if ``timeout`` passed first."""
        end = time.monotonic() + timeout
        with self._cv:
            while self._inflight:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def pending(self) -> int:
        with self._cv:
            return len(self._inflight)

    def abort(self) -> None:
        """Tell every peer this context is dead; in-flight operations end with an error."""
        with self.lock:
            if self.ctx is not None:
                lib.cm_ctx_abort(self.ctx)

    def counters(self) -> dict:
        out = ffi.new("uint64_t[8]")
        with self.lock:
            if self.ctx is not None:
                lib.cm_ctx_counters(self.ctx, out, 8)
        names = ("shm_tx_bytes", "shm_rx_bytes", "tcp_tx_bytes", "tcp_rx_bytes", "plans", "sleeps")
        return {n: int(out[i]) for i, n in enumerate(names)}

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5.0)
        with self.lock:
            if self.ctx is not None:
                lib.cm_ctx_free(self.ctx)
                self.ctx = None
