"""Init: from a torch.distributed Store to a connected native engine.

Rounds, each a publish-then-gather through the store under the communicator's key prefix:

1. every rank publishes its PeerInfo (host identity, pid, cores, a /dev/shm probe file); then
   every rank publishes which same-identity peers' probes it can see, and two ranks are on one host
   only if both see each other's probe; those ranks form this rank's local group;
2. every transport listens and every rank publishes the addresses (or the error it hit, so that
   all ranks fail with the same clear message instead of waiting);
3. for every peer, the first transport (in ``comms.transports.ORDER``) whose ``can_connect`` says
   yes connects; then a barrier; then each transport's ``finish()`` (the shm segments lose their
   names, tcp listeners close).

Every wait has the init deadline; on expiry the error names the ranks that never showed up.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import time
from datetime import timedelta

from . import config
from . import log as clog
from .engine import Engine
from .errors import CommsError, CommTimeout, InvalidUsage, TransportError
from .hostid import PeerInfo
from .transports import ORDER

log = clog.get("INIT")


def _host_cores(local: list, fallback: int) -> int:
    """The CPUs the ranks of this host may run on, together: ranks bound one core each (comms.run
    --bind) each see one CPU, yet have a core apiece. ``fallback``: this rank's own count, when a
    peer did not report its CPUs."""
    try:
        return len(set().union(*(set(p.extra["topology"]["cpus"]) for p in local))) or fallback
    except (KeyError, TypeError):
        return fallback


def _spin_policy(nlocal: int, cores: int) -> tuple[int, int]:
    """(polls before yielding, yields before sleeping): spin hard when every local rank has a core,
    yield almost at once when they outnumber the cores (a spinning rank would steal the core its
    peer needs)."""
    spin = config.get("SPIN")
    if nlocal <= cores:
        return (spin or 200_000), 200
    return (spin or 64), 32


class Bootstrap:
    """The init-time context transports see: rank, size, peers, the engine, the store, the deadline."""

    def __init__(self, rank: int, size: int, store, prefix: str, timeout: float):
        self.rank, self.size = rank, size
        self.store = store
        self.prefix = prefix
        self.comm_key = hashlib.blake2b(prefix.encode(), digest_size=16).digest()
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        forced = config.get("TRANSPORT").lower()
        if forced not in ("auto", "shm", "tcp"):
            raise InvalidUsage(f"COMMS_TRANSPORT={forced!r}: expected auto, shm or tcp")
        self.forced_transport = None if forced == "auto" else forced
        self.peers: list[PeerInfo] = []
        self.local_ranks: list[int] = []
        self.engine: Engine | None = None
        self.transports = []
        self.chosen: dict[int, str] = {}

    # -- store rounds --------------------------------------------------------------------------
    def _key(self, name: str, rank: int) -> str:
        return f"{self.prefix}{name}/{rank}"

    def gather(self, name: str, value) -> list:
        """Publish ``value`` under ``name`` and return every rank's value, in rank order."""
        self.store.set(self._key(name, self.rank), pickle.dumps(value))
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
        return [pickle.loads(self.store.get(k)) for k in keys]

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
            self.peers = self.gather("info", mine)
            seen = self.gather("probe", [p.rank for p in self.peers if p.same_host(mine) and mine.sees_probe_of(p)])
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
        spin, yields = _spin_policy(len(self.local_ranks), cores)
        hosts = len({p.host for p in self.peers})
        log.info("rank %d of %d (%s) on %s: %d host%s; local ranks %s; %d usable cores%s; spin %d then %d yields",
                 self.rank, self.size, self.prefix, me.hostname, hosts, "" if hosts == 1 else "s", self.local_ranks,
                 cores, " (oversubscribed)" if len(self.local_ranks) > cores else "", spin, yields)
        self.engine = Engine(self.rank, self.size, spin, yields)
        try:
            self._connect(me)
        except BaseException:
            self.close_transports()
            self.engine.close()
            raise
        return self

    def _connect(self, me: PeerInfo) -> None:
        self.transports = [cls(self) for cls in ORDER]
        addrs, error = {}, None
        for t in self.transports:
            try:
                addrs[t.name] = t.listen()
            except CommsError as e:
                error = str(e)
                break
        everyone = self.gather("addr", (addrs, error))
        bad = [(r, err) for r, (_, err) in enumerate(everyone) if err]
        if bad:
            r, err = bad[0]
            raise TransportError(f"init failed on rank {r}: {err}" if r != self.rank else err, op="init",
                                 rank=self.rank, peer=r)
        for peer in range(self.size):
            if peer == self.rank:
                continue
            for t in self.transports:
                if t.can_connect(me, self.peers[peer]) and addrs.get(t.name) and everyone[peer][0].get(t.name):
                    self.chosen[peer] = t.name
                    break
            else:
                raise TransportError(f"init: no transport can reach rank {peer} from rank {self.rank} "
                                     f"(COMMS_TRANSPORT={config.get('TRANSPORT')})", op="init", rank=self.rank, peer=peer)
        error = None
        try:
            for t in self.transports:
                group = [p for p, name in self.chosen.items() if name == t.name]
                for peer in sorted(group, key=lambda p: (p < self.rank, p)):   # dial up first, then accept
                    t.connect(peer, everyone[peer][0][t.name])
        except CommsError as e:
            error = str(e)
        results = self.gather("connected", error)
        bad = [(r, err) for r, err in enumerate(results) if err]
        if bad:
            r, err = bad[0]
            raise TransportError(f"init failed on rank {r}: {err}" if r != self.rank else err, op="init",
                                 rank=self.rank, peer=r)
        for t in self.transports:
            t.finish()
        if log.isEnabledFor(logging.INFO):
            by = {}
            for peer, name in sorted(self.chosen.items()):
                by.setdefault(name, []).append(peer)
            log.info("rank %d transports: %s", self.rank,
                     "; ".join(f"{name} to ranks {peers}" for name, peers in by.items()) or "none (single rank)")

    def close_transports(self) -> None:
        for t in self.transports:
            try:
                t.close()
            except Exception:
                pass


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
