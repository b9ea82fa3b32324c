"""DDP training over the comms backend: switching from Gloo is one word.

    python -m comms.run -n 2 examples/ddp_train.py                 # or: torchrun --nproc-per-node 2 ...
    python -m comms.run -n 2 examples/ddp_train.py --backend gloo  # the same run over Gloo
    python -m comms.run -n 2 examples/ddp_train.py --check         # also train over Gloo, compare

Fits a small MLP to a synthetic regression task; each rank draws its own batches from a
DistributedSampler. Rank 0 prints the loss per epoch. At the end every rank checks that its
parameters are identical to rank 0's; with ``--check`` the same training also runs over a Gloo
group in the same job and the parameters must match bit for bit. Exits non-zero on any mismatch.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import comms  # noqa: F401 - registers the "comms" backend


def dataset(n: int = 512, dim: int = 16) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, 1, generator=g)
    return TensorDataset(x, torch.sin(x @ w) + 0.1 * torch.randn(n, 1, generator=g))


def train(group, epochs: int, verbose: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    ddp = DDP(model, process_group=group, bucket_cap_mb=0.01)        # small buckets: several in flight
    data = dataset()
    sampler = DistributedSampler(data, num_replicas=dist.get_world_size(group), rank=dist.get_rank(group), seed=0)
    loader = DataLoader(data, batch_size=32, sampler=sampler)
    opt = torch.optim.Adam(ddp.parameters(), lr=3e-3)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        total = torch.zeros(2)
        for x, y in loader:
            loss = nn.functional.mse_loss(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += torch.tensor([loss.item() * len(x), len(x)])
        dist.all_reduce(total, group=group)
        if verbose and dist.get_rank() == 0:
            print(f"epoch {epoch}: loss {total[0] / total[1]:.5f}")
    return [p.detach().clone() for p in model.parameters()]


def in_sync(params: list[torch.Tensor], group) -> bool:
    """Every rank holds rank 0's parameters, bit for bit."""
    flat = torch.cat([p.reshape(-1) for p in params])
    ref = flat.clone()
    dist.broadcast(ref, group_src=0, group=group)
    ok = torch.tensor([int(torch.equal(flat, ref))])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    return bool(ok.item())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="comms")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--check", action="store_true", help="also train over a Gloo group and compare")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group(args.backend)
    rank = dist.get_rank()
    params = train(None, args.epochs, verbose=True)
    ok = in_sync(params, None)
    if args.check:
        gloo = dist.new_group(backend="gloo")
        ref = train(gloo, args.epochs, verbose=False)
        same = all(torch.equal(a, b) for a, b in zip(params, ref))
        if rank == 0:
            print(f"{args.backend} and gloo parameters identical: {same}")
        ok = ok and same
    if rank == 0:
        print(f"parameters in sync on {dist.get_world_size()} ranks: {ok}")
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
