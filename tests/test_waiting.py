"""How a waiting rank waits (native/wait.c, native/engine.c): a wait whose data comes through the
kernel (tcp) sleeps in poll() at once, and the progress thread driving an asynchronous operation
sleeps too, leaving the core to the caller (DDP's backward pass overlaps its all_reduce so). Each
test waits about a second for a late peer and counts the CPU seconds rank 0 spent meanwhile: a
spinning wait spends about as much CPU as wall time."""
from __future__ import annotations

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



def test_a_spinning_thread_that_waits_for_its_cpu_counts_the_cpu_contended():
    """native/wait.c: a thread that spent over a tenth of the last 2 ms waiting in a run queue (here:
    pinned to one CPU with a busy process) finds its context contended: the spin budget drops from
    its maximum to its minimum, and the preempted-spins counter counts it. Nothing is spinning
    meanwhile, so the other signal (a gap in a spinner's own clock readings) plays no part."""
    import os
    import subprocess
    import sys
    import time
    from comms.runtime import native
    ctx = native.ctx_new(0, 1, 0, 0, 200_000, 2_000)
    mask = os.sched_getaffinity(0)
    cpu = max(mask)
    hog = None
    try:
        assert native.spin_budget(ctx, native.now_ns()) == 200_000          # the first look only samples
        os.sched_setaffinity(0, {cpu})
        hog = subprocess.Popen([sys.executable, "-c",
                                "import os; os.sched_setaffinity(0, {%d})\nwhile True: pass" % cpu])
        budgets, end = [], time.monotonic() + 1.0
        while time.monotonic() < end and 2_000 not in budgets:
            budgets.append(native.spin_budget(ctx, native.now_ns()))
        counters = native.ffi.new("uint64_t[8]")
        native.ctx_counters(ctx, counters, 8)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
        os.sched_setaffinity(0, mask)
        native.ctx_free(ctx)
    assert budgets[-1] == 2_000, budgets[-5:]
    assert counters[4] >= 1                                  # preempted_spins (comms.runtime.engine.COUNTERS)


def test_a_gap_counts_as_contention_only_with_a_run_queue_wait():
    """native/wait.c cm_spin_gap: a spinning wait that finds a gap in its own clock readings counts its
    CPU contended only where its thread spent at least half of the gap in a run queue (another
    thread ran in its place); a gap without that wait (the hypervisor's, an interrupt's) leaves the
    budget at its maximum. Here the first gap is made up (no run-queue wait at all), the second
    follows 50 ms pinned to one CPU with a busy process."""
    import os
    import subprocess
    import sys
    import time
    from comms.runtime import native
    ctx = native.ctx_new(0, 1, 0, 0, 200_000, 2_000)
    mask, hog = os.sched_getaffinity(0), None
    try:
        assert native.spin_budget(ctx, native.now_ns()) == 200_000          # samples run_delay
        native.spin_gap(ctx, native.now_ns(), 5_000_000)
        after_idle_gap = native.spin_budget(ctx, native.now_ns())
        cpu = max(mask)
        os.sched_setaffinity(0, {cpu})
        hog = subprocess.Popen([sys.executable, "-c",
                                "import os; os.sched_setaffinity(0, {%d})\nwhile True: pass" % cpu])
        time.sleep(0.2)                                                      # the hog is running
        native.spin_budget(ctx, native.now_ns() + 10 ** 10)                 # a fresh sample (forced)
        end = time.monotonic() + 0.05
        while time.monotonic() < end:                                        # shares the CPU with it
            pass
        native.spin_gap(ctx, native.now_ns() + 10 ** 10, 5_000_000)
        after_busy_gap = native.spin_budget(ctx, native.now_ns() + 10 ** 10)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
        os.sched_setaffinity(0, mask)
        native.ctx_free(ctx)
    assert after_idle_gap == 200_000
    assert after_busy_gap == 2_000
