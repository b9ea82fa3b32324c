"""Rank-side loop of one launch: ``bench.worker --backend B --ops ... --places out,in --sizes ... --out F``,
started by ``python -m comms.run`` (comms, gloo) or ``mpirun`` (mpi).

Per launch: create the backend; then for every op and every place (out-of-place, then in-place):
if the backend cannot run that mode natively, record why (the row shows n/a); otherwise allocate a
buffer pool, warm up and time every size (:mod:`bench.measure`: steps 1-4 there), then for every
size:

5. check (``--check 1``), outside the timed loop: one more op on fresh exact inputs
   (:mod:`bench.ops`), counting wrong elements. Test hook: with ``COMMS_BENCH_CORRUPT`` set (not
   "0"), one element of one rank's result is overwritten before the comparison.

With ``--variants auto,ring,...`` (comms only; one op per launch: what bench.regret runs) every
size measures each variant side by side in the same launch, in interleaved rounds
(:func:`bench.measure.measure_variants`; ``auto`` is the default selection, any other name that
algorithm forced). Each variant writes its own results entry (with ``"variant"``), and the check
runs once per variant, with that variant's algorithm forced. Each such row also keeps
``round_mean_us``: per round, in round order, the slowest rank's mean time per op in that round
(what bench.regret pairs round by round).

Finally one float64 all_reduce gathers every rank's (median, min, mean, wrong, iters, batch) per
measured size, and rank 0 writes the launch's JSON: the figure per size is the slowest rank's median.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

from . import backends, cli, moe_op, ops
from .measure import (LAUNCH_WARM_ROUNDS, NEXT_WARM_ROUNDS, Pool, forced_algorithm, measure, measure_variants,
                      warm_launch)

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
