"""Calibration of the cost model (comms.tuning): link figures and timed candidates, cached per host.

The first time a host signature (CPU, cores, host layout, link classes, NICs and their
reported speeds) is seen, rank 0 measures each link class of the communicator's route
(comms.tuning.Route) and its reduction speed, and caches them, by transport name, in
``~/.cache/comms/calibration.json`` (COMMS_CALIBRATE=0 turns this off and the transports' default
figures apply). ``alpha_us`` is the latency of one *step* of a plan: 8 B passed around a ring of
the link's ranks (the host leaders for the inter-host link, host 0's ranks for the intra-host one
unless that is the same transport), every member sending and receiving in each round, many rounds
inside one native plan. It thus leaves out the per-call cost that every algorithm pays alike
(Python, plan lookup, the first wake-up), and it includes what a host with more ranks than cores
adds to every step. ``beta_gbps`` comes from a 4 MiB ping-pong.
Every figure is the least of several runs, since other work on a shared machine only adds to it.
Rank 0's parameters are published through the store so every rank prices alike and
picks the same algorithm. A link shaped below what its NIC reports (tc, a busy fabric) is not part
of the signature, so cached figures of the link between hosts are checked at every init: rank 0
and its peer on that link time a few 4 MiB ping-pongs (6 round trips, about 0.2 s on a 2 Gbit/s
link), and figures whose bandwidth is off by more than LINK_DRIFT either way are measured again
(a job must not run for good on figures taken under other conditions).
With COMMS_TUNE, every rank then times the candidate algorithms (comms.autotune), and the table
is cached with the link figures.
"""
from __future__ import annotations

import json
import math
import os
import platform
import time

import numpy as np

from . import config
from . import log as clog
from .tuning import Params, describe_links

log = clog.get("TUNING")
CALIBRATION_VERSION = "v9"     # part of the cache key: v2 measures alpha per plan step, v3 adds timed
                               # candidates, v4 times them at every power of two and takes the mean
                               # over the rounds, v5 through the public call in 25 ms turns, paired,
                               # v6 after an untimed lead-in of each turn, v7 confirms a probe out of
                               # line with both neighbours against their winner, v8 settles after
                               # moving the ranks and times the step latency twice, v9 keeps the
                               # link figures under "links", by transport name (the route's classes)
HOP_ROUNDS = 50                # rounds of the ring inside one plan when measuring alpha
LINK_DRIFT = 3.0               # a cached inter-host bandwidth this far from today's is measured again: a
                               # shaped link differs from an unshaped one by 8x and more here (2 Gbit/s
                               # against 2-3 GB/s), and the suite's load moved loopback's figure 2x


def signature(comm) -> str:
    topo = comm.topology
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    classes = sorted({comm.route.intra, comm.route.inter})      # alike on every rank
    nics = ",".join(f"{n['name']}:{n['speed_mbps']}" for n in topo.hosts[0].nics)
    return f"{CALIBRATION_VERSION}|{platform.machine()}|{cpu}|{topo.hosts[0].cores} cores|" \
           f"{len(topo.hosts)}x{len(topo.hosts[0].ranks)}|" \
           f"{','.join(classes)}|nics {nics}|{platform.release()}"


def _cache_path() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "comms", "calibration.json")


def _pingpong(comm, peer: int, nbytes: int, iters: int, leader: bool, stat=np.median) -> float:
    """One-way time (µs) of ``nbytes`` between this rank and ``peer`` (``stat`` over the round trips)."""
    buf = np.ones(max(1, nbytes // 4), np.float32)          # touched: no page faults in the timing
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        if leader:
            comm.send(buf, peer, tag=0xCA1)
            comm.recv(buf, peer, tag=0xCA1)
        else:
            comm.recv(buf, peer, tag=0xCA1)
            comm.send(buf, peer, tag=0xCA1)
        times.append((time.perf_counter() - t0) / 2 * 1e6)
    return float(stat(times))


def _beta(comm, other: int, lead: bool, reps: int, small: int) -> float:
    """GB/s of a 4 MiB message between this rank and ``other``: the least of ``reps`` ping-pongs,
    less the least one-way time of ``small`` 8 B ones, after untimed round trips of both sizes."""
    _pingpong(comm, other, 8, small // 5, lead)               # warm up both paths
    _pingpong(comm, other, 4 << 20, max(1, reps // 4), lead)
    # least times: on a shared machine other work only ever adds to them
    a = _pingpong(comm, other, 8, small, lead, np.min)        # one-way, per-call cost included
    t = _pingpong(comm, other, 4 << 20, reps, lead, np.min)
    return min(max((4 << 20) / max(t - a, 1e-3) / 1e3, 0.05), 100.0)


def _link_holds(comm, cached: dict, cls: str, ring: list, key: str) -> bool:
    """Collective over the communicator: whether the cached bandwidth of link class ``cls`` between
    hosts (measured by ``ring[0]`` = rank 0 and ``ring[1]``) is still within LINK_DRIFT of what a
    short ping-pong between them gives now. Every rank gets rank 0's answer."""
    peer = ring[1]
    if comm.rank in (0, peer):
        now = _beta(comm, peer if comm.rank == 0 else 0, comm.rank == 0, 5, 20)
    if comm.rank == 0:
        then = cached.get("links", {}).get(cls, {}).get("beta_gbps")
        holds = bool(then) and 1 / LINK_DRIFT <= now / then <= LINK_DRIFT
        if not holds:
            log.warning("comms: the cached %s link figures (%s GB/s) do not match the link now (%.3f GB/s): "
                        "calibrating again", cls, then, now)
        comm._store.set(f"{key}/holds", "1" if holds else "0")
    return comm._store.get(f"{key}/holds") == b"1"


def _hops(comm, ring: list, rounds: int, reps: int) -> float:
    """Least µs per round (over ``reps`` runs) of 8 B around ``ring`` (ranks in ring order, this
    rank among them): in each round every member sends to its right neighbour and receives from its
    left, all rounds in one point-to-point plan, so the figure is the latency of one step of a
    collective's plan with every member active, without the per-call cost."""
    from .algorithms.plan import IN, OUT, PHASE, RECV, SEND, Plan, Step
    from .checks import fast as _fast
    from .operations import MSG_P2P
    from .engine import Encoded
    i = ring.index(comm.rank)
    right, left = ring[(i + 1) % len(ring)], ring[(i - 1) % len(ring)]
    src, dst = np.ones(2, np.float32), np.zeros(2, np.float32)
    p_in, count, dtype = _fast(src, "calibration", False)
    p_out = _fast(dst, "calibration", True)[0]
    steps = []
    for _ in range(rounds):
        steps += [Step(SEND, right, IN, 0, src.nbytes), Step(RECV, left, OUT, 0, src.nbytes), Step(PHASE)]
    enc = Encoded(Plan("calibration", tuple(steps[:-1])), "send", MSG_P2P, 0, dtype, 0, -1, count, 0xCA2)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        comm._run(enc, p_in, p_out, [src, dst], False)
        times.append((time.perf_counter() - t0) / rounds * 1e6)
    return float(min(times))


def _alpha(cls: str, hops: list) -> float:
    """Rank 0: one link class's step latency (µs) from its :func:`_hops` figures, the least of them,
    clamped to a sane range. With timed candidates the hops run twice, before and after the timing,
    some seconds apart: on 4 ranks sharing 2 CPUs one figure in five to ten came out at 5-14 µs
    against the usual 1.6-2.7 (the whole of a run of seven, so a state of the machine or of where
    the scheduler put the ranks), and the step latency decides where the near-tie rule of
    comms.tuning applies: at 14 µs it put rhd's 32 KiB all_reduce among the latency-bound sizes
    and gave it to an algorithm the bench measured 15-35 % behind."""
    alpha = min(max(min(hops), 0.05), 1000.0)
    log.info("comms: %s step latency %s us: %.3f", cls, " then ".join(f"{h:.3f}" for h in hops), alpha)
    return round(alpha, 3)


def _finish(links: dict, timed: dict | None, sig: str) -> dict:
    """Rank 0: the default parameters with the measured ``links`` (name -> alpha_us, beta_gbps) and
    ``timed`` candidates (comms.autotune; None where none were timed), plus the reduction speed;
    cached under ``sig``."""
    x, y = np.ones(1 << 23, np.float32), np.ones(1 << 23, np.float32)   # 32 MiB: beyond the caches
    from ._native import ffi, lib
    lib.cm_reduce(ffi.from_buffer(x), ffi.from_buffer(y), x.size, 2, 0)
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        lib.cm_reduce(ffi.from_buffer(x), ffi.from_buffer(y), x.size, 2, 0)
        best = min(best, time.perf_counter() - t0)
    red = min(x.nbytes / best / 1e9, 100.0)
    d = Params().as_dict()
    d["links"].update(links)
    if timed is not None:
        d["measured"] = timed
    d["reduce_gbps"] = round(red, 3)
    d["source"] = f"calibrated {time.strftime('%Y-%m-%d %H:%M:%S')}"
    path = _cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            with open(path) as f:
                everything = json.load(f)
        except (OSError, ValueError):
            everything = {}
        everything[sig] = d
        with open(f"{path}.{os.getpid()}", "w") as f:
            json.dump(everything, f, indent=1)
        os.replace(f"{path}.{os.getpid()}", path)
    except OSError as e:
        log.warning("comms: cannot cache the calibration in %s: %s", path, e)
    return d


def tuned_collectives() -> list[str]:
    """The collectives COMMS_TUNE asks to time at calibration (comms.autotune), checked."""
    from . import algorithms
    from .errors import InvalidUsage
    colls = [c.strip() for c in config.get("TUNE").split(",") if c.strip()]
    timeable = ("all_reduce", "broadcast", "all_gather", "reduce_scatter", "all_to_all")
    bad = [c for c in colls if c not in timeable]
    if bad:
        raise InvalidUsage(f"COMMS_TUNE: cannot time {', '.join(bad)} (choose from {', '.join(timeable)})")
    return [c for c in timeable if c in colls and len(algorithms.REGISTRY[c]) > 1]


def calibrate(comm) -> Params:
    """Every rank calls this at init (collectively); rank 0's parameters win."""
    key = f"{comm.prefix}calibration"
    if comm.size == 1 or not config.get("CALIBRATE"):
        return Params()
    topo, route = comm.topology, comm.route
    rings = {}                # link class -> the ranks that measure it (rank 0 first)
    if len(topo.hosts) > 1:
        rings[route.inter] = sorted(h.leader for h in topo.hosts)
    local = sorted(topo.hosts[0].ranks)
    if len(local) > 1 and route.intra not in rings:
        rings[route.intra] = local
    colls = tuned_collectives()
    sig = signature(comm) + (f"|timed {','.join(colls)}" if colls else "") \
        + ("|deterministic" if colls and comm._deterministic else "")      # its plans are timed
    cached = None
    # The link figures use point-to-point messages and the store only. The timed candidates run
    # real collectives, and the numbering is reset after them: the user's first collective is 1.
    if comm.rank == 0:
        try:
            with open(_cache_path()) as f:
                cached = json.load(f).get(sig)
        except (OSError, ValueError):
            cached = None
        comm._store.set(f"{key}/cached", "1" if cached else "0")
    if comm._store.get(f"{key}/cached") == b"1" and len(topo.hosts) > 1 \
            and not _link_holds(comm, cached, route.inter, rings[route.inter], key) and comm.rank == 0:
        cached = None
    if comm.rank == 0:
        comm._store.set(f"{key}/measure", "0" if cached else "1")
    measure = comm._store.get(f"{key}/measure") == b"1"
    if measure:
        measured, hops, table = {}, {}, None
        for cls, ring in rings.items():
            peer = ring[1]
            if comm.rank in (0, peer):
                beta = _beta(comm, peer if comm.rank == 0 else 0, comm.rank == 0, 8, 100)
            if comm.rank in ring:
                _hops(comm, ring, 5, 3)                           # warm up
                hops[cls] = [_hops(comm, ring, HOP_ROUNDS, 7)]
            if comm.rank == 0:
                measured[cls] = {"beta_gbps": round(beta, 3)}
        if colls:
            from . import autotune, timed
            mine = autotune.measure(comm, colls, config.get("TUNE_SECONDS"))
            comm._engine.seq = 0          # every rank is past the probes: the user's first collective is 1
            comm._store.set(f"{key}/timed/{comm.rank}", json.dumps(mine))
            if comm.rank == 0:
                table = timed.combine(
                    [json.loads(comm._store.get(f"{key}/timed/{r}")) for r in range(comm.size)])
            for cls, ring in rings.items():       # the step latency once more, some seconds later (_alpha)
                if comm.rank in ring:
                    hops[cls].append(_hops(comm, ring, HOP_ROUNDS, 7))
        if comm.rank == 0:
            for cls in rings:
                measured[cls]["alpha_us"] = _alpha(cls, hops[cls])
            cached = _finish(measured, table, sig)
    if comm.rank == 0:
        comm._store.set(key, json.dumps(cached))
    params = Params.from_dict(json.loads(comm._store.get(key)))
    log.info("cost model parameters (%s): %s, reduce %.1f GB/s", params.source, describe_links(params.links),
             params.reduce_gbps)
    return params
