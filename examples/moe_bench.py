"""MoE dispatch + combine benchmark: comms.moe vs the usual CPU way (torch.distributed on Gloo).

    python examples/moe_bench.py                       # T=4096, H=4096, K=8, E=64, bf16 on 2 and 4 local ranks
    python examples/moe_bench.py --tokens 1024 --hidden 2048 --ranks 2 --iters 3

Both sides route the same tokens (random top-K over E experts, each token sent once per
destination rank, the same routing math):

- comms: ``comms.moe.Dispatcher.dispatch`` / ``combine``: one count exchange, then the rows are
  written straight into the peers' receive windows (single copy into shared memory, or an uneven
  ``all_to_all`` over shared memory with ``COMMS_MOE_SINGLE_COPY=0``), combine summed natively
  (float32, fixed order);
- Gloo, the usual CPU way (``bench/moe_gloo.py``, which ``python -m bench --ops moe --backends
  comms,gloo`` times too): ``all_to_all_single`` of the counts, then of ``x[send_idx]`` and of the
  routing metadata (uneven splits), and back for combine, summed with one float32 ``index_add_``.

Token GB/s is reported as DeepEP does: bytes of the token rows a rank receives in dispatch (and
sends back in combine) divided by the time of that call (the slowest rank's). The last columns
time a plain ``all_to_all`` of the same bytes (even splits) on each side: algbw, busbw
(nccl-tests: algbw * (W-1)/W), and the share of that algbw dispatch reaches. Each rank uses one
intra-op thread (as torchrun sets OMP_NUM_THREADS=1). Figures on a shared machine are noisy.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))      # the repository root: bench/

from bench import moe_gloo  # noqa: E402  the Gloo way, shared with python -m bench --ops moe
from bench.ops import random_routing  # noqa: E402  the bench's --moe-routing random

DTYPE = torch.bfloat16


def _routing(args, rank: int):
    """x (random, seeded per rank) and the bench's random routing: uniform scores, top-K, weights = scores."""
    x = torch.randn(args.tokens, args.hidden, generator=torch.Generator().manual_seed(4321 + rank)).to(DTYPE)
    idx, w = random_routing(args.tokens, args.experts, args.topk, rank)
    return x, idx, w


def _gloo_moe(dist, x, idx, w, num_experts: int, world: int):
    """Dispatch + combine the usual CPU way (:mod:`bench.moe_gloo`); returns (recv_x, out, t_dispatch, t_combine)."""
    t0 = time.perf_counter()
    recv_x, _, _, route = moe_gloo.dispatch(dist, x, idx, w, num_experts)
    t1 = time.perf_counter()
    out = moe_gloo.combine(dist, recv_x, route)
    t2 = time.perf_counter()
    return recv_x, out, t1 - t0, t2 - t1


def bench_rank(rank: int, world: int, args) -> dict:
    torch.set_num_threads(1)
    import torch.distributed as dist

    import comms
    import comms.moe
    comm = comms.init(timeout=600)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x, idx, w = _routing(args, rank)
    ep = comms.moe.Dispatcher(comm, args.experts, args.hidden)
    res = {"comms_d": [], "comms_c": [], "gloo_d": [], "gloo_c": [], "a2a": [], "gloo_a2a": []}
    recv_rows = 0
    for it in range(args.iters + 1):                     # the first round is a warm-up
        comm.barrier()
        t0 = time.perf_counter()
        recv_x, _, _, _, handle = ep.dispatch(x, idx, w)
        t1 = time.perf_counter()
        out = ep.combine(recv_x, handle)
        t2 = time.perf_counter()
        recv_rows = recv_x.shape[0]
        dist.barrier()
        g_recv, g_out, gd, gc = _gloo_moe(dist, x, idx, w, args.experts, world)
        if it == 0:
            assert torch.equal(g_recv, recv_x) and torch.allclose(g_out.float(), out.float(), rtol=1e-2, atol=1e-2), \
                "comms and Gloo disagree"
            # comms' own all_to_all of the same bytes (the largest rank's), even splits
            most = torch.tensor([handle.send_idx.numel()])
            comm.all_reduce(most, op=comms.MAX)
            rows = -(-int(most) // world) * world
            a2a_in = torch.randn(rows, args.hidden).to(DTYPE)
            a2a_out = torch.zeros_like(a2a_in)
            del g_recv, g_out
            continue
        res["comms_d"].append(t1 - t0)
        res["comms_c"].append(t2 - t1)
        res["gloo_d"].append(gd)
        res["gloo_c"].append(gc)
        comm.barrier()
        t0 = time.perf_counter()
        comm.all_to_all(a2a_out, a2a_in)
        res["a2a"].append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_to_all_single(a2a_out, a2a_in)
        res["gloo_a2a"].append(time.perf_counter() - t0)
    dist.destroy_process_group()
    comm.close()
    med = {k: statistics.median(v) for k, v in res.items()}
    med["recv_bytes"] = recv_rows * args.hidden * 2
    med["send_bytes"] = handle.send_idx.numel() * args.hidden * 2
    med["a2a_bytes"] = a2a_in.numel() * 2
    return med


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args(argv)
    from comms.testing import spawn
    print(f"MoE dispatch+combine: T={args.tokens} tokens/rank, H={args.hidden}, K={args.topk}, E={args.experts}, "
          f"bf16, median of {args.iters} iterations; GB/s = 1e9 B/s")
    print(f"{'ranks':>5} {'side':>6} {'dispatch ms':>12} {'combine ms':>11} {'disp GB/s':>10} {'comb GB/s':>10} "
          f"{'d+c ms':>8} {'speedup':>8} | all_to_all of the same bytes: algbw busbw GB/s, dispatch/algbw")
    for world in args.ranks:
        per_rank = spawn(bench_rank, world, timeout=1800, args=(args,))
        mean = {k: statistics.mean(r[k] for r in per_rank) for k in per_rank[0]}
        worst = {k: max(r[k] for r in per_rank) for k in per_rank[0]}        # the slowest rank sets the pace
        total = {s: worst[f"{s}_d"] + worst[f"{s}_c"] for s in ("comms", "gloo")}
        for side, a2a in (("comms", "a2a"), ("gloo", "gloo_a2a")):
            d, c = worst[f"{side}_d"], worst[f"{side}_c"]
            algbw = mean["a2a_bytes"] / worst[a2a] / 1e9
            share = mean["send_bytes"] / d / 1e9 / algbw
            print(f"{world:>5} {side:>6} {d * 1e3:>12.1f} {c * 1e3:>11.1f} {mean['recv_bytes'] / d / 1e9:>10.2f} "
                  f"{mean['recv_bytes'] / c / 1e9:>10.2f} {total[side] * 1e3:>8.1f} "
                  f"{total['gloo'] / total[side]:>7.2f}x"
                  f" | {algbw:6.2f} {algbw * (world - 1) / world:6.2f}  {share:5.0%}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
