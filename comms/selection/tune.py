"""``python -m comms.tune``: time every algorithm on this machine and keep the winners as rules.

    python -m comms.tune -n N [--ops all_reduce,...] [-b 8] [-e 64M] [-f 4] [--rounds 11] [--turn-ms 100] [--dry-run]

Outside a launcher it starts N local ranks of itself through ``comms.run``; under one (RANK and
WORLD_SIZE set) every rank takes part. For each op and size it makes the op's calls under a rule
naming the :func:`candidates`, with online timing on (comms.selection.online, the one timing
mechanism), until the trial decides. Rank 0 prints the winners as rules (each covering its size up
to the next one's) and, unless ``--dry-run``, writes them into the calibration cache entry of this
host signature, which holds the host layout; later inits there use them after the user's rules and
before the model's (comms.selection.rules).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

from ..config import _size
from .model import ranges

GROSS = 2.0              # a candidate moves and reduces its bytes in at most this times the time the
#                          frugalest one does. #25 saw a pick that moved 2.7x the inter-host bytes win
#                          one calibration's timing; the step latencies are left to the timing, since
#                          on ranks sharing cores the calibrated one moved 2-37x between fresh
#                          calibrations (2 simulated hosts x 2 ranks, shared CPUs: shm 2.3-84.6 us)
OPS = ("all_reduce", "broadcast", "all_gather", "reduce_scatter", "all_to_all")
MAX_CALLS = 200_000      # per size: 7 algorithms x 11 rounds x at most 960 calls a turn (100 ms turns) is ~74,000


def _caller(comm, op: str, nbytes: int):
    """A call of ``op`` whose selector message size is about ``nbytes``, and that size."""
    n = comm.size
    if op in ("all_reduce", "broadcast"):
        buf = np.ones(max(1, nbytes // 4), np.float32)
        return (lambda: comm.all_reduce(buf)) if op == "all_reduce" else (lambda: comm.broadcast(buf, 0)), buf.nbytes
    per = max(1, nbytes // 4 // (n - 1))
    part, whole = np.ones(per, np.float32), np.ones(per * n, np.float32)
    if op == "all_gather":
        return (lambda: comm.all_gather(whole, part)), part.nbytes * (n - 1)
    if op == "reduce_scatter":
        return (lambda: comm.reduce_scatter(part, whole)), part.nbytes * (n - 1)
    out = np.empty_like(whole)
    return (lambda: comm.all_to_all_single(out, whole)), part.nbytes * (n - 1)


def candidates(comm, op: str, nbytes: int) -> list[str]:
    """The algorithms the model does not call grossly worse at ``nbytes``, cheapest first (the
    model's pick stays on ties): those whose bytes take at most GROSS times the least any takes
    (the price without step latencies), or less than the cheapest's whole price (latency decides
    there). A timing never picks what puts far more bytes on a link, and judges the gaps that are
    step latency alone: on 2 simulated hosts x 2 ranks sharing 2 CPUs, rhd, priced 1.7-2.0x
    recursive doubling at 512 B (twice its steps; the price moved with the calibration), measured
    0.90x its time."""
    from .. import algorithms
    prices = {a: comm.price(op, a, nbytes) for a in algorithms.names(op)}
    data = {a: comm.price(op, a, nbytes, steps=False) for a in prices}
    least, cheapest = min(data.values()), min(prices.values())
    keep = (a for a, t in prices.items() if math.isfinite(t) and (data[a] <= GROSS * least or data[a] < cheapest))
    return sorted(keep, key=prices.get)


def sweep(comm, op: str, sizes: list[int]) -> tuple[list[int], list[str]]:
    """Collective: the trial's winner at each size, as (selector sizes, picks)."""
    done, picks, at = comm.online_decided(), [], []
    for nbytes in sizes:
        call, m = _caller(comm, op, nbytes)
        if at and m <= at[-1]:
            continue
        names = candidates(comm, op, m)
        comm.set_algo(f"{op}:{m}-{m + 1}:{'|'.join(names)}")
        for _ in range(MAX_CALLS if len(names) > 1 else 1):
            call()
            if comm.online_decided() > done:      # not online_choices(): it builds a list per call
                break
        else:
            if len(names) > 1:
                raise RuntimeError(f"comms.tune: {op} of {m} B did not decide in {MAX_CALLS} calls")
        choices = comm.online_choices()
        picks.append(choices[-1]["chosen"] if len(choices) > done else comm.algorithm_ran(op, m))
        done = len(choices)
        at.append(m)
    comm.set_algo(None)
    return at, picks


def _parse(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m comms.tune", description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--nproc", type=int, default=None, help="ranks to start (outside a launcher)")
    ap.add_argument("--ops", default="all_reduce", help=f"comma-separated, of {', '.join(OPS)}")
    ap.add_argument("-b", "--minbytes", default="8")
    ap.add_argument("-e", "--maxbytes", default="64M")
    ap.add_argument("-f", "--stepfactor", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=11, help="rounds of each trial (COMMS_ONLINE_ROUNDS; default 11: "
                    "on 2 simulated hosts sharing 2 CPUs, 5 rounds put direct ahead of recursive doubling at 32 B and "
                    "512 B, 0.80-0.96x, where the bench measured it 1.3-1.5x behind)")
    ap.add_argument("--turn-ms", type=float, default=100.0, help="length of one turn (COMMS_ONLINE_TURN_MS); "
                    "default 100: a token bucket's credit and the scheduler's ticks average out")
    ap.add_argument("--dry-run", action="store_true", help="print the rules, do not write them")
    ns = ap.parse_args(argv)
    ns.ops = [o.strip() for o in ns.ops.split(",") if o.strip()]
    bad = [o for o in ns.ops if o not in OPS]
    if bad or ns.stepfactor < 2 or ns.rounds < 1:
        ap.error(f"unknown ops {bad}" if bad else "need -f >= 2 and --rounds >= 1")
    ns.minbytes, ns.maxbytes = _size(ns.minbytes), _size(ns.maxbytes)
    return ns


def main(argv: list[str] | None = None) -> int:
    """The command line above; 0 when the rules were printed (and written)."""
    argv = sys.argv[1:] if argv is None else argv
    ns = _parse(argv)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        from ..launch.run import launch
        return launch(["-m", "comms.tune", *argv], ns.nproc or len(os.sched_getaffinity(0)))
    os.environ["COMMS_ONLINE_ROUNDS"], os.environ["COMMS_ONLINE_TURN_MS"] = str(ns.rounds), str(ns.turn_ms)
    from .. import init
    from .calibrate import save_rules
    comm = init()
    try:
        if not comm.calibration.signature:
            raise SystemExit("comms.tune: calibration is off (COMMS_CALIBRATE=0) or there is one rank: "
                             "nothing to tune for")
        sizes = [s for s in (max(1, ns.minbytes) * ns.stepfactor ** k for k in range(64)) if s <= ns.maxbytes]
        t0, rules = time.perf_counter(), []
        for op in ns.ops:
            rules += ranges(op, *sweep(comm, op, sizes))
        choices = comm.online_choices()
        if comm.rank == 0:
            note = f"{time.strftime('%Y-%m-%d %H:%M:%S')}, {ns.rounds} rounds, {time.perf_counter() - t0:.0f} s"
            for c in choices:
                ratios = ", ".join(f"{a} {r:.3f}" for a, r in c["ratios"].items())
                print(f"# {c['key'][0]} {c['key'][1:]}: {c['chosen']} (time / first's: {ratios})")
            print("#".join(rules))
            if not ns.dry_run:
                save_rules(comm.calibration.signature, "#".join(rules), note)
                print(f"# written for {comm.calibration.signature}")
    finally:
        comm.close()
    return 0
