"""Timed candidates: the cost model corrected by measuring every algorithm at calibration.

The cost model (comms.tuning) prices an algorithm from a few link figures; what it leaves out (how
the scheduler shares two cores among four ranks, a token bucket that lets small bursts through at
wire speed, a plan's own overheads) can make it pick an algorithm that measures slower. So, when a
host signature is calibrated, every rank also runs each registered algorithm of the collectives in
COMMS_TUNE at a grid of message sizes (:data:`PROBES`, 8 B to 32 MiB in steps of 2, as far as
COMMS_TUNE_SECONDS per collective allows); the selection prices with the resulting table as
comms.timed describes.

Contract of :func:`measure` (collective: every rank calls it at the same point of init, with the
same arguments): at each probe every algorithm that does not decline the size is forced in turn
(``set_algo``, as COMMS_ALGO would) and called through the public method on torch CPU tensors, the
way a job calls it (:func:`_calls`; up to :data:`BUFFERS` buffer sets rotated through as a job's
tensors are): one warm-up call per set and one more timed from a barrier, then up to :data:`ROUNDS`
rounds in which each contender runs one turn of ``reps(call)`` back-to-back calls (about
:data:`~comms.rounds.ROUND_S`, as a turn of the bench), each turn started by a barrier and untimed
calls (:func:`~comms.rounds.lead`), the order flipped every round so drift on a busy machine hits
them alike. A round's figure per algorithm is the slowest rank's mean time per call in its turn
(every rank gets the same figures from a MAX all_reduce, so every rank makes the same decisions);
after each round the algorithms far behind the fastest stop being timed at this probe
(:func:`~comms.rounds.contenders`), and the figures pair the algorithms round by round
(:func:`~comms.rounds.figures`). A turn's mean, not a per-call median or minimum: a job's time is
the sum of its collectives' times, tails included (with more ranks than cores, an algorithm whose
typical call is fast can still lose by its stalls; the median round, the figure before, left them
out and priced direct within 7 % of recursive doubling at 8 KiB on 4 ranks sharing 2 cores where
the bench's means put it 11-19 % behind). The calls are real collectives (matched and checked like
any other), taking sequence numbers 1, 2, ...; the caller resets the numbering once every rank is
done, so the user's first collective is number 1, and init's rules are restored. Call counts come
from the slowest rank's time per call (the timed warm-up's, then the latest round's), so every rank
runs the same calls. Rank 0 combines the ranks' tables with comms.timed.combine (the slowest rank's
figure per entry).
"""
from __future__ import annotations

import math
import time

import numpy as np

from . import log as clog
from .algorithms.plan import NotSupported
from .dtypes import ReduceOp
from .rounds import PRUNE_RATIO, contenders, doubtful, figures, lead, reps, settle_calls
from .timed import PROBES, layout

log = clog.get("TUNING")
ROUNDS = 6                                       # timed rounds of a probe's contenders, in
PASSES = 3                                       # this many sweeps over the probes
FIRST_SWEEP = 0.6                                # share of COMMS_TUNE_SECONDS the first sweep may use
CONFIRM_ROUNDS = 6                               # rounds more for a probe in doubt (rounds.doubtful)
BUFFERS, POOL_BYTES = 4, 64 << 20                # buffer sets rotated through, bounded in bytes
PRUNE_FROM = 512 << 10                           # from this probe on, PRUNE_RATIO behind the fastest...
PRUNE_AFTER = 2                                  # ...at this many probes in a row: not timed at larger ones


def _args(comm, coll: str, nbytes: int):
    """(Args, input elements, output elements) of a float32 ``coll`` whose selector size is ``nbytes``."""
    from .algorithms.plan import Args
    n, es = comm.size, 4
    common = dict(hosts=comm._hosts(), deterministic=comm._deterministic, board=comm._board)
    if coll in ("all_reduce", "broadcast"):
        c = max(1, nbytes // es)
        return Args(coll, comm.rank, n, c, es, root=0 if coll == "broadcast" else -1, inplace=True, **common), c, c
    blk = max(1, nbytes // (es * (n - 1)))      # elements per block: the selector counts n - 1 blocks
    if coll == "all_gather":
        return Args(coll, comm.rank, n, blk, es, **common), blk, n * blk
    if coll == "reduce_scatter":
        return Args(coll, comm.rank, n, blk, es, **common), n * blk, blk
    if coll == "all_to_all":
        splits = (blk * es,) * n
        return Args(coll, comm.rank, n, 0, es, send_splits=splits, recv_splits=splits, **common), n * blk, n * blk
    raise ValueError(f"cannot time {coll}")


def _calls(comm, coll: str, nin: int, nout: int) -> list:
    """One zero-argument call of ``coll`` per buffer set (up to :data:`BUFFERS`, rotated through as
    a job's tensors are, and the bench's): the public method on torch CPU tensors, the way a job
    calls it. The per-call work around the plan matters where ranks share cores: a rank busy in
    Python is a peer the others wait for, and a wait that outlasts its spin sleeps and pays a
    wake-up. On 4 ranks on 2 cores a 128 KiB all_reduce took 70-88 us a call through the engine
    alone and 103-158 us through ``all_reduce(tensor)``, and the two ranked ring and rhd apart."""
    import torch
    out = []
    for _ in range(max(1, min(BUFFERS, POOL_BYTES // (4 * max(nin + nout, 1))))):
        inp = torch.zeros(max(1, nin))              # zeros: a SUM in place stays finite; touched: no page faults
        res = inp if coll in ("all_reduce", "broadcast") else torch.zeros(max(1, nout))
        if coll == "all_reduce":
            out.append(lambda b=inp: comm.all_reduce(b))
        elif coll == "broadcast":
            out.append(lambda b=inp: comm.broadcast(b, 0))
        else:
            out.append(lambda f=getattr(comm, coll), o=res, i=inp: f(o, i))
    return out


def _over_budget(comm, t_start: float, t_size: float, budget_s: float, growth: float) -> bool:
    """Collective: True when the next probe (about ``growth`` times the last one's time, since it
    moves that many times the bytes) would end past ``budget_s`` seconds of timing on the slowest
    rank. The ranks agree through a MAX all_reduce of their clocks, so all of them stop at the same
    probe."""
    now = time.perf_counter()
    clocks = np.array([now - t_start, now - t_size], np.float64)
    comm.all_reduce(clocks, op=ReduceOp.MAX)
    return clocks[0] + growth * clocks[1] > budget_s


class _Probe:
    """One (collective, size) of the sweep: its contenders, their call counts and round figures."""

    def __init__(self, comm, coll: str, nbytes: int, names: list, dropped: set):
        from .selector import build
        self.comm, self.coll, self.nbytes = comm, coll, nbytes
        self.args, self.nin, self.nout = _args(comm, coll, nbytes)
        self.order = []
        for a in names:
            if a in dropped:
                continue
            try:
                build(self.args, a)      # one that declines is not forced (the next candidate would run)
            except NotSupported:
                continue
            self.order.append(a)
        self.alive = list(self.order)
        self.means: dict = {a: [] for a in self.order}
        # each algorithm's latest time per call in s (the slowest rank's, so the same on every
        # rank), which sizes its turns (reps) and their lead-in (lead): first the timed warm-up's,
        # then each round's own. A single first call stands for a turn badly: on 2 hosts x 2 ranks
        # at 2 Gbit/s the warm-up call of a 16 KiB recursive doubling took some ms (skew,
        # connections), so its turns ran a few dozen calls, inside the link's 1 MB burst allowance,
        # and it timed 98 us a call against the 132 us it sustains, ahead of hierarchical (which
        # the bench measures 1.16x faster there)
        self.call_s: dict = {}

    def run(self, rounds: int, narrow: bool = True, settle: bool = False) -> None:
        """``rounds`` more rounds of the contenders (the first call also warms up and sets the call
        counts), narrowing them after each round (with ``narrow``); with ``settle`` (the ranks were
        just moved to other CPUs), about :data:`~comms.rounds.SETTLE_S` of untimed calls first
        (:func:`~comms.rounds.settle_calls`)."""
        comm, coll = self.comm, self.coll
        calls = _calls(comm, coll, self.nin, self.nout)
        if not self.call_s:
            warm = np.zeros(len(self.order), np.float64)
            for i_a, a in enumerate(self.order):
                comm.set_algo(f"{coll}:{a}")
                for call in calls:                 # warm-up: the plan, connections, pages, caches
                    call()
                comm.barrier()                     # then one call per set from a common start
                t0 = time.perf_counter()
                for call in calls:
                    call()
                warm[i_a] = (time.perf_counter() - t0) / len(calls)
            comm.all_reduce(warm, op=ReduceOp.MAX)                # every rank runs the same counts
            self.call_s = {a: float(w) for a, w in zip(self.order, warm)}
        for r in range(rounds):
            done = max((len(v) for v in self.means.values()), default=0)      # rounds so far
            turns = self.alive if done % 2 == 0 else self.alive[::-1]
            if settle and r == 0:
                comm.set_algo(f"{coll}:{turns[0]}")
                comm.barrier()
                for j in range(settle_calls(self.call_s[turns[0]])):
                    calls[j % len(calls)]()
            got = np.zeros(len(turns), np.float64)
            for i_a, a in enumerate(turns):
                k = reps(self.call_s[a])
                comm.set_algo(f"{coll}:{a}")
                comm.barrier()            # every rank starts the turn together, not skewed by the last...
                for j in range(lead(self.call_s[a])):   # ...and neither the barrier's skew, the plan's build
                    calls[-1 - j % len(calls)]()     # nor a link's burst allowance is timed (lead())
                t0 = time.perf_counter()
                for j in range(k):
                    calls[j % len(calls)]()
                got[i_a] = (time.perf_counter() - t0) / k * 1e6
            comm.all_reduce(got, op=ReduceOp.MAX)         # the slowest rank's round: every rank alike
            got_of = dict(zip(turns, got))
            self.call_s.update({a: float(t) * 1e-6 for a, t in got_of.items()})
            for a in self.order:              # None: not timed in this round (the rounds stay aligned)
                self.means[a].append(float(got_of[a]) if a in got_of else None)
            if narrow:
                self.alive = contenders(self.means, self.alive, done + 1)


def measure(comm, colls: list[str], budget_s: float = math.inf) -> dict:
    """This rank's figures: {"layout": [size, [ranks per host]], coll: {algo: [µs per probe, or
    None where the algorithm declined or was dropped], as long as the probes reached]}} (see the
    module docstring). The rounds of a probe are spread over :data:`PASSES` sweeps of the sizes, so
    that they lie seconds apart: this VM moves between states that last 2 to 5 s, in which the
    algorithms do not all slow down alike (on 4 ranks sharing 2 cores, a calibration that met one
    from 512 B to 1 MiB timed direct fastest at 32 KiB and ring at 64 KiB, which the bench measured
    37 % and 58 % behind rhd); rounds from several sweeps outvote one state in
    :func:`~comms.rounds.figures`.
    Where a host has more ranks than CPUs and they share them unbound, each sweep pins its ranks in
    another placement (:func:`_placements`), since the scheduler's placement of a launch decides
    which algorithm wins there; every rank gets its own CPUs back at the end.
    A probe with a single contender left is not timed again. In the first sweep, from
    :data:`PRUNE_FROM` up, an algorithm more than :data:`~comms.rounds.PRUNE_RATIO` times the
    fastest at :data:`PRUNE_AFTER` probes in a row is not timed at larger probes, and is then not
    chosen there (one disturbed probe of two rounds dropped hierarchical on 2 hosts x 2 ranks, the
    fastest from 1 MiB up by 1.5x). The first sweep stops, on every rank alike, before a probe that would end
    past :data:`FIRST_SWEEP` of ``budget_s`` seconds (per collective), each later one before a
    probe that would start past its share of the rest (sweep 2 of 3 at 80 %, the last at 100 %, so
    every placement is timed on a short budget too); the correction is held constant from the last
    probe up."""
    from . import algorithms
    out: dict = {"layout": layout(comm.size, comm._hosts())}
    per_sweep = max(1, ROUNDS // PASSES)
    place = _placements(comm)
    # a move is followed by untimed calls (settle_calls), which are collectives: where some hosts
    # move their ranks and others do not (another CPU count, a user's binding), every rank settles
    # alike, those that stay put through a place() that does nothing
    anyone = np.array([1.0 if place else 0.0])
    comm.all_reduce(anyone, op=ReduceOp.MAX)
    if anyone[0] and place is None:
        place = _stay
    try:
        for coll in colls:
            out[coll] = _sweeps(comm, coll, list(algorithms.REGISTRY[coll]), budget_s, per_sweep, place)
    finally:
        if place:
            place(None)
    comm.set_algo(None)                        # init's rules again
    comm._scratch = np.empty(0, np.uint8)      # the probes' scratch is not the user's
    comm._scratch_ptr = 0
    return out


def _stay(k) -> None:
    """place(k) of a rank whose host does not move its ranks while others' do (see measure)."""


def _placements(comm):
    """None, or ``place(k)`` that moves this rank to its CPU in placement k of its host's ranks
    (comms.binding.arrangement; None: back to its own CPUs), where the host has more ranks than
    CPUs and its ranks share them unbound (a user's binding is kept as it is)."""
    import os
    from .binding import arrangement
    topo = comm.topology
    host = topo.hosts[topo.host_of[comm.rank]]
    try:
        cpu_sets = [tuple(comm._boot.peers[r].extra["topology"]["cpus"]) for r in host.ranks]
        mine = os.sched_getaffinity(0)
    except (AttributeError, KeyError, OSError):
        return None
    if len(set(cpu_sets)) != 1 or not 2 <= len(cpu_sets[0]) < len(host.ranks):
        return None
    where = topo.local_index[comm.rank]

    def place(k):
        try:
            os.sched_setaffinity(0, mine if k is None else {arrangement(k, len(host.ranks), cpu_sets[0])[where]})
        except OSError:
            pass
    return place


def _sweeps(comm, coll: str, names: list, budget_s: float, per_sweep: int, place) -> dict:
    """One collective's table (see :func:`measure`)."""
    comm.barrier()                # the budget's clock starts when every rank is here
    t_start = t_size = time.perf_counter()
    probes: list[_Probe] = []
    dropped: set = set()          # far behind at large probes: not timed at larger ones
    behind: dict = {}             # algorithm -> consecutive large probes it was far behind at
    if place:
        place(0)
    for i, nbytes in enumerate(PROBES):
        if i and _over_budget(comm, t_start, t_size, FIRST_SWEEP * budget_s, nbytes / PROBES[i - 1]):
            log.info("comms: timed %s up to %d B (COMMS_TUNE_SECONDS=%g)", coll, PROBES[i - 1], budget_s)
            break
        t_size = time.perf_counter()
        probe = _Probe(comm, coll, nbytes, names, dropped)
        probe.run(per_sweep)
        probes.append(probe)
        fig = figures(probe.means)
        if nbytes >= PRUNE_FROM and fig:
            # the figures are the slowest rank's, the same on every rank: they all drop the same ones
            for a in fig:
                behind[a] = behind.get(a, 0) + 1 if fig[a] > PRUNE_RATIO * min(fig.values()) else 0
            dropped |= {a for a, c in behind.items() if c >= PRUNE_AFTER}
    cut = False
    for sweep in range(1, PASSES):
        moved = bool(place)                # the next probe timed settles first (settle_calls)
        if place:
            place(sweep)
        rounds = per_sweep if sweep < PASSES - 1 else ROUNDS - per_sweep * (PASSES - 1)
        until = budget_s * (FIRST_SWEEP + (1.0 - FIRST_SWEEP) * sweep / (PASSES - 1))
        for probe in probes:
            if len(probe.alive) < 2:
                continue
            if _over_budget(comm, t_start, t_size, until, 0.0):
                log.info("comms: %s: sweep %d stopped before %d B (COMMS_TUNE_SECONDS=%g)", coll, sweep + 1,
                         probe.nbytes, budget_s)
                cut = True
                break
            probe.run(rounds, settle=moved)
            moved = False
    if not cut:
        _confirm(comm, coll, probes, t_start, t_size, budget_s, place)
    log.info("comms: timed %s in %.1f s: %d probes to %d B, rounds per probe %s", coll, time.perf_counter() - t_start,
             len(probes), probes[-1].nbytes if probes else 0,
             " ".join(str(max((sum(x is not None for x in v) for v in p.means.values()), default=0)) for p in probes))
    table: dict = {a: [] for a in names}
    for probe in probes:
        fig = figures(probe.means)
        for a in names:
            table[a].append(round(fig[a], 3) if a in fig else None)
    return table


def _confirm(comm, coll: str, probes: list, t_start: float, t_size: float, budget_s: float, place) -> None:
    """A last sweep of :data:`CONFIRM_ROUNDS` more rounds at the probes whose order is in doubt
    (:func:`~comms.rounds.doubtful`), within the budget. Each round visits those probes, the
    closest calls first, in one placement of the ranks (round r in placement r mod :data:`PASSES`,
    so that none of them outweighs the others; the first probe after a move settles first, see
    :func:`~comms.rounds.settle_calls`), so the rounds of a probe lie seconds apart, as the sweeps'
    do. Where two algorithms cross over, or sit within a few per cent of each other, six rounds on
    a busy machine leave the order to chance (4 ranks on 2 cores, 64 KiB: recursive doubling and
    rhd timed 151.8 and 153.9 us, the bench measured them 1.11x apart; its rounds' ratios spread by
    12-19 %), and a figure out of line with its neighbours is most often a spell of the machine:
    the neighbours' winner gets rounds too."""
    figs = [figures(p.means) for p in probes]
    todo = [(p, doubtful(figs, i), figs[i]) for i, p in enumerate(probes)]
    # the closest calls first: the budget may not reach them all
    todo = sorted((t for t in todo if t[1]), key=lambda t: sorted(t[2][a] for a in t[1])[1] / min(t[2].values()))
    for probe, algos, _ in todo:
        probe.alive = [a for a in probe.order if a in algos]
    for r in range(CONFIRM_ROUNDS):
        if place:
            place(r % PASSES)
        for i, (probe, _, _) in enumerate(todo):
            if _over_budget(comm, t_start, t_size, budget_s, 0.0):
                log.info("comms: %s: confirmation stopped in round %d before %d B (COMMS_TUNE_SECONDS=%g)", coll,
                         r + 1, probe.nbytes, budget_s)
                return
            probe.run(1, narrow=False, settle=bool(place) and i == 0)
