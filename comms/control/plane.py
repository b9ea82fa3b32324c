"""The control plane: who is alive, told to every rank within a second or two, over pyzmq.

One :class:`Plane` per root communicator (init, shrink, grow; a split shares its parent's), with
one thread. Each rank binds a ROUTER and connects a DEALER to each of its neighbours in the skip
ring (comms.algorithms.patterns.skip_ring: rank ± 1, 2, 4, ...). Liveness is zmq's own ZMTP
heartbeat on those connections (ZMQ_HEARTBEAT_IVL / _TIMEOUT / _TTL): a connection whose peer
stops answering for COMMS_HEARTBEAT_MS × COMMS_HEARTBEAT_MISSES is dropped by zmq, and a killed
process's connections drop at once (the kernel closes its sockets, zombie or not). A socket
monitor reports the drop; unless the peer said BYE first (a clean close), it is declared failed,
with the cause this rank can see (for a peer on this host, what /proc says of its pid), and a FAIL
notice floods the survivors through their neighbours. No rank coordinates: any rank watching the
failed one declares it, and every rank forwards a notice once.

Every communicator subscribed to the plane then fails at once: its context is revoked natively
(cm_ctx_revoke, which wakes a blocked wait), so a rank blocked in a collective with other peers is
released too, and every later call raises PeerError naming the failed ranks and their causes.
``revoke`` floods a REVOKE for one communicator the same way.

With a job secret (comms.security), every connection is CURVE-encrypted, and zmq's ZAP handler
admits only clients that hold the job's key pair (derived from the secret, which never crosses the
wire); a stranger fails the handshake, is logged, and the job goes on. Messages are parsed strictly
(comms.control.wire) whatever their origin.
"""
from __future__ import annotations

import atexit
import threading
import time
import weakref

import zmq
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from .. import config
from ..algorithms.patterns import skip_ring
from ..diag import log as clog
from . import wire

log = clog.get("CONTROL")

BYE_GRACE_S = 0.1    # a dropped connection waits this long for the BYE that may have crossed it (a clean close)
CONNECT_WAIT_S = 5.0  # the longest init waits for the plane's handshakes (a silent neighbour is found later)
TICK_S = 0.05        # the thread's longest sleep while something is due
IDLE_S = 0.5         # ... and while nothing is (closing wakes it through its command socket)


_LIVE: "weakref.WeakSet[Plane]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """A process that ends normally says BYE on every plane it still has: its peers must not take
    the end of a finished rank for a failure (a rank still running its last calls with others)."""
    for plane in list(_LIVE):
        plane.close()


def _pid_state(pid: int) -> str | None:
    """The state letter of ``pid`` in /proc (R, S, D, Z, T, ...), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data[data.rindex(b")") + 2:][:1].decode()
    except (OSError, ValueError):
        return None


def _cause(pid: int | None) -> int:
    if pid is None:
        return wire.LOST
    state = _pid_state(pid)
    return {None: wire.GONE, "Z": wire.ZOMBIE, "X": wire.GONE, "T": wire.STOPPED, "t": wire.STOPPED}.get(
        state, wire.LOST)


class Plane:
    """The control plane of one root communicator: see the module docstring. Ranks are the plane's
    own (the root communicator's); subscribers map them to theirs."""

    def __init__(self, rank: int, size: int, key: bytes, host: str, local_pids: dict[int, int], keys=None):
        self.rank, self.size, self.key = rank, size, key
        self.local_pids = dict(local_pids)          # plane rank -> pid, for peers whose /proc this rank sees
        self.keys = keys                            # (public, secret) z85 CURVE keys, or None
        self.failed: dict[int, tuple[int, int]] = {}    # plane rank -> (cause, detecting rank)
        self.left: set[int] = set()
        self.ivl_ms = max(10, int(config.get("HEARTBEAT_MS")))
        self.timeout_ms = self.ivl_ms * max(1, config.get("HEARTBEAT_MISSES"))
        self._subs: dict[bytes, tuple] = {}             # token -> (weakref to comm, plane ranks)
        self._revoked: set[bytes] = set()
        self._aborted: set[bytes] = set()
        self._lock = threading.RLock()
        self._cmd_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._connected = threading.Event()         # every neighbour's handshake done (wait_connected)
        _LIVE.add(self)
        self._peers: dict[int, list] = {}
        self.ctx = zmq.Context()
        self._auth = None
        if keys is not None:
            self._start_zap()
        self.router = self._socket(zmq.ROUTER, server=True)
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        if ":" in host:
            self.router.setsockopt(zmq.IPV6, 1)
        port = self.router.bind_to_random_port(f"tcp://[{host}]" if ":" in host else f"tcp://{host}")
        self.endpoint = f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
        self._cmd_in = self.ctx.socket(zmq.PAIR)
        self._cmd_in.bind(f"inproc://cmd-{id(self)}")
        self._cmd_out = self.ctx.socket(zmq.PAIR)
        self._cmd_out.connect(f"inproc://cmd-{id(self)}")
        self._router_mon = self.router.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                                          | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                                          | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)

    # -- sockets ---------------------------------------------------------------------------------
    def _socket(self, kind: int, server: bool) -> zmq.Socket:
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.HEARTBEAT_IVL, self.ivl_ms)
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, self.timeout_ms)
        s.setsockopt(zmq.HEARTBEAT_TTL, self.timeout_ms)
        s.setsockopt(zmq.HANDSHAKE_IVL, max(2000, 4 * self.timeout_ms))
        s.setsockopt(zmq.MAXMSGSIZE, wire.HEADER.size + wire.COUNT.size + wire.MAX_ENTRIES * wire.ENTRY.size)
        if self.keys is not None:
            public, secret = self.keys
            if server:
                s.curve_server = True
                s.zap_domain = b"comms"
            else:
                s.curve_serverkey = public
            s.curve_publickey, s.curve_secretkey = public, secret
        return s

    def _start_zap(self) -> None:
        """zmq's ZAP handler (pyzmq's ThreadAuthenticator), admitting only the job's public key."""
        from zmq.auth.thread import ThreadAuthenticator
        plane = self

        class JobKey:
            def callback(self, domain, key):
                if key == plane.keys[0]:
                    return True
                log.warning("comms: rank %d's control plane refused a client without the job's key (a stranger "
                            "or a rank of another job)", plane.rank)
                return False

        self._auth = ThreadAuthenticator(self.ctx, log=log)
        self._auth.start()
        self._auth.configure_curve_callback("comms", credentials_provider=JobKey())

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, endpoints: list[str]) -> None:
        """Connect to the neighbours (every rank's endpoint, in plane rank order) and start the thread."""
        for p in skip_ring(self.rank, self.size):
            d = self._socket(zmq.DEALER, server=False)
            d.setsockopt(zmq.SNDHWM, 256)             # a notice waits for a connection still being made
            if endpoints[p].startswith("tcp://["):
                d.setsockopt(zmq.IPV6, 1)
            mon = d.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
            d.connect(endpoints[p])
            self._peers[p] = [d, mon, False, None]      # socket, monitor, handshaken, dropped at
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name=f"comms-control-{self.rank}", daemon=True)
        self._thread.start()

    def wait_connected(self, timeout: float) -> bool:
        """Wait until every neighbour this rank connects to has completed its handshake (at most
        ``timeout`` s); whether they all have. A neighbour that never does is declared SILENT later."""
        return self._connected.wait(max(0.0, timeout))

    def close(self) -> None:
        """Say BYE to the neighbours and stop (idempotent; from any thread, the plane's own too)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._thread is None:
            self._release()
            return
        self._command(b"close")
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=2.0)

    def _release(self) -> None:
        for d, mon, _, _ in self._peers.values():
            d.close(0)
            mon.close(0)
        for s in (self.router, self._router_mon, self._cmd_in, self._cmd_out):
            s.close(0)
        if self._auth is not None:
            self._auth.stop()
        self.ctx.term()

    # -- subscribers -------------------------------------------------------------------------------
    def subscribe(self, comm, token: bytes, plane_ranks: list[int]) -> None:
        """Fail ``comm`` (whose rank i is plane rank ``plane_ranks[i]``) when one of its ranks fails,
        or when a rank revokes ``token``; at once if one already did."""
        with self._lock:
            self._subs[token] = (weakref.ref(comm), list(plane_ranks))
            self._notify_one(token, self.failed)
            if token in self._revoked:
                comm._revoked_by(-1)

    def unsubscribe(self, token: bytes) -> None:
        """Forget a communicator; the last one gone closes the plane."""
        with self._lock:
            self._subs.pop(token, None)
            last = not self._subs
        if last:
            self.close()

    def revoke(self, token: bytes) -> None:
        """Flood a REVOKE of ``token`` to every rank (its subscribers fail with Revoked)."""
        self._command(b"revoke" + token)

    def abort(self, token: bytes) -> None:
        """Flood an ABORT of ``token``: this rank's communicator failed on an error it found itself,
        and its subscribers elsewhere fail at once, naming this rank."""
        self._command(b"abort." + token)

    def death_cause(self, plane_rank: int) -> int:
        """The cause to declare for ``plane_rank``, which a transport saw die (its pidfd): a zombie
        when its /proc says so (this rank sees its pid), else gone."""
        pid = self.local_pids.get(plane_rank)
        return wire.ZOMBIE if pid is not None and _pid_state(pid) == "Z" else wire.GONE

    def declare(self, plane_rank: int, cause: int) -> None:
        """Declare ``plane_rank`` failed from this rank (a transport saw it die first)."""
        self._command(b"fail" + plane_rank.to_bytes(4, "big") + bytes([cause]))

    def _command(self, msg: bytes) -> None:
        with self._cmd_lock:
            try:
                self._cmd_out.send(msg, zmq.NOBLOCK)
            except zmq.ZMQError:
                pass                                   # closing: nothing to tell

    def _text(self, p: int) -> str:
        cause, by = self.failed[p]
        who = "this rank" if by == self.rank else f"rank {by}"
        return f"{wire.CAUSES[cause]} (detected by {who}'s control plane)"

    def _notify_one(self, token: bytes, failed) -> None:
        ref, ranks = self._subs[token]
        comm = ref()
        if comm is None:
            return
        mine = {i: self._text(p) for i, p in enumerate(ranks) if p in failed}
        if mine:
            comm._peers_failed(mine)

    # -- the thread ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        poller = zmq.Poller()
        for s in (self.router, self._router_mon, self._cmd_in):
            poller.register(s, zmq.POLLIN)
        monitors = {}
        for p, entry in self._peers.items():
            poller.register(entry[1], zmq.POLLIN)
            monitors[entry[1]] = p
        try:
            while True:
                connecting = any(not e[2] for e in self._peers.values())
                if not connecting:                    # every neighbour handshaken, or given up as failed
                    self._connected.set()
                due = connecting or any(e[3] is not None for e in self._peers.values())
                events = dict(poller.poll(int((TICK_S if due else IDLE_S) * 1000)))
                if self._cmd_in in events and self._on_command(self._cmd_in.recv()):
                    break
                if self.router in events:
                    self._on_router()
                if self._router_mon in events:
                    self._on_router_event(self._router_mon.recv_multipart())
                for sock, p in list(monitors.items()):
                    if sock in events:
                        self._on_peer_event(p, parse_monitor_message(sock.recv_multipart()))
                self._check_due(poller, monitors)
        except zmq.ZMQError as e:
            if not self._closed:
                log.warning("comms: rank %d's control plane stopped: %s", self.rank, e)
        finally:
            self._release()

    def _on_command(self, msg: bytes) -> bool:
        if msg == b"close":
            self._flood(wire.bye(self.key, self.rank))
            time.sleep(0.01)                          # let the BYEs leave before the sockets close
            return True
        if msg.startswith(b"revoke"):
            self._on_revoke(msg[6:], self.rank)
        elif msg.startswith(b"abort."):
            self._on_revoke(msg[6:], self.rank, wire.ABORT)
        elif msg.startswith(b"fail"):
            self._learn([(int.from_bytes(msg[4:8], "big"), msg[8], self.rank)])
        return False

    def _on_router(self) -> None:
        while True:
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            msg = wire.parse(frames[-1], self.key, self.size) if len(frames) == 2 else None
            if msg is None:
                log.warning("comms: rank %d's control plane dropped a malformed message (%d frames)", self.rank,
                            len(frames))
            elif msg.kind == wire.FAIL:
                self._learn(msg.entries)
            elif msg.kind in (wire.REVOKE, wire.ABORT):
                self._on_revoke(msg.token, msg.origin, msg.kind)
            elif msg.kind == wire.BYE:
                self.left.add(msg.origin)

    def _on_router_event(self, frames) -> None:
        ev = parse_monitor_message(frames)
        log.warning("comms: rank %d's control plane refused a connection (%s): a stranger, or a rank of "
                    "another job", self.rank, "wrong key" if ev["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH
                    else "bad handshake")

    def _on_peer_event(self, p: int, ev: dict) -> None:
        entry = self._peers[p]
        if ev["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            entry[2], entry[3] = True, None
        elif ev["event"] == zmq.EVENT_DISCONNECTED and entry[2] and entry[3] is None:
            entry[3] = time.monotonic()

    def _check_due(self, poller, monitors) -> None:
        now = time.monotonic()
        found = []
        for p, entry in self._peers.items():
            if p in self.failed or p in self.left:
                continue
            if entry[3] is not None and now - entry[3] >= BYE_GRACE_S:
                found.append((p, _cause(self.local_pids.get(p)), self.rank))
            elif not entry[2] and now - self._started > max(5.0, 4 * self.timeout_ms / 1e3):
                found.append((p, wire.SILENT, self.rank))
        if found:
            self._learn(found)
        for p in [p for p in self._peers if p in self.failed or p in self.left]:
            d, mon, _, _ = self._peers.pop(p)          # stop reconnecting to it
            poller.unregister(mon)
            monitors.pop(mon, None)
            d.close(0)
            mon.close(0)

    def _flood(self, frame: bytes) -> None:
        for p, entry in self._peers.items():
            if p not in self.failed:
                try:
                    entry[0].send(frame, zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass                               # not connected (or full): others carry it

    def _learn(self, entries) -> None:
        with self._lock:
            new = [(r, c, d) for r, c, d in entries if r not in self.failed]
            for r, c, d in new:
                self.failed[r] = (c, d)
                log.warning("comms: rank %d learned that rank %d failed: %s", self.rank, r, self._text(r))
            if new:
                self._flood(wire.fail(self.key, new))
                for token in list(self._subs):
                    self._notify_one(token, {r for r, _, _ in new})

    def _on_revoke(self, token: bytes, origin: int, kind: int = wire.REVOKE) -> None:
        """A REVOKE or ABORT of ``token``: flooded on the first time only, and told to its subscriber."""
        seen = self._revoked if kind == wire.REVOKE else self._aborted
        with self._lock:
            if token in seen:
                return
            seen.add(token)
            self._flood(wire.revoke(self.key, token, origin, kind))
            sub = self._subs.get(token)
            comm = sub[0]() if sub else None
            if comm is not None:
                ranks = sub[1]
                who = ranks.index(origin) if origin in ranks else -1
                if kind == wire.REVOKE:
                    comm._revoked_by(who)
                elif origin != self.rank and who >= 0:
                    comm._aborted_by(who)


def local_pids(boot) -> dict[int, int]:
    """Plane rank -> pid of the ranks whose /proc this rank sees (same host and pid namespace)."""
    me = boot.peers[boot.rank]
    return {p.rank: p.pid for p in boot.peers if p.rank != boot.rank and p.same_pid_namespace(me)}


def curve_keys():
    """The job's CURVE key pair (z85 public, z85 secret), derived from the job secret; None without one."""
    from ..security.token import derive, job_secret
    secret = job_secret()
    if secret is None:
        return None
    sk = z85.encode(derive(secret, "control-plane curve"))
    return zmq.curve_public(sk), sk


def create(boot) -> Plane:
    """Bind this rank's plane, exchange endpoints through the bootstrap's store round, start it."""
    from ..transports.mesh import local_address
    all_local = all(p.same_host(boot.peers[boot.rank]) for p in boot.peers)
    plane = Plane(boot.rank, boot.size, boot.comm_key, local_address(all_local), local_pids(boot), curve_keys())
    endpoints = boot.gather("control", plane.endpoint)
    if not all(isinstance(e, str) and e.startswith("tcp://") and len(e) < 128 for e in endpoints):
        plane.close()
        from ..errors import TransportError
        raise TransportError("init (control): a rank published a malformed control-plane endpoint", op="init",
                             rank=boot.rank)
    plane.start(endpoints)
    # init returns with the plane armed: a neighbour that dies during the first call is known the
    # way later ones are (a connection that never came up is only found SILENT after 5 s)
    if not plane.wait_connected(min(CONNECT_WAIT_S, max(0.0, boot.deadline - time.monotonic()))):
        log.info("comms: rank %d's control plane is still connecting to some neighbours; init goes on", boot.rank)
    return plane

