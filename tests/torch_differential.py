"""Differential testing of the comms backend against Gloo: one random sequence of collectives (ops,
dtypes, shapes, roots, splits, sync or async) runs through a comms group and a Gloo group in the
same job, and every output is compared. All ranks draw the same sequence from the seed; the data
differ per rank.

Asynchronous calls also compare what ``work.get_future().wait()`` holds (and the future that
``all_reduce_coalesced`` / ``all_gather_coalesced`` return): the same structure (container types,
nesting, tensor dtypes and shapes) and the same contents as Gloo's. Where Gloo's work has no future
(reduce-scatter, send, recv: "Work::getFuture not implemented"), comms' future must hold only
tensors the caller passed to that call.

Every warning is an error, except the deprecation notices torch's own frontend gives for the
deprecated spellings the sequence calls on purpose (:data:`TORCH_DEPRECATIONS`): a warning raised
from comms' code fails the test."""
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
         "all_gather_single", "_all_gather_base", "all_gather_coalesced", "reduce_scatter", "reduce_scatter_tensor",
         "reduce_scatter_single", "coalesced_all_reduce", "coalesced_all_gather_single",
         "coalesced_reduce_scatter_single", "all_to_all_single", "all_to_all", "gather", "scatter", "barrier", "ring")
REDUCING = ("all_reduce", "all_reduce_coalesced", "reduce", "reduce_scatter", "reduce_scatter_tensor",
            "reduce_scatter_single", "coalesced_all_reduce", "coalesced_reduce_scatter_single")
# What torch 2.13's frontend (distributed_c10d.py, its ``@deprecated`` decorators) warns about the
# deprecated spellings this sequence calls on purpose. Nothing else may warn.
TORCH_DEPRECATIONS = (r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                      r"`torch\.distributed\.reduce_scatter_tensor` is deprecated",
                      r"`torch\.distributed\._all_gather_base` is a private function",
                      r"`torch\.distributed\.all_reduce_coalesced` will be deprecated",
                      r"`torch\.distributed\.all_gather_coalesced` will be deprecated")
NO_FUTURE = "no future"          # Gloo's work raises "Work::getFuture not implemented"


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
    if coll in ("reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single",
                "coalesced_reduce_scatter_single") and dtype == torch.bool:
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


def run_case(c: dict, group, rank: int, size: int, seed: int, i: int, strided: bool) -> tuple[list, list, list]:
    """Run case ``c`` on ``group``; returns (the outputs that are defined on this rank, the values
    of the futures of its asynchronous works in order, every tensor the caller passed). ``strided``
    makes every tensor non-contiguous (Gloo refuses those: it gets contiguous ones)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + i * 101 + rank)
    coll, dtype, shape, root, a = c["coll"], c["dtype"], c["shape"], c["root"], c["async_op"]
    op = getattr(R, c["op"])
    S = _strided if strided else (lambda t: t)
    passed: list[torch.Tensor] = []

    def new(*shape_):                       # an output buffer
        passed.append(S(torch.zeros(shape_ or shape, dtype=dtype)))
        return passed[-1]

    def data(*shape_):                      # an input buffer
        passed.append(S(_data(gen, dtype, shape_ or shape)))
        return passed[-1]

    x = data()
    works, futures, outs = [], [], []

    def issue(w):
        if a and w is not None:
            works.append(w)

    if coll == "all_reduce":
        issue(dist.all_reduce(x, op, group=group, async_op=a))
        outs = [x]
    elif coll == "all_reduce_coalesced":
        xs = [x, data(3), S(x.reshape(-1)[: max(1, x.numel() // 2)].clone())]
        passed.append(xs[-1])
        fut = dist.all_reduce_coalesced(xs, op, group=group, async_op=a)
        if a:
            futures.append(fut)
        outs = xs
    elif coll == "coalesced_all_reduce":                             # the coalescing manager's allreduce_coalesced
        xs = [x, data(3), data(2, 2)]
        with dist._coalescing_manager(group=group, async_ops=a) as cm:
            for t in xs:
                dist.all_reduce(t, op, group=group)
        works += cm.works
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
    elif coll in ("all_gather_into_tensor", "all_gather_single", "_all_gather_base"):
        out = new(size * shape[0], *shape[1:])
        issue(getattr(dist, coll)(out, x, group=group, async_op=a))
        outs = [out]
    elif coll == "all_gather_coalesced":                             # output_lists[r][k]: rank r's input k
        ys = [x, data(3)]
        outs_ = [[new(*y.shape) for y in ys] for _ in range(size)]
        fut = dist.all_gather_coalesced(outs_, ys, group=group, async_op=a)
        if a:
            futures.append(fut)
        outs = [t for ts in outs_ for t in ts]
    elif coll == "coalesced_all_gather_single":
        ys = [x, data(3, 2)]
        outs = [new(size * y.shape[0], *y.shape[1:]) for y in ys]
        with dist._coalescing_manager(group=group, async_ops=a) as cm:
            for o, y in zip(outs, ys):
                dist.all_gather_single(o, y, group=group)
        works += cm.works
    elif coll == "reduce_scatter":
        out = new()
        issue(dist.reduce_scatter(out, [data() for _ in range(size)], op=op, group=group, async_op=a))
        outs = [out]
    elif coll in ("reduce_scatter_tensor", "reduce_scatter_single"):
        inp = data(size * shape[0], *shape[1:])
        out = new()
        issue(getattr(dist, coll)(out, inp, op=op, group=group, async_op=a))
        outs = [out]
    elif coll == "coalesced_reduce_scatter_single":
        shapes = [shape, (3,)]
        ins = [data(size * s[0], *s[1:]) for s in shapes]
        outs = [new(*s) for s in shapes]
        with dist._coalescing_manager(group=group, async_ops=a) as cm:
            for o, t in zip(outs, ins):
                dist.reduce_scatter_single(o, t, op=op, group=group)
        works += cm.works
    elif coll == "all_to_all_single":
        sp = c["splits"]
        if shape[0] % 2:                                            # uneven splits
            ins, got = sp[rank], [sp[p][rank] for p in range(size)]
        else:
            ins, got = [shape[0]] * size, [shape[0]] * size
        inp = data(sum(ins), *shape[1:])
        out = new(sum(got), *shape[1:])
        issue(dist.all_to_all_single(out, inp, got if shape[0] % 2 else None, ins if shape[0] % 2 else None,
                                     group=group, async_op=a))
        outs = [out]
    elif coll == "all_to_all":
        outs = [new() for _ in range(size)]
        issue(dist.all_to_all(outs, [data() for _ in range(size)], group=group, async_op=a))
    elif coll == "gather":
        outs = [new() for _ in range(size)] if rank == root else None
        issue(dist.gather(x, outs, group_dst=root, group=group, async_op=a))
        outs = outs or []
    elif coll == "scatter":
        out = new()
        src = [data() for _ in range(size)] if rank == root else None
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
    values = [future_value(w) for w in works] + [f.wait() for f in futures]
    return outs, values, passed


def future_value(work):
    """What ``work.get_future()`` completes with, or :data:`NO_FUTURE` where the work has none."""
    try:
        fut = work.get_future()
    except RuntimeError as e:
        if "getFuture not implemented" not in str(e):
            raise
        return NO_FUTURE
    return fut.wait()


def layout(value):
    """The structure of a future's value: container types and nesting, tensors as (dtype, shape)."""
    if isinstance(value, torch.Tensor):
        return (value.dtype, tuple(value.shape))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [layout(v) for v in value])
    return (type(value).__name__, value)


def tensors_of(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for v in value for t in tensors_of(v)] if isinstance(value, (list, tuple)) else []


def _same(m: torch.Tensor, r: torch.Tensor, exact: bool, half: bool, what: str) -> None:
    if exact:
        torch.testing.assert_close(m, r, rtol=0, atol=0, equal_nan=True, msg=lambda s: f"{what}: {s}")
    else:     # more than 2 ranks: float sums may be added in another order; halves rounded once
        torch.testing.assert_close(m, r, rtol=0.02 if half else 1e-5, atol=0.5 if half else 1e-5,
                                   equal_nan=True, msg=lambda s: f"{what}: {s}")


def compare_futures(mine: list, ref: list, passed: list, exact: bool, half: bool, what: str,
                    contents: bool = True) -> int:
    """Each future value of comms against Gloo's: same layout and (``contents``) contents; where
    Gloo's work has no future, comms' holds a list of tensors the caller passed. Returns the
    tensors compared."""
    assert len(mine) == len(ref), f"{what}: {len(mine)} futures, Gloo {len(ref)}"
    n = 0
    for k, (m, r) in enumerate(zip(mine, ref)):
        w = f"{what} future {k}"
        if r is NO_FUTURE:
            assert type(m) is list and all(any(t is p for p in passed) for t in m), \
                f"{w}: Gloo has none; comms' holds {layout(m)}, not the caller's tensors"
            continue
        assert layout(m) == layout(r), f"{w}: comms' future holds {layout(m)}, Gloo's {layout(r)}"
        if not contents:
            continue
        for j, (mt, rt) in enumerate(zip(tensors_of(m), tensors_of(r))):
            _same(mt, rt, exact, half, f"{w} tensor {j}")
            n += 1
    return n


def differential(rank: int, size: int, seed: int, ncases: int) -> dict:
    """Run ``ncases`` random collectives on comms and on Gloo and compare every output and every
    future's value; returns how many outputs were compared per collective (the same on every rank
    but for rooted ones), plus ``"futures"``: how many future tensors were compared against Gloo's."""
    warnings.simplefilter("error")
    for message in TORCH_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    torch.set_num_threads(1)
    dist.init_process_group("comms")
    gloo = dist.new_group(backend="gloo")
    world = dist.group.WORLD
    rng = np.random.default_rng(seed)
    compared: dict[str, int] = {"futures": 0}
    for i in range(ncases):
        c = make_case(rng, size)
        mine, mine_f, passed = run_case(c, world, rank, size, seed, i, c["strided"])
        ref, ref_f, _ = run_case(c, gloo, rank, size, seed, i, False)
        exact = size <= 2 or c["coll"] not in REDUCING or c["dtype"] not in FLOATS
        half = c["dtype"] in (torch.float16, torch.bfloat16)
        for k, (m, r) in enumerate(zip(mine, ref, strict=True)):
            _same(m, r, exact, half, f"case {i} {c} output {k} on rank {rank}")
        compared[c["coll"]] = compared.get(c["coll"], 0) + len(mine)
        defined = c["coll"] != "reduce" or rank == c["root"]        # off the root reduce's buffer is unspecified
        compared["futures"] += compare_futures(mine_f, ref_f, passed, exact, half, f"case {i} {c} on rank {rank}",
                                               contents=defined)
    dist.destroy_process_group()
    return compared
