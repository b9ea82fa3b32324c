"""Tensor-parallel inference of a small transformer block over the comms backend, checked against
the same block run whole in one process.

    python -m comms.run -n 2 examples/tp_inference.py            # or: torchrun --nproc-per-node 2 ...
    python -m comms.run -n 2 examples/tp_inference.py --backend gloo

Megatron-style sharding with DTensor (``parallelize_module``): the attention's q/k/v projections
and the MLP's up projection are split by columns (each rank owns a slice of heads and hidden
units), the output projections by rows; each row-parallel layer ends in one all_reduce. Every rank
builds the same block from one seed, so each can also run it unsharded and compare. Rank 0
prints the largest difference; the exit status is non-zero if any rank is off by more than the
tolerance.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import comms  # noqa: F401 - registers the "comms" backend


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a GELU MLP. The number of heads in
    a forward pass follows from the projection's width, so a column shard runs its own heads."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.head_dim = dim // heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).view(b, s, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, -1))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


TP_PLAN = {"q": ColwiseParallel(), "k": ColwiseParallel(), "v": ColwiseParallel(), "o": RowwiseParallel(),
           "up": ColwiseParallel(), "down": RowwiseParallel()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="comms")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group(args.backend)
    rank, size = dist.get_rank(), dist.get_world_size()
    if args.heads % size:
        raise SystemExit(f"--heads {args.heads} must be a multiple of the world size {size}")
    mesh = init_device_mesh("cpu", (size,))

    torch.manual_seed(0)
    whole = nn.Sequential(*(Block(args.dim, args.heads, 4 * args.dim) for _ in range(args.layers))).eval()
    sharded = nn.Sequential(*(Block(args.dim, args.heads, 4 * args.dim) for _ in range(args.layers))).eval()
    sharded.load_state_dict(whole.state_dict())
    for block in sharded:
        parallelize_module(block, mesh, TP_PLAN)

    x = torch.randn(3, 10, args.dim, generator=torch.Generator().manual_seed(1))   # the same on every rank
    with torch.no_grad():
        want = whole(x)
        got = sharded(x)
    err = torch.tensor([(got - want).abs().max().item()])
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    ok = err.item() <= args.tol
    if rank == 0:
        print(f"{args.layers} blocks, dim {args.dim}, {args.heads} heads on {size} ranks ({args.backend}): "
              f"max |tensor parallel - one process| = {err.item():.2e} -> {'OK' if ok else 'MISMATCH'}")
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
