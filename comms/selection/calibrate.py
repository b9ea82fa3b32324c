"""Calibration: the cost model's figures, measured in well under 2 s at the first init on a host :func:`signature`
and cached per transport in ``~/.cache/comms/calibration.json`` (rank 0's for every rank), with the rules
``python -m comms.tune`` wrote (:func:`save_rules`). ``beta_gbps``: a 4 MiB ping-pong less an 8 B one;
``reduce_gbps``: a float32 SUM of 32 MiB (``cache_reduce_gbps``: of 64 KiB); the latencies (and between hosts the
burst speed) :func:`fit` the all_reduces of PROBES as they ran. Shaping is not in the signature: a cached link
between hosts is checked with a few 4 MiB ping-pongs (0.2 s at 2 Gbit/s) and, off by more than LINK_DRIFT,
measured again (tuned rules dropped). COMMS_CALIBRATE=0: defaults, no cache.
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
from .model import Link, Params, cost, describe

log = clog.get("TUNING")
FORMAT = "v18"           # part of the key: entries of another layout are not read
BOARD = ("board", 64)    # one host's probe of the board, where the transport has one: board_share, not fit()
PROBES = {               # the all_reduces (algorithm, bytes) fit() prices, by layout
    # between hosts: on 2 simulated hosts x 2 ranks sharing 2 CPUs (htb) a tree of 8 B took 108 us and recursive
    # doubling 66, with 1 and 2 steps between hosts; a ring of steps there took 4-41 us a step
    # (a tree of 16 KiB drains a token bucket: 36 or 70-74 us from one init to the next)
    "hosts": (("recursive_doubling", 64), ("tree", 64), ("hierarchical", 64), ("tree", 8192)),
    # one host of 2: steps that carry data, where recursive doubling's one step and the ring's two part (1x2 shm: a
    # step took 0.94 us with 8 B, 1.7-2.2 us plus the bytes with 4-32 KiB; alpha from 8 B steps alone, 0.54 us, gave
    # 16-32 KiB to the ring, 22 % behind recursive doubling's one step: 7.85 against 6.58 us)
    "pair": (("recursive_doubling", 4096), ("ring", 4096), BOARD),
    # a host of 3 or more ranks whose transport waits on a step's peers together: direct's one step on L-1 peers
    # against recursive doubling's log2(L). Not the ring: on 1x4 beside a busy loop its steps took up to 1.4x
    # recursive doubling's (alpha 10.3 against 7.3 us); fitted with them, the larger alpha left each_us too small
    # to price direct's 64 B as it ran, and direct got 8-32 KiB, 43 % behind recursive doubling
    "peers": (("recursive_doubling", 4096), ("direct", 64), ("recursive_doubling", 64), BOARD),
}   # one host's probes include the board where the transport has one: its time over direct's price is board_share

FIT_ROUNDS = 10          # rounds of the probes, interleaved; each probe's median time, of FIT_REPS back to back, on
FIT_REPS = 16            # the slowest rank (a tree's root is done when it has sent: one op alone there timed 15-50 us,
#                          where the bench's 8 B tree took 29-108, back to back on 2 simulated hosts x 2 ranks)
HOST_ROUNDS, HOST_REPS = 5, 400    # the same on one host, in stretches long enough to see what else wants the CPU: on
#                          1x4 beside a busy loop, stretches of 16 had direct at 1.0-1.2x recursive doubling and the
#                          board 0.7-1.0x, where the bench measured 1.6x and 1.2-1.5x; stretches of 400-1500 (10-50
#                          ms) gave 1.5x and 0.9-1.6x. Idle they agree (board 0.75x recursive doubling, 5 us a call)
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


FREE = {"alpha_us": 0.0, "each_us": 0.0, "op_us": 0.0, "burst_gbps": 1e9}    # a figure left out of a price


def _price(comm, p: Params, algo: str, nbytes: int, floor: bool = True) -> float:
    """µs of an all_reduce of ``nbytes`` by ``algo`` on ``comm``'s layout, ``p`` scaled as the selector scales it."""
    return cost("all_reduce", algo, nbytes, comm.size, comm.topology.host_groups(),
                p.scaled(comm.oversubscription(), links={comm.route.intra}), comm.route, floor)


def fit(comm, p: Params, took: dict, unknowns: list) -> Params:
    """``p`` with the figures ``unknowns`` ((link, field) pairs of :class:`Link`; a burst speed enters as its inverse)
    that price the all_reduces of ``took`` (µs by (algorithm, bytes)) closest to their times: least squares, none
    negative. The model's own terms, from the collectives it prices, on ``comm``'s layout."""
    slow = {u: 2 * p.link(u[0]).beta_gbps for u in unknowns if u[1] == "burst_gbps"}   # a burst the model uses

    def price(algo: str, nbytes: int, at: tuple = (), value: float = 0.0) -> float:
        links = dict(p.links)
        for u in unknowns:
            links[u[0]] = replace(links.get(u[0]) or p.link(u[0]), **{u[1]: value if u == at else FREE[u[1]]})
        return _price(comm, replace(p, links=links), algo, nbytes, False)
    rows, times = [], []
    for (algo, nbytes), t in took.items():
        base = price(algo, nbytes)
        rows.append([(price(algo, nbytes, u, slow.get(u, 1.0)) - base) * slow.get(u, 1.0) for u in unknowns])
        times.append(t - base)
    a, y, free = np.array(rows), np.array(times), list(range(len(unknowns)))
    while True:                                 # a negative figure is held at 0
        x = np.zeros(len(unknowns))
        x[free] = np.linalg.lstsq(a[:, free], y, rcond=None)[0]
        if x.min() >= 0:
            break
        free.remove(int(x.argmin()))
    links = dict(p.links)
    for (name, field), v in zip(unknowns, map(float, x)):
        v = max(v, 0.05) if field == "alpha_us" else min(1 / max(v, 0.01), 100.0) if field == "burst_gbps" else v
        links[name] = replace(links.get(name) or p.link(name), **{field: round(v, 3)})
    return replace(p, links=links)


def calibrate(comm, store, all_reduce: Callable[[str, int, int], float | None]) -> Calibration:
    """Collective over ``comm`` at init; ``store`` carries rank 0's figures; ``all_reduce(algo, nbytes, reps)``: the
    mean seconds of ``reps`` float32 SUM all_reduces by ``algo`` back to back (None where it declines)."""
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
        if far:           # between hosts the link's latencies and burst speed are fitted, the intra link's are not:
            # with 2 ranks a host every all_reduce's steps inside and across hosts come in pairs (their sum is fitted)
            links[route.inter] = Link(0.0, round(_beta(comm, far, 6), 3))
            unknowns = [(route.inter, f) for f in ("alpha_us", "each_us", "op_us", "burst_gbps")]
            probes = PROBES["hosts"]
        else:
            unknowns, probes = [(route.intra, "alpha_us")], PROBES["pair"]
            if len(hosts[0]) > 2 and route.together:
                unknowns, probes = unknowns + [(route.intra, "each_us")], PROBES["peers"]
        if len(hosts[0]) > 1 and route.intra not in links:
            links[route.intra] = replace(Params().link(route.intra), beta_gbps=round(_beta(comm, hosts[0][1], 6), 3))
        rounds, reps = (FIT_ROUNDS, FIT_REPS) if far else (HOST_ROUNDS, HOST_REPS)
        _agree(store, f"{key}/probes", comm.rank, lambda: "go")       # every rank at once, interleaved
        for _ in range(rounds + 1):
            for probe in probes:
                all_reduce(*probe, reps // 4)           # untimed, the waits settle: without, 64 B recursive
                # doubling and tree swapped places in 2 inits of 4 (2 simulated hosts x 2 ranks, htb, split CPUs;
                # with, 15-17 against 18-19 us in 4 of 4, the bench's 20-22 against 25-29)
                took.setdefault(probe, []).append(all_reduce(*probe, reps))
        slowest = np.array([statistics.median(t[1:]) * 1e6 if t[0] is not None else -1.0 for t in took.values()])
        comm.all_reduce(slowest, ReduceOp.MAX)          # the rank a collective waits for
        took = {probe: float(t) for probe, t in zip(took, slowest) if t >= 0}

        def measured() -> str:
            p = Params(reduce_gbps=_reduce_gbps(), source=f"calibrated {time.strftime('%Y-%m-%d %H:%M:%S')}",
                       cache_reduce_gbps=_reduce_gbps(64 << 10, 200))
            log.info("all_reduce probes (us): %s", took)
            board = took.pop(BOARD, None)
            p = fit(comm, replace(p, links={**p.links, **links}), took, unknowns) if took else p
            if board:       # held within 0.25-4x, a guard against a stalled probe: measured 0.45x (1x2: the board
                # 0.5-0.6 us, direct priced 1.2) to 1.0x (1x4 beside a busy loop, where the bench had it 1.2-1.5x
                # recursive doubling's time; at the default 0.9 it won 8 B-2 KiB, 20-34 % behind)
                p = replace(p, board_share=round(min(max(board / _price(comm, p, "direct", BOARD[1]), 0.25), 4.0), 3))
            _store_entry(sig, p.as_dict())
            return json.dumps(p.as_dict())
        entry = json.loads(_agree(store, f"{key}/measured", comm.rank, measured))
    params = Params.from_dict(entry)
    log.info("cost model parameters (%s): %s%s", params.source, describe(params.as_dict()),
             f"; tuned rules ({entry['tuned']})" if entry.get("rules") else "")
    return Calibration(params, entry.get("rules", ""), sig)
