"""Every collective end to end in real processes, over shared memory and over TCP, with random
cases (dtypes, ops, sizes up to MiBs, roots, splits, in/out of place, numpy and torch) checked
against the numpy reference; all ranks must get bitwise-identical reductions."""
from __future__ import annotations

import pytest

from comms.testing import spawn
from workers import run_cases, transports_seen


def check(results, size, transport):
    """Every rank got the same bits, and only ``transport`` carried data (none on one rank)."""
    assert len({tuple(r) for r in results}) == 1, "ranks computed different bits"
    if size > 1:
        assert results[0][-1] == f"stats:{transport}", results[0][-1]


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_shm(size):
    check(spawn(run_cases, size, timeout=180, args=(100 + size, 45)), size, "shm")


@pytest.mark.parametrize("size", [2, 3])
def test_tcp(size):
    check(spawn(run_cases, size, timeout=180, args=(200 + size, 40), env={"COMMS_TRANSPORT": "tcp"}), size, "tcp")


@pytest.mark.parametrize("algo", ["all_reduce:ring#reduce_scatter:ring#broadcast:ring",
                                  "all_reduce:direct#barrier:linear#all_gather:bruck#all_to_all:bruck",
                                  "all_reduce:rhd", "all_reduce:recursive_doubling", "all_reduce:tree",
                                  "all_reduce:board"])
@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_forced_algorithms(algo, transport):
    results = spawn(run_cases, 3, timeout=180, args=(300, 25),
                    env={"COMMS_ALGO": algo, "COMMS_TRANSPORT": transport})
    check(results, 3, transport)


def test_small_slots_stress_pipelining():
    """Tiny shm slots: every large message crosses the ring in hundreds of chunks."""
    env = {"COMMS_SHM_SLOT_BYTES": "4K", "COMMS_SHM_SLOTS": "3", "COMMS_TCP_CHUNK_BYTES": "1000"}
    check(spawn(run_cases, 2, timeout=180, args=(400, 40), env=env), 2, "shm")


def test_transport_choice_and_host_identity():
    out = spawn(transports_seen, 3, timeout=60)
    assert out[0] == {"transports": {1: "shm", 2: "shm"}, "local": [0, 1, 2]}
    out = spawn(transports_seen, 2, timeout=60, env={"COMMS_TRANSPORT": "tcp"})
    assert out[1]["transports"] == {0: "tcp"}


def test_host_id_override_splits_hosts():
    """Ranks with different COMMS_HOST_ID are different hosts: they must talk over TCP."""
    out = spawn(_hosted, 4, timeout=60, env={"COMMS_CALIBRATE": "0"})      # the choice, not the figures
    assert out[0] == {"transports": {1: "shm", 2: "tcp", 3: "tcp"}, "local": [0, 1]}
    assert out[3] == {"transports": {0: "tcp", 1: "tcp", 2: "shm"}, "local": [2, 3]}


def _hosted(rank, size):
    import os
    os.environ["COMMS_HOST_ID"] = f"host{rank // 2}"
    return transports_seen(rank, size)


HIERARCHICAL = "#".join(f"{c}:hierarchical" for c in
                        ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "all_to_all"))


def test_ring_forwards_between_transports():
    """The flat ring over hosts {0, 1} and {2, 3}, in rounds at every size: ranks 1 and 3 forward over
    tcp what arrives over shm, ranks 0 and 2 over shm what arrives over tcp, a few hundred bytes at
    a time (tiny slots and tcp chunks), every send gated on the receive of its bytes."""
    env = {"COMMS_ALGO": "all_reduce:ring", "COMMS_SHM_SLOT_BYTES": "4K", "COMMS_SHM_SLOTS": "3",
           "COMMS_TCP_CHUNK_BYTES": "1000"}
    results = spawn(_contiguous_cases, 4, timeout=180, env=env)
    check([r[:-1] + ["x"] for r in results], 1, "shm")
    assert results[0][-1] == "stats:shm,tcp"


def _contiguous_cases(rank, size):
    import os
    from comms.algorithms import ring
    os.environ["COMMS_HOST_ID"] = f"host{rank // 2}"
    ring.RING_PIPELINE_BYTES, ring.RING_BLOCK_BYTES = 0, 4096     # rounds at every size, many of them
    return run_cases(rank, size, 600, 30)


@pytest.mark.parametrize("algo", ["", HIERARCHICAL])
def test_mixed_hosts_collectives(algo):
    """2 emulated hosts x 2 ranks: shm inside a host, tcp across; hierarchical algorithms forced."""
    results = spawn(_mixed_cases, 4, timeout=180, env={"COMMS_ALGO": algo})
    check([r[:-1] + ["x"] for r in results], 1, "shm")
    assert results[0][-1] == "stats:shm,tcp"            # both transports carried data


def _mixed_cases(rank, size):
    import os
    os.environ["COMMS_HOST_ID"] = f"host{(rank % 2)}"     # hosts {0, 2} and {1, 3}: not contiguous
    return run_cases(rank, size, 500, 40)


def test_ranks_that_cannot_see_each_others_shm_probe_use_tcp():
    out = spawn(_blind, 3, timeout=60, env={"COMMS_CALIBRATE": "0"})
    assert out[0] == {"transports": {1: "tcp", 2: "tcp"}, "local": [0]}


def _blind(rank, size):
    from comms.runtime.hostid import PeerInfo
    PeerInfo.sees_probe_of = lambda self, other: other.rank == self.rank   # as if /dev/shm were private
    return transports_seen(rank, size)


def test_deterministic_mode_end_to_end():
    """Every algorithm, over shm and tcp (2 emulated hosts x 2 ranks), gives the same bits."""
    from workers import deterministic_digests
    out = spawn(deterministic_digests, 4, timeout=180, args=(10_001,), env={"COMMS_DETERMINISTIC": "1"})
    digests = {d for per_rank in out for d in per_rank.values()}
    assert len(digests) == 1, out
    assert set(out[0]) >= {"ring", "direct", "tree", "rhd", "recursive_doubling", "hierarchical"}


def test_tcp_latency_hook_delays_every_message():
    from workers import tcp_round_trip_us
    env = {"COMMS_TRANSPORT": "tcp", "COMMS_TCP_DELAY_US": "3000"}
    rtt = spawn(tcp_round_trip_us, 2, timeout=120, env=env)[0]
    assert 6000 <= rtt < 60000, rtt        # two messages of at least 3 ms each per round trip


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_a_wait_sleeps_while_a_later_collective_heads_a_stream(transport):
    """A peer that runs ahead into the next collective leaves its message at the head of the
    stream, unmatched until this rank posts that collective: a wait for something else must still
    sleep (it used to see news on that stream every pass and spin, starving peers on shared cores)."""
    from workers import wait_beside_a_parked_collective
    env = {"COMMS_ALGO": "all_reduce:direct", "COMMS_CALIBRATE": "0", "COMMS_TRANSPORT": transport}
    out = spawn(wait_beside_a_parked_collective, 3, timeout=120, env=env)
    assert [o["sum"] for o in out] == [3.0] * 3
    r0 = out[0]
    assert r0["wall"] >= 0.4 and r0["sleeps"] >= 1, r0
    assert r0["cpu"] < 0.3 * r0["wall"], r0


def test_set_algo_switches_the_algorithm_between_collectives():
    """Every registered all_reduce algorithm forced in turn on one live communicator (2 hosts x 2
    ranks, so the hierarchical one runs too) runs and sums right; bad rules raise and leave the
    rules as they were; a split inherits the rules in force; None goes back to the default."""
    from comms import algorithms
    from workers import switched_algorithms
    names = algorithms.names("all_reduce")
    out = spawn(switched_algorithms, 4, timeout=120)
    assert all(o == out[0] for o in out), "ranks disagree"
    o = out[0]
    board = o["ran"].pop("board")
    assert board[0] != "board" and board[1] == [10.0]      # two hosts: the board declines, another runs
    assert o["ran"] == {a: [a, [10.0]] for a in names if a != "board"}
    assert "no algorithm 'no_such' for all_reduce" in o["bad"]
    last = names[-1]
    assert o["after_bad"] == last and o["split"] == last
    assert o["default"][1] == o["default"][0] and o["default"][2] == [10.0]


def test_thousands_of_unwaited_async_collectives_run_in_order_and_right():
    """4000 asynchronous all_reduces queued behind each other (collectives run one at a time): the
    engine looks only at running plans on each pass, so they drain, each with its own sum."""
    from workers import many_queued_collectives
    n = 4000
    out = spawn(many_queued_collectives, 2, timeout=120, args=(n,), env={"COMMS_CALIBRATE": "0"})
    for o in out:
        assert o["wrong"] == [] and o["x"] == [1.0] * 3, o


def test_a_queued_collective_times_out_on_its_own_deadline():
    """A collective queued behind one that cannot finish fails with its own 1 s timeout (looked at
    every 20 ms while queued), naming itself and the peer the running one waits for, long before
    the running one's 30 s deadline."""
    from workers import queued_collective_times_out
    out = spawn(queued_collective_times_out, 2, timeout=60, env={"COMMS_CALIBRATE": "0"})
    o = out[0]
    assert o["error"] == "CommTimeout" and 0.9 <= o["after"] < 5, o
    assert "all_reduce (seq 2) on rank 0" in o["msg"] and "rank 1" in o["msg"], o
    assert o["first"] is not None, o
