"""``python -m comms.tune``: time every algorithm on this machine and keep the winners as rules.

    python -m comms.tune -n N [--ops all_reduce,...] [-b 8] [-e 64M] [-f 4] [--rounds 11] [--turn-ms 100] [--dry-run]

Outside a launcher it starts N local ranks of itself through ``comms.run``; under one (RANK and
WORLD_SIZE set) every rank takes part in comms.selection.tune's trials. Rank 0 prints the winners as
rules and, unless ``--dry-run``, writes them into the calibration cache entry of this host signature.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from .config import _size
from .selection.tune import OPS, tune


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
        from .launch.run import launch
        return launch(["-m", "comms.tune", *argv], ns.nproc or len(os.sched_getaffinity(0)))
    os.environ["COMMS_ONLINE_ROUNDS"], os.environ["COMMS_ONLINE_TURN_MS"] = str(ns.rounds), str(ns.turn_ms)
    from . import init
    from .selection.calibrate import save_rules
    comm = init()
    try:
        if not comm.calibration.signature:
            raise SystemExit("comms.tune: calibration is off (COMMS_CALIBRATE=0) or there is one rank: "
                             "nothing to tune for")
        sizes = [s for s in (max(1, ns.minbytes) * ns.stepfactor ** k for k in range(64)) if s <= ns.maxbytes]
        t0 = time.perf_counter()
        rules = tune(comm, ns.ops, sizes)
        choices = comm.online_choices()
        if comm.rank == 0:
            note = f"{time.strftime('%Y-%m-%d %H:%M:%S')}, {ns.rounds} rounds, {time.perf_counter() - t0:.0f} s"
            for c in choices:
                ratios = ", ".join(f"{a} {r:.3f}" for a, r in c["ratios"].items())
                print(f"# {c['key'][0]} {c['key'][1:]}: {c['chosen']} (time / first's: {ratios})")
            print(rules)
            if not ns.dry_run:
                save_rules(comm.calibration.signature, rules, note)
                print(f"# written for {comm.calibration.signature}")
    finally:
        comm.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
