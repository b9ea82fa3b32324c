"""Init time with and without a job secret: ``python -m bench.init_auth [-np 2 4] [--inits 5]``.

For each rank count and transport (auto: shm on this host; tcp: the mesh and its hellos), one
launch without COMMS_AUTH_TOKEN and one with it, alternated ``--launches`` times; each rank times
``--inits`` successive ``comms.init()``/``close()`` pairs (the first one of a launch is dropped: it
pays the imports). Calibration is off (COMMS_CALIBRATE=0), so the figure is the bootstrap itself:
store rounds, transport setup, hellos. Prints, per case, the median over ranks and inits of the
slowest rank's time, in milliseconds.

``--latency``: instead, the 8 B all_reduce after init, with and without the secret, in the same
processes: each rank alternates a communicator without COMMS_AUTH_TOKEN and one with it
``--rounds`` times, timing ``--calls`` calls on each (after 200 untimed); prints the median per
call of each and the median over rounds of the paired ratio (the two of a round run back to back,
under the same load).
"""
from __future__ import annotations

import argparse
import statistics
import time


def _inits(rank: int, size: int, n: int) -> list[float]:
    import comms
    out = []
    for _ in range(n + 1):
        t0 = time.perf_counter()
        comm = comms.init(timeout=60)
        out.append(time.perf_counter() - t0)
        comm.close()
    return out[1:]


def _latency(rank: int, size: int, rounds: int, calls: int) -> list[tuple[float, float]]:
    import os

    import numpy as np

    import comms
    x = np.ones(2, np.float32)                   # 8 B
    out = []
    for _ in range(rounds):
        pair = []
        for token in (False, True):
            if token:
                os.environ["COMMS_AUTH_TOKEN"] = "bench token"
            else:
                os.environ.pop("COMMS_AUTH_TOKEN", None)
            comm = comms.init(timeout=60)
            for _ in range(200):
                comm.all_reduce(x)
            t0 = time.perf_counter()
            for _ in range(calls):
                comm.all_reduce(x)
            pair.append((time.perf_counter() - t0) / calls)
            comm.close()
        out.append(tuple(pair))
    return out


def latency(args) -> None:
    from comms.testing import spawn
    for size in args.np:
        for transport in args.transports:
            env = {"COMMS_TRANSPORT": transport, "COMMS_CALIBRATE": "0", "COMMS_AUTH_TOKEN_FILE": None,
                   "COMMS_AUTH_TOKEN": None}
            per_rank = spawn(_latency, size, timeout=600, args=(args.rounds, args.calls), env=env)
            rounds = [(max(r[i][0] for r in per_rank), max(r[i][1] for r in per_rank)) for i in range(args.rounds)]
            off, on = (statistics.median(r[k] for r in rounds) * 1e6 for k in (0, 1))
            ratio = statistics.median(b / a for a, b in rounds)
            print(f"{size:>5} {transport:>9}  8 B all_reduce: no token {off:.2f} us, token {on:.2f} us, "
                  f"paired token/no token {ratio:.3f} ({args.rounds} rounds x {args.calls} calls, slowest rank)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.init_auth", description=__doc__.split("\n\n")[0])
    ap.add_argument("-np", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--inits", type=int, default=5)
    ap.add_argument("--launches", type=int, default=3)
    ap.add_argument("--transports", nargs="+", default=["auto", "tcp"])
    ap.add_argument("--latency", action="store_true", help="time 8 B all_reduce after init instead")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args(argv)
    if args.latency:
        latency(args)
        return 0
    from comms.testing import spawn
    print(f"{'ranks':>5} {'transport':>9} {'token':>6} {'median ms':>10} {'min ms':>8}  ({args.launches} launches x "
          f"{args.inits} inits, slowest rank of each)")
    for size in args.np:
        for transport in args.transports:
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.launches):
                for token in (False, True):
                    env = {"COMMS_TRANSPORT": transport, "COMMS_CALIBRATE": "0", "COMMS_AUTH_TOKEN_FILE": None,
                           "COMMS_AUTH_TOKEN": "bench token" if token else None}
                    per_rank = spawn(_inits, size, timeout=300, args=(args.inits,), env=env)
                    times[token].extend(max(r[i] for r in per_rank) for i in range(args.inits))
            for token in (False, True):
                t = times[token]
                print(f"{size:>5} {transport:>9} {'yes' if token else 'no':>6} {statistics.median(t) * 1e3:>10.1f} "
                      f"{min(t) * 1e3:>8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
