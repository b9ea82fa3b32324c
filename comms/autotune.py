"""Timed candidates: the cost model corrected by measuring every algorithm at calibration.

The cost model (comms.tuning) prices an algorithm from a few link figures; what it leaves out (how
the scheduler shares two cores among four ranks, a token bucket that lets small bursts through at
wire speed, a plan's own overheads) can make it pick an algorithm that measures slower. So, when a
host signature is calibrated, every rank also runs each registered algorithm of the collectives in
COMMS_TUNE at a grid of message sizes (:data:`PROBES`, 8 B to 32 MiB in steps of 2, as far as
COMMS_TUNE_SECONDS per collective allows), and the selection prices an algorithm at

    cost(m) x correction(m),  correction = measured / modelled at the probes,

interpolated linearly in log(size) between probes and held constant beyond the grid. At a probe
the cheapest corrected algorithm is the one that measured fastest; between probes the model's shape
places the crossover. An algorithm that declined a probe (NotSupported) is not chosen at sizes next
to it.

Contract of :func:`measure` (collective: every rank calls it at the same point of init, with the
same arguments): each (algorithm, size) runs one warm-up call per buffer set (up to :data:`BUFFERS`
sets, rotated through as a job's tensors are), then :data:`ROUNDS` timed rounds of ``reps(size)``
back-to-back calls, each round started by a barrier, the algorithms interleaved and their order
flipped every round so drift on a busy machine hits all of them alike; a rank's figure is its mean
time per call over all the rounds (at bulk probes, calls of :data:`SLOW_CALL_S` or more, paired
round by round instead: :func:`figures`). The mean, not a per-call median or minimum, and not the median
round either: a job's time is the sum of its collectives' times, tails included (with more ranks
than cores, an algorithm whose typical call is fast can still lose by its stalls, and a stall every
few rounds is part of what it costs: the median round left them out, and priced direct within 7 %
of recursive doubling at 8 KiB on 4 ranks sharing 2 cores where the bench's means put it 11-19 %
behind). The calls are real collectives (they are matched and checked like any other), taking sequence
numbers 1, 2, ...; the caller resets the numbering once every rank is done, so the user's first
collective is number 1. Call counts come from the slowest rank's warm-up call, so every rank runs
the same calls. Rank 0 combines the ranks' figures with :func:`combine` (the slowest rank's figure
per entry: a collective is as fast as its slowest member), and the table is cached with the
calibration. The table holds its communicator's layout (ranks and hosts) and applies only to
communicators of that layout (a split sub-communicator prices with the model alone).
"""
from __future__ import annotations

import math
import time

import numpy as np

from . import log as clog
from .algorithms.plan import NotSupported
from .dtypes import F32, ReduceOp

log = clog.get("TUNING")
PROBES = [8 << k for k in range(23)]            # 8 B .. 32 MiB, x2: a cost can step between two
# sizes, which interpolation across x4 missed (seen: recursive doubling over tcp under a 2 Gbit/s
# token bucket took 4x as long at 64 KiB as at 32 KiB, and the selector kept it there)
ROUNDS = 5
BUFFERS, POOL_BYTES = 4, 64 << 20                # buffer sets rotated through, bounded in bytes
PRUNE_FROM, PRUNE_RATIO = 512 << 10, 3.0         # from this probe on, this far behind the fastest: no more probes
ROUND_S = 0.004                                  # a timed round lasts about this long...
ROUND_CALLS = 200                                # ...in at most this many calls, and at least MIN_CALLS
MIN_CALLS = 2
SLOW_CALL_S, SLOW_ROUND_S = 0.0005, 0.025        # calls this slow move bulk data: rounds this long


def reps(call_s: float) -> int:
    """Back-to-back calls per timed round for a call of about ``call_s`` seconds (the slowest
    rank's warm-up call, so every rank runs the same count). Small sizes need many: on a host with
    more ranks than cores one call in a hundred waits milliseconds for a descheduled peer, and that
    tail is part of what a job pays. Slow calls (bulk data) get rounds of :data:`SLOW_ROUND_S`: a
    link can let a short burst through faster than it sustains (a token bucket, a switch buffer),
    and back-to-back collectives use it up; 4 ms rounds of 256 KiB on 2 hosts at 2 Gbit/s (a tc
    bucket of 1 MB) priced ring under tree, which sustained 1.6x faster."""
    round_s = SLOW_ROUND_S if call_s >= SLOW_CALL_S else ROUND_S
    return max(MIN_CALLS, min(ROUND_CALLS, int(round_s / max(call_s, 1e-9))))


def layout(n: int, hosts: tuple) -> list:
    """What a timed table is valid for: the rank count and the ranks per host."""
    return [n, [len(g) for g in hosts]]


def _args(comm, coll: str, nbytes: int):
    """(Args, input bytes, output bytes, header count, root) of a float32 ``coll`` whose selector
    size is ``nbytes``."""
    from .algorithms.plan import Args
    n, es = comm.size, 4
    common = dict(hosts=comm._hosts(), deterministic=comm._deterministic)
    if coll in ("all_reduce", "broadcast"):
        c = max(1, nbytes // es)
        a = Args(coll, comm.rank, n, c, es, root=0 if coll == "broadcast" else -1, inplace=True, **common)
        return a, c * es, c * es, c, a.root
    blk = max(1, nbytes // (es * (n - 1)))      # elements per block: the selector counts n - 1 blocks
    if coll == "all_gather":
        return Args(coll, comm.rank, n, blk, es, **common), blk * es, n * blk * es, blk, -1
    if coll == "reduce_scatter":
        return Args(coll, comm.rank, n, blk, es, **common), n * blk * es, blk * es, n * blk, -1
    if coll == "all_to_all":
        splits = (blk * es,) * n
        return Args(coll, comm.rank, n, 0, es, send_splits=splits, recv_splits=splits, **common), \
            n * blk * es, n * blk * es, n * blk, -1
    raise ValueError(f"cannot time {coll}")


def _over_budget(comm, t_start: float, t_size: float, budget_s: float, growth: float) -> bool:
    """Collective: True when the next probe (about ``growth`` times the last one's time, since it
    moves that many times the bytes) would end past ``budget_s`` seconds of timing on the slowest
    rank. The ranks agree through a MAX all_reduce of their clocks, so all of them stop at the same
    probe."""
    now = time.perf_counter()
    clocks = np.array([now - t_start, now - t_size], np.float64)
    comm.all_reduce(clocks, op=ReduceOp.MAX)
    return clocks[0] + growth * clocks[1] > budget_s


def figures(means: dict, paired: bool) -> dict:
    """{algo: µs per call} from {algo: [mean µs per call in each round]} (rounds of equal calls,
    the algorithms' turns interleaved). Unpaired: each algorithm's mean over its rounds. Paired (bulk
    probes): the fastest algorithm by mean is the reference, and every other one is priced at the
    reference's mean times the median over rounds of its ratio to the reference in the same round.
    The reason is the machine, not the stalls: this VM moves between states that last seconds (an
    8 MiB all_reduce on 2 ranks took 0.7 ms, then 7 ms for 2 to 5 s, both ranks at 100 % on cores
    of their own), and a state change in the middle of a probe lands on some algorithms' turns and
    not others', which a mean pools into the ranking; two turns of one round sit within a fraction
    of a second. At fast probes a round holds hundreds of calls and a stall of milliseconds is what
    the mean must keep (the module docstring), so those stay unpaired."""
    fig = {a: float(np.mean(v)) for a, v in means.items() if v}
    if not paired or len(fig) < 2:
        return fig
    ref = min(fig, key=fig.get)
    out = {}
    for a, v in means.items():
        if not v:
            continue
        ratios = [x / y for x, y in zip(v, means[ref]) if x > 0 and y > 0]
        out[a] = fig[ref] * float(np.median(ratios)) if ratios else fig[a]
    return out


def measure(comm, colls: list[str], budget_s: float = math.inf) -> dict:
    """This rank's figures: {"layout": [size, [ranks per host]], coll: {algo: [µs per probe, or
    None where the algorithm declined or was dropped], as long as the probes reached]}} (see the
    module docstring). From :data:`PRUNE_FROM` up, an algorithm more than :data:`PRUNE_RATIO` times
    the fastest (on the slowest rank, so every rank drops the same) is not timed at larger probes,
    and is then not chosen there.
    Probing a collective stops, on every rank alike, before a probe that would end past
    ``budget_s`` seconds (per collective); the correction is then held constant from the last probe up."""
    from . import algorithms
    from .algorithms.plan import COLL_IDS
    from .communicator import MSG_COLL, _addr
    from .engine import Encoded
    from .selector import build
    out: dict = {"layout": layout(comm.size, comm._hosts())}
    for coll in colls:
        comm.barrier()            # the budget's clock starts when every rank is here
        t_start = t_size = time.perf_counter()
        names = list(algorithms.REGISTRY[coll])
        table: dict = {a: [] for a in names}
        dropped: set = set()     # far behind at a large probe: not timed at larger ones
        for i, nbytes in enumerate(PROBES):
            if i and _over_budget(comm, t_start, t_size, budget_s, nbytes / PROBES[i - 1]):
                log.info("comms: timed %s up to %d B (COMMS_TUNE_SECONDS=%g)", coll, PROBES[i - 1], budget_s)
                break
            t_size = time.perf_counter()
            args, nin, nout, count, root = _args(comm, coll, nbytes)
            sets = []             # rotated through, like a job's tensors (and the bench's buffer sets)
            for _ in range(max(1, min(BUFFERS, POOL_BYTES // max(nin + nout, 1)))):
                src = np.ones(max(1, nin // 4), np.float32)      # touched: no page faults in the timing
                dst = src if coll in ("all_reduce", "broadcast") else np.zeros(max(1, nout // 4), np.float32)
                sets.append((_addr(src), _addr(dst), [src, dst]))
            runs = {}
            for a in names:
                if a in dropped:
                    continue
                try:
                    plan = build(args, a)
                except NotSupported:
                    continue
                runs[a] = Encoded(plan, coll, MSG_COLL, COLL_IDS[coll], F32, 0, root, count)
            order = list(runs)
            warm = np.zeros(len(order), np.float64)
            for i_a, a in enumerate(order):
                for p_in, p_out, keep in sets:                    # warm-up: connections, pages, caches
                    t0 = time.perf_counter()
                    comm._run(runs[a], p_in, p_out, keep, False)
                    warm[i_a] = time.perf_counter() - t0
            comm.all_reduce(warm, op=ReduceOp.MAX)                # every rank runs the same counts
            k_of = {a: reps(float(w)) for a, w in zip(order, warm)}
            means: dict = {a: [] for a in order}
            for rnd in range(ROUNDS):
                for a in (order if rnd % 2 == 0 else order[::-1]):
                    enc = runs[a]
                    comm.barrier()        # every rank starts the round together, not skewed by the last
                    k = k_of[a]
                    t0 = time.perf_counter()
                    for j in range(k):
                        p_in, p_out, keep = sets[j % len(sets)]
                        comm._run(enc, p_in, p_out, keep, False)
                    means[a].append((time.perf_counter() - t0) / k * 1e6)
            fig = figures(means, paired=bool(len(warm)) and float(warm.min()) >= SLOW_CALL_S)
            for a in names:
                table[a].append(round(fig[a], 3) if a in fig else None)
            if nbytes >= PRUNE_FROM and fig:
                # the ranks must drop the same ones: decide on the slowest rank's figures
                slowest = np.array([fig[a] for a in order], np.float64)
                comm.all_reduce(slowest, op=ReduceOp.MAX)
                dropped |= {a for a, t in zip(order, slowest) if t > PRUNE_RATIO * slowest.min()}
        out[coll] = table
    comm._scratch = np.empty(0, np.uint8)      # the probes' scratch is not the user's
    comm._scratch_ptr = 0
    return out


def combine(tables: list[dict]) -> dict:
    """Every rank's :func:`measure` -> one table: per entry the slowest rank's figure (None if any
    rank's algorithm declined)."""
    out = {"layout": tables[0]["layout"]}
    for coll, algos in tables[0].items():
        if coll == "layout":
            continue
        reached = min(len(t[coll][a]) for t in tables for a in algos)
        out[coll] = {a: [None if any(t[coll][a][i] is None for t in tables) else max(t[coll][a][i] for t in tables)
                         for i in range(reached)] for a in algos}
    return out


def applies(measured: dict | None, n: int, hosts: tuple) -> bool:
    return bool(measured) and measured.get("layout") == layout(n, hosts)


def correction(measured: dict, coll: str, algo: str, model) -> "callable | None":
    """The factor (a function of bytes) that turns ``model(bytes)`` into the measured time of
    ``algo``, or None when ``coll``/``algo`` was not measured. It returns math.inf next to a probe
    where the algorithm declined."""
    row = (measured.get(coll) or {}).get(algo)
    if row is None:
        return None
    points = []               # (log2 size, log ratio or None for a decline)
    for size, t in zip(PROBES, row):
        if t is None:
            points.append((math.log2(size), None))
            continue
        m = model(size)
        if m is None or not math.isfinite(m) or m <= 0:
            continue
        points.append((math.log2(size), math.log(max(t, 1e-3) / m)))
    if not points or all(r is None for _, r in points):
        return lambda nbytes: math.inf if points else 1.0

    def factor(nbytes: float) -> float:
        x = math.log2(max(nbytes, PROBES[0]))
        hit = next((r for px, r in points if px == x), False)
        if hit is not False:
            r = hit
        elif x <= points[0][0]:
            r = points[0][1]
        elif x >= points[-1][0]:
            r = points[-1][1]
        else:
            j = next(j for j in range(1, len(points)) if points[j][0] >= x)
            (x0, r0), (x1, r1) = points[j - 1], points[j]
            if r0 is None or r1 is None:
                return math.inf
            r = r0 + (r1 - r0) * (x - x0) / (x1 - x0)
        return math.inf if r is None else math.exp(r)
    return factor
