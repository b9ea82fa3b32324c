"""Soak: a long run of mixed collectives with checksums, watching for wrong results and for growth.

    python -m bench.soak [-n 4] [--ops 100000] [--warmup 2000] [--small] [--json FILE]

``n`` ranks (comms.testing.spawn, one host) run operations 0 .. ops-1 of bench.mixed: all_reduce,
all_gather, broadcast, reduce_scatter and all_to_all in a deterministic mix of element types and
sizes (1 to 16384 elements per rank's block; ``--small``: up to 1024), each result checked whole
against the exact reference. Every rank samples its resident memory (VmRSS) and its open fds after
the warm-up and at ten points after, the last at the end. Reported: wrong results (must be 0), per
rank the samples after warm-up and at the end and their growth (must stay under 5 %), the op rate
and the run time. Exit status 0 when nothing was wrong and nothing grew by 5 % or more.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

GROWTH_BAR = 0.05


def _rank(rank: int, size: int, ops: int, warmup: int, big: bool) -> dict:
    import comms
    from bench.mixed import run_op, vm
    comm = comms.init()
    wrong, per_op, samples = [], {}, []
    marks = {warmup + (ops - warmup) * i // 10 for i in range(1, 10)}
    t0 = time.perf_counter()
    for k in range(ops):
        if k == warmup:
            comm.barrier()
            samples.append((k, *vm()))
            t0 = time.perf_counter()
        elif k in marks:
            samples.append((k, *vm()))
        ok, op = run_op(comm, k, big)
        per_op[op] = per_op.get(op, 0) + 1
        if not ok:
            wrong.append((k, op))
    comm.barrier()
    seconds = time.perf_counter() - t0
    samples.append((ops, *vm()))
    comm.close()
    return {"rank": rank, "wrong": len(wrong), "first_wrong": wrong[:20], "per_op": per_op, "samples": samples,
            "seconds": seconds}


def growth(samples: list) -> tuple[float, float]:
    """(VmRSS growth, fd growth) from the first sample (after warm-up) to the last, as fractions."""
    (_, rss0, fd0), (_, rss1, fd1) = samples[0], samples[-1]
    return (rss1 - rss0) / rss0, (fd1 - fd0) / fd0


def soak(n: int, ops: int, warmup: int, big: bool = True, timeout: float = 3600.0) -> dict:
    """Run the soak; the summary as a dict (``ok``: no wrong result, no growth of 5 % or more)."""
    from comms.testing import spawn

    import bench.soak as me                     # by its module name: the ranks unpickle it there
    warmup = min(warmup, ops // 2)
    t0 = time.perf_counter()
    out = spawn(me._rank, n, timeout=timeout, args=(ops, warmup, big),
                env={"COMMS_TIMEOUT": "120"})
    wall = time.perf_counter() - t0
    ranks = []
    for o in out:
        rss, fds = growth(o["samples"])
        ranks.append({"rank": o["rank"], "wrong": o["wrong"], "first_wrong": o["first_wrong"],
                      "rss_kib": [o["samples"][0][1], o["samples"][-1][1]],
                      "fds": [o["samples"][0][2], o["samples"][-1][2]],
                      "rss_growth": rss, "fd_growth": fds, "samples": o["samples"]})
    measured = max(o["seconds"] for o in out)
    summary = {"ranks": n, "ops": ops, "warmup": warmup, "big": big, "wrong": sum(r["wrong"] for r in ranks),
               "per_op": out[0]["per_op"], "seconds_after_warmup": measured,
               "ops_per_s": (ops - warmup) / measured if measured > 0 else 0.0, "wall_s": wall,
               "max_rss_growth": max(r["rss_growth"] for r in ranks),
               "max_fd_growth": max(r["fd_growth"] for r in ranks), "per_rank": ranks}
    summary["ok"] = (summary["wrong"] == 0 and summary["max_rss_growth"] < GROWTH_BAR
                     and summary["max_fd_growth"] < GROWTH_BAR)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=4)
    p.add_argument("--ops", type=int, default=100_000)
    p.add_argument("--warmup", type=int, default=2000)
    p.add_argument("--small", action="store_true", help="blocks of at most 1024 elements")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    s = soak(args.n, args.ops, args.warmup, big=not args.small)
    print(f"# bench.soak: {s['ranks']} ranks, {s['ops']} mixed collectives ({s['warmup']} warm-up), "
          f"per collective: {s['per_op']}")
    print(f"# wrong results: {s['wrong']}; run time {s['wall_s']:.1f} s "
          f"({s['seconds_after_warmup']:.1f} s after warm-up, {s['ops_per_s']:.0f} ops/s)")
    print(f"# {'rank':>4} {'VmRSS KiB (warm, end)':>24} {'growth':>8} {'fds (warm, end)':>16} {'growth':>8}")
    for r in s["per_rank"]:
        print(f"  {r['rank']:>4} {r['rss_kib'][0]:>11} {r['rss_kib'][1]:>12} {r['rss_growth']:>8.2%} "
              f"{r['fds'][0]:>7} {r['fds'][1]:>8} {r['fd_growth']:>8.2%}")
        if r["first_wrong"]:
            print(f"       first wrong (op, collective): {r['first_wrong']}")
    print(f"# {'OK' if s['ok'] else 'FAILED'}: bars are 0 wrong and growth < {GROWTH_BAR:.0%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(s, f, indent=1)
    return 0 if s["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
