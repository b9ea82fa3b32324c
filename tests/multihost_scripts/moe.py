"""Run under tests/multihost.py (torchrun per simulated host): MoE dispatch/combine across hosts.

    python tests/multihost.py --hosts 2 --ranks 2 -- tests/multihost_scripts/moe.py ACROSS

Each rank runs the same cases through the hierarchical dispatcher (tokens cross between hosts
once, then fan out inside the host) and the flat one, normal and low-latency modes, checked against
the reference (tests/moe_workers.py), then routes every token to the other host and checks that the
inter-host bytes went over ACROSS (the transport expected between hosts). Prints
``MULTIHOST-MOE-OK rank=R ...`` on success.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # tests/

import comms  # noqa: E402
from comms.moe import Dispatcher  # noqa: E402
from moe_workers import run_case, run_ll_case  # noqa: E402

CASES = [dict(seed=s, experts=8, k=k, hidden=h, dtype=dt, tokens=tok, route=route, target=3, fp8=fp8,
              cap=max(tok) + 1)
         for s, (k, h, dt, tok, route, fp8) in enumerate([
             (2, 128, "bf16", [5, 17, 0, 40], "random", True),
             (3, 33, "fp32", [1, 2, 5, 17], "sparse", False),
             (1, 256, "fp16", [40, 40, 40, 40], "one_rank", False),
             (2, 8, "bf16", [0, 0, 0, 0], "random", False),
             (4, 128, "fp32", [17, 5, 2, 1], "no_expert", True)])]


def main() -> None:
    across = sys.argv[1]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    comm = comms.init(timeout=90)
    per_host = int(os.environ["LOCAL_WORLD_SIZE"])
    others = [p for p in range(world) if p // per_host != rank // per_host]
    assert all(comm.transports[p] == across for p in others), comm.transports
    for hierarchical in (True, False):
        for case in CASES:
            ep = Dispatcher(comm, case["experts"], case["hidden"], hierarchical=hierarchical)
            assert (ep.hier is not None) == hierarchical, "hierarchical mode not chosen"
            run_case(ep, case, world, rank, exact_combine=not hierarchical)
            run_ll_case(ep, case, world, rank)
            ep.close()
    # every token to one expert on each rank of the other host: the bytes cross between hosts
    E, H, T = 8, 512, 64
    other = 1 - rank // per_host
    idx = torch.stack([torch.full((T,), 4 * other), torch.full((T,), 4 * other + 2)], dim=1)
    x = torch.randn(T, H).bfloat16()
    ep = Dispatcher(comm, E, H)
    before = ep.link_stats()[f"{across}_tx_bytes"]
    rx, ri, rw, _, h = ep.dispatch(x, idx, torch.rand(T, 2))
    back = ep.combine(rx, h)
    crossed = ep.link_stats()[f"{across}_tx_bytes"] - before
    assert torch.equal(back, x * 2), f"rank {rank}: round trip"
    assert crossed >= 2 * T * H * 2, f"rank {rank}: only {crossed} B crossed over {across}"
    ep.close()
    comm.close()
    os.write(1, f"MULTIHOST-MOE-OK rank={rank} across={across} crossed={crossed}\n".encode())


if __name__ == "__main__":
    main()
