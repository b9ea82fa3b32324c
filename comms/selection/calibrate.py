"""Calibration: the cost model's figures, measured in well under 2 s at the first init on a host :func:`signature`
and cached per transport in ``~/.cache/comms/calibration.json`` (rank 0's for every rank), with the rules
``python -m comms.tune`` wrote (:func:`save_rules`). ``alpha_us``: one plan step, in rings of the link's ranks all
at once (between hosts :func:`fit_inter` fits it from all_reduces); ``beta_gbps``: a 4 MiB ping-pong less an 8 B one;
``reduce_gbps``: a float32 SUM of 32 MiB (``cache_reduce_gbps``: of 64 KiB). Shaping is not in the signature: a
cached link between hosts is checked with a few 4 MiB ping-pongs (0.2 s at 2 Gbit/s) and, off by more than
LINK_DRIFT, measured again (tuned rules dropped). COMMS_CALIBRATE=0: defaults, no cache.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
import timeit
from dataclasses import replace
from typing import Callable, NamedTuple

import numpy as np

from .. import config
from ..diag import log as clog
from ..dtypes import ReduceOp
from ..runtime.hostid import cpu_model
from .model import BURST_BYTES, Link, Params, cost, describe

log = clog.get("TUNING")
FORMAT = "v15"           # part of the key: entries of another layout are not read
HOP_ROUNDS = 50          # ring rounds inside one plan: 50 x 1.5 us on shm is well above the clock's grain
HOP_REPS = 4             # runs of the ring in each of HOP_BATCHES batches HOP_PAUSE_S apart, alpha from all of them. On 4
HOP_BATCHES = 3          # ranks sharing 2 CPUs one batch of 7 runs took 4-12x the others' least in 2 of 80 (5.4 and 15.3
HOP_PAUSE_S = 0.025      # against 1.2-1.8 us, sleeping 130-150 times), as did 1 first init in 6 (8.2 us); 3 batches: 1.1-1.5
#                          us in 8 first inits of 8. The pause outlasts the 20 ms a preempted wait stays contended (wait.c)
HOP_PAYLOAD = 4096       # bytes a step carries inside a host whose ranks have a core each, alpha then the median run's
#                          step less those bytes at beta. On 1x2 shm a step took 0.94 us with 8 B, 1.7-2.2 us plus the
#                          bytes with 4-32 KiB, and 1 run in 7-10 was 1.3-1.5 us; alpha as the least 8 B step (0.54 us)
#                          gave 16-32 KiB to the ring, 22 % behind recursive doubling's one step (7.85 against 6.58 us).
#                          Not where ranks outnumber cores: their waits yield at once, and 4 ranks on 2 CPUs took 2-40
#                          us a step from run to run (alpha 14-29 us gave 16-64 KiB to direct, 30-84 % behind rhd; timed
#                          then with Python around each run, see Communicator._timers)
FIT_PROBES = (("recursive_doubling", 64), ("tree", 64), ("hierarchical", 64), ("tree", BURST_BYTES // 2))
HOST_PROBES = (("direct", 64), ("recursive_doubling", 64))    # inside a host of 3 or more ranks whose transport
#                                                               waits on a step's peers together: fit_host
FIT_ROUNDS = 10          # rounds of the probes, interleaved; each probe's median time, of FIT_REPS back to back, on
FIT_REPS = 16            # the slowest rank (a tree's root is done when it has sent: one op alone there timed 15-50 us,
#                          where the bench's 8 B tree took 29-108, back to back on 2 simulated hosts x 2 ranks)
LINK_DRIFT = 3.0         # a shaped link here differs from loopback by 8x and more (2 Gbit/s against 2-3
#                          GB/s), and the suite's own load moved loopback's figure 2x: 3x tells them apart


class Calibration(NamedTuple):
    params: Params
    rules: str               # tuned rules for this signature (comms.tune), "" where none
    signature: str


def signature(comm) -> str:
    """The cache key of ``comm``'s host: what its figures and tuned rules depend on."""
    hosts, route = comm.topology.hosts, comm.route
    nics = ",".join(f"{n['name']}:{n['speed_mbps']}" for n in hosts[0].nics)
    det = "|deterministic" if config.get("DETERMINISTIC") else ""      # other plans, other tuned rules
    return f"{FORMAT}|{platform.machine()}|{cpu_model()}|{hosts[0].cores} cores|{len(hosts)}x{len(hosts[0].ranks)}|" \
           f"{','.join(sorted({route.intra, route.inter}))}|nics {nics}|{platform.release()}{det}"


def _load() -> tuple[str, dict]:
    """The cache's path (under XDG_CACHE_HOME, else ~/.cache) and its entries; {} where unreadable."""
    path = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "comms", "calibration.json")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = {}
    return path, data if isinstance(data, dict) else {}


def _store_entry(sig: str, entry: dict) -> None:
    """Write the cache entry of ``sig``, atomically; a warning where the cache cannot be written."""
    path, everything = _load()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(f"{path}.{os.getpid()}", "w") as f:
            json.dump({**everything, sig: entry}, f, indent=1)
        os.replace(f"{path}.{os.getpid()}", path)
    except OSError as e:
        log.warning("comms: cannot write the calibration cache %s: %s", path, e)


def save_rules(sig: str, rules: str, note: str) -> None:
    """Record ``rules`` (the selector's grammar) as the tuned rules of signature ``sig``."""
    entry = _load()[1].get(sig)
    if entry is None:
        raise RuntimeError(f"no calibration cached for {sig!r}: tune with calibration on")
    _store_entry(sig, {**entry, "rules": rules, "tuned": note})


def _beta(comm, peer: int, reps: int, nbytes: int = 4 << 20) -> float:
    """GB/s of ``nbytes`` between rank 0 and ``peer`` (the least of ``reps`` ping-pongs less 8 B's, after
    an untimed round trip of each size), on those two ranks; 0.0 on the others."""
    if comm.rank not in (0, peer):
        return 0.0
    other, order = (peer, (comm.send, comm.recv)) if comm.rank == 0 else (0, (comm.recv, comm.send))

    def pingpong(size: int, iters: int) -> float:       # the least one-way µs over ``iters`` round trips
        buf = np.ones(max(1, size // 4), np.float32)    # touched: no page faults in the timing
        return min(timeit.repeat(lambda: [f(buf, other, tag=0xCA1) for f in order], repeat=iters, number=1)) / 2e-6
    pingpong(8, 2)
    pingpong(nbytes, 1)
    small, big = pingpong(8, 20), pingpong(nbytes, reps)
    return min(max(nbytes / max(big - small, 1e-3) / 1e3, 0.05), 100.0)


def _reduce_gbps(nbytes: int = 32 << 20, calls: int = 1) -> float:
    """GB/s of a float32 SUM of ``nbytes`` (32 MiB: beyond the caches), the least of 4 runs of ``calls``."""
    from ..dtypes import F32
    from ..runtime.native import OPS, ffi, reduce
    x, y = np.ones(nbytes // 4, np.float32), np.ones(nbytes // 4, np.float32)
    px, py = ffi.from_buffer(x), ffi.from_buffer(y)
    best = min(timeit.repeat(lambda: reduce(px, py, x.size, F32, OPS["SUM"]), repeat=4, number=calls)) / calls
    return round(min(x.nbytes / best / 1e9, 100.0), 3)


def _agree(store, key: str, rank: int, value: Callable[[], str]) -> str:
    """Rank 0's ``value()`` published under ``key``; every rank returns it."""
    if rank == 0:
        store.set(key, value())
    return store.get(key).decode()


def fit_host(comm, p: Params, took: dict) -> tuple[str, Link]:
    """The link inside one host with the latency each peer beyond the first adds to a step waiting on them together:
    what makes direct's price of HOST_PROBES less recursive doubling's the difference of their times."""
    route, hosts, link = comm.route, comm.topology.host_groups(), p.link(comm.route.intra)

    def price(algo: str, each: float) -> float:
        q = replace(p, links={**p.links, route.intra: replace(link, each_us=each)})
        return cost("all_reduce", algo, HOST_PROBES[0][1], comm.size, hosts,
                    q.scaled(comm.oversubscription(), links={route.intra}), route)
    (direct, rd), base = (took[probe] for probe in HOST_PROBES), price("direct", 0.0)
    gap, per = base - price("recursive_doubling", 0.0), price("direct", 1.0) - base     # per: µs a unit of each_us
    return route.intra, replace(link, each_us=round(max(0.0, (direct - rd - gap) / per), 3))


def fit_inter(comm, p: Params, took: dict) -> tuple[str, Link]:
    """The link between hosts of ``p`` with its step latency, the latency each other rank of a host crossing at
    once adds, the cost once per op and the burst speed that price FIT_PROBES (µs by (algorithm, bytes) in
    ``took``) closest to their times (least squares): in the model's own terms, from the collectives it prices.
    On 2 simulated hosts x 2 ranks sharing 2 CPUs (htb) a tree of 8 B took 108 us and recursive doubling 66, with
    1 and 2 steps between hosts; a ring of steps there (the way of alpha_us inside a host) took 4-41 us a step."""
    route, hosts, link = comm.route, comm.topology.host_groups(), p.link(comm.route.inter)
    slow = 2 * link.beta_gbps                   # a burst speed the model uses, to see how the bytes weigh

    def price(algo: str, nbytes: int, **inter) -> float:
        inter = {"alpha_us": 0.0, "each_us": 0.0, "op_us": 0.0, "burst_gbps": 1e9, **inter}
        q = replace(p, links={**p.links, route.inter: replace(link, **inter)})
        return cost("all_reduce", algo, nbytes, comm.size, hosts, q.scaled(comm.oversubscription(),
                                                                              links={route.intra}), route, False)
    rows, times = [], []
    for (algo, nbytes), t in took.items():
        base = price(algo, nbytes)
        rows.append([price(algo, nbytes, alpha_us=1.0) - base, price(algo, nbytes, each_us=1.0) - base, 1.0,
                     (price(algo, nbytes, burst_gbps=slow) - base) * slow])
        times.append(t - base)
    a, y, free = np.array(rows), np.array(times), list(range(4))
    while True:                                 # least squares, none negative: a negative one is held at 0
        x = np.zeros(4)
        x[free] = np.linalg.lstsq(a[:, free], y, rcond=None)[0]
        if x.min() >= 0:
            break
        free.remove(int(x.argmin()))
    alpha, each, op, per_burst = map(float, x)
    return route.inter, replace(link, alpha_us=round(max(alpha, 0.05), 3), each_us=round(each, 3),
                                op_us=round(op, 3), burst_gbps=round(min(1 / max(per_burst, 0.01), 100.0), 3))


def calibrate(comm, store, ring: Callable[[int, int, int, int], float],
              all_reduce: Callable[[str, int, int], float | None]) -> Calibration:
    """Collective over ``comm`` at init; ``store`` carries rank 0's figures; ``ring(right, left, rounds, nbytes)``:
    the seconds of one plan of ``rounds`` exchanges of ``nbytes`` (send right, receive left); ``all_reduce(algo,
    nbytes, reps)``: the mean of ``reps`` all_reduces by ``algo`` back to back (None where it declines)."""
    if comm.size == 1 or not config.get("CALIBRATE"):
        return Calibration(Params(), "", "")
    key, sig, route = f"{comm.prefix}calibration", signature(comm), comm.route
    hosts = [sorted(h.ranks) for h in comm.topology.hosts]
    far = hosts[1][0] if len(hosts) > 1 else 0            # rank 0's peer on another host
    entry = json.loads(_agree(store, f"{key}/cached", comm.rank, lambda: json.dumps(_load()[1].get(sig))))
    if entry and far:                                     # rank 0's and its peer's figure now against the cached one
        now = _beta(comm, far, 4)
        then = entry.get("links", {}).get(route.inter, {}).get("beta_gbps") or 0.0
        holds = bool(then) and 1 / LINK_DRIFT <= now / then <= LINK_DRIFT
        if _agree(store, f"{key}/holds", comm.rank, lambda: str(int(holds))) == "0":
            if comm.rank == 0:
                log.warning("comms: the cached %s figures (%.3f GB/s) do not match the link now (%.3f GB/s): "
                            "calibrating again (tuned rules dropped)", route.inter, then, now)
            entry = None
    if not entry:
        links, took = {}, {}
        if far:
            links[route.inter] = Link(0.0, round(_beta(comm, far, 6), 3))      # fit_inter: the rest
        if len(hosts[0]) > 1 and route.intra not in links:   # a ring of each host's ranks, every host at once
            beta = _beta(comm, hosts[0][1], 6)
            _agree(store, f"{key}/ring", comm.rank, lambda: "go")           # every ring starts together
            members = next(h for h in hosts if comm.rank in h)
            i = members.index(comm.rank)
            right, left = members[(i + 1) % len(members)], members[(i - 1) % len(members)]
            # steps with data inside a host whose ranks each have a core (HOP_PAYLOAD)
            payload = route.intra != route.inter and comm.oversubscription() <= 1
            load, runs = HOP_PAYLOAD if payload else 8, []
            for batch in range(HOP_BATCHES if len(members) > 1 else 0):
                time.sleep(HOP_PAUSE_S if batch else 0.0)
                ring(right, left, 5, load)                             # warm up (and start together again)
                runs += [ring(right, left, HOP_ROUNDS, load) for _ in range(HOP_REPS)]
            alpha = 0.0 if not runs else min(runs) / HOP_ROUNDS * 1e6 if not (payload and beta) else \
                statistics.median(runs) / HOP_ROUNDS * 1e6 - load / (beta * 1e3)
            links[route.intra] = Link(round(min(max(alpha, 0.05), 1000.0), 3), round(beta, 3))
        probes = FIT_PROBES if far else HOST_PROBES if len(hosts[0]) > 2 and route.together else ()
        if probes:                              # every rank at once, interleaved
            _agree(store, f"{key}/probes", comm.rank, lambda: "go")
            for _ in range(FIT_ROUNDS + 1):
                for probe in probes:
                    all_reduce(*probe, FIT_REPS // 4)       # untimed, the waits settle: without, 64 B recursive
                    # doubling and tree swapped places in 2 inits of 4 (2 simulated hosts x 2 ranks, htb, split CPUs;
                    # with, 15-17 against 18-19 us in 4 of 4, the bench's 20-22 against 25-29)
                    took.setdefault(probe, []).append(all_reduce(*probe, FIT_REPS))
            slowest = np.array([statistics.median(t[1:]) * 1e6 if t[0] is not None else -1.0 for t in took.values()])
            comm.all_reduce(slowest, ReduceOp.MAX)          # the rank a collective waits for
            took = {probe: float(t) for probe, t in zip(took, slowest) if t >= 0}

        def measured() -> str:
            p = Params(reduce_gbps=_reduce_gbps(), source=f"calibrated {time.strftime('%Y-%m-%d %H:%M:%S')}",
                       cache_reduce_gbps=_reduce_gbps(64 << 10, 200))
            p = replace(p, links={**p.links, **links})
            if took:
                log.info("all_reduce probes (us): %s", took)
                name, link = fit_inter(comm, p, took) if far else fit_host(comm, p, took)
                p = replace(p, links={**p.links, name: link})
            _store_entry(sig, p.as_dict())
            return json.dumps(p.as_dict())
        entry = json.loads(_agree(store, f"{key}/measured", comm.rank, measured))
    params = Params.from_dict(entry)
    log.info("cost model parameters (%s): %s%s", params.source, describe(params.as_dict()),
             f"; tuned rules ({entry['tuned']})" if entry.get("rules") else "")
    return Calibration(params, entry.get("rules", ""), sig)
