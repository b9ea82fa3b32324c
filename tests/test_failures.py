"""Bad input and failures: clear errors on every rank, never a hang, nothing leaked."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from comms.testing import RankFailed, spawn
import fault_workers as fw


def test_bad_arguments_raise_before_any_byte_moves():
    out = spawn(fw.bad_arguments, 2, timeout=60)
    for caught, y in out:
        assert caught == ["InvalidUsage"] * len(caught), caught
        assert y == [3.0] * 5


def test_mismatched_sizes_fail_on_every_rank():
    out = spawn(fw.mismatched_count, 2, timeout=60)
    for name, msg, seq, peer, *_ in out:
        assert name == "MismatchError", msg
        assert "seq 2" in msg and "10 elements" in msg and "20 elements" in msg, msg
    # the detecting rank names itself and the peer
    assert any("rank 0 called all_reduce" in o[1] or "rank 1 called all_reduce" in o[1] for o in out)


def test_mismatched_collectives_fail_on_every_rank():
    out = spawn(fw.mismatched_op, 2, timeout=60)
    for name, msg, *_ in out:
        assert name == "MismatchError", msg
        # whichever rank reads the other's header first reports both calls with their seq numbers
        assert "all_reduce(seq 1" in msg and ("broadcast(seq 1" in msg or "barrier(seq 2" in msg), msg


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_a_mismatch_among_four_ranks_is_known_long_before_the_deadline(transport):
    out = spawn(fw.mismatch_among_four, 4, timeout=120, args=(transport,), env={"COMMS_TRANSPORT": transport})
    for rank, (name, msg, seq, peer, elapsed) in enumerate(out):
        assert name == "MismatchError", (rank, msg)
        # whichever rank saw it names both calls (rank 3's all_gather against a broadcast, or the
        # barrier after it that a rank done with its broadcast began)
        assert "all_gather(seq 2" in msg and ("broadcast(seq 2" in msg or "barrier(seq 3" in msg), (rank, msg)
        assert elapsed < 20, (rank, elapsed, msg)


def test_skipped_collective_times_out_naming_op_seq_and_peer():
    out = spawn(fw.skipped_collective, 4, timeout=60)
    for rank, (name, msg, seq, peer, elapsed) in enumerate(out):
        if rank == 2:
            assert name in ("PeerError", "CommTimeout", "MismatchError"), msg
            continue
        assert name in ("CommTimeout", "PeerError"), msg
        assert msg.startswith(f"all_reduce (seq 2) on rank {rank}"), msg
        assert elapsed < 10, f"rank {rank} took {elapsed:.1f} s to fail"
    timeouts = [o for r, o in enumerate(out) if r != 2 and o[0] == "CommTimeout"]
    assert timeouts and all("timed out after 3 s waiting for rank" in o[1] for o in timeouts), out


def assert_killed_rank_reported(err: RankFailed) -> None:
    """Rank 1 of 3 died by SIGKILL; ranks 0 and 2 each raised PeerError naming rank 1 and the
    all_reduce, within 10 s (workers return (name, message, seq, peer, seconds))."""
    assert err.rank == 1 and err.exc_type == "ProcessDied"
    assert set(err.results) == {0, 2}, err
    for r in (0, 2):
        name, msg, seq, peer, elapsed = err.results[r]
        assert name == "PeerError", msg
        assert "rank 1" in msg and "all_reduce (seq" in msg, msg
        assert elapsed < 10, msg


@pytest.mark.parametrize("transport", ["shm", "tcp"])
@pytest.mark.parametrize("big", [False, True])
def test_killed_rank_is_reported_by_survivors(transport, big):
    with pytest.raises(RankFailed) as info:
        spawn(fw.victim, 3, timeout=60, args=(big,), env={"COMMS_TRANSPORT": transport})
    assert_killed_rank_reported(info.value)


def test_stranger_on_the_tcp_port_is_rejected():
    out = spawn(fw.stranger, 2, timeout=60, env={"COMMS_TRANSPORT": "tcp"})
    assert out == [[3.0] * 3] * 2


def test_async_work_and_p2p():
    out = spawn(fw.async_ops, 2, timeout=90)
    for rank, o in enumerate(out):
        assert o[:3] == [True, True, True]
        assert o[3] == [float(2 * i + 1) for i in range(5)]
        assert o[4:6] == ["CommTimeout", True]
        if rank == 1:
            assert o[6] == [[1.0] * 3, [2.0] * 3]
            assert o[7] == [0, 0, [5.0, 5.0], [6.0, 6.0]]
            assert o[8] == [True, True], o[8]


def test_split():
    out = spawn(fw.split_groups, 4, timeout=90)
    assert out[0][:5] == [1, 2, [2, 0], [2.0], True]
    assert out[2][:5] == [0, 2, [2, 0], [2.0], False]
    assert out[1][:4] == [1, 2, [3, 1], [4.0]]
    assert out[3][5] == [3.0, 3.0]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="needs root and unshare to mount a tiny private /dev/shm")
def test_dev_shm_too_small_names_the_size():
    code = ("import sys; sys.path.insert(0, 'tests'); from comms.testing import spawn; import fault_workers as fw\n"
            "from comms.testing import RankFailed\n"
            "try:\n    spawn(fw.split_groups, 2, timeout=60, env={'COMMS_SHM_SLOT_BYTES': '1M'})\n"
            "except RankFailed as e:\n    print('FAILED', e.failures)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           f"mount -t tmpfs -o size=2m tmpfs /dev/shm && exec {sys.executable} -c \"$0\"", code],
                          cwd=root, capture_output=True, text=True, timeout=120)
    assert "FAILED" in proc.stdout, proc.stdout + proc.stderr
    assert "/dev/shm is too small" in proc.stdout and "needs 16793600 bytes (16.0 MiB: 2 local ranks x 8 slots" in proc.stdout, proc.stdout
    assert proc.stdout.count("('TransportError'") == 2, proc.stdout   # both ranks fail, with the same cause


def test_launcher_runs_an_init_script_and_names_a_failing_rank(tmp_path):
    script = tmp_path / "job.py"
    script.write_text("import comms, numpy as np, sys\n"
                      "comm = comms.init(timeout=10)\n"
                      "x = np.ones(4); comm.all_reduce(x)\n"
                      "print('sum', x[0])\n"
                      "if comm.rank == 1 and len(sys.argv) > 1: sys.exit(3)\n"
                      "comm.close()\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ok = subprocess.run([sys.executable, "-m", "comms.run", "-n", "3", str(script)], cwd=root,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("sum 3.0") == 3 and "[rank 2] sum 3.0" in ok.stdout
    t0 = time.monotonic()
    bad = subprocess.run([sys.executable, "-m", "comms.run", "-n", "3", str(script), "fail"], cwd=root,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "rank 1" in bad.stderr, bad.stderr
    assert time.monotonic() - t0 < 60


def test_application_abort_reaches_every_rank_with_its_reason():
    out = spawn(fw.app_abort, 3, timeout=60)
    for rank, (name, msg, *_) in enumerate(out):
        assert name == "PeerError", msg
        assert "the scheduler preempted this job" in msg, msg
