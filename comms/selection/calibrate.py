"""Calibration: the cost model's link figures, measured once per host signature and cached.

The first init on a host signature (CPU, cores, hosts x ranks, link classes, NICs, kernel)
measures each link class of the route and the reduction speed on rank 0 and its peers, in well
under 2 s, and caches them by transport name in ``~/.cache/comms/calibration.json``:

* ``alpha_us``: one plan step: 8 B around a ring of the link's ranks, every member sending and
  receiving in each of :data:`HOP_ROUNDS` rounds of one native plan, the least of :data:`HOP_REPS`
  runs, with every rank in such a ring at once (no per-call cost; what ranks sharing cores, and
  the kernel's work on their packets, add to a step is in);
* ``beta_gbps``: a 4 MiB ping-pong less an 8 B one, the least of several;
* ``reduce_gbps``: a float32 SUM of 32 MiB, beyond the caches.

Every rank gets rank 0's figures through the store. The entry also keeps the rules
``python -m comms.tune`` wrote (:func:`save_rules`). Shaping is not in the signature, so an init
with cached figures of a link between hosts checks them with a few 4 MiB ping-pongs (about 0.2 s
at 2 Gbit/s) and measures again, dropping the tuned rules, when the bandwidth moved more than
:data:`LINK_DRIFT`. COMMS_CALIBRATE=0 uses the transports' defaults and no cache.
"""
from __future__ import annotations

import json
import os
import platform
import time
from typing import Callable, NamedTuple

import numpy as np

from .. import config
from ..diag import log as clog
from .model import Params, describe_links

log = clog.get("TUNING")
FORMAT = "v10"           # part of the key: entries of another layout are not read
HOP_ROUNDS = 50          # ring rounds inside one plan: 50 x 1.5 us on shm is well above the clock's grain
HOP_REPS = 7             # runs of the ring: on 4 ranks sharing 2 CPUs one run in 5-10 was 2-5x the rest
LINK_DRIFT = 3.0         # a shaped link here differs from loopback by 8x and more (2 Gbit/s against 2-3
#                          GB/s), and the suite's own load moved loopback's figure 2x: 3x tells them apart


class Calibration(NamedTuple):
    params: Params
    rules: str               # tuned rules for this signature (comms.tune), "" where none
    signature: str


def signature(comm) -> str:
    topo = comm.topology
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    classes = ",".join(sorted({comm.route.intra, comm.route.inter}))
    nics = ",".join(f"{n['name']}:{n['speed_mbps']}" for n in topo.hosts[0].nics)
    layout = f"{len(topo.hosts)}x{len(topo.hosts[0].ranks)}"
    det = "|deterministic" if config.get("DETERMINISTIC") else ""      # other plans, other tuned rules
    return f"{FORMAT}|{platform.machine()}|{cpu}|{topo.hosts[0].cores} cores|{layout}|{classes}|nics {nics}|" \
           f"{platform.release()}{det}"


def cache_path() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "comms", "calibration.json")


def _load() -> dict:
    try:
        with open(cache_path()) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _store_entry(sig: str, entry: dict | None) -> None:
    """Write (None: drop) the cache entry of ``sig``, atomically."""
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        everything = _load()
        if entry is None:
            everything.pop(sig, None)
        else:
            everything[sig] = entry
        with open(f"{path}.{os.getpid()}", "w") as f:
            json.dump(everything, f, indent=1)
        os.replace(f"{path}.{os.getpid()}", path)
    except OSError as e:
        log.warning("comms: cannot write the calibration cache %s: %s", path, e)


def save_rules(sig: str, rules: str, note: str) -> None:
    """Record ``rules`` (the selector's grammar) as the tuned rules of signature ``sig``."""
    entry = _load().get(sig)
    if entry is None:
        raise RuntimeError(f"no calibration cached for {sig!r}: tune with calibration on")
    entry["rules"], entry["tuned"] = rules, note
    _store_entry(sig, entry)


def _pingpong(comm, peer: int, nbytes: int, iters: int, lead: bool) -> float:
    """Least one-way µs of ``nbytes`` between this rank and ``peer`` over ``iters`` round trips."""
    buf = np.ones(max(1, nbytes // 4), np.float32)          # touched: no page faults in the timing
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        for send in ((True, False) if lead else (False, True)):
            (comm.send if send else comm.recv)(buf, peer, tag=0xCA1)
        best = min(best, (time.perf_counter() - t0) / 2 * 1e6)
    return best


def _beta(comm, peer: int, lead: bool, reps: int) -> float:
    """GB/s of 4 MiB between this rank and ``peer``, after an untimed round trip of each size."""
    _pingpong(comm, peer, 8, 2, lead)
    _pingpong(comm, peer, 4 << 20, 1, lead)
    small = _pingpong(comm, peer, 8, 20, lead)
    big = _pingpong(comm, peer, 4 << 20, reps, lead)
    return min(max((4 << 20) / max(big - small, 1e-3) / 1e3, 0.05), 100.0)


def _beta_from_rank0(comm, peer: int, reps: int) -> float:
    """:func:`_beta` between rank 0 and ``peer``, on those two ranks; 0.0 on the others."""
    if comm.rank not in (0, peer):
        return 0.0
    return _beta(comm, peer if comm.rank == 0 else 0, comm.rank == 0, reps)


def _reduce_gbps() -> float:
    from ..runtime.native import ffi, lib
    x, y = np.ones(1 << 23, np.float32), np.ones(1 << 23, np.float32)
    best = float("inf")
    for _ in range(4):
        t0 = time.perf_counter()
        lib.cm_reduce(ffi.from_buffer(x), ffi.from_buffer(y), x.size, lib.CM_F32, lib.CM_SUM)
        best = min(best, time.perf_counter() - t0)
    return round(min(x.nbytes / best / 1e9, 100.0), 3)


def _agree(store, key: str, rank: int, value: Callable[[], str]) -> str:
    """Rank 0's ``value()`` published under ``key``; every rank returns it."""
    if rank == 0:
        store.set(key, value())
    return store.get(key).decode()


def calibrate(comm, store, ring: Callable[[int, int, int], float]) -> Calibration:
    """Collective over ``comm`` at init. ``store`` carries rank 0's figures; ``ring(right, left,
    rounds)`` runs one plan of ``rounds`` 8 B exchanges (send right, receive left) and returns its
    seconds."""
    if comm.size == 1 or not config.get("CALIBRATE"):
        return Calibration(Params(), "", "")
    key, sig = f"{comm.prefix}calibration", signature(comm)
    topo, route = comm.topology, comm.route
    # link class -> ring_of(rank): the ring that rank runs. Every rank runs one at once, as in a
    # collective's steps: between hosts the ranks of one local index (rank 0's: the leaders), inside
    # a host its ranks. Measured with the leaders alone while the other ranks idled, on 2 simulated
    # hosts x 2 ranks sharing 2 CPUs under htb, the tcp step came out at 8.8 us where an 8 B
    # recursive doubling took 170-180 us, and the model chose hierarchical at 8 KiB, 1.86x behind
    # recursive doubling (bench.regret)
    hosts = [sorted(h.ranks) for h in topo.hosts]
    where = {r: (i, k) for i, h in enumerate(hosts) for k, r in enumerate(h)}
    rings = {}
    if len(hosts) > 1:
        rings[route.inter] = lambda r: [h[where[r][1]] for h in hosts if where[r][1] < len(h)]
    if len(hosts[0]) > 1 and route.intra not in rings:
        rings[route.intra] = lambda r: hosts[where[r][0]]
    cached = _agree(store, f"{key}/cached", comm.rank, lambda: json.dumps(_load().get(sig)))
    entry = json.loads(cached)
    if entry and len(topo.hosts) > 1:
        peer = rings[route.inter](0)[1]
        now = _beta_from_rank0(comm, peer, 4)

        def holds() -> str:
            then = entry.get("links", {}).get(route.inter, {}).get("beta_gbps") or 0.0
            if then and 1 / LINK_DRIFT <= now / then <= LINK_DRIFT:
                return "1"
            log.warning("comms: the cached %s figures (%.3f GB/s) do not match the link now (%.3f GB/s): "
                        "calibrating again (tuned rules dropped)", route.inter, then, now)
            return "0"
        if _agree(store, f"{key}/holds", comm.rank, holds) == "0":
            entry = None
    if not entry:
        links = {}
        for cls, ring_of in rings.items():
            peer, members = ring_of(0)[1], ring_of(comm.rank)
            beta = _beta_from_rank0(comm, peer, 6)
            alpha = float("inf")
            _agree(store, f"{key}/{cls}/rings", comm.rank, lambda: "go")     # every ring starts together
            if len(members) > 1:
                i = members.index(comm.rank)
                right, left = members[(i + 1) % len(members)], members[(i - 1) % len(members)]
                ring(right, left, 5)                                   # warm up
                alpha = min(ring(right, left, HOP_ROUNDS) for _ in range(HOP_REPS)) / HOP_ROUNDS * 1e6
            links[cls] = {"alpha_us": round(min(max(alpha, 0.05), 1000.0), 3), "beta_gbps": round(beta, 3)}

        def measured() -> str:
            d = Params().as_dict()
            d["links"].update(links)
            d["reduce_gbps"] = _reduce_gbps()
            d["source"] = f"calibrated {time.strftime('%Y-%m-%d %H:%M:%S')}"
            _store_entry(sig, d)
            return json.dumps(d)
        entry = json.loads(_agree(store, f"{key}/measured", comm.rank, measured))
    params = Params.from_dict(entry)
    log.info("cost model parameters (%s): %s, reduce %.1f GB/s%s", params.source, describe_links(params.links),
             params.reduce_gbps, f"; tuned rules ({entry['tuned']})" if entry.get("rules") else "")
    return Calibration(params, entry.get("rules", ""), sig)
