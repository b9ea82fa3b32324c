"""How a waiting rank waits (native/wait.c, native/engine.c): a wait whose data comes through the
kernel (tcp) sleeps in poll() at once, and the progress thread driving an asynchronous operation
sleeps too, leaving the core to the caller (DDP's backward pass overlaps its all_reduce so). Each
test waits about a second for a late peer and counts the CPU seconds rank 0 spent meanwhile: a
spinning wait spends about as much CPU as wall time."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time

import pytest

from comms.testing import spawn
import wait_workers as ww


@pytest.mark.parametrize("transport,async_op", [("tcp", False), ("tcp", True), ("shm", True)])
def test_a_long_wait_sleeps(transport, async_op):
    out = spawn(ww.idle_wait, 2, timeout=90, args=(async_op,),
                env={"COMMS_TRANSPORT": transport, "COMMS_CALIBRATE": "0"})[0]
    assert out["got"], out
    assert out["wall"] >= 0.9, out
    assert out["cpu"] < 0.25 * out["wall"], out          # spinning through it would cost ~1.0
    assert out["sleeps"] >= 1, out



def in_a_new_thread(fn):
    """``fn()`` in a thread of its own, whose result it returns (or whose exception it raises): the
    run-queue samples of native/wait.c are per thread, so each test starts from none."""
    out = {}

    def body():
        try:
            out["value"] = fn()
        except BaseException as e:   # noqa: BLE001 -- raised again below, in the test's thread
            out["error"] = e
    t = threading.Thread(target=body)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


@contextlib.contextmanager
def cpu_shared_with_a_busy_process():
    """For the block, this thread pinned to one CPU together with a busy process."""
    mask = os.sched_getaffinity(0)
    cpu = max(mask)
    os.sched_setaffinity(0, {cpu})
    hog = subprocess.Popen([sys.executable, "-c", "import os; os.sched_setaffinity(0, {%d})\nwhile True: pass" % cpu])
    try:
        yield
    finally:
        hog.kill()
        hog.wait()
        os.sched_setaffinity(0, mask)


def test_a_spinning_thread_that_waits_for_its_cpu_counts_the_cpu_contended():
    """native/wait.c: a thread that spent over a tenth of the last 2 ms waiting in a run queue (here:
    pinned to one CPU with a busy process) finds its context contended: the spin budget drops from
    its maximum to its minimum, and the preempted-spins counter counts it. Nothing is spinning
    meanwhile, so the other signal (a gap in a spinner's own clock readings) plays no part."""
    from comms.runtime import native
    ctx = native.ctx_new(0, 1, 0, 0, 200_000, 2_000)

    def run():
        assert native.spin_budget(ctx, native.now_ns()) == 200_000          # the first look only samples
        with cpu_shared_with_a_busy_process():
            budgets, end = [], time.monotonic() + 1.0
            while time.monotonic() < end and 2_000 not in budgets:
                budgets.append(native.spin_budget(ctx, native.now_ns()))
        return budgets
    try:
        budgets = in_a_new_thread(run)
        counters = native.ffi.new("uint64_t[8]")
        native.ctx_counters(ctx, counters, 8)
    finally:
        native.ctx_free(ctx)
    assert budgets[-1] == 2_000, budgets[-5:]
    assert counters[4] >= 1                                  # preempted_spins (comms.runtime.engine.COUNTERS)


def test_a_gap_counts_as_contention_only_with_a_run_queue_wait():
    """native/wait.c cm_spin_gap: a spinning wait that finds a gap in its own clock readings counts its
    CPU contended (the preempted-spins counter, and the budget at its minimum) only where its thread
    spent at least half of the gap in a run queue (another thread ran in its place); a gap without
    that wait (the hypervisor's, an interrupt's) changes nothing. Here the first gap is made up (no
    run-queue wait at all), the second follows 50 ms pinned to one CPU with a busy process."""
    from comms.runtime import native
    ctx = native.ctx_new(0, 1, 0, 0, 200_000, 2_000)
    counters = native.ffi.new("uint64_t[8]")

    def preempted() -> int:
        native.ctx_counters(ctx, counters, 8)
        return counters[4]                                   # preempted_spins (comms.runtime.engine.COUNTERS)

    def run():
        assert native.spin_budget(ctx, native.now_ns()) == 200_000          # the first look only samples
        native.spin_gap(ctx, native.now_ns(), 5_000_000)
        idle = preempted(), native.spin_budget(ctx, native.now_ns())
        with cpu_shared_with_a_busy_process():
            time.sleep(0.2)                                                  # the busy process runs
            native.spin_budget(ctx, native.now_ns())                         # a fresh sample
            before = preempted()
            end = time.monotonic() + 0.05
            while time.monotonic() < end:                                    # shares the CPU with it
                pass
            native.spin_gap(ctx, native.now_ns(), 5_000_000)
            return idle, (preempted() - before, native.spin_budget(ctx, native.now_ns()))
    try:
        after_idle_gap, after_busy_gap = in_a_new_thread(run)
    finally:
        native.ctx_free(ctx)
    assert after_idle_gap == (0, 200_000)
    assert after_busy_gap == (1, 2_000)
