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

