"""Differential testing of the comms backend against Gloo: one random sequence of collectives (ops,
dtypes, shapes, roots, splits, sync or async) runs through a comms group and a Gloo group in the
same job, and every output is compared. All ranks draw the same sequence from the seed; the data
differ per rank."""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.distributed as dist

import comms  # noqa: F401 - registers the backend

R = dist.ReduceOp
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
INTS = (torch.int8, torch.uint8, torch.int32, torch.int64)
DTYPES = FLOATS + INTS + (torch.bool,)
FLOAT_OPS = ("SUM", "PRODUCT", "MIN", "MAX", "AVG")
INT_OPS = ("SUM", "PRODUCT", "MIN", "MAX", "BAND", "BOR", "BXOR")
BOOL_OPS = ("MIN", "MAX", "BAND", "BOR", "BXOR")
COLLS = ("all_reduce", "all_reduce_coalesced", "broadcast", "reduce", "all_gather", "all_gather_into_tensor",
         "reduce_scatter", "reduce_scatter_tensor", "all_to_all_single", "all_to_all", "gather", "scatter",
         "barrier", "ring")
REDUCING = ("all_reduce", "all_reduce_coalesced", "reduce", "reduce_scatter", "reduce_scatter_tensor")


def _data(gen: torch.Generator, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype in INTS:
        lo = 0 if dtype == torch.uint8 else -20
        return torch.randint(lo, 20, shape, generator=gen, dtype=torch.int64).to(dtype)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * 4).to(dtype)


def make_case(rng: np.random.Generator, size: int) -> dict:
    """One collective, the same on every rank."""
    coll = COLLS[rng.integers(len(COLLS))]
    dtype = DTYPES[rng.integers(len(DTYPES))]
    if coll in ("reduce_scatter", "reduce_scatter_tensor") and dtype == torch.bool:
        dtype = torch.int32                  # Gloo has no bool reduce-scatter
    ops = FLOAT_OPS if dtype in FLOATS else INT_OPS if dtype in INTS else BOOL_OPS
    rows = int(rng.choice([0, 1, 2, 5, 64, 3000])) if rng.random() < 0.9 else int(rng.integers(20_000, 40_000))
    shape = (rows,) + tuple(int(d) for d in rng.integers(1, 4, rng.integers(0, 3)))
    splits = rng.integers(0, 4, (size, size)).tolist()
    return dict(coll=coll, dtype=dtype, op=ops[rng.integers(len(ops))], shape=shape, root=int(rng.integers(size)),
                splits=splits, async_op=bool(rng.random() < 0.5), strided=bool(rng.random() < 0.25))


def _strided(t: torch.Tensor) -> torch.Tensor:
    """A non-contiguous tensor with the values of ``t`` (every other element of a wider buffer)."""
    v = torch.zeros(t.shape + (2,), dtype=t.dtype)[..., 0]
    v.copy_(t)
    return v


def run_case(c: dict, group, rank: int, size: int, seed: int, i: int, strided: bool) -> list[torch.Tensor]:
    """Run case ``c`` on ``group``; returns the outputs that are defined on this rank. ``strided``
    makes every tensor non-contiguous (Gloo refuses those: it gets contiguous ones)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + i * 101 + rank)
    coll, dtype, shape, root, a = c["coll"], c["dtype"], c["shape"], c["root"], c["async_op"]
    op = getattr(R, c["op"])
    S = _strided if strided else (lambda t: t)

    def new(*shape_):                       # an output buffer
        return S(torch.zeros(shape_ or shape, dtype=dtype))

    x = S(_data(gen, dtype, shape))
    works, outs = [], []

    def issue(w):
        if a and w is not None:
            works.append(w)

    if coll == "all_reduce":
        issue(dist.all_reduce(x, op, group=group, async_op=a))
        outs = [x]
    elif coll == "all_reduce_coalesced":
        xs = [x, S(_data(gen, dtype, (3,))), S(x.reshape(-1)[: max(1, x.numel() // 2)].clone())]
        fut = dist.all_reduce_coalesced(xs, op, group=group, async_op=a)
        if a:
            fut.wait()
        outs = xs
    elif coll == "broadcast":
        issue(dist.broadcast(x, group_src=root, group=group, async_op=a))
        outs = [x]
    elif coll == "reduce":
        issue(dist.reduce(x, group_dst=root, op=op, group=group, async_op=a))
        outs = [x] if rank == root else []
    elif coll == "all_gather":
        outs = [new() for _ in range(size)]
        issue(dist.all_gather(outs, x, group=group, async_op=a))
    elif coll == "all_gather_into_tensor":
        out = new(size * shape[0], *shape[1:])
        issue(dist.all_gather_into_tensor(out, x, group=group, async_op=a))
        outs = [out]
    elif coll == "reduce_scatter":
        out = new()
        issue(dist.reduce_scatter(out, [S(_data(gen, dtype, shape)) for _ in range(size)], op=op, group=group,
                                  async_op=a))
        outs = [out]
    elif coll == "reduce_scatter_tensor":
        inp = S(_data(gen, dtype, (size * shape[0],) + shape[1:]))
        out = new()
        issue(dist.reduce_scatter_tensor(out, inp, op=op, group=group, async_op=a))
        outs = [out]
    elif coll == "all_to_all_single":
        sp = c["splits"]
        if shape[0] % 2:                                            # uneven splits
            ins, got = sp[rank], [sp[p][rank] for p in range(size)]
        else:
            ins, got = [shape[0]] * size, [shape[0]] * size
        inp = S(_data(gen, dtype, (sum(ins),) + shape[1:]))
        out = new(sum(got), *shape[1:])
        issue(dist.all_to_all_single(out, inp, got if shape[0] % 2 else None, ins if shape[0] % 2 else None,
                                     group=group, async_op=a))
        outs = [out]
    elif coll == "all_to_all":
        outs = [new() for _ in range(size)]
        issue(dist.all_to_all(outs, [S(_data(gen, dtype, shape)) for _ in range(size)], group=group, async_op=a))
    elif coll == "gather":
        outs = [new() for _ in range(size)] if rank == root else None
        issue(dist.gather(x, outs, group_dst=root, group=group, async_op=a))
        outs = outs or []
    elif coll == "scatter":
        out = new()
        src = [S(_data(gen, dtype, shape)) for _ in range(size)] if rank == root else None
        issue(dist.scatter(out, src, group_src=root, group=group, async_op=a))
        outs = [out]
    elif coll == "barrier":
        issue(dist.barrier(group=group, async_op=a))
    elif coll == "ring":                                            # isend/irecv around the ring
        out = new()
        nxt, prv = (rank + 1) % size, (rank - 1) % size
        works += dist.batch_isend_irecv([dist.P2POp(dist.isend, x, group=group, group_peer=nxt, tag=i),
                                         dist.P2POp(dist.irecv, out, group=group, group_peer=prv, tag=i)])
        outs = [out]
    for w in works:
        assert w.wait() is True
    return outs


def differential(rank: int, size: int, seed: int, ncases: int) -> dict:
    """Run ``ncases`` random collectives on comms and on Gloo and compare every output; returns
    how many outputs were compared per collective (the same on every rank but for rooted ones)."""
    warnings.simplefilter("ignore", FutureWarning)
    torch.set_num_threads(1)
    dist.init_process_group("comms")
    gloo = dist.new_group(backend="gloo")
    world = dist.group.WORLD
    rng = np.random.default_rng(seed)
    compared: dict[str, int] = {}
    for i in range(ncases):
        c = make_case(rng, size)
        mine = run_case(c, world, rank, size, seed, i, c["strided"])
        ref = run_case(c, gloo, rank, size, seed, i, False)
        exact = size <= 2 or c["coll"] not in REDUCING or c["dtype"] not in FLOATS
        for k, (m, r) in enumerate(zip(mine, ref, strict=True)):
            what = f"case {i} {c} output {k} on rank {rank}"
            if exact:
                torch.testing.assert_close(m, r, rtol=0, atol=0, equal_nan=True, msg=lambda s: f"{what}: {s}")
            else:     # more than 2 ranks: float sums may be added in another order; halves rounded once
                half = c["dtype"] in (torch.float16, torch.bfloat16)
                torch.testing.assert_close(m, r, rtol=0.02 if half else 1e-5, atol=0.5 if half else 1e-5,
                                           equal_nan=True, msg=lambda s: f"{what}: {s}")
        compared[c["coll"]] = compared.get(c["coll"], 0) + len(mine)
    dist.destroy_process_group()
    return compared
