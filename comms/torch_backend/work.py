"""The c10d Work objects of the comms backend: :class:`CommsWork` for started operations and
:class:`DoneWork` for operations that already completed synchronously.

Both subclass ``torch.distributed.Work`` in Python, so C++ callers (the DDP reducer, functional
collectives) reach ``wait`` and ``get_future`` through torch's trampoline, and Python callers get
the methods below directly.

Contract of :class:`CommsWork`:

* It wraps one or more started ``comms.Work`` handles and an optional post step (copying staged
  results into the caller's tensors, see :mod:`.ops`). The outcome is settled exactly once, when
  every handle ended: the first handle's error, else the post step's error, else success. The post
  step runs on whichever thread settles first: the comms progress thread (when it has a post step
  or a future was asked for) or a waiter.
* ``wait(timeout=None)`` blocks until settled and raises the comms error (``CommsError`` and
  subclasses; ``CommTimeout`` also when ``timeout`` passes first), else returns True. ``timeout``
  may be a ``timedelta`` (C++ passes one; zero or negative means none) or seconds.
* ``is_completed()`` never blocks; it is True once the outcome is settled (success or failure).
* ``get_future()`` returns a ``torch.futures.Future`` completed with the operation's outputs laid
  out as Gloo's future holds them (the process group chooses the value: a flat list of tensors,
  or one list per rank for the coalesced all-gathers), or with the error. Its callbacks never run on the comms progress thread: completions seen there
  are handed to a small pool of threads (:func:`_deliver`), so a callback may start and even wait
  for other comms work (PowerSGD's DDP hook does). A future completed by a waiter runs its
  callbacks on the waiter's thread, as torch does.
* ``source_rank()`` (and ``_source_rank``) is the sender of a completed receive, a group rank.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist

from .ops import seconds

log = logging.getLogger("comms")

# Threads completing futures (running their callbacks): one is enough unless callbacks block, and
# a blocked one does not hold up the others; created on first use, shared by every group.
FUTURE_THREADS = 8
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _deliver(fut, value, exc) -> None:
    """Complete ``fut`` on a pool thread (never on the progress thread, which must keep going)."""
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(FUTURE_THREADS, thread_name_prefix="comms-future")
    _pool.submit(_complete, fut, value, exc)


def _complete(fut, value, exc) -> None:
    try:
        if exc is None:
            fut.set_result(value)
        else:
            fut.set_exception(exc)
    except BaseException:  # noqa: BLE001 - a pool thread has no caller to report to
        log.exception("comms: completing a future failed")


class CommsWork(dist.Work):
    """A started operation: one or more comms handles plus a post step (module docstring)."""

    def __init__(self, handles: tuple, outputs: list, post=None):
        super().__init__()
        self._handles = handles
        self._outputs = outputs
        self._post = post
        self._lock = threading.Lock()
        self._settled = False
        self._exc: BaseException | None = None
        self._fut = None
        self._fut_unset = False
        if post is not None:            # copy results out as soon as they arrive, waited on or not
            self._watch()

    # -- settling ----------------------------------------------------------------------------
    def _watch(self) -> None:
        for h in self._handles:
            h.add_done_callback(self._on_done)
        # comms.Work.add_done_callback can miss a completion that races with it; settling is
        # idempotent, so check once more ourselves.
        if all(h.is_completed() for h in self._handles):
            self._settle()

    def _on_done(self, _handle) -> None:
        """Progress-thread callback: must never raise (it would stop the progress thread)."""
        try:
            self._settle(deliver=_deliver)
        except BaseException:  # noqa: BLE001
            log.exception("comms: settling %r failed", self)

    def _settle(self, blocking: bool = True, deliver=_complete) -> bool:
        """Settle once every handle ended; complete the future (with ``deliver``) if one is
        pending. Returns whether the work is settled (False also when ``blocking`` is False and
        another thread is busy)."""
        if not self._settled and not all(h.is_completed() for h in self._handles):
            return False
        if not self._lock.acquire(blocking):
            return False
        try:
            if not self._settled:
                exc = next((e for e in (h.exception() for h in self._handles) if e is not None), None)
                if exc is None and self._post is not None:
                    try:
                        self._post()
                    except Exception as e:  # noqa: BLE001 - reported through wait() and the future
                        exc = e
                self._exc, self._post, self._handles = exc, None, ()
                self._settled = True
            fut, self._fut_unset = (self._fut if self._fut_unset else None), False
        finally:
            self._lock.release()
        if fut is not None:
            deliver(fut, self._outputs if self._exc is None else None, self._exc)
        return True

    # -- the torch.distributed.Work interface ------------------------------------------------------
    def wait(self, timeout=None) -> bool:
        if not self._settled:
            secs = seconds(timeout)
            end = None if secs is None else time.monotonic() + secs
            for h in self._handles:
                h.wait(None if end is None else max(0.0, end - time.monotonic()))
            self._settle()
        if self._exc is not None:
            raise self._exc
        return True

    def is_completed(self) -> bool:
        return self._settled or self._settle(blocking=False)

    def is_success(self) -> bool:
        return self.is_completed() and self._exc is None

    def exception(self):
        return self._exc if self.is_completed() else None

    def result(self) -> list:
        self.wait()
        return self._outputs

    def get_future(self) -> torch.futures.Future:
        with self._lock:
            fresh = self._fut is None
            if fresh:
                self._fut = torch.futures.Future()
                self._fut_unset = True
        if fresh:
            if self._settled:
                self._settle()
            else:
                self._watch()
        return self._fut

    def source_rank(self) -> int:
        self.wait()
        src = getattr(self, "_source", None)
        if src is None:
            raise ValueError("source_rank: this work is not a receive")
        return src

    _source_rank = source_rank

    def synchronize(self) -> None:
        """CPU work has no stream to synchronize with."""

    def block_current_stream(self) -> None:
        """CPU work has no stream to block."""

    def __repr__(self) -> str:
        state = "pending" if not self._settled else "failed" if self._exc else "done"
        return f"<comms CommsWork {state}>"


class RecvWork(CommsWork):
    """A receive: ``source_rank()`` is the comms handle's source (the group rank of the sender)."""

    def __init__(self, handle, outputs: list, post=None):
        super().__init__((handle,), outputs, post)
        self._recv = handle

    @property
    def _source(self) -> int | None:
        return self._recv.source


class DoneWork(dist.Work):
    """A completed operation (``asyncOp=False``: it ran before the call returned). The process
    group reuses one instance while nobody else holds it (see ``ProcessGroupComms._done``), so
    the output list of the latest synchronous call stays referenced until the next one."""

    def __init__(self, group=None):
        super().__init__()
        self._outputs: list | None = None     # None: the group's latest (``_last_outputs``)
        self._group = group

    def wait(self, timeout=None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True

    def is_success(self) -> bool:
        return True

    def exception(self):
        return None

    def result(self) -> list:
        if self._outputs is None:
            return self._group._last_outputs if self._group is not None else []
        return self._outputs

    def get_future(self) -> torch.futures.Future:
        fut = torch.futures.Future()
        fut.set_result(self.result())
        return fut

    def synchronize(self) -> None:
        """Nothing to synchronize on CPU."""

    def block_current_stream(self) -> None:
        """Nothing to block on CPU."""
