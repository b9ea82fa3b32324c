"""Rank functions and strangers for tests/test_strangers.py: an authenticated 3-rank tcp job that a
process without the token attacks through the store, the data port and the control port.

The strangers never hold the secret. What they replay was captured from real traffic: a dialer's
hello as it crossed the wire to rank 2, a rank's tagged store value, and the byte stream of a real
CURVE client of the job talking to a listener of the job (recorded by a proxy in between)."""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from datetime import timedelta

import numpy as np

import comms
from comms.control import wire
from comms.runtime.bootstrap import default_store
from comms.security.store import TAG_BYTES
from security_workers import Warnings, _stranger

STORE_KINDS = ["untagged", "forged tag", "replay from the init round", "replay from rank 1"]
DATA_KINDS = ["garbage", "no-secret"]          # security_workers._stranger's, + the replayed hello
VICTIM = 2                                     # the rank whose store value is replaced, who is dialed


def _wait_file(path: str, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def _write(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


# -- the store ---------------------------------------------------------------------------------
class StoreStranger:
    """A client of the job's TCPStore without the secret (a connection of its own). It wins the
    race for rank 2's entry of a split's first round: the real value is never written, the
    stranger's is (an ``untagged`` body, a body with a ``forged tag``, or a real tagged value
    replayed from another key: rank 2's own entry of init's round, or rank 1's of this round)."""

    def __init__(self, init_prefix: str):
        from torch.distributed import TCPStore
        self.store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(seconds=20))
        self.init_prefix = init_prefix
        self.attempts: list = []

    def write(self, kind: str, key: str) -> None:
        captured = bytes(self.store.get(f"{self.init_prefix}info/{VICTIM}"))       # tagged, for another key
        if kind == "untagged":
            value = captured[:-TAG_BYTES]
        elif kind == "forged tag":
            value = captured[:-TAG_BYTES] + os.urandom(TAG_BYTES)
        elif kind == "replay from the init round":
            value = captured
        else:
            other = key[:-len(str(VICTIM))] + "1"
            self.store.wait([other])
            value = bytes(self.store.get(other))
        assert json.loads(value[:-TAG_BYTES] if kind != "untagged" else value)      # a plausible entry
        self.store.set(key, value)
        self.attempts.append((kind, key))


class HookStore:
    """Rank 2's store: passes everything through, except that when a stranger is armed, rank 2's
    entry of the next split's first round goes to the stranger instead (see StoreStranger)."""

    def __init__(self, store):
        self._store, self.armed, self.stranger = store, None, None

    def set(self, key, value):
        if self.armed and "split" in key and key.endswith(f"/info/{VICTIM}"):
            kind, self.armed = self.armed, None
            self.stranger.write(kind, key)
        else:
            self._store.set(key, value)

    def __getattr__(self, name):           # get, wait, check, add, set_timeout
        return getattr(self._store, name)


# -- the data port -----------------------------------------------------------------------------
def _replay(addr, hello: bytes, out: list, flag: str) -> None:
    """Replays a real dialer's hello (recorded as it reached rank 2) on a new connection."""
    sock = socket.create_connection(addr)
    _stranger_io(sock, hello, out)
    open(flag, "w").close()


def _stranger_io(sock, payload: bytes, out: list) -> None:
    from comms.transports.hello import NONCE_BYTES
    sock.settimeout(30)
    got, how = b"", "closed"
    try:
        while len(got) < NONCE_BYTES and (chunk := sock.recv(NONCE_BYTES - len(got))):
            got += chunk
        sock.sendall(payload)
        while chunk := sock.recv(4096):
            got += chunk
    except ConnectionResetError:
        how = "reset"
    except OSError as e:
        how = f"error {e}"
    finally:
        sock.close()
    out.append(("replayed hello", how, got))


def _arm_data_port(rank: int, workdir: str, outcomes: list, threads: list) -> dict:
    """During init only: strangers on rank 2's listener as soon as it listens; the hello rank 1
    sends rank 2 (its first dial), recorded as it arrived, replayed on a new connection; rank 0
    dials rank 2 only once that replay was refused (so rank 2 still reads hellos when it comes)."""
    import comms.transports.mesh as mesh
    import comms.transports.tcp as tcp
    state = {"armed": True, "hello": None, "listener": None}
    flag = os.path.join(workdir, "replayed")
    listen, read, dial = tcp.TcpTransport.listen, mesh.Mesh._read, mesh.Mesh._dial

    def listen_and_poke(self):
        addr = listen(self)
        if state["armed"] and rank == VICTIM:
            state["listener"] = self.mesh.listener.getsockname()[:2]
            for kind in DATA_KINDS:
                s = socket.create_connection(state["listener"])
                t = threading.Thread(target=_stranger, args=(kind, s, self.boot.comm_key, self.boot.size, outcomes),
                                     daemon=True)
                t.start()
                threads.append(t)
        return addr

    def read_and_record(self, p):
        read(self, p)
        if state["armed"] and rank == VICTIM and state["hello"] is None and self.accepted.get(1) is p.sock:
            state["hello"] = bytes(p.data)          # exactly what rank 1 sent, checked and taken
            t = threading.Thread(target=_replay, args=(state["listener"], state["hello"], outcomes, flag),
                                 daemon=True)
            t.start()
            threads.append(t)

    def dial_after_the_replay(self, peer, addr):
        if state["armed"] and rank == 0 and peer == VICTIM:
            _wait_file(flag, 20)
        return dial(self, peer, addr)

    tcp.TcpTransport.listen = listen_and_poke
    mesh.Mesh._read = read_and_record
    mesh.Mesh._dial = dial_after_the_replay
    return state


# -- the control port --------------------------------------------------------------------------
class _Proxy:
    """Forwards one TCP connection to ``target``, recording what the client sends."""

    def __init__(self, target):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port, self.target, self.chunks = self.listener.getsockname()[1], target, []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        client, _ = self.listener.accept()
        server = socket.create_connection(self.target)
        back = threading.Thread(target=self._pump, args=(server, client, None), daemon=True)
        back.start()
        self._pump(client, server, self.chunks)
        back.join(5)

    @staticmethod
    def _pump(src, dst, record):
        try:
            while data := src.recv(65536):
                if record is not None:
                    record.append(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass


def capture_control_stream(keys, frame: bytes, key: bytes, size: int) -> list[bytes]:
    """The bytes a real client of the job (its CURVE keys) sends to deliver ``frame`` to a real
    server of the job (a listener with the job's keys, not a rank), as a proxy on the path records
    them; the server must have received ``frame`` intact and well formed."""
    import zmq
    ctx = zmq.Context()
    server, client = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        server.curve_server = True
        for s in (server, client):
            s.setsockopt(zmq.LINGER, 0)
            s.curve_publickey, s.curve_secretkey = keys
        client.curve_serverkey = keys[0]
        proxy = _Proxy(("127.0.0.1", server.bind_to_random_port("tcp://127.0.0.1")))
        client.connect(f"tcp://127.0.0.1:{proxy.port}")
        client.send(frame)
        assert server.poll(10000), "the real server never got the captured message"
        got = server.recv_multipart()[-1]
        assert got == frame and wire.parse(got, key, size) is not None
    finally:
        client.close(0)
        server.close(0)
        ctx.term()
    proxy.thread.join(5)
    return proxy.chunks


# -- the job -----------------------------------------------------------------------------------
def job(rank: int, size: int, workdir: str) -> dict:
    """Init (strangers on the data port), all_reduce, one failing split per store attack then a
    clean one, then wait while a stranger attacks rank 0's control port; the planes' state and a
    last all_reduce after it. COMMS_AUTH_TOKEN comes from the environment."""
    t0 = time.monotonic()
    phases = {}
    warnings = Warnings()
    data, threads = [], []
    state = _arm_data_port(rank, workdir, data, threads)
    store = HookStore(default_store(rank, size, 30))
    comm = comms.init(store=store, timeout=30)
    state["armed"] = False
    phases["init"] = time.monotonic() - t0
    x = np.full(4, rank + 1.0)
    comm.all_reduce(x)

    splits = []
    if rank == VICTIM:
        store.stranger = StoreStranger(comm.prefix)
    for kind in STORE_KINDS:
        store.armed = kind if rank == VICTIM else None
        try:
            comm.split(0).close()
            splits.append((kind, "accepted", ""))
        except comms.CommsError as e:
            splits.append((kind, type(e).__name__, str(e)))
    sub = comm.split(0)                              # no stranger this time
    y = np.full(2, 10.0 * (rank + 1))
    sub.all_reduce(y)
    sub.close()
    phases["splits"] = time.monotonic() - t0

    plane = comm.control
    if rank == 0:
        token = comm._control_link[1]
        frames = [wire.revoke(plane.key, token, 1), wire.fail(plane.key, [(1, wire.GONE, 0)]), wire.bye(plane.key, 2)]
        _write(os.path.join(workdir, "control.json"), {
            "endpoint": plane.endpoint, "server key": plane.keys[0].decode(),     # public, as its name says
            "frames": [f.hex() for f in frames],
            "stream": [c.hex() for c in capture_control_stream(plane.keys, frames[0], plane.key, size)]})
    if rank == VICTIM:
        _write(os.path.join(workdir, "data.json"), {"listener": state["listener"]})
    phases["published"] = time.monotonic() - t0
    attacked = _wait_file(os.path.join(workdir, "done"), 60)
    phases["attacked"] = time.monotonic() - t0
    end = time.monotonic() + 5                       # rank 0's plane thread logs each refusal as it happens
    while rank == 0 and sum("control plane refused" in w for w in warnings.lines) < 5 and time.monotonic() < end:
        time.sleep(0.05)
    time.sleep(0.3)                                  # anything delivered (or logged twice) has arrived by now
    seen = {"failed": dict(plane.failed), "left": sorted(plane.left), "revoked": len(plane._revoked),
            "comm failed": dict(comm._failed)}
    z = np.full(3, rank + 1.0)
    comm.all_reduce(z)
    comm.close()
    for t in threads:
        t.join(20)
    phases["end"] = time.monotonic() - t0
    return {"phases": phases, "x": x.tolist(), "y": y.tolist(), "z": z.tolist(), "splits": splits, "attacked": attacked,
            "seen": seen, "data": sorted(data), "warnings": warnings.lines,
            "store attempts": store.stranger.attempts if store.stranger else []}
