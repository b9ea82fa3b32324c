"""Init: from a torch.distributed Store to a connected native engine.

Rounds, each a publish-then-gather through the store under the communicator's key prefix (values
are JSON, checked on the way in; nothing from the store is unpickled; with a job secret the store
is a comms.security.store.AuthenticatedStore, so a value without this job's HMAC tag is refused):

1. every rank publishes its PeerInfo (host identity, pid, cores, a /dev/shm probe file); then
   every rank publishes which same-identity peers' probes it can see, and two ranks are on one host
   only if both see each other's probe; those ranks form this rank's local group;
2. every transport listens and every rank publishes the addresses (or the error it hit, so that
   all ranks fail with the same clear message instead of waiting);
3. for every pair of ranks, the first transport (in ``comms.transports.ORDER``) whose
   ``can_connect`` says yes and for which both published an address carries their traffic; every
   rank computes the same choice for every pair (:meth:`Bootstrap.pair_transport`), which gives the
   cost model its route; each rank connects its own peers, then a barrier, then each transport's
   ``finish()`` (the shm segments lose their names, tcp listeners close).

Every wait has the init deadline; on expiry the error names the ranks that never showed up.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from datetime import timedelta

from .. import config
from ..diag import log as clog
from .engine import Engine
from ..errors import CommsError, CommTimeout, InvalidUsage, TransportError
from .hostid import PeerInfo
from ..transports import NAMES, ORDER
from ..selection.model import Route

log = clog.get("INIT")


def _host_cores(local: list, fallback: int) -> int:
    """The CPUs the ranks of this host may run on, together: ranks bound one core each (comms.run
    --bind) each see one CPU, yet have a core apiece. ``fallback``: this rank's own count, when a
    peer did not report its CPUs."""
    try:
        return len(set().union(*(set(p.extra["topology"]["cpus"]) for p in local))) or fallback
    except (KeyError, TypeError):
        return fallback


SPIN_MAX_NS = 200_000        # the longest adaptive spin where every local rank has a core
SPIN_MIN_NS = 2_000          # the shortest adaptive spin (a preempted rank's, for a while)
# Where ranks outnumber the cores a wait polls once, then yields: its peers need the core it holds.
# An adaptive spin reads the clock every 64 polls, so even a 2 us budget polled 64 times first:
# 8 B all_reduce, 4 ranks on 2 cores (python -m bench -np 4 --backends comms@COMMS_SPIN=N, 5
# launches each, one run): 1 poll 12.0 us, 4 polls 12.4, 16 polls 13.9, 64 polls 24.1; the adaptive
# spin, in four other runs: 15.5-24.0 us (MPI in the same runs: 7.4-11.3 us).
OVERSUBSCRIBED_POLLS = 1


def _spin_policy(nlocal: int, cores: int) -> tuple[int, int, int, int]:
    """(fixed polls, yields before sleeping, longest and shortest adaptive spin in ns). Where every
    local rank has a core a wait may spin up to SPIN_MAX_NS, as far as its own waits show that it
    pays (native/wait.c); where they outnumber the cores it polls OVERSUBSCRIBED_POLLS times
    and yields (a spinning rank would steal the core its peer needs). COMMS_SPIN fixes the spin
    at that many polls instead, COMMS_YIELDS the yields before a wait sleeps."""
    spin, yields = config.get("SPIN"), config.get("YIELDS")
    if nlocal <= cores:
        return spin, yields or 200, SPIN_MAX_NS, SPIN_MIN_NS
    return spin or OVERSUBSCRIBED_POLLS, yields or 32, SPIN_MIN_NS, SPIN_MIN_NS


class Bootstrap:
    """The init-time context transports see: rank, size, peers, the engine, the store, the deadline."""

    def __init__(self, rank: int, size: int, store, prefix: str, timeout: float, secret: bytes | None = None):
        self.rank, self.size = rank, size
        self.store = store
        self.secret = secret                 # the job's secret (comms.security.token): hellos prove it
        self.prefix = prefix
        self.comm_key = hashlib.blake2b(prefix.encode(), digest_size=16).digest()
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.allowed = allowed_transports()     # COMMS_TRANSPORT's list, in its order (None: auto)
        self.peers: list[PeerInfo] = []
        self.local_ranks: list[int] = []
        self.oversubscribed = False
        self.engine: Engine | None = None
        self.transports = []
        self.chosen: dict[int, str] = {}
        self.endpoints: dict = {}            # peer -> Endpoint
        self._published: list[dict] = []     # every rank's transport addresses (name -> bytes)

    # -- store rounds --------------------------------------------------------------------------
    def _key(self, name: str, rank: int) -> str:
        return f"{self.prefix}{name}/{rank}"

    def gather(self, name: str, value) -> list:
        """Publish ``value`` (anything JSON can hold) under ``name`` and return every rank's value,
        in rank order, as JSON gave it back; the caller checks each one's shape."""
        self.store.set(self._key(name, self.rank), json.dumps(value))
        keys = [self._key(name, r) for r in range(self.size)]
        left = self.deadline - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            self.store.wait(keys, timedelta(seconds=left))
        except Exception as e:                       # torch raises DistStoreError / RuntimeError
            missing = self._missing(keys)
            raise CommTimeout(f"init ({name}): rank {self.rank} waited {self.timeout:.0f} s and ranks {missing} "
                              f"never arrived ({type(e).__name__})", op="init", rank=self.rank,
                              peer=missing[0] if missing else None) from None
        out = []
        for r, k in enumerate(keys):
            try:
                out.append(json.loads(self.store.get(k)))
            except ValueError:
                raise TransportError(f"init ({name}): rank {r}'s entry in the store is not valid JSON: not a rank "
                                     "of this version of comms, a rank with COMMS_AUTH_TOKEN set where this one has "
                                     "none, or a corrupted store", op="init", rank=self.rank, peer=r) from None
            except TransportError as e:              # comms.security.store: the tag did not match
                raise TransportError(f"init ({name}): rank {r}'s entry: {e}", op="init", rank=self.rank,
                                     peer=r) from None
        return out

    def _missing(self, keys) -> list[int]:
        out = []
        for r, k in enumerate(keys):
            try:
                if not self.store.check([k]):
                    out.append(r)
            except Exception:
                out.append(r)
        return out

    # -- the three rounds ----------------------------------------------------------------------
    def run(self) -> "Bootstrap":
        self.store.set_timeout(timedelta(seconds=max(1.0, self.timeout)))
        mine = PeerInfo.mine(self.rank)
        try:
            self.peers = [PeerInfo.from_json(d, r) for r, d in enumerate(self.gather("info", mine.to_json()))]
            seen = self.gather("probe", [p.rank for p in self.peers if p.same_host(mine) and mine.sees_probe_of(p)])
            if not all(isinstance(s, list) and all(isinstance(r, int) for r in s) for s in seen):
                raise TransportError("init (probe): a rank published a malformed probe list", op="init", rank=self.rank)
        finally:
            mine.drop_probe()
        for p in self.peers:           # one host = same identity and each sees the other's probe
            if p.rank != self.rank and p.same_host(mine) and not (p.rank in seen[self.rank] and self.rank in seen[p.rank]):
                log.warning("comms: rank %d and rank %d report the same host identity but do not share /dev/shm; "
                            "treating them as different hosts", self.rank, p.rank)
                p.host = f"{p.host}/rank{p.rank}"
        me = self.peers[self.rank]
        self.local_ranks = [p.rank for p in self.peers if p.same_host(me)]
        clog.set_rank(self.rank)
        cores = _host_cores([self.peers[r] for r in self.local_ranks], me.cores)
        spin, yields, spin_max, spin_min = _spin_policy(len(self.local_ranks), cores)
        self.oversubscribed = len(self.local_ranks) > cores      # its ranks wait by sleeping, not spinning
        hosts = len({p.host for p in self.peers})
        log.info("rank %d of %d (%s) on %s: %d host%s; local ranks %s; %d usable cores%s; spin %s then %d yields",
                 self.rank, self.size, self.prefix, me.hostname, hosts, "" if hosts == 1 else "s", self.local_ranks,
                 cores, " (oversubscribed)" if len(self.local_ranks) > cores else "",
                 f"{spin} polls" if spin else f"adaptive {spin_min / 1e3:g}-{spin_max / 1e3:g} us", yields)
        self.engine = Engine(self.rank, self.size, spin, yields, spin_max, spin_min,
                             (config.get("UNEXPECTED_MSG_BYTES"), config.get("UNEXPECTED_PEER_BYTES")))
        try:
            self._connect(me)
        except BaseException:
            self.close_transports()
            self.engine.close()
            raise
        return self

    def _connect(self, me: PeerInfo) -> None:
        by_name = {cls.name: cls for cls in ORDER}
        self.transports = [by_name[n](self) for n in self.allowed] if self.allowed else [cls(self) for cls in ORDER]
        addrs, error = {}, None
        for t in self.transports:
            try:
                addrs[t.name] = t.listen().hex()
            except CommsError as e:
                error = str(e)
                break
        everyone = self.gather("addr", [addrs, error])
        bad = [(r, err) for r, (_, err) in enumerate(everyone) if err]
        if bad:
            r, err = bad[0]
            raise TransportError(f"init failed on rank {r}: {err}" if r != self.rank else str(err), op="init",
                                 rank=self.rank, peer=r)
        self._published = [self._addresses(r, a) for r, (a, _) in enumerate(everyone)]
        for peer in range(self.size):
            if peer == self.rank:
                continue
            name = self.pair_transport(self.rank, peer)
            if name is None:
                raise TransportError(f"init: no transport can reach rank {peer} from rank {self.rank} "
                                     f"(COMMS_TRANSPORT={config.get('TRANSPORT')})", op="init", rank=self.rank, peer=peer)
            self.chosen[peer] = name
        error = None
        try:
            for t in self.transports:
                group = [p for p, name in self.chosen.items() if name == t.name]
                for peer in sorted(group, key=lambda p: (p < self.rank, p)):   # dial up first, then accept
                    self.endpoints[peer] = t.connect(peer, self._published[peer][t.name])
        except CommsError as e:
            error = str(e)
        results = self.gather("connected", error)
        bad = [(r, err) for r, err in enumerate(results) if err]
        if bad:
            r, err = bad[0]
            raise TransportError(f"init failed on rank {r}: {err}" if r != self.rank else str(err), op="init",
                                 rank=self.rank, peer=r)
        for t in self.transports:
            t.finish()
        if log.isEnabledFor(logging.INFO):
            by = {}
            for peer, name in sorted(self.chosen.items()):
                by.setdefault(name, []).append(peer)
            log.info("rank %d transports: %s", self.rank,
                     "; ".join(f"{name} to ranks {peers}" for name, peers in by.items()) or "none (single rank)")

    def _addresses(self, rank: int, published) -> dict:
        """Rank ``rank``'s published transport addresses, checked: transport name -> bytes."""
        try:
            out = {name: bytes.fromhex(published[name]) for name in NAMES if name in published}
            if set(published) - set(NAMES):
                raise ValueError(f"unknown transports {sorted(set(published) - set(NAMES))}")
            return out
        except (TypeError, ValueError, AttributeError) as e:
            raise TransportError(f"init: rank {rank} published malformed transport addresses ({e}): a rank of "
                                 f"another version of comms?", op="init", rank=self.rank, peer=rank) from None

    def pair_transport(self, a: int, b: int) -> str | None:
        """The transport that carries the traffic between ranks ``a`` and ``b`` (the same answer on
        every rank): the first in ORDER that can connect them and that both published an address
        for. None when there is none."""
        for t in self.transports:
            if t.can_connect(self.peers[a], self.peers[b]) and self._published[a].get(t.name) \
                    and self._published[b].get(t.name):
                return t.name
        return None

    def route(self) -> Route:
        """The link classes of the cost model (comms.selection.model): the transport that carries pairs of
        ranks on one host and the one that carries pairs on two, as every rank computes them
        (the most used where pairs differ; the transport auto picks where no such pair exists)."""
        classes = {cls.name: cls for cls in ORDER}
        count: dict[bool, dict[str, int]] = {True: {}, False: {}}
        for a in range(self.size):
            for b in range(a + 1, self.size):
                name = self.pair_transport(a, b)
                if name:
                    same = self.peers[a].same_host(self.peers[b])
                    count[same][name] = count[same].get(name, 0) + 1

        def pick(same: bool) -> str:
            if count[same]:
                return max(count[same], key=lambda n: (count[same][n], -NAMES.index(n)))
            me = self.peers[0]                    # no such pair: what rank 0 would use for one (alike everywhere)
            other = me if same else PeerInfo(-1, me.host + "/elsewhere", "", 0, 0, 1)
            return next((t.name for t in self.transports if t.can_connect(me, other)
                         and self._published[0].get(t.name)), "tcp")
        intra, inter = pick(True), pick(False)
        return Route(intra, inter, classes[intra].waits_together, self.coll_bytes())

    def coll_bytes(self) -> int:
        """The largest all_reduce a transport runs by itself for this communicator (the board
        algorithm; comms.algorithms.board): its Transport.coll_bytes when one transport carries
        every pair of ranks, all on this host; 0 otherwise. The same on every rank."""
        if self.size < 2 or len(self.local_ranks) != self.size:
            return 0
        names = {self.pair_transport(a, b) for a in range(self.size) for b in range(a + 1, self.size)}
        t = next((t for t in self.transports if names == {t.name}), None)
        return t.coll_bytes() if t is not None else 0

    def close_transports(self) -> None:
        for t in self.transports:
            try:
                t.close()
            except Exception:
                pass


def allowed_transports() -> tuple[str, ...] | None:
    """The transports COMMS_TRANSPORT lists, in the order they are tried for each pair of ranks
    (``rdma`` alone forces it for every peer; ``shm,rdma``, or ``shm+rdma``, puts shm inside a host
    and rdma between hosts); None for ``auto``. Checked against the registered transports."""
    text = config.get("TRANSPORT").lower().replace(" ", "")
    if text == "auto":
        return None
    names = tuple(text.replace("+", ",").split(","))      # "+" too: for tools whose lists take the commas
    bad = [n for n in names if n not in NAMES]
    if bad or not names or len(set(names)) != len(names):
        raise InvalidUsage(f"COMMS_TRANSPORT={config.get('TRANSPORT')!r}: expected auto, or registered transports "
                           f"({', '.join(NAMES)}) separated by commas, each once")
    return names


def default_store(rank: int, size: int, timeout: float):
    """The TCPStore at MASTER_ADDR:MASTER_PORT, as torchrun sets it up. Rank 0 hosts it unless an
    agent (torchrun, comms.run) already does (TORCHELASTIC_USE_AGENT_STORE=True)."""
    from torch.distributed import TCPStore
    try:
        host = os.environ["MASTER_ADDR"]
        port = int(os.environ["MASTER_PORT"])
    except KeyError as e:
        raise InvalidUsage(f"comms.init(): {e.args[0]} is not set; run under torchrun or python -m comms.run, "
                           "or pass store=") from None
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    return TCPStore(host, port, size, is_master=(rank == 0 and not agent), timeout=timedelta(seconds=timeout),
                    wait_for_workers=False)
