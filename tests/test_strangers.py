"""Strangers (issue #26, section 5): a process without the job's token tries the store, the data
port and the control port of a running authenticated job, with garbage and with replays of real
traffic. Every attempt is counted and refused, and the job's results are right.

The job (tests/stranger_workers.py: 3 ranks over tcp, COMMS_AUTH_TOKEN set) runs init with
strangers on rank 2's data port (garbage, a plain hello, and rank 1's real hello replayed), then
four splits whose rank-2 store entry a stranger replaces (untagged, a forged tag, and two real
tagged values replayed from other keys), then a clean split; then it waits while this process,
which has no token, attacks rank 0's control port (and rank 2's closed data port)."""
from __future__ import annotations

import json
import os
import socket
import threading
import time

import zmq
from zmq.utils.monitor import parse_monitor_message

from comms.testing import spawn
import stranger_workers as stw

ENV = {"COMMS_AUTH_TOKEN": "the job's token", "COMMS_AUTH_TOKEN_FILE": None, "COMMS_TRANSPORT": "tcp",
       "COMMS_CALIBRATE": "0"}
REFUSED_HANDSHAKE = "control plane refused a connection (bad handshake)"
REFUSED_KEY = "control plane refused a connection (wrong key)"
REFUSED_BY_ZAP = "control plane refused a client without the job's key"


def _raw(addr, chunks: list[bytes]) -> tuple[str, int]:
    """Sends ``chunks`` on a plain TCP connection, then reads until the other side ends it: (how it
    ended, how many bytes came back)."""
    sock = socket.create_connection(addr, timeout=10)
    got, how = 0, "closed"
    try:
        for c in chunks:
            sock.sendall(c)
            time.sleep(0.05)
        while data := sock.recv(4096):
            got += len(data)
    except ConnectionResetError:
        how = "reset"
    except socket.timeout:
        how = "still open"
    finally:
        sock.close()
    return how, got


def _zmq_client(ctx, endpoint: str, creds, server_key, frames: list[bytes]) -> list[str]:
    """A DEALER (NULL mechanism, or CURVE with ``creds``) that sends ``frames``, one connection
    only: the events its monitor saw until the connection ended."""
    s = ctx.socket(zmq.DEALER)
    mon = None
    try:
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RECONNECT_IVL, -1)              # one attempt, one refusal
        if creds:
            s.curve_serverkey, s.curve_publickey, s.curve_secretkey = server_key, *creds
        mon = s.get_monitor_socket(addr=f"inproc://stranger-monitor-{os.urandom(8).hex()}")
        s.connect(endpoint)
        for f in frames:
            s.send(f)
        events, end = [], time.monotonic() + 10
        while time.monotonic() < end and "DISCONNECTED" not in events:
            if mon.poll(100):
                events.append(zmq.Event(parse_monitor_message(mon.recv_multipart())["event"]).name)
    finally:
        s.close(0)
        if mon is not None:
            mon.close(0)
    return events


def _control_stranger(workdir: str, out: dict) -> None:
    """Without the token: waits for rank 0 to publish its control endpoint, attacks it, then tells
    the job it is done."""
    try:
        if not stw._wait_file(os.path.join(workdir, "data.json"), 90) or \
                not stw._wait_file(os.path.join(workdir, "control.json"), 30):
            out["error"] = "the job never published its endpoints"
            return
        with open(os.path.join(workdir, "control.json")) as f:
            pub = json.load(f)
        with open(os.path.join(workdir, "data.json")) as f:
            listener = tuple(json.load(f)["listener"])
        frames = [bytes.fromhex(h) for h in pub["frames"]]
        stream = [bytes.fromhex(h) for h in pub["stream"]]
        host, port = pub["endpoint"][len("tcp://"):].rsplit(":", 1)
        addr = (host, int(port))
        ctx = zmq.Context()
        try:
            out["garbage"] = _raw(addr, [b"GET / HTTP/1.0\r\n\r\n" + b"x" * 64])
            out["zmtp garbage"] = _raw(addr, [b"\xff" + bytes(8) + b"\x7f\x03\x00" + b"XYZZY".ljust(20, b"\0")
                                              + bytes(32) + b"garbage" * 10])     # a ZMTP 3.0 greeting, then junk
            out["null client"] = _zmq_client(ctx, pub["endpoint"], None, None, frames)
            out["curve, another key pair"] = _zmq_client(ctx, pub["endpoint"], zmq.curve_keypair(),
                                                         pub["server key"].encode(), frames)
            out["replayed curve stream"] = _raw(addr, stream)
        finally:
            ctx.term()
        try:
            socket.create_connection(listener, timeout=5).close()
            out["data port after init"] = "accepted"
        except ConnectionRefusedError:
            out["data port after init"] = "refused"
    except Exception as e:                   # noqa: BLE001  (the test reads it)
        out["error"] = repr(e)
    finally:
        open(os.path.join(workdir, "done"), "w").close()


def test_strangers_on_the_store_the_data_port_and_the_control_port_are_refused(tmp_path):
    workdir = str(tmp_path)
    seen: dict = {}
    attacker = threading.Thread(target=_control_stranger, args=(workdir, seen), daemon=True)
    attacker.start()
    t0 = time.monotonic()
    out = spawn(stw.job, 3, timeout=120, args=(workdir,), env=ENV)
    took = time.monotonic() - t0
    attacker.join(10)
    assert "error" not in seen, seen
    attempts: dict[tuple[str, str], int] = {}

    def attempt(target: str, kind: str) -> None:
        attempts[target, kind] = attempts.get((target, kind), 0) + 1

    for r in out:                                     # the job's results, after every attack
        assert r["x"] == [6.0] * 4 and r["y"] == [60.0] * 2 and r["z"] == [6.0] * 3, r
        assert r["attacked"], "the control-port stranger never finished"

    # -- the store: every rank refuses the stranger's value for rank 2, each of the four times
    done = out[stw.VICTIM]["store attempts"]
    assert [k for k, _ in done] == stw.STORE_KINDS, done
    for kind, key in done:
        attempt("store", kind)
        for rank, r in enumerate(out):
            got = dict((k, (name, msg)) for k, name, msg in r["splits"])[kind]
            assert got[0] == "TransportError", (rank, kind, got)
            assert f"rank 2's entry: store: the value under key {key!r} (read by rank {rank}) failed " \
                   "authentication" in got[1], (rank, kind, got)

    # -- the data port: rank 2 refused each stranger, which got its challenge and no proof
    victim = out[stw.VICTIM]
    assert sorted(k for k, _, _ in victim["data"]) == sorted(stw.DATA_KINDS + ["replayed hello"]), victim["data"]
    for kind, how, got in victim["data"]:
        attempt("data", kind)
        assert how in ("closed", "reset") and len(got) <= 16, (kind, how, got)
    refused = [w for w in victim["warnings"] if "rank 2 refused a tcp connection" in w]
    assert len(refused) == 3, refused
    # the replay is refused for its proof, over the challenge of its own connection
    assert sum("a hello claiming rank 1 failed authentication" in w for w in refused) == 1, refused
    assert seen["data port after init"] == "refused", seen
    attempt("data", "after init")
    for r in out[:stw.VICTIM]:
        assert not any("refused a tcp connection" in w for w in r["warnings"]), r["warnings"]

    # -- the control port of rank 0: nothing delivered, every handshake refused and logged
    for kind in ("garbage", "zmtp garbage", "replayed curve stream"):
        attempt("control", kind)
        how, _ = seen[kind]
        assert how in ("closed", "reset"), (kind, seen[kind])
    assert seen["garbage"][1] <= 64 and seen["zmtp garbage"][1] <= 64, seen    # a greeting at most
    assert seen["replayed curve stream"][1] > 0, seen       # got as far as a fresh WELCOME, no further
    assert "HANDSHAKE_FAILED_AUTH" in seen["curve, another key pair"], seen
    for kind in ("null client", "curve, another key pair"):
        attempt("control", kind)
        assert any(e.startswith("HANDSHAKE_FAILED_") for e in seen[kind]), (kind, seen[kind])
        assert "HANDSHAKE_SUCCEEDED" not in seen[kind] and seen[kind][-1] == "DISCONNECTED", (kind, seen[kind])
    # (the plain garbage is refused but not logged: libzmq reports no handshake event for a peer
    # that does not even send a ZMTP greeting, so only the stranger sees it, reset)
    lines = out[0]["warnings"]
    assert sum(REFUSED_HANDSHAKE in w for w in lines) == 3, lines      # zmtp garbage, null, replay
    assert sum(REFUSED_KEY in w for w in lines) == 1 and sum(REFUSED_BY_ZAP in w for w in lines) == 1, lines
    for rank, r in enumerate(out):
        assert r["seen"] == {"failed": {}, "left": [], "revoked": 0, "comm failed": {}}, (rank, r["seen"])
        if rank:
            assert not any("control plane refused" in w for w in r["warnings"]), r["warnings"]
        assert not any("learned that rank" in w or "dropped a malformed" in w for w in r["warnings"]), r["warnings"]

    assert attempts == {**{("store", k): 1 for k in stw.STORE_KINDS},
                        **{("data", k): 1 for k in stw.DATA_KINDS + ["replayed hello", "after init"]},
                        **{("control", k): 1 for k in ("garbage", "zmtp garbage", "null client",
                                                       "curve, another key pair", "replayed curve stream")}}
    print(f"\n{sum(attempts.values())} attempts, all refused, in {took:.1f} s: {sorted(attempts)}")
