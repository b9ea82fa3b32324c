"""How fast a failure is known everywhere, and what going on costs: the control plane's figures.

    python -m bench.failover [-n 4] [--launches 5] [--how kill,stop] [--transport auto|tcp]

Each launch starts ``n`` ranks at COMMS_TIMEOUT=300. After a first all_reduce, the last rank is
killed (SIGKILL) or stopped (SIGSTOP) while the others block in receives from each other, not from
it. Reported per launch, for the slowest survivor:

* ``known``: from the victim's signal to the survivor's PeerError (the clock is the machine's);
* ``shrink``: the survivors' comm.shrink() (agreement and the new communicator's init);
* ``first``: the first all_reduce of 1 MiB on the shrunk communicator.

The table is the median over launches, with the worst launch beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time

import numpy as np


def _rank(rank: int, size: int, how: str) -> dict:
    import comms
    comm = comms.init()
    victim = size - 1
    x = np.ones(4, np.float32)
    comm.all_reduce(x)
    comm.barrier()
    if rank == victim:
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        time.sleep(600)
    hit = time.time() + 0.2            # when the victim signals itself, give or take the barrier's skew
    try:
        comm.recv(x, (rank + 1) % (size - 1) if size > 2 else victim)
        return {"error": "no error"}
    except comms.PeerError:
        known = time.time() - hit
    t0 = time.perf_counter()
    new = comm.shrink()
    shrink = time.perf_counter() - t0
    y = np.ones(1 << 18, np.float32)
    t0 = time.perf_counter()
    new.all_reduce(y)
    first = time.perf_counter() - t0
    if rank == 0 and how == "stop":
        os.kill(comm._boot.peers[victim].pid, signal.SIGKILL)
    comm.close()
    new.close()
    return {"known": known, "shrink": shrink, "first": first, "ok": bool(y[0] == size - 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=4)
    p.add_argument("--launches", type=int, default=5)
    p.add_argument("--how", default="kill,stop")
    p.add_argument("--transport", default="auto")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from comms.testing import RankFailed, spawn

    import bench.failover as me              # by its module name: the ranks unpickle it there
    env = {"COMMS_TIMEOUT": "300", "COMMS_TRANSPORT": args.transport}
    rows = {}
    for how in args.how.split(","):
        runs = []
        for _ in range(args.launches):
            try:
                out = spawn(me._rank, args.n, timeout=120, args=(how,), env=env)
            except RankFailed as e:
                out = [e.results[r] for r in sorted(e.results)]
            if len(out) != args.n - 1 or not all("known" in o and o["ok"] for o in out):
                print(f"# {how}: a launch failed: {out}", file=sys.stderr)
                continue
            runs.append({k: max(o[k] for o in out) for k in ("known", "shrink", "first")})
        rows[how] = runs
    print(f"# bench.failover: {args.n} ranks, transport {args.transport}, COMMS_TIMEOUT=300, "
          f"{args.launches} launches; slowest survivor per launch; median (worst)")
    print(f"# {'failure':<8} {'known (s)':>16} {'shrink (s)':>16} {'first 1 MiB (ms)':>18}  launches")
    for how, runs in rows.items():
        if not runs:
            print(f"  {how:<8} {'-':>16}")
            continue
        cell = [f"{statistics.median(r[k] for r in runs) * m:.3f} ({max(r[k] for r in runs) * m:.3f})"
                for k, m in (("known", 1), ("shrink", 1), ("first", 1e3))]
        print(f"  {how:<8} {cell[0]:>16} {cell[1]:>16} {cell[2]:>18}  {len(runs)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": args.n, "transport": args.transport, "runs": rows}, f, indent=1)
    return 0 if all(rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
