"""Work: the handle of an operation started with ``async_op=True``.

``wait(timeout=None)`` blocks until the operation completes and raises its error if it failed
(``timeout`` seconds without completion raise CommTimeout; the operation itself keeps its own
deadline). ``is_completed()`` never blocks. ``exception()`` returns the error or None.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

from .errors import CommTimeout


class Work:
    __slots__ = ("op", "seq", "rank", "source", "_event", "_exc", "_keep", "_result", "_callbacks", "_handle",
                 "_enc", "_t0", "_cb_lock")

    def __init__(self, op: str, seq: int, rank: int, keepalive: Any = None, result: Any = None):
        self.op, self.seq, self.rank = op, seq, rank
        self._event = threading.Event()
        self._exc: BaseException | None = None
        self._keep = keepalive          # buffers that must outlive the operation
        self._result = result
        self._callbacks: list[Callable[["Work"], None]] = []
        self._cb_lock = threading.Lock()
        self._handle = None             # native exec, owned by the engine
        self.source: int | None = None  # the peer of a point-to-point operation, once complete

    def _finish(self, exc: BaseException | None) -> None:
        self._exc = exc
        self._keep = None
        with self._cb_lock:
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            cb(self)

    def add_done_callback(self, cb: Callable[["Work"], None]) -> None:
        """Call ``cb(work)`` exactly once on completion: at once (in this thread) if already
        complete, else from the progress thread. Callbacks must not block on other operations."""
        with self._cb_lock:
            if not self._event.is_set():
                self._callbacks.append(cb)
                return
        cb(self)

    def is_completed(self) -> bool:
        return self._event.is_set()

    def exception(self) -> BaseException | None:
        return self._exc if self._event.is_set() else None

    def wait(self, timeout: float | None = None) -> bool:
        if not self._event.wait(timeout):
            raise CommTimeout(f"Work.wait: {self.op} (seq {self.seq}) on rank {self.rank} did not complete "
                              f"within {timeout} s", op=self.op, seq=self.seq, rank=self.rank)
        if self._exc is not None:
            raise self._exc
        return True

    def result(self) -> Any:
        """The operation's output object (after wait)."""
        self.wait()
        return self._result

    def __repr__(self) -> str:
        state = "failed" if self._exc else "done" if self._event.is_set() else "pending"
        return f"<Work {self.op} seq={self.seq} {state}>"


def completed(op: str, seq: int, rank: int, result: Any = None) -> Work:
    """A Work that is already done (for async calls that needed no communication)."""
    w = Work(op, seq, rank, result=result)
    w._finish(None)
    return w
