"""The Python side of the native engine: one native context per communicator, plan encoding, and
the progress thread that drives operations started with ``async_op=True``.

Threading contract: every native call on a context happens under ``Engine.lock`` (the native code
is not thread-safe; it releases the GIL, so Python threads keep running). The lock has a native
half, the context's owner word, which the per-call fast path (``cm_call_run``) takes by itself in C
instead of the Python lock (see :class:`ContextLock`). A synchronous operation
takes the lock, starts its plan and waits for it in one native call (which also progresses any
asynchronous ones). Asynchronous operations are started under the lock and then driven by the
progress thread, which waits in short native slices so other callers get the lock in between.
Collectives run one at a time, in the order they were started on the context.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from typing import Callable

from ..diag import log as clog
from . import native
from .native import ffi
from ..algorithms.plan import Plan
from ..errors import E_ABORTED, EAGAIN, TransportError
from . import failures
from ..work import Work

SLICE_NS = 1_000_000        # how long the progress thread waits natively before releasing the lock

log = clog.get("COLL")


class Encoded:
    """A plan in the native step layout plus its message signature, ready to run; the
    communicator caches one per (collective, size, dtype, op, root, ...).

    Bounds: ``lens`` are the byte lengths of the input and output buffers of the call the plan is
    encoded for (0 where the call passes none); with the plan's own scratch they are the lengths
    native/plan_check.c checks every step against, here, once. A plan with a step past a buffer
    raises InvalidUsage and is never run. The cache key of the plan must fix those lengths (it
    holds the count and dtype, or the splits): every later call with it passes buffers at least
    as long, and neither it nor the engine checks them again (the fast path stays as it was)."""
    __slots__ = ("plan", "steps", "nsteps", "scratch_bytes", "sig", "name", "is_coll", "any_source", "trial",
                 "call")

    def __init__(self, plan: Plan, name: str, kind: int, coll: int, dtype: int, redop: int, root: int,
                 count: int, tag: int = 0, *, lens: tuple[int, int]):
        self.plan, self.name, self.is_coll = plan, name, kind == 1
        self.trial = None            # the online trial (comms.selection.online) this plan is an alternative of, while it lasts
        self.call = None             # its prepared synchronous call (cm_call) while the fast path serves it
        self.any_source = any(s.peer == -1 and s.kind == 2 for s in plan.steps)
        self.nsteps = len(plan.steps)
        self.steps = ffi.new("cm_step[]", max(1, self.nsteps))
        for i, s in enumerate(plan.steps):
            c = self.steps[i]
            c.kind, c.peer, c.buf, c.buf2 = s.kind, s.peer, s.buf, s.buf2
            c.off, c.off2, c.nbytes, c.aux = s.off, s.off2, s.nbytes, s.aux
        self.scratch_bytes = plan.scratch_bytes
        bounds = (int(lens[0]), int(lens[1]), plan.scratch_bytes)
        fault = ffi.new("cm_plan_fault *")
        if native.plan_check(self.steps, self.nsteps, ffi.new("uint64_t[3]", bounds), 3, dtype, fault):
            raise failures.plan_error(name, plan, fault, bounds, dtype)
        self.sig = ffi.new("cm_hdr *")
        sig = self.sig
        sig.kind, sig.coll, sig.dtype, sig.redop, sig.root = kind, coll, dtype, redop, root
        sig.count, sig.tag = count, tag


class ContextLock:
    """The engine lock: a ``threading.Lock`` and then the native context's owner word. The fast
    path's ``cm_call_run`` takes only the word, in C (a Python lock costs it about 120 ns of a
    1 us call), and returns CM_EBUSY untouched when another thread holds it; every other caller
    takes both here, a blocking acquire waiting out a fast-path call in flight (which ends by its
    own deadline). Once the engine has freed its context (``ctx`` None) only the Python lock is left."""

    __slots__ = ("_lock", "_engine")

    def __init__(self, engine: "Engine"):
        self._lock = threading.Lock()
        self._engine = engine

    def acquire(self, blocking: bool = True) -> bool:
        if not self._lock.acquire(blocking):
            return False
        ctx = self._engine.ctx
        if ctx is not None:
            if blocking:
                native.ctx_enter(ctx)
            elif not native.ctx_try_enter(ctx):
                self._lock.release()
                return False
        return True

    def release(self) -> None:
        ctx = self._engine.ctx
        if ctx is not None:
            native.ctx_leave(ctx)
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class Engine:
    def __init__(self, rank: int, size: int, spin: int, yields: int, spin_max_ns: int, spin_min_ns: int,
                 unexpected: tuple[int, int] | None = None):
        """``unexpected``: the most bytes of one early p2p message and of those kept aside per peer
        (COMMS_UNEXPECTED_MSG_BYTES, COMMS_UNEXPECTED_PEER_BYTES); None keeps the native defaults."""
        self.ctx = native.ctx_new(rank, size, spin, yields, spin_max_ns, spin_min_ns)
        if self.ctx == ffi.NULL:
            raise TransportError(f"cannot create the native context for rank {rank} of {size}")
        if unexpected is not None:
            native.ctx_set_unexp_limits(self.ctx, *unexpected)
        self.rank = rank
        self.lock = ContextLock(self)
        # the context's handle: what other threads do to the context without the engine lock, which
        # a wait blocked in native code holds (revoke, flight-recorder reads), against close freeing
        # it, and resizing the flight recorder freeing the old ring
        self._revoke_lock = threading.Lock()
        self.status = ffi.new("cm_status *")
        self.bufs = ffi.new("uintptr_t[4]")
        self._exec_out = ffi.new("cm_exec **")
        self.flight_capacity = 0
        self.timeline = None
        self._inflight: deque[tuple[Work, object, Callable]] = deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def seq(self) -> int:
        """The sequence number of the last collective started on this context (the native context
        numbers each one as it starts, in the order plans reach it)."""
        return int(native.ctx_seq(self.ctx)) if self.ctx is not None else 0

    @seq.setter
    def seq(self, value: int) -> None:
        with self.lock:
            native.ctx_set_seq(self.ctx, value)

    def set_timeline(self, timeline) -> None:
        """Record every plan's message times into ``timeline`` (comms.diag.timeline.Timeline)."""
        with self.lock:
            self.timeline = timeline
            native.ctx_set_trace(self.ctx, 1)

    def _trace(self, enc: Encoded, seq: int, handle, t0: int, rc: int) -> None:
        if self.timeline is None:
            return
        times = ffi.new("int64_t[]", 2 * max(1, enc.nsteps))
        n = native.exec_op_times(handle, times, enc.nsteps)
        self.timeline.record(enc, seq, t0, time.monotonic_ns(), list(times[0:2 * n]), rc == 0)

    def set_flight_capacity(self, entries: int) -> None:
        with self.lock, self._revoke_lock:           # no reader copies the ring it frees
            if native.ctx_flight_capacity(self.ctx, entries) != 0:
                raise TransportError(f"cannot allocate a flight recorder of {entries} entries")
            self.flight_capacity = entries

    def read_flight(self):
        """A copy of the flight recorder (cm_fr_entry[], oldest first), from any thread, also while
        another one waits in native code: it takes the context's handle lock, not the engine lock,
        so close() cannot free the context, nor a resize the ring, while it is copied. The copy
        holds whole entries only (native/flight.c); [] once closed."""
        with self._revoke_lock:
            if self.ctx is None or not self.flight_capacity:
                return []
            buf = ffi.new("cm_fr_entry[]", self.flight_capacity)
            n = native.ctx_flight(self.ctx, buf, self.flight_capacity)
        return [buf[i] for i in range(n)]

    # -- one operation ------------------------------------------------------------------------
    def _load(self, p_in, p_out, p_scratch) -> None:
        """Fill the buffer table (the caller holds the lock; native copies it)."""
        b = self.bufs
        b[0] = p_in
        b[1] = p_out
        b[2] = p_scratch

    def _seq_of(self, enc: Encoded) -> int:
        """The number the context gave the plan just started (the caller holds the lock): its
        sequence number if a collective, 0 for p2p."""
        return int(native.ctx_seq(self.ctx)) if enc.is_coll else 0

    @contextlib.contextmanager
    def locked(self):
        """The native context, under the lock (None once closed), for calls outside a plan."""
        self._acquire()
        try:
            yield self.ctx
        finally:
            self.lock.release()

    def _acquire(self) -> None:
        """Take the context lock; if the progress thread holds it in a sliced wait, kick it out."""
        if not self.lock.acquire(blocking=False):
            native.ctx_kick(self.ctx)
            self.lock.acquire()

    def run(self, enc: Encoded, p_in, p_out, p_scratch, deadline_ns: int):
        """Run a plan to completion. Returns (failure, source, seq): failure is None or
        (code, status copy); source is the sender of an any-source receive (else None)."""
        self._acquire()
        try:
            return self._run_locked(enc, p_in, p_out, p_scratch, deadline_ns)
        finally:
            self.lock.release()

    def _run_locked(self, enc: Encoded, p_in, p_out, p_scratch, deadline_ns: int):
        self._load(p_in, p_out, p_scratch)
        if enc.any_source or self.timeline is not None:
            out = self._exec_out
            rc = native.exec_start(self.ctx, enc.steps, enc.nsteps, self.bufs, 3, enc.sig, deadline_ns, out)
            seq = self._seq_of(enc)
            if out[0] != ffi.NULL:
                t0 = time.monotonic_ns()
                rc = native.exec_wait(self.ctx, out[0], -1, self.status)
                source = native.exec_peer(out[0], 0)
                self._trace(enc, seq, out[0], t0, rc)
                native.exec_free(self.ctx, out[0])
                if not rc:
                    return None, source, seq
        else:
            rc = native.exec_run(self.ctx, enc.steps, enc.nsteps, self.bufs, 3, enc.sig, deadline_ns,
                                 self.status)
            seq = self._seq_of(enc)
        if rc:
            st = ffi.new("cm_status *", self.status[0])
            st.code = rc
            return (rc, st), None, seq
        return None, None, seq

    def start(self, enc: Encoded, p_in, p_out, p_scratch, deadline_ns: int, work: Work,
              on_done: Callable) -> None:
        """Start a plan (setting ``work.seq``) and hand it to the progress thread;
        ``on_done(work, code, status)`` runs when it ends."""
        out = ffi.new("cm_exec **")
        work._enc = enc
        work._t0 = time.monotonic_ns()
        self._acquire()
        try:
            self._load(p_in, p_out, p_scratch)
            rc = native.exec_start(self.ctx, enc.steps, enc.nsteps, self.bufs, 3, enc.sig, deadline_ns, out)
            work.seq = self._seq_of(enc)
            if out[0] == ffi.NULL:
                st = ffi.new("cm_status *", self.status[0])
                st.code = rc
                failed = True
            else:
                failed = False
                work._handle = out[0]
        finally:
            self.lock.release()
        if failed:
            on_done(work, rc, st)
            return
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
                rc = native.exec_wait(self.ctx, handle, SLICE_NS, st)
                if rc != EAGAIN:
                    status = ffi.new("cm_status *", st[0])
                    work.source = native.exec_peer(handle, 0) if not rc else None
                    self._trace(work._enc, work.seq, handle, work._t0, rc)
                    native.exec_free(self.ctx, handle)
            if rc == EAGAIN:
                continue
            with self._cv:
                self._inflight.popleft()
                self._cv.notify_all()
            work._handle = None
            try:
                on_done(work, rc, status)
            except Exception:                 # a failing callback must not stop the progress thread
                log.exception("comms: a completion callback of %s (seq %d) raised", work.op, work.seq)

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
        """Tell every peer this context is dead; in-flight operations end with an error. From any
        thread: where a wait holds the context (another thread blocked in an operation, or the
        progress thread), that wait aborts it at once instead (cm_ctx_revoke with CM_E_ABORTED)."""
        if self.lock.acquire(blocking=False):
            try:
                if self.ctx is not None:
                    native.ctx_abort(self.ctx)
            finally:
                self.lock.release()
        else:
            self.revoke(E_ABORTED, -1)

    def revoke(self, code: int, peer: int) -> None:
        """From any thread (the control plane's): fail the context with ``code`` (naming ``peer``) at
        its owner's next check, waking a wait blocked in it. Takes no engine lock: a blocked wait
        holds it; cm_ctx_revoke touches only atomics, and close() cannot free the context meanwhile."""
        with self._revoke_lock:
            if self.ctx is not None:
                native.ctx_revoke(self.ctx, code, peer)

    COUNTERS = ("plans", "sleeps", "busy_ns", "failed_plans", "preempted_spins")

    def _raw_counters(self) -> dict:
        from ..transports import NAMES
        out = ffi.new("uint64_t[8]")
        pair = ffi.new("uint64_t[2]")
        raw = {}
        with self.lock:
            if self.ctx is not None:
                native.ctx_counters(self.ctx, out, 8)
            for name in NAMES:               # every registered transport, used or not
                if self.ctx is not None:
                    native.ctx_transport_bytes(self.ctx, name.encode(), pair)
                raw[f"{name}_tx_bytes"], raw[f"{name}_rx_bytes"] = int(pair[0]), int(pair[1])
        raw.update((n, int(out[i])) for i, n in enumerate(self.COUNTERS))
        return raw

    def zero_counters(self) -> None:
        """Count from now on (init's own traffic is not the user's)."""
        self._counter_base = self._raw_counters()

    def counters(self) -> dict:
        """Payload bytes each registered transport carried (``<name>_tx_bytes``, ``<name>_rx_bytes``),
        plans run, sleeps, busy nanoseconds, failed plans and spins cut short by preemption, since :meth:`zero_counters`."""
        raw = self._raw_counters()
        base = getattr(self, "_counter_base", None) or {}
        return {n: v - base.get(n, 0) for n, v in raw.items()}

    def transport_of(self, peer: int) -> str | None:
        """The name of the transport whose channel carries ``peer`` (None: no channel)."""
        with self.lock:
            name = native.ctx_chan_transport(self.ctx, peer) if self.ctx is not None else ffi.NULL
        return ffi.string(name).decode() if name != ffi.NULL else None

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5.0)
        with self.lock, self._revoke_lock:
            if self.ctx is not None:
                native.ctx_free(self.ctx)
                self.ctx = None
