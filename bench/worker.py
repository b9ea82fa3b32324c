"""Rank-side loop of one launch: ``python -m comms.run -n N -m bench.worker --backend B --sizes ... --out F``.

Per launch: create the backend, allocate a pool of up to :data:`MAX_BUFFERS` buffer sets (bounded
by :data:`POOL_BYTES` over all ranks) and touch them, warm the op up once, then for every size:

1. barrier;
2. warm-up ops (untimed for the figure, but timed individually to estimate the cost of one op);
3. iteration count: ``-n`` when given; 2000 ops at 8 B and below; otherwise enough ops for about
   ``--target-time`` seconds (from the warm-up ops' mean), clamped to [:data:`MIN_SAMPLES` samples,
   :data:`MAX_ITERS`]. Ranks agree on the slowest rank's estimate, so all run the same count;
4. timed loop: ops rotate over the buffer sets; each op is timed with ``time.perf_counter``; the
   rank's figure is the median per-op time. With ``--batch N`` (N > 1), sizes below
   :data:`BATCH_BELOW` are timed in batches of N ops instead, each batch giving one sample (its
   mean). Per-op timing is the default: it costs about 0.1 us per op, and batch means of an op with
   a bimodal time (one that sleeps in the kernel on a busy machine) sit well above its median,
   which would put a step into the curve at BATCH_BELOW;
5. check (``--check 1``), outside the timed loop: one more op on fresh exact inputs
   (:mod:`bench.ops`), counting wrong elements.

Finally one float64 all_reduce gathers every rank's (median, min, wrong, iters) per size, and
rank 0 writes the launch's JSON: the figure per size is the slowest rank's median.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from . import backends, ops

TINY_BYTES, TINY_ITERS = 8, 2000     # the anchors' method: 8 B uses 2000 timed ops
BATCH_BELOW = 64 << 10               # --batch applies below this size
SMALL_WARMUP = 50                    # default warm-up ops below BATCH_BELOW
MIN_SAMPLES = 5                      # at least this many timed samples (ops or batches) per size
MAX_ITERS = 5000                     # bounds the loop when rare stalls make the mean far above the median
MAX_BUFFERS = 4                      # buffer sets rotated through in the timed loop
POOL_BYTES = 1 << 30                 # bound on all ranks' pools together
LARGE_WARMUP = 5                     # default warm-up ops from BATCH_BELOW up


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.worker", allow_abbrev=False)
    p.add_argument("--backend", required=True, choices=list(backends.BACKENDS))
    p.add_argument("--op", default="all_reduce", choices=list(ops.OPS))
    p.add_argument("--dtype", default="float32", type=ops.canonical_dtype)
    p.add_argument("--sizes", required=True, help="comma-separated byte sizes")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--check", type=int, default=1, choices=(0, 1))
    p.add_argument("--target-time", type=float, default=0.4)
    p.add_argument("--batch", type=int, default=1, help="ops per timed sample below 64 KiB")
    p.add_argument("--timeout", type=float, default=None, help="the backend's own deadline, seconds")
    p.add_argument("--out", default=None, help="JSON written by rank 0")
    return p.parse_args(argv)


def plan(op: ops.Op, sizes: list[int], nranks: int, es: int) -> list[ops.Layout]:
    """Layouts for the requested sizes: sizes too small for one element per block are dropped and
    sizes that round to the same buffers are kept once."""
    seen, out = set(), []
    for s in sizes:
        lay = op.layout(s, nranks, es)
        if lay is not None and lay.nbytes not in seen:
            seen.add(lay.nbytes)
            out.append(lay)
    return out


class Pool:
    """Buffer sets of the largest layout; :meth:`views` hands out per-size views of each set."""

    def __init__(self, op: ops.Op, layouts: list[ops.Layout], nranks: int, dtype: str):
        tdt, es = ops.torch_dtype(dtype), ops.elem_size(dtype)
        max_in = max(lay.in_count for lay in layouts)
        max_out = max(lay.out_count for lay in layouts)
        set_bytes = (max_out + (0 if op.inplace else max_in)) * es
        self.nsets = max(1, min(MAX_BUFFERS, POOL_BYTES // nranks // max(set_bytes, 1)))
        self.sets = []
        for _ in range(self.nsets):
            out = torch.zeros(max_out, dtype=tdt)    # zeros: a SUM in place stays finite and exact
            inp = out if op.inplace else torch.zeros(max_in, dtype=tdt)
            self.sets.append((inp, out))

    def views(self, lay: ops.Layout) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(inp[: lay.in_count], out[: lay.out_count]) for inp, out in self.sets]


def _time_each(fns, n: int) -> list[float]:
    """Run ``n`` ops rotating over ``fns``; return each op's seconds."""
    k, nb, out, clock = 0, len(fns), [], time.perf_counter
    for _ in range(n):
        t0 = clock()
        fns[k % nb]()
        out.append(clock() - t0)
        k += 1
    return out


def _time_batches(fns, nbatches: int, batch: int) -> list[float]:
    """Run ``nbatches`` batches of ``batch`` ops rotating over ``fns``; return seconds per op of each batch."""
    k, nb, out, clock = 0, len(fns), [], time.perf_counter
    for _ in range(nbatches):
        t0 = clock()
        for _ in range(batch):
            fns[k % nb]()
            k += 1
        out.append((clock() - t0) / batch)
    return out


def choose_iters(args, lay: ops.Layout, batch: int, estimate_s: float) -> int:
    """Timed ops for this size: a whole number of batches, the same on every rank."""
    if args.iters is not None:
        iters = args.iters
    elif lay.nbytes <= TINY_BYTES:
        iters = TINY_ITERS
    else:
        iters = int(args.target_time / max(estimate_s, 1e-7))
        iters = max(MIN_SAMPLES * batch, min(MAX_ITERS, iters))
    return -(-iters // batch) * batch


def measure(args, backend, op: ops.Op, lay: ops.Layout, pool: Pool) -> dict:
    """Steps 1-4 of the module doc for one size; returns this rank's figures."""
    fns = [op.bind(backend, inp, out) for inp, out in pool.views(lay)]
    small = lay.nbytes < BATCH_BELOW
    batch = max(1, args.batch) if small else 1
    if args.iters is not None:
        batch = max(1, min(batch, args.iters))
    backend.barrier()
    nwarm = args.warmup if args.warmup is not None else (max(SMALL_WARMUP, batch) if small else LARGE_WARMUP)
    warm = _time_each(fns, nwarm)
    est = statistics.fmean(warm[1:] or warm) if warm else 1e-3   # mean: the loop's wall time follows it
    if args.iters is None:
        est = backend.reduce_values([est], "max")[0]       # all ranks must run the same count
    iters = choose_iters(args, lay, batch, est)
    if batch > 1:
        samples = _time_batches(fns, iters // batch, batch)
    else:
        samples = _time_each(fns, iters)
    return {"median_s": statistics.median(samples), "min_s": min(samples), "mean_s": statistics.fmean(samples),
            "iters": iters, "batch": batch}


def check(backend, op: ops.Op, lay: ops.Layout, dtype: str) -> int:
    """Step 5: wrong elements in this rank's output of one op on exact inputs."""
    inp, out = op.check_buffers(lay, backend.rank, backend.size, dtype)
    op.bind(backend, inp, out)()
    want = op.expected(lay, backend.rank, backend.size, dtype)
    return int(torch.count_nonzero(out != want))


def warm_launch(backend, op: ops.Op, layouts: list[ops.Layout], pool: Pool) -> None:
    """Launch warm-up: connections, first-call setup, every pool set at the largest size."""
    backend.barrier()
    for inp, out in pool.views(layouts[0]) * 25:
        op.bind(backend, inp, out)()
    for inp, out in pool.views(layouts[-1]):
        op.bind(backend, inp, out)()
    backend.barrier()


def _log(rank: int, msg: str) -> None:
    if rank == 0:
        sys.stderr.write(f"bench.worker: {msg}\n")
        sys.stderr.flush()


def run(args) -> dict | None:
    """The whole launch; returns the JSON document on rank 0 (None elsewhere)."""
    t_start = time.time()
    backend = backends.make(args.backend, args.timeout)
    rank, n = backend.rank, backend.size
    op, es = ops.OPS[args.op], ops.elem_size(args.dtype)
    layouts = plan(op, [int(s) for s in args.sizes.split(",") if s], n, es)
    if not layouts:
        raise SystemExit("bench.worker: no size holds one element per rank block")
    pool = Pool(op, layouts, n, args.dtype)
    warm_launch(backend, op, layouts, pool)
    local = []                          # per size: median_s, min_s, mean_s, wrong, iters, batch
    for lay in layouts:
        t0 = time.perf_counter()
        r = measure(args, backend, op, lay, pool)
        wrong = check(backend, op, lay, args.dtype) if args.check else 0
        local.append((r["median_s"], r["min_s"], r["mean_s"], wrong, r["iters"], r["batch"]))
        _log(rank, f"{args.backend} {op.name} {lay.nbytes} B: {r['iters']} ops (batch {r['batch']}), "
                   f"rank 0 median {r['median_s'] * 1e6:.2f} us, wrong {wrong}, "
                   f"{time.perf_counter() - t0:.2f} s")
    # gather everything: each rank fills its own row of a zero matrix, then SUM
    width = len(local[0])
    flat = [0.0] * (n * len(layouts) * width)
    for i, row in enumerate(local):
        base = (rank * len(layouts) + i) * width
        flat[base: base + width] = [float(v) for v in row]
    flat = backend.reduce_values(flat, "sum")
    doc = None
    if rank == 0:
        rows = []
        for i, lay in enumerate(layouts):
            per = [flat[(r * len(layouts) + i) * width:(r * len(layouts) + i + 1) * width] for r in range(n)]
            med = [p[0] * 1e6 for p in per]
            rows.append({
                "nbytes": lay.nbytes, "count": lay.count, "in_count": lay.in_count, "out_count": lay.out_count,
                "time_us": max(med), "rank_median_us": med, "rank_min_us": [p[1] * 1e6 for p in per],
                "rank_mean_us": [p[2] * 1e6 for p in per],
                "wrong": int(sum(p[3] for p in per)), "iters": int(per[0][4]), "batch": int(per[0][5]),
                "algorithm": backend.algorithm(op.name, op.msg_bytes(lay, n, es)),
            })
        doc = {
            "backend": args.backend, "op": op.name, "dtype": args.dtype, "nranks": n,
            "transport": backend.transport(), "buffers": pool.nsets, "versions": backend.versions(),
            "python": platform.python_version(), "seconds": None, "rows": rows,
        }
    backend.barrier()
    backend.close()
    if doc is not None:
        doc["seconds"] = time.time() - t_start
    return doc


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    doc = run(args)
    if doc is not None and args.out:
        tmp = f"{args.out}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
