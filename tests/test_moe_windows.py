"""The single-copy exchange of comms.moe (shared-memory receive windows, comms/moe/windows.py):
it never weakens the process's protection against ptrace, it is the path taken on one host and
gives the all_to_all path's bytes exactly, it never writes into memory a caller holds, and it
leaves nothing in /dev/shm, also when a rank is killed with SIGKILL."""
from __future__ import annotations

import os

import pytest

from comms.moe.windows import KEEP_IDLE
from comms.runtime.cleanup import SHM_DIR
from comms.testing import RankFailed, spawn

import moe_window_workers as ww


def test_single_copy_never_sets_a_ptracer():
    """Under a seccomp filter that traps prctl(PR_SET_PTRACER) (the old cross-memory-attach path
    called it on every rank, letting any process of the user attach), a single-copy round trip
    makes no such call, while the control call after it is caught. Where Yama's ptrace_scope is 1
    and the ranks lack CAP_SYS_PTRACE, rank 0 also fails to read its sibling rank 1's memory."""
    out = spawn(ww.guarded_round_trip, 3, timeout=120, env={"COMMS_MOE_SINGLE_COPY": "1"})
    for rank, o in enumerate(out):
        assert o["enabled"], (rank, o["reason"])
        assert o["calls"] == 0, f"rank {rank} called prctl(PR_SET_PTRACER) {o['calls']} times"
        assert o["control_calls"] == 1, f"rank {rank}: the seccomp trap did not catch the control call"
    if out[0]["yama"]:
        assert out[0]["sibling_read"] == "EPERM", out[0]["sibling_read"]


def test_single_copy_is_taken_and_matches_all_to_all_bitwise():
    world = 3
    cases = [dict(seed=s, experts=e, k=k, hidden=h, dtype="bf16", tokens=t, route=r, target=1)
             for s, e, k, h, t, r in [(1, 6, 2, 256, [40, 17, 33], "random"), (2, 9, 3, 128, [0, 25, 8], "sparse"),
                                      (3, 3, 1, 384, [12, 0, 0], "one_rank"), (4, 6, 2, 128, [5, 5, 5], "no_expert")]]
    out = spawn(ww.compare_paths, world, timeout=200, args=(cases,))
    for rank, o in enumerate(out):
        assert o["enabled"] == (True, False), (rank, o["enabled"])
        for i, m in enumerate(o["moved"]):
            # every row for a peer went into its window, none through the communicator's rings
            # (which carried only the headers and the window announcements)
            assert m["window_tx_bytes"] == m["rows_to_peers"] * m["row_bytes"], (rank, i, m)
            assert m["shm_tx_bytes"] < 1024, (rank, i, m)
    assert sum(m["rows_to_peers"] for o in out for m in o["moved"]) > 100


def test_held_recv_x_is_never_overwritten_and_windows_are_reused():
    world = 3
    out = spawn(ww.held_views_and_names, world, timeout=200)
    for rank, o in enumerate(out):
        assert o["held_intact"], rank
        assert o["new_windows"] == 0, (rank, o["new_windows"])
        assert len(o["owned"]) <= KEEP_IDLE + 2, (rank, o["owned"])
        assert o["names"] == [], (rank, o["names"])
        for p in range(world):                 # every peer maps exactly the windows p owns
            if p != rank:
                assert o["mapped"][p] == out[p]["owned"], (rank, p, o["mapped"][p], out[p]["owned"])


def test_no_window_name_survives_a_kill_9():
    with pytest.raises(RankFailed) as info:
        spawn(ww.killed_while_named, 2, timeout=120)
    err = info.value
    assert err.rank == 0 and err.exc_type == "ProcessDied", err
    survivor = err.results[1]
    pid0, name = survivor["victim"]
    assert survivor["error"] in ("PeerError", "CommTimeout"), survivor
    assert survivor["left"] == [], survivor          # unlinked by the survivor's failed exchange
    # the victim's name (it was there when the victim died) was swept once the ranks exited
    assert not os.path.exists(os.path.join(SHM_DIR, name))
    assert not [n for n in os.listdir(SHM_DIR) if n.startswith(f"comms.{os.getuid()}.{pid0}.")]
