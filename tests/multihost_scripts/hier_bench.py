"""all_reduce timing across simulated hosts, for comparing algorithms (COMMS_ALGO) on one link.

    COMMS_ALGO=all_reduce:ring python tests/multihost.py --hosts 2 --ranks 2 --rate 2gbit \\
        -- tests/multihost_scripts/hier_bench.py [--size 16M] [--iters 10] [--warmup 3]

Every rank fills a float32 buffer (its rank + 1), all_reduces it and checks the sum; each
iteration starts after a barrier and its time is the slowest rank's. Rank 0 prints one line:

    hier_bench: all_reduce 16 MiB float32 4 ranks 2 hosts algo=ring COMMS_ALGO=all_reduce:ring median 123.4 ms ...

(``algo`` is the algorithm the communicator actually ran, from its flight record).
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

import comms
from comms.config import _size


def main() -> None:
    ap = argparse.ArgumentParser(description="all_reduce timing (median of --iters after --warmup)")
    ap.add_argument("--size", default="16M", help="bytes per rank, K/M/G suffixes (default 16M)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    with comms.init(timeout=120) as comm:
        n = _size(args.size) // 4
        buf = np.empty(n, np.float32)
        want = float(sum(range(1, comm.size + 1)))
        times = []
        for i in range(args.warmup + args.iters):
            buf.fill(comm.rank + 1)
            comm.barrier()
            t0 = time.perf_counter()
            comm.all_reduce(buf)
            dt = time.perf_counter() - t0
            if buf[0] != want or buf[-1] != want or not np.all(buf == want):
                raise SystemExit(f"rank {comm.rank}: wrong all_reduce result (want {want})")
            if i >= args.warmup:
                times.append(dt)
        t = np.array(times)
        comm.all_reduce(t, op=comms.MAX)              # each iteration takes as long as its slowest rank
        record = [r for r in comm.flight_record() if r.get("op") == "all_reduce" and r.get("count") == n]
        algo = record[-1].get("algorithm", "?") if record else "?"
        hosts = len({x for x in _hostnames(comm)})
        if comm.rank == 0:
            med = float(np.median(t))
            nbytes = n * 4
            busbw = 2 * (comm.size - 1) / comm.size * nbytes / med / 1e9
            print(f"hier_bench: all_reduce {nbytes / 2**20:g} MiB float32 {comm.size} ranks {hosts} hosts "
                  f"algo={algo} COMMS_ALGO={os.environ.get('COMMS_ALGO', '')} median {med * 1e3:.1f} ms "
                  f"min {t.min() * 1e3:.1f} max {t.max() * 1e3:.1f} ms over {args.iters} iters "
                  f"algbw {nbytes / med / 1e9:.3f} GB/s busbw {busbw:.3f} GB/s", flush=True)


def _hostnames(comm) -> list[bytes]:
    import socket
    mine = np.frombuffer(socket.gethostname().encode()[:64].ljust(64, b"\0"), np.uint8).copy()
    out = np.zeros(64 * comm.size, np.uint8)
    comm.all_gather(out, mine)
    return [out[i * 64:(i + 1) * 64].tobytes() for i in range(comm.size)]


if __name__ == "__main__":
    main()
