"""The control plane: failures known everywhere within seconds (killed, stopped, unreaped), revoke,
shrink, grow and join, the torch backend's abort, and its wire format under malformed input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import zmq
from hypothesis import given, settings, strategies as st

from comms.algorithms.patterns import skip_ring
from comms.control import wire
from comms.control.plane import Plane
from comms.testing import RankFailed, spawn

import control_workers as cw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONG = {"COMMS_TIMEOUT": "300"}      # a failure must be known long before the deadline
KNOWN_S = 5.0                        # "within seconds" with room for a loaded 2-core CI machine
                                     # (the 2 s figure is measured by bench, not asserted here)


def _survivors(info: RankFailed) -> dict:
    assert set(info.failures) == {max(info.failures)}, info.failures    # only the victim died
    return info.results


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_failed_rank_is_known_by_ranks_blocked_with_other_peers(how):
    with pytest.raises(RankFailed) as info:
        spawn(cw.silent_victim, 3, timeout=90, args=(how,), env=LONG)
    cause = "killed" if how == "kill" else "stopped (SIGSTOP"
    for rank, (name, msg, peer, failed, elapsed, later) in _survivors(info.value).items():
        assert name == "PeerError" and peer == 2 and failed == [2], msg
        assert f"recv on rank {rank}: rank 2 failed" in msg and cause in msg and "control plane" in msg, msg
        assert elapsed < KNOWN_S, (rank, elapsed)
        assert later == "PeerError"                 # later calls raise too


def test_killed_rank_that_nobody_reaped_is_known():
    """The issue's case: a SIGKILLed rank stays a zombie (its supervisor does not wait() for it), so
    kill(pid, 0) still finds it; the control plane's connections drop anyway."""
    import torch.distributed as dist
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    env = dict(os.environ, WORLD_SIZE="3", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port),
               TORCHELASTIC_USE_AGENT_STORE="True", COMMS_TIMEOUT="300", PYTHONPATH=os.path.join(ROOT, "tests"))
    code = "from control_workers import unreaped_main; unreaped_main()"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=dict(env, RANK=str(r)),
                              stdout=subprocess.PIPE, text=True) for r in range(3)]
    try:
        outs = [procs[r].communicate(timeout=90)[0] for r in (0, 1)]     # rank 2 is not waited for yet
        zombie = open(f"/proc/{procs[2].pid}/stat").read().split(") ")[1][0]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert zombie == "Z"
    for rank, out in enumerate(outs):
        name, msg, peer, failed, elapsed, later = json.loads(out.strip().splitlines()[-1])
        assert name == "PeerError" and failed == [2] and "zombie" in msg, msg
        assert elapsed < KNOWN_S, (rank, elapsed)


def test_revoke_reaches_every_rank_and_shrink_gives_a_working_communicator():
    out = spawn(cw.revoke_then_shrink, 3, timeout=90, env=LONG)
    for rank, (name, msg, peer, failed, elapsed, new_rank, new_size, y) in enumerate(out):
        assert name == "Revoked" and peer == 0 and "revoked by rank 0" in msg, msg
        assert elapsed < KNOWN_S
        assert (new_rank, new_size, y) == (rank, 3, [6.0] * 4)


def test_survivors_shrink_after_a_kill_and_renumber_in_order():
    with pytest.raises(RankFailed) as info:
        spawn(cw.shrink_after_kill, 4, timeout=120, env=LONG)
    results = info.value.results
    assert sorted(results) == [0, 2, 3] and set(info.value.failures) == {1}
    for old, (name, msg, peer, failed, rank, size, members, y0, y1, gathered) in results.items():
        assert name == "PeerError" and failed == [1] and "rank 1 failed" in msg, msg
        assert (rank, size, members) == ([0, 2, 3].index(old), 3, [0, 2, 3])
        assert y0 == y1 == 6.0                       # 1 + 2 + 3 over the renumbered ranks
        assert gathered == [0, 2, 3]


class _Survivor:
    """What shrink's agreement reads of a communicator: its rank, size, store, deadline, prefix and
    the failed ranks its control plane reported."""
    def __init__(self, rank, size, store, failed):
        self.rank, self.size, self._store, self.timeout, self.prefix = rank, size, store, 20.0, "comms/t/"
        self._failed = failed

    def failed_ranks(self):
        return self._failed


def _agree_all(store, views: dict) -> dict:
    import threading
    from comms.control.membership import agree
    out = {}

    def one(rank):
        try:
            out[rank] = agree(_Survivor(rank, len(views), store, views[rank]), 1)
        except Exception as e:                    # noqa: BLE001 - the test looks at which
            out[rank] = e
    threads = [threading.Thread(target=one, args=(r,)) for r in views]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


@pytest.mark.parametrize("secret", [None, b"s" * 32])
def test_a_partition_that_leaves_both_sides_the_store_lets_one_side_shrink(secret):
    """Hosts {0, 1} and {2, 3} lose each other but both reach the store: each side converges on the
    other's failure, and without a decision both would build a communicator under one prefix."""
    from torch.distributed import HashStore
    from comms.errors import PeerError
    from comms.security.store import AuthenticatedStore
    store = HashStore() if secret is None else AuthenticatedStore(HashStore(), secret)
    for _ in range(3):
        out = _agree_all(store, {0: [2, 3], 1: [2, 3], 2: [0, 1], 3: [0, 1]})
        won = sorted(r for r, v in out.items() if isinstance(v, list))
        assert won in ([0, 1], [2, 3]), out
        lost = sorted(set(out) - set(won))
        assert all(out[r] == lost for r in won), out
        for r in lost:
            assert isinstance(out[r], PeerError) and "decided first" in str(out[r]) and r in out[r].failed, out[r]
        store = HashStore() if secret is None else AuthenticatedStore(HashStore(), secret)


def test_a_survivor_that_learns_of_a_failure_after_the_decision_adopts_it():
    """Ranks 0, 1 and 3 agreed that 2 failed and rank 0 decided; then rank 1 sees 3 fail too. It
    takes the decided set (the next communicator's init finds 3) instead of waiting for rank 0's
    view to change until the deadline."""
    import json as _json
    from torch.distributed import HashStore
    from comms.control.membership import agree, child_prefix
    store = HashStore()
    base = f"{child_prefix(_Survivor(0, 4, store, []), 'shrink1')}agree/"
    store.set(f"{base}1", _json.dumps([2]))
    store.set(f"{base}3", _json.dumps([2]))
    assert agree(_Survivor(0, 4, store, [2]), 1) == [2]
    t0 = time.monotonic()
    assert agree(_Survivor(1, 4, store, [2, 3]), 1) == [2]
    assert time.monotonic() - t0 < 5


def test_a_replacement_joins_through_grow():
    out = spawn(cw.grow_with_joiner, 3, timeout=90)
    assert out == [(0, 3, 6.0), (1, 3, 6.0), (2, 3, 6.0)]


def test_torch_abort_releases_every_waiter():
    out = spawn(cw.torch_abort, 2, timeout=90, env=LONG)
    (n0, m0, t0), (n1, m1, t1) = out
    assert "aborted" in m0 and "process group was aborted" in m0 and t0 < KNOWN_S, out
    assert n1 == "PeerError" and "rank 0 aborted" in m1 and t1 < KNOWN_S, out


# -- rank arithmetic and the wire format -----------------------------------------------------------
@given(st.integers(1, 300))
def test_skip_ring_is_symmetric_small_and_connected(size):
    graph = {r: skip_ring(r, size) for r in range(size)}
    for r, peers in graph.items():
        assert r not in peers and len(peers) == len(set(peers)) <= 2 * max(1, size - 1).bit_length()
        assert all(r in graph[p] for p in peers)
    seen, todo = {0}, [0]
    while todo:
        for p in graph[todo.pop()]:
            if p not in seen:
                seen.add(p)
                todo.append(p)
    assert len(seen) == size


KEY = bytes(range(16))


@given(st.lists(st.tuples(st.integers(0, 9), st.sampled_from(sorted(wire.CAUSES)), st.integers(0, 9)),
                max_size=20), st.binary(min_size=8, max_size=8), st.integers(0, 9))
def test_wire_round_trips(entries, tok, origin):
    assert wire.parse(wire.fail(KEY, entries), KEY, 10).entries == tuple(entries)
    for kind in (wire.REVOKE, wire.ABORT):
        m = wire.parse(wire.revoke(KEY, tok, origin, kind), KEY, 10)
        assert (m.kind, m.token, m.origin) == (kind, tok, origin)
    assert wire.parse(wire.revoke(KEY, tok, origin, 9), KEY, 10) is None     # no such kind
    assert wire.parse(wire.bye(KEY, origin), KEY, 10).origin == origin
    frame = wire.fail(KEY, entries)
    for cut in range(len(frame)):                   # every truncation is dropped
        assert wire.parse(frame[:cut], KEY, 10) is None
    assert wire.parse(frame, bytes(16), 10) is None  # another plane's key
    assert wire.parse(wire.bye(KEY, origin), KEY, origin) is None    # a rank out of range


@given(st.binary(max_size=200))
def test_wire_drops_arbitrary_bytes(frame):
    m = wire.parse(frame, KEY, 4)
    assert m is None or m.kind in (wire.FAIL, wire.REVOKE, wire.BYE)


class _Sub:
    """A subscriber that records what the plane tells it (stands in for a communicator)."""

    def __init__(self):
        self.failed, self.revoked = {}, []

    def _peers_failed(self, failed):
        self.failed.update(failed)

    def _revoked_by(self, origin):
        self.revoked.append(origin)


def _pair(keys=None):
    a = Plane(0, 2, KEY, "127.0.0.1", {}, keys)
    b = Plane(1, 2, KEY, "127.0.0.1", {}, keys)
    a.start([a.endpoint, b.endpoint])
    b.start([a.endpoint, b.endpoint])
    return a, b


def _wait(cond, s=5.0):
    end = time.monotonic() + s
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)
    return cond()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.binary(max_size=120), min_size=1, max_size=3), min_size=1, max_size=8))
def test_plane_survives_malformed_frames_from_a_stranger(batches):
    a, b = _pair()
    sub = _Sub()
    a.subscribe(sub, b"tok-0001", [0, 1])
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    try:
        s.connect(a.endpoint)
        for frames in batches:
            s.send_multipart(frames)
        b.revoke(b"tok-0001")                       # a real message after the garbage still arrives
        assert _wait(lambda: sub.revoked == [1])
        assert sub.failed == {} and a.failed == {}
    finally:
        s.close(0)
        ctx.term()
        b.close()
        a.close()
    assert sub.failed == {}                          # b said BYE: closing is no failure


def test_authenticated_plane_refuses_a_stranger(caplog):
    from comms.control.plane import curve_keys
    os.environ["COMMS_AUTH_TOKEN"] = "job-secret-one"
    try:
        keys = curve_keys()
    finally:
        del os.environ["COMMS_AUTH_TOKEN"]
    assert keys is not None
    a, b = _pair(keys)
    sub = _Sub()
    a.subscribe(sub, b"tok-0002", [0, 1])
    ctx = zmq.Context()
    strangers = []
    try:
        other_pk, other_sk = zmq.curve_keypair()
        for creds in (None, (other_pk, other_sk)):            # no key at all; a key of another job
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            if creds:
                s.curve_serverkey, s.curve_publickey, s.curve_secretkey = keys[0], *creds
            s.connect(a.endpoint)
            s.send(wire.revoke(KEY, b"tok-0002", 1))           # well formed: only the handshake stops it
            strangers.append(s)
        time.sleep(1.0)
        assert sub.revoked == []
        b.revoke(b"tok-0002")                                 # the real peer still gets through
        assert _wait(lambda: sub.revoked == [1])
    finally:
        for s in strangers:
            s.close(0)
        ctx.term()
        b.close()
        a.close()
    assert any("refused" in r.getMessage() for r in caplog.records)


def test_elastic_inference_example_keeps_serving_and_takes_a_replacement():
    out = subprocess.run([sys.executable, "examples/elastic_inference.py", "--replicas", "3",
                          "--kill-rank", "1", "--kill-at", "5", "--steps", "20"], cwd=ROOT, capture_output=True,
                         text=True, timeout=240)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert summary["replaced"] and summary["reports"] == 3 and summary["final_size"] == 3, summary   # 2 + the newcomer
    assert summary["sizes_seen"] == [2, 3] and summary["all_correct"] and summary["steps"] >= 20, summary
    assert "rank 1 failed" in out.stderr


@pytest.mark.parametrize("nproc", [2, 3])
def test_torchrun_max_restarts_restarts_reinitialises_and_continues(tmp_path, nproc):
    """examples/elastic_restart.py under torchrun --max-restarts: rank 1 is killed in the first
    attempt; the survivors fail fast, torchrun restarts the group, which re-initialises the "comms"
    backend and finishes from its checkpoint with the right sum."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = subprocess.run([torchrun, "--standalone", "--nproc-per-node", str(nproc), "--max-restarts", "1",
                          "--monitor-interval", "0.2", "examples/elastic_restart.py", "--steps", "20",
                          "--checkpoint", str(tmp_path / "ckpt.json"), "--crash-at", "8"],
                         cwd=ROOT, capture_output=True, text=True, timeout=240, env=dict(os.environ, COMMS_TIMEOUT="300"))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"steps": 20, "attempt": 1, "correct": True}, report
    assert "exitcode: -9" in out.stderr                        # the first attempt did lose rank 1
