"""Receive windows: POSIX shared-memory segments into which the ranks of one host write token rows.

A rank receives the rows of a single-copy exchange (:mod:`comms.moe.single_copy`) in one of its
windows, a /dev/shm segment that every peer of the group maps; the writers copy rows straight
into it. Nothing here grants any process more access than a file of mode 0600 owned by this user
does: no ptrace permission, no change of the process's protections.

Identity. The windows of one rank are numbered by a generation counter ``gen`` (0 is the
availability probe's segment); a window's name is
``comms.<uid>.<owner pid>.<token>g<gen>``, ``token`` being random per :class:`Windows`, so a peer
derives it from ``(uid, pid, token)`` (learnt once) and ``gen`` (announced with every exchange).

Naming rule (nothing outlives its processes). A window has a name only from its creation until
the end of the exchange that announces it: every peer maps every newly announced window before
that exchange's closing barrier, and the owner unlinks the name right after it, whether the
exchange succeeded or failed (:meth:`Windows.unlink_fresh`). From then on the segment is nameless
and the kernel frees it when its last mapping is gone, even after ``kill -9``. An owner killed
while a name exists leaves it behind; the name carries its pid, so
:func:`comms.runtime.cleanup.sweep_stale_segments` (every init, the launchers, ``spawn``) removes
it like the transport's segments.

Lifetime of the memory. A mapping is unmapped when the last numpy/torch view of it is gone. A
window is *busy* while a view handed out by :meth:`Windows.take` is alive (a caller's ``recv_x``
is such a view: zero copy), and only a window that is not busy is handed out again, so no
exchange writes into memory a caller still holds. At most one window is retired per exchange
(announced as ``drop``, so every peer unmaps it too): one that a larger one replaces, or an idle
one beyond :data:`KEEP_IDLE`. A new window is 1.25 times the request rounded up to :data:`ALIGN`,
so that sizes that vary a little from call to call keep reusing it; its space is reserved in
/dev/shm when it is made (a full /dev/shm fails there, naming the size, never with SIGBUS later).
"""
from __future__ import annotations

import os
import secrets
import weakref
from dataclasses import dataclass, field

import numpy as np

from .. import errors
from ..runtime.cleanup import PREFIX, SHM_DIR
from ..runtime import native
from ..runtime.native import ffi

ALIGN = 1 << 20                 # window sizes are multiples of this
KEEP_IDLE = 4                   # idle windows kept for reuse beyond the busy ones


def window_name(uid: int, pid: int, token: int, gen: int) -> str:
    """The /dev/shm name (no slash) of window ``gen`` of the :class:`Windows` ``(uid, pid, token)``."""
    return f"{PREFIX}{uid}.{pid}.{token:012x}g{gen}"


def map_window(name: str, nbytes: int, create: bool) -> np.ndarray:
    """Map segment ``name`` read-write, all pages populated, as a uint8 array of its whole size
    (the mapping lives as long as any view of the array). ``create``: make a new segment of
    ``nbytes`` (mode 0600, space reserved, so a full /dev/shm fails here and never with SIGBUS
    later); otherwise open an existing one (``nbytes``: the least size accepted). Raises
    :class:`~comms.errors.TransportError` naming the segment and errno."""
    size = ffi.new("uint64_t *", nbytes)
    out = ffi.new("void **")
    sys_errno = ffi.new("int *")
    rc = native.window_map(name.encode(), size, 1 if create else 0, out, sys_errno)
    if rc != 0:
        err = sys_errno[0]
        hint = " (/dev/shm is too small: enlarge it, or set COMMS_MOE_SINGLE_COPY=0)" \
            if rc == errors.E_NOMEM else ""
        raise errors.TransportError(f"cannot {'create' if create else 'map'} shared-memory window {name} "
                                    f"of {nbytes} bytes: {os.strerror(err) if err > 0 else errors.code_name(rc)}"
                                    f"{hint}")
    n = int(size[0])
    ptr = ffi.gc(ffi.cast("char *", out[0]), lambda p, n=n: native.shm_unmap(p, n, ffi.NULL), n)
    return np.frombuffer(ffi.buffer(ptr, n), np.uint8)


def unlink(name: str) -> None:
    """Remove ``name`` from /dev/shm (already gone: nothing to do)."""
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass


@dataclass
class Window:
    """One window of this rank: its generation, its whole mapping, and a weak reference to the
    view of its last :meth:`Windows.take` (the window is busy while that view is alive)."""
    gen: int
    seg: np.ndarray
    held: "weakref.ref | None" = field(default=None)

    @property
    def busy(self) -> bool:
        return self.held is not None and self.held() is not None

    @property
    def nbytes(self) -> int:
        return self.seg.nbytes


class Windows:
    """This rank's windows (owner side). Not thread-safe; one exchange at a time."""

    def __init__(self):
        self.uid, self.pid = os.getuid(), os.getpid()
        self.token = secrets.randbits(48)
        self.gen = 0                                # the last generation made (0: the probe's)
        self.windows: list[Window] = []
        self.fresh: list[str] = []                  # names created and not yet unlinked

    def name(self, gen: int) -> str:
        return window_name(self.uid, self.pid, self.token, gen)

    def create(self, gen: int, nbytes: int) -> np.ndarray:
        """Make segment ``gen`` (named until :meth:`unlink_fresh`) and return its mapping."""
        name = self.name(gen)
        seg = map_window(name, nbytes, create=True)
        self.fresh.append(name)
        return seg

    def take(self, nbytes: int) -> tuple[Window, np.ndarray, int]:
        """A window of at least ``nbytes`` that no caller holds, the view that marks it busy
        (``nbytes`` long, from offset 0; keep it alive exactly as long as the rows are in use),
        and the generation to retire in this exchange (0: none). A new window is created (and
        named until :meth:`unlink_fresh`) when no idle one is large enough."""
        idle = [w for w in self.windows if not w.busy]
        fits = [w for w in idle if w.nbytes >= nbytes]
        drop = 0
        if fits:
            win = min(fits, key=lambda w: w.nbytes)
            spare = [w for w in idle if w is not win]
            if len(spare) > KEEP_IDLE:
                drop = min(spare, key=lambda w: w.nbytes).gen
        else:
            if idle and len(idle) >= KEEP_IDLE:
                drop = max(idle, key=lambda w: w.nbytes).gen     # replaced by the new, larger one
            size = max(ALIGN, -(-(nbytes + nbytes // 4) // ALIGN) * ALIGN)
            self.gen += 1
            win = Window(self.gen, self.create(self.gen, size))
            self.windows.append(win)
        if drop:
            self.windows = [w for w in self.windows if w.gen != drop]
        view = win.seg[:nbytes]
        win.held = weakref.ref(view)
        return win, view, drop

    def unlink_fresh(self) -> None:
        """Remove the names of the windows created since the last call (every peer has mapped
        them, or the exchange failed)."""
        names, self.fresh = self.fresh, []
        for name in names:
            unlink(name)

    def close(self) -> None:
        """Forget every window (views a caller still holds keep their memory until dropped)."""
        self.unlink_fresh()
        self.windows = []


class PeerWindows:
    """The windows of the peers that this rank maps (writer side), by peer and generation."""

    def __init__(self, world: int):
        self.ident: list[tuple[int, int, int]] = [(0, 0, 0)] * world     # (uid, pid, token) by rank
        self.maps: list[dict[int, np.ndarray]] = [{} for _ in range(world)]

    def update(self, peer: int, gen: int, drop: int) -> None:
        """Apply what ``peer`` announced: forget its window ``drop`` (0: none) and map ``gen``
        unless mapped already (before the barrier of the exchange, while it is still named)."""
        if drop:
            self.maps[peer].pop(drop, None)
        if gen not in self.maps[peer]:
            self.maps[peer][gen] = map_window(window_name(*self.ident[peer], gen), 1, create=False)

    def region(self, peer: int, gen: int, offset: int, nbytes: int) -> np.ndarray:
        """``nbytes`` of ``peer``'s window ``gen`` from ``offset``, bounds-checked."""
        seg = self.maps[peer][gen]
        if offset < 0 or offset + nbytes > seg.nbytes:
            raise errors.TransportError(f"window {gen} of rank {peer} has {seg.nbytes} bytes; "
                                        f"asked for [{offset}, {offset + nbytes})", peer=peer)
        return seg[offset:offset + nbytes]

    def close(self) -> None:
        self.maps = [{} for _ in self.maps]
