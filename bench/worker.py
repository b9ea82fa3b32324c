"""Rank-side loop of one launch: ``bench.worker --backend B --ops ... --places out,in --sizes ... --out F``,
started by ``python -m comms.run`` (comms, gloo) or ``mpirun`` (mpi).

Per launch: create the backend; then for every op and every place (out-of-place, then in-place):
if the backend cannot run that mode natively, record why (the row shows n/a); otherwise allocate a
pool of up to :data:`MAX_BUFFERS` buffer sets (bounded by :data:`POOL_BYTES` over all ranks,
aliased as the place says) and touch them, warm up (:data:`LAUNCH_WARM_ROUNDS` rounds over the sets
at the smallest size for the launch's first mode, :data:`NEXT_WARM_ROUNDS` for later ones, then one
op per set at the largest size), then for every size:

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
   (:mod:`bench.ops`), counting wrong elements. Test hook: with ``COMMS_BENCH_CORRUPT`` set (not
   "0"), one element of one rank's result is overwritten before the comparison.

With ``--variants auto,ring,...`` (comms only; one op per launch: what bench.regret runs) every
size measures each variant side by side in the same launch: ``auto`` is the default selection, any
other name that algorithm forced (:meth:`bench.backend_base.Backend.force`, what COMMS_ALGO=op:name does
at init). Each variant gets its warm-up and its iteration count as in steps 2-3; the timed ops are
then split into ``--variant-rounds`` rounds (default :data:`bench.cli.VARIANT_ROUNDS`), and every
round runs every variant in turn (the order flipped every round), each turn started by a barrier
and one untimed op (the forced plan is rebuilt at each switch). So drift on a busy machine, and a
launch's placement of ranks on cores, hit every variant alike. The variants' figures pool their rounds' samples; each variant
writes its own results entry (with ``"variant"``), and the check runs once per variant. Each such
row also keeps ``round_mean_us``: per round, in round order, the slowest rank's mean time per op in
that round (what bench.regret pairs round by round).

Finally one float64 all_reduce gathers every rank's (median, min, mean, wrong, iters, batch) per
measured size, and rank 0 writes the launch's JSON: the figure per size is the slowest rank's median.
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

from . import backends, cli, moe_op, ops

TINY_BYTES, TINY_ITERS = 8, 2000     # the anchors' method: 8 B uses 2000 timed ops
BATCH_BELOW = 64 << 10               # --batch applies below this size
SMALL_WARMUP = 50                    # default warm-up ops below BATCH_BELOW
MIN_SAMPLES = 5                      # at least this many timed samples (ops or batches) per size
MAX_ITERS = 5000                     # bounds the loop when rare stalls make the mean far above the median
MAX_BUFFERS = 4                      # buffer sets rotated through in the timed loop
POOL_BYTES = 1 << 30                 # bound on all ranks' pools together
LARGE_WARMUP = 5                     # default warm-up ops from BATCH_BELOW up
LAUNCH_WARM_ROUNDS = 25              # launch warm-up: rounds over the buffer sets at the smallest size...
NEXT_WARM_ROUNDS = 2                 # ...and for every later (op, place) of the launch


CORRUPT_ENV = "COMMS_BENCH_CORRUPT"   # test hook: set (not "0") to corrupt one element per check


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.worker", allow_abbrev=False)
    p.add_argument("--backend", required=True, choices=list(backends.BACKENDS))
    p.add_argument("--label", default=None, help="the name the table shows (default: --backend)")
    p.add_argument("--ops", default="all_reduce", help="comma-separated ops")
    p.add_argument("--places", default="out,in", help="comma-separated: out, in")
    p.add_argument("--root", type=int, default=0)
    p.add_argument("--moe-experts", type=int, default=0, help="moe: experts (default 4 per rank)")
    p.add_argument("--moe-topk", type=int, default=4)
    p.add_argument("--moe-hidden", type=int, default=1024)
    p.add_argument("--moe-routing", choices=moe_op.MoE.ROUTINGS, default="consecutive")
    p.add_argument("--dtype", default="float32", type=ops.canonical_dtype)
    p.add_argument("--sizes", required=True, help="comma-separated byte sizes")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--check", type=int, default=1, choices=(0, 1))
    p.add_argument("--target-time", type=float, default=0.4)
    p.add_argument("--batch", type=int, default=1, help="ops per timed sample below 64 KiB")
    p.add_argument("--timeout", type=float, default=None, help="the backend's own deadline, seconds")
    p.add_argument("--out", default=None, help="JSON written by rank 0")
    p.add_argument("--variants", default=None,
                   help="comms, one op: comma-separated auto (default selection) and algorithm names, "
                        "measured side by side at every size")
    p.add_argument("--variant-rounds", type=int, default=cli.VARIANT_ROUNDS,
                   help=f"--variants: interleaved timed rounds per size (default {cli.VARIANT_ROUNDS})")
    args = p.parse_args(argv)
    if args.variant_rounds < 1:
        p.error("--variant-rounds must be at least 1")
    args.ops = [o for o in args.ops.split(",") if o]
    args.variants = [v for v in args.variants.split(",") if v] if args.variants else None
    if args.variants is not None and (args.backend != "comms" or len(args.ops) != 1 or ops.MOE in args.ops):
        p.error("--variants needs --backend comms and one collective in --ops")
    args.places = [pl for pl in args.places.split(",") if pl]
    bad = [o for o in args.ops if o not in ops.OPS and o != ops.MOE] + \
        [pl for pl in args.places if pl not in ops.PLACES]
    if bad:
        p.error(f"unknown op or place: {', '.join(bad)}")
    return args


plan = ops.plan


class Pool:
    """Buffer sets of the largest layout for one (op, place) on this rank, aliased as
    :meth:`bench.ops.Op.buffers` says; :meth:`views` hands out per-size (input, output) views."""

    def __init__(self, op: ops.Op, layouts: list[ops.Layout], rank: int, nranks: int, root: int, place: str,
                 dtype: str):
        self.op, self.rank, self.nranks, self.root, self.place = op, rank, nranks, root, place
        tdt, es = ops.torch_dtype(dtype), ops.elem_size(dtype)
        big = op.buffers(layouts[-1], rank, nranks, root, place)
        # sizes are ascending, so the last layout has the largest buffers; the aliased one is the base
        n_in = 0 if big.view == "in" else big.in_count
        n_out = 0 if big.view == "out" else big.out_count
        set_bytes = (n_in + n_out) * es
        self.nsets = max(1, min(MAX_BUFFERS, POOL_BYTES // nranks // max(set_bytes, 1)))
        self.sets = []
        for _ in range(self.nsets):
            # zeros, touched: a SUM in place stays finite and exact, and no page fault is timed
            self.sets.append((torch.zeros(n_in, dtype=tdt), torch.zeros(n_out, dtype=tdt)))

    def views(self, lay: ops.Layout) -> list[tuple[torch.Tensor, torch.Tensor]]:
        spec = self.op.buffers(lay, self.rank, self.nranks, self.root, self.place)
        out = []
        for base_in, base_out in self.sets:
            if spec.view == "in":
                o = base_out[: spec.out_count]
                i = o[spec.offset: spec.offset + spec.in_count]
            elif spec.view == "out":
                i = base_in[: spec.in_count]
                o = i[spec.offset: spec.offset + spec.out_count]
            else:
                i, o = base_in[: spec.in_count], base_out[: spec.out_count]
            out.append((i, o))
        return out


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


def _fns_and_batch(args, backend, op: ops.Op, place: str, lay: ops.Layout, pool: Pool):
    fns = [backend.bind_op(op, place, inp, out, args.root) for inp, out in pool.views(lay)]
    small = lay.nbytes < BATCH_BELOW
    batch = max(1, args.batch) if small else 1
    if args.iters is not None:
        batch = max(1, min(batch, args.iters))
    nwarm = args.warmup if args.warmup is not None else (max(SMALL_WARMUP, batch) if small else LARGE_WARMUP)
    return fns, batch, nwarm


def _estimate(warm: list[float]) -> float:
    return statistics.fmean(warm[1:] or warm) if warm else 1e-3   # mean: the loop's wall time follows it


def _figures(samples: list[float], iters: int, batch: int) -> dict:
    return {"median_s": statistics.median(samples), "min_s": min(samples), "mean_s": statistics.fmean(samples),
            "iters": iters, "batch": batch}


def _timed(fns, iters: int, batch: int) -> list[float]:
    return _time_batches(fns, iters // batch, batch) if batch > 1 else _time_each(fns, iters)


def measure(args, backend, op: ops.Op, place: str, lay: ops.Layout, pool: Pool) -> dict:
    """Steps 1-4 of the module doc for one size; returns this rank's figures."""
    fns, batch, nwarm = _fns_and_batch(args, backend, op, place, lay, pool)
    backend.barrier()
    est = _estimate(_time_each(fns, nwarm))
    if args.iters is None:
        est = backend.reduce_values([est], "max")[0]       # all ranks must run the same count
    iters = choose_iters(args, lay, batch, est)
    return _figures(_timed(fns, iters, batch), iters, batch)


def forced_algorithm(variant: str) -> str | None:
    """The algorithm a ``--variants`` name forces (None for ``auto``, the default selection)."""
    return None if variant == "auto" else variant


def measure_variants(args, backend, op: ops.Op, place: str, lay: ops.Layout, pool: Pool,
                     variants: list[str]) -> dict[str, dict]:
    """``--variants``: every variant's figures for one size, measured in interleaved rounds (the
    module doc); each also carries the algorithm that ran (``"algorithm"``) and this rank's mean
    time per op in each round, in round order (``"round_means_s"``)."""
    fns, batch, nwarm = _fns_and_batch(args, backend, op, place, lay, pool)
    msg_bytes = op.msg_bytes(lay, backend.size, ops.elem_size(args.dtype))
    est = []
    for v in variants:
        backend.force(op.name, forced_algorithm(v))
        backend.barrier()
        est.append(_estimate(_time_each(fns, nwarm)))
    if args.iters is None:
        est = backend.reduce_values(est, "max")             # all ranks must run the same counts
    # a round's share of each variant's ops, in whole batches (at least one per round)
    rounds = args.variant_rounds
    per_round = {v: max(1, -(-choose_iters(args, lay, batch, e) // (batch * rounds))) * batch
                 for v, e in zip(variants, est)}
    samples: dict[str, list[float]] = {v: [] for v in variants}
    round_means: dict[str, list[float]] = {v: [] for v in variants}   # per round: the mean of its samples
    ran: dict[str, str] = {}
    for rnd in range(rounds):
        for v in (variants if rnd % 2 == 0 else variants[::-1]):
            backend.force(op.name, forced_algorithm(v))
            backend.barrier()
            fns[0]()                                         # the rebuilt plan's first call, untimed
            got = _timed(fns, per_round[v], batch)
            samples[v] += got
            round_means[v].append(statistics.fmean(got))
            ran[v] = backend.algorithm(op.name, msg_bytes)
    return {v: dict(_figures(samples[v], per_round[v] * rounds, batch), algorithm=ran[v], round_means_s=round_means[v])
            for v in variants}


def corrupt_target(op: ops.Op, nranks: int, root: int) -> int:
    """The rank whose result the test hook corrupts: the root when only it has a result, else the last."""
    return root if op.root_result else nranks - 1


def check(args, backend, op: ops.Op, place: str, lay: ops.Layout, corrupt: bool = False) -> int:
    """Step 5: wrong elements in this rank's output of one op on exact inputs. With ``corrupt``
    (the :data:`CORRUPT_ENV` test hook) one element of one rank's result is overwritten before the
    comparison, which must then count it."""
    rank, n, root, dtype = backend.rank, backend.size, args.root, args.dtype
    extra = 0
    if op.name == ops.MOE:
        recv_x, out = backend.moe_round_trip(op, op.check_input(lay, rank, n, root, dtype))
        out, want_recv = out.reshape(-1), op.expected_recv(lay, rank, n, dtype)
        extra = _differ(recv_x, want_recv)
    else:
        spec = op.buffers(lay, rank, n, root, place)
        inp, out = ops.make_buffers(spec, ops.torch_dtype(dtype), op.check_input(lay, rank, n, root, dtype))
        backend.bind_op(op, place, inp, out, root)()
    want = op.expected(lay, rank, n, root, dtype)
    if want is None:
        return extra
    if corrupt and rank == corrupt_target(op, n, root):
        out[out.numel() // 2] = 0          # every expected value is at least 1
    return extra + _differ(out, want)


def _differ(got: torch.Tensor, want: torch.Tensor) -> int:
    """Elements of ``got`` that differ from ``want``; all of them when the shapes differ."""
    if got.shape != want.shape:
        return max(got.numel(), want.numel())
    return int(torch.count_nonzero(got != want))


def warm_launch(args, backend, op: ops.Op, place: str, layouts: list[ops.Layout], pool: Pool,
                rounds: int = LAUNCH_WARM_ROUNDS) -> None:
    """Warm-up for one (op, place): connections, first-call setup, every pool set at the largest size."""
    backend.barrier()
    for inp, out in pool.views(layouts[0]) * rounds:
        backend.bind_op(op, place, inp, out, args.root)()
    for inp, out in pool.views(layouts[-1]):
        backend.bind_op(op, place, inp, out, args.root)()
    backend.barrier()


def _log(rank: int, msg: str) -> None:
    if rank == 0:
        sys.stderr.write(f"bench.worker: {msg}\n")
        sys.stderr.flush()


def corrupt_requested(env=None) -> bool:
    return (os.environ if env is None else env).get(CORRUPT_ENV, "") not in ("", "0")


def run(args) -> dict | None:
    """The whole launch; returns the JSON document on rank 0 (None elsewhere)."""
    t_start = time.time()
    backend = backends.make(args.backend, args.timeout)
    label = args.label or args.backend
    rank, n = backend.rank, backend.size
    if not 0 <= args.root < n:
        raise SystemExit(f"bench.worker: root {args.root} is not a rank of {n}")
    es = ops.elem_size(args.dtype)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    corrupt = corrupt_requested()
    moe = {"experts": args.moe_experts, "topk": args.moe_topk, "hidden": args.moe_hidden,
           "routing": args.moe_routing}
    plans = [(op, plan(op, sizes, n, es)) for op in (ops.lookup(name, moe) for name in args.ops)]
    total = sum(len(lays) for _, lays in plans) * len(args.places)
    done = 0
    results, local = [], []   # local: per measured size, (median_s, min_s, mean_s, wrong, iters, batch)
    local_rounds = []         # per measured size: its round means (--variants), padded to --variant-rounds
    variants = args.variants or [None]
    for op, layouts in plans:
        for place in args.places:
            reason = backend.native(op.name, place, args.dtype) if layouts else "no size holds one element per block"
            entries = {}          # variant (None without --variants) -> its results entry
            for v in variants:
                entries[v] = {"op": op.name, "place": place, "na": reason, "buffers": 0, "rows": []}
                if v is not None:
                    entries[v]["variant"] = v
                results.append(entries[v])
            if reason:
                done += len(layouts)
                _log(rank, f"[{done}/{total}] {label} {op.name} {place}: n/a ({reason})")
                continue
            pool = Pool(op, layouts, rank, n, args.root, place, args.dtype)
            for res in entries.values():
                res["buffers"] = pool.nsets
            warm_launch(args, backend, op, place, layouts, pool, NEXT_WARM_ROUNDS if local else LAUNCH_WARM_ROUNDS)
            for lay in layouts:
                t0 = time.perf_counter()
                if args.variants:
                    figs = measure_variants(args, backend, op, place, lay, pool, args.variants)
                else:
                    figs = {None: measure(args, backend, op, place, lay, pool)}
                wrong_all = 0
                for v, r in figs.items():
                    if v is not None and args.check:
                        backend.force(op.name, forced_algorithm(v))
                    wrong = check(args, backend, op, place, lay, corrupt) if args.check else 0
                    wrong_all += wrong
                    algo = r.get("algorithm") or backend.algorithm(op.name, op.msg_bytes(lay, n, es))
                    entries[v]["rows"].append({"nbytes": lay.nbytes, "count": lay.count, "in_count": lay.in_count,
                                               "out_count": lay.out_count, "algorithm": algo, "_k": len(local)})
                    local.append((r["median_s"], r["min_s"], r["mean_s"], wrong, r["iters"], r["batch"]))
                    local_rounds.append(r.get("round_means_s", []))
                    if op.name == ops.MOE and rank == 0:   # per rank: rows it dispatches (DeepEP counts their bytes)
                        entries[v]["rows"][-1]["dispatched_rows"] = op.dispatched_rows(lay, n)
                if args.variants:
                    backend.force(op.name, None)
                done += 1
                first = next(iter(figs.values()))
                _log(rank, f"[{done}/{total}] {label} {op.name} {place} {lay.nbytes} B: {first['iters']} ops "
                           f"(batch {first['batch']})" + (f" x {len(figs)} variants" if args.variants else "")
                           + f", rank 0 median {first['median_s'] * 1e6:.2f} us, wrong {wrong_all}, "
                           f"{time.perf_counter() - t0:.2f} s")
            del pool
    # gather everything: each rank fills its own row of a zero matrix, then SUM
    width, m = 6, len(local)
    flat = [0.0] * (n * m * width)
    for i, row in enumerate(local):
        base = (rank * m + i) * width
        flat[base: base + width] = [float(v) for v in row]
    if flat:
        flat = backend.reduce_values(flat, "sum")
    # round means: the slowest rank's per round (every rank runs the same rounds), as the figure is
    nrounds = args.variant_rounds if args.variants else 0
    rounds_max = [x for rm in local_rounds for x in (list(rm) + [0.0] * nrounds)[:nrounds]]
    if rounds_max:
        rounds_max = backend.reduce_values(rounds_max, "max")
    doc = None
    if rank == 0:
        for res in results:
            for row in res["rows"]:
                i = row.pop("_k")
                per = [flat[(r * m + i) * width:(r * m + i + 1) * width] for r in range(n)]
                med = [p[0] * 1e6 for p in per]
                row.update({"time_us": max(med), "rank_median_us": med, "rank_min_us": [p[1] * 1e6 for p in per],
                            "rank_mean_us": [p[2] * 1e6 for p in per], "wrong": int(sum(p[3] for p in per)),
                            "iters": int(per[0][4]), "batch": int(per[0][5])})
                if nrounds:
                    row["round_mean_us"] = [x * 1e6 for x in rounds_max[i * nrounds:(i + 1) * nrounds]]
        doc = {
            "backend": label, "base": args.backend, "dtype": args.dtype, "nranks": n, "root": args.root,
            "transport": backend.transport(), "versions": backend.versions(),
            "python": platform.python_version(), "corrupt": corrupt, "seconds": None, "results": results,
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
