"""A flight-recorder dump racing close(): the dump (a SIGUSR1 watcher thread, comms.diag.flight)
reads the native ring without the engine lock, which a collective blocked in native code holds, so
it must never read a context that close() freed meanwhile. The engine's handle lock keeps the two
apart (a read holds it; close frees the context under it), and close() unregisters the
communicator from the SIGUSR1 dumps before anything is freed."""
from __future__ import annotations

import threading
import types

from comms._native import ffi, lib
from comms.diag import flight
from comms.runtime import native
from comms.runtime.engine import Engine
from comms.testing import spawn


class SlowReader:
    """The native library, but a flight read that stalls between finding the context and reading
    it (as a watcher thread preempted there would) until the context is freed or a second passed;
    it reads only a context that is still alive, and remembers an attempt on a freed one."""

    def __init__(self):
        self.entered = threading.Event()
        self.freed_now = threading.Event()
        self.freed: set[int] = set()
        self.read_freed: list[int] = []

    @staticmethod
    def key(ctx) -> int:
        return int(ffi.cast("uintptr_t", ctx))

    def cm_ctx_flight(self, ctx, out, n):
        self.entered.set()
        self.freed_now.wait(1.0)
        if self.key(ctx) in self.freed:
            self.read_freed.append(self.key(ctx))
            return 0
        return lib.cm_ctx_flight(ctx, out, n)

    def cm_ctx_free(self, ctx):
        self.freed.add(self.key(ctx))
        lib.cm_ctx_free(ctx)
        self.freed_now.set()


def slow_core(monkeypatch) -> SlowReader:
    """A SlowReader in place of the wrapper's ctx_flight and ctx_free, the calls the engine makes for
    a dump and for close."""
    slow = SlowReader()
    monkeypatch.setattr(native, "ctx_flight", slow.cm_ctx_flight)
    monkeypatch.setattr(native, "ctx_free", slow.cm_ctx_free)
    return slow


def fake_comm(engine):
    return types.SimpleNamespace(_engine=engine, _plans={}, _boot=types.SimpleNamespace(chosen={}))


def test_a_dump_racing_close_never_reads_a_freed_context(monkeypatch):
    slow = slow_core(monkeypatch)
    eng = Engine(0, 1, 0, 0, 0, 0)
    eng.set_flight_capacity(16)
    comm = fake_comm(eng)
    got = []
    reader = threading.Thread(target=lambda: got.append(flight.records(comm)))
    reader.start()
    assert slow.entered.wait(10)                     # the dump found the context and is about to read it
    closer = threading.Thread(target=eng.close)
    closer.start()
    reader.join(10)
    closer.join(10)
    assert not reader.is_alive() and not closer.is_alive()
    assert slow.read_freed == [], "the dump read a context that close() had freed"
    assert eng.ctx is None and got == [[]]           # it read the (empty) ring, then close freed it
    assert flight.records(comm) == []                # and a dump after close reads nothing


def test_capacity_changes_wait_for_a_reader(monkeypatch):
    """Resizing the ring frees the old one: not while a dump copies it."""
    slow = slow_core(monkeypatch)
    eng = Engine(0, 1, 0, 0, 0, 0)
    eng.set_flight_capacity(16)
    order = []

    def read():
        flight.records(fake_comm(eng))
        order.append("read")

    reader = threading.Thread(target=read)
    reader.start()
    assert slow.entered.wait(10)
    resize = threading.Thread(target=lambda: (eng.set_flight_capacity(4), order.append("resized")))
    resize.start()
    reader.join(10)
    resize.join(10)
    eng.close()
    assert order == ["read", "resized"]


def _close_unregisters(rank, size, directory):
    import numpy as np
    import comms
    from comms.diag import flight as fl
    comm = comms.init(timeout=20)
    comm.all_reduce(np.ones(2))
    before = comm in fl._live
    comm.close()
    return before, comm in fl._live


def test_close_unregisters_from_the_sigusr1_dumps(tmp_path):
    out = spawn(_close_unregisters, 2, timeout=60, args=(str(tmp_path),), env={"COMMS_FLIGHT_DIR": str(tmp_path)})
    assert out == [(True, False), (True, False)]
