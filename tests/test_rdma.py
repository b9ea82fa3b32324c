"""The rdma transport (libfabric) end to end, on libfabric's software providers: ``tcp;ofi_rxm``
(RDM over TCP) and ``shm``. Every collective with random cases, the registration cache, endpoints,
failures (a rank killed mid-transfer, mismatches, a deadline, a provider that cannot open).

CI installs libfabric (.ci/setup.sh); these tests fail, not skip, without it. Across two simulated
hosts (shm inside a host, rdma between): tests/test_multihost.py.
"""
from __future__ import annotations

import pytest

from comms.testing import RankFailed, spawn
import fault_workers as fw
import rdma_workers as rw
from test_collectives import check
from test_failures import assert_killed_rank_reported
from workers import run_cases

RDMA = {"COMMS_TRANSPORT": "rdma"}


def _env(provider: str, **extra) -> dict:
    return {**RDMA, "FI_PROVIDER": provider, **extra}


@pytest.mark.parametrize("provider,size", [("tcp", 2), ("tcp", 4), ("shm", 3)])
def test_every_collective_over_rdma(provider, size):
    """Random cases of every collective (dtypes, ops, roots, splits, sizes up to MiBs: eager sends
    and rendezvous writes, in place and reduced through the staging slots), same bits on every rank,
    and rdma carried all of it."""
    check(spawn(run_cases, size, timeout=240, args=(600 + size, 20), env=_env(provider)), size, "rdma")


def test_collectives_when_local_buffers_need_registering_too():
    """FI_MR_LOCAL, as verbs and EFA demand: every buffer a send or write reads is registered and
    its descriptor passed (the software providers do not ask for it; the hook makes comms act so)."""
    env = _env("tcp", COMMS_RDMA_MR_LOCAL="1", COMMS_ALGO="all_reduce:ring#all_gather:ring")
    check(spawn(run_cases, 3, timeout=240, args=(700, 30), env=env), 3, "rdma")


def test_a_small_eager_limit_sends_most_messages_by_rendezvous():
    env = _env("shm", COMMS_RDMA_EAGER_BYTES="1K", COMMS_ALGO="all_reduce:rhd#all_to_all:pairwise")
    check(spawn(run_cases, 3, timeout=240, args=(800, 30, False), env=env), 3, "rdma")


@pytest.mark.parametrize("provider", ["tcp", "shm"])
def test_registration_cache(provider):
    out = spawn(rw.registration_cache, 2, timeout=120, env=_env(provider, COMMS_CALIBRATE="0"))
    for o in out:
        assert o["sum_ok"] and o["after_free_ok"] and o["after_resize_ok"] and o["torch_ok"], o
        # all_reduces of one buffer: registered by the first, found in the cache by the next four
        assert o["first_call"]["registrations"] >= 1 and o["first_call"]["one_use_registrations"] == 0, o
        assert o["same_buffer"]["registrations"] == 0 and o["same_buffer"]["cache_hits"] >= 4, o
        assert o["same_buffer"]["one_use_registrations"] == 0, o
        # freed: forgotten before its memory came back; the new buffer there has its own registration
        assert o["after_free"]["forgets"] == 1 and o["after_free"]["registrations"] == 1, o
        assert o["after_free"]["pinned"] == 0, o
        # a storage resized in place: its old range is forgotten, the new one registered
        assert o["moved"] and o["after_resize"]["forgets"] == 1 and o["after_resize"]["registrations"] == 1, o
        # a torch tensor's storage: registered once, forgotten when the storage goes
        assert o["torch"]["registrations"] == 1 and o["torch"]["cache_hits"] >= 2, o
        assert o["torch_freed"]["forgets"] == 1 and o["torch_freed"]["pinned"] == -1, o
        assert o["same_address"], "the freed buffer's address did not come back: the stale-key case was not tested"


def test_endpoints_send_over_the_rdma_channel():
    out = spawn(rw.endpoints, 3, timeout=120, env=_env("tcp", COMMS_CALIBRATE="0"))
    for o in out:
        assert o["transport"] == "rdma" and o["small"] and o["big"], o
        assert o["rdma_bytes"] >= 12 << 20 and o["other_bytes"] == 0, o


def test_killed_rank_mid_transfer_is_reported_by_survivors():
    """Over the tcp provider, as between hosts (verbs and EFA alike keep their locks inside a process)."""
    with pytest.raises(RankFailed) as info:
        spawn(rw.victim_mid_transfer, 3, timeout=90, env=_env("tcp", COMMS_CALIBRATE="0"))
    assert_killed_rank_reported(info.value)


def test_killed_rank_between_collectives_is_reported():
    """Over the shm provider, the rank is killed outside libfabric: that provider guards each rank's
    region with a spin lock its peers take too (libfabric 1.17), and a rank killed while holding it
    leaves its peers spinning inside fi_send/fi_writedata for good (seen 1 launch in about 20 under
    load, gdb: pthread_spin_lock under fi_writedata). No deadline reaches into a call that never
    returns; rank 0 logs a warning at init, docs/rdma.md says so, and comms' own shm transport (the
    default on one host) is the one tested mid-transfer there (test_failures)."""
    with pytest.raises(RankFailed) as info:
        spawn(rw.victim_mid_transfer, 3, timeout=60, args=(False,), env=_env("shm", COMMS_CALIBRATE="0"))
    assert_killed_rank_reported(info.value)


def test_mismatched_collectives_fail_on_every_rank():
    for name, msg, *_ in spawn(fw.mismatched_op, 2, timeout=60, env=_env("tcp")):
        assert name == "MismatchError", msg
        assert "all_reduce(seq 1" in msg, msg
    for name, msg, *_ in spawn(fw.mismatched_count, 2, timeout=60, env=_env("shm")):
        assert name == "MismatchError" and "10 elements" in msg and "20 elements" in msg, msg


def test_skipped_collective_times_out():
    out = spawn(fw.skipped_collective, 3, timeout=60, env=_env("tcp"))
    for rank, (name, msg, seq, peer, elapsed) in enumerate(out):
        if rank != 2:
            assert name in ("CommTimeout", "PeerError") and msg.startswith(f"all_reduce (seq 2) on rank {rank}"), msg
            assert elapsed < 10, msg


@pytest.mark.parametrize("env,says", [
    ({"FI_PROVIDER": "no_such_provider"}, "FI_PROVIDER=no_such_provider"),
    ({"COMMS_RDMA_LIBFABRIC": "/nonexistent/libfabric.so.1"}, "libfabric is not installed"),
])
def test_a_provider_that_cannot_open_fails_every_rank_clearly(env, says):
    """Forced rdma never falls back: every rank raises, naming the provider or the package."""
    out = spawn(rw.open_error, 2, timeout=60, env={**RDMA, **env})
    for name, msg in out:
        assert name == "TransportError", msg
        assert says in msg and "COMMS_TRANSPORT=rdma" in msg, msg
    assert "libfabric1" in out[0][1] or "no_such_provider" in out[0][1]


@pytest.mark.parametrize("provider", ["tcp", "shm"])
def test_closing_leaves_nothing_open(provider):
    for o in spawn(rw.nothing_left_open, 3, timeout=120, env=_env(provider, COMMS_CALIBRATE="0")):
        assert o == {"leaked": [], "shm": []}, o


def test_info_shows_the_provider_fabric_and_domain():
    """python -m comms.info under the launcher with rdma forced: the provider libfabric chose (and
    its version), its fabric and domain, and the route the cost model prices."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    env = dict(os.environ, **_env("tcp"))
    out = subprocess.run([sys.executable, "-m", "comms.run", "-n", "2", "-m", "comms.info"],
                         cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if "  rdma " in ln)
    assert "provider tcp;ofi_rxm" in line and ", fabric " in line and ", domain " in line, line
    assert "provider_version 1" in line and "hardware False" in line, line
    assert "route: rdma inside a host, rdma between hosts" in out.stdout, out.stdout
