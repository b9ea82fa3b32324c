"""Rank functions for the torch.distributed backend tests: every c10d op through a comms group and
a Gloo group in the same job, Work semantics, subgroups, teardown (spawned by comms.testing)."""
from __future__ import annotations

import os
import threading
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist

import comms  # noqa: F401 - registers the backend

R = dist.ReduceOp


def init(backend: str = "comms", tag: str | None = None, **kw) -> None:
    """The world group. With ``tag``, through the job's store under a prefix of its own: Gloo
    groups made again after destroy_process_group get the names of their predecessors and would
    read their keys (comms groups do not: they count generations)."""
    warnings.simplefilter("ignore", FutureWarning)      # deprecated spellings we test on purpose
    if tag is not None:
        kw.update(store=job_store(tag), rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    dist.init_process_group(backend, **kw)


def job_store(tag: str) -> dist.Store:
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=60))
    return dist.PrefixStore(f"{tag}/", base)


def clone(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    return [clone(v) for v in x]


def assert_same(a, b, what: str, exact: bool = True) -> None:
    if isinstance(a, torch.Tensor):
        if exact:
            assert a.dtype == b.dtype and torch.equal(a, b), f"{what}: comms {a} != gloo {b}"
        elif a.dtype in (torch.float16, torch.bfloat16):   # comms rounds once (float32 sums), Gloo per step
            torch.testing.assert_close(a, b, atol=0.25, rtol=0.02, msg=lambda m: f"{what}: {m}")
        else:
            torch.testing.assert_close(a, b, msg=lambda m: f"{what}: {m}")
        return
    assert len(a) == len(b), what
    for i, (x, y) in enumerate(zip(a, b)):
        assert_same(x, y, f"{what}[{i}]", exact)


# -- every op, comms against gloo ------------------------------------------------------------------
def _layout(value):
    """Nested lists of tensor shapes: what a future's value looks like."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    return [_layout(v) for v in value]


def every_op(group, rank: int, size: int, async_op: bool) -> dict:
    """Run every c10d operation once on ``group``; returns name -> outputs."""
    out = {}
    g = torch.Generator().manual_seed(7 + rank)
    x = torch.randn(6, 3, generator=g)
    n = torch.randint(1, 50, (6, 3), generator=g, dtype=torch.int64)
    root = 1 % size

    futures = out["_futures"] = {}       # the layout of each async work's future value (None: no future)

    def go(name, work):
        name = f"{name}#{sum(k.startswith(name + '#') for k in futures)}"
        if async_op and isinstance(work, torch._C.Future):          # all_reduce_coalesced
            assert isinstance(work.wait(), list)
        elif async_op:
            assert isinstance(work, dist.Work), f"async call returned {work!r}"
            assert work.wait() is True
            try:
                futures[name] = _layout(work.get_future().wait())
            except RuntimeError:                                    # Gloo has none for some ops
                futures[name] = None
        else:
            assert work is None

    for op in ("SUM", "PRODUCT", "MIN", "MAX", "AVG"):
        t = x.clone()
        go("all_reduce", dist.all_reduce(t, getattr(R, op), group=group, async_op=async_op))
        out[f"all_reduce_{op}"] = t
    for op in ("BAND", "BOR", "BXOR"):
        t = n.clone()
        go("all_reduce", dist.all_reduce(t, getattr(R, op), group=group, async_op=async_op))
        out[f"all_reduce_{op}"] = t
    for dtype in (torch.bfloat16, torch.float16, torch.float64, torch.int8, torch.uint8, torch.int32, torch.bool):
        t = (x * 3).to(dtype)
        go("all_reduce", dist.all_reduce(t, R.MAX if dtype == torch.bool else R.SUM, group=group, async_op=async_op))
        out[f"all_reduce_{dtype}"] = t
    t = x.clone().t()                                       # not contiguous
    go("all_reduce", dist.all_reduce(t, group=group, async_op=async_op))
    out["all_reduce_strided"] = t
    t = torch.complex(x, -x)
    go("all_reduce", dist.all_reduce(t, group=group, async_op=async_op))
    out["all_reduce_complex"] = t
    ts = [x.clone(), x[:2].clone() * 2, x[1].clone()]
    go("all_reduce_coalesced", dist.all_reduce_coalesced(ts, group=group, async_op=async_op))
    out["all_reduce_coalesced"] = ts
    for dtype in (torch.float32, torch.complex64, torch.int16, torch.float8_e4m3fn):
        if dtype in (torch.int16, torch.float8_e4m3fn) and group is not None:
            continue                                        # Gloo has no such broadcast
        t = (x * 10).to(dtype) if rank == root else torch.zeros(6, 3, dtype=dtype)
        go("broadcast", dist.broadcast(t, group_src=root, group=group, async_op=async_op))
        out[f"broadcast_{dtype}"] = t
        if dtype in (torch.int16, torch.float8_e4m3fn):     # moved as bytes: check against the root's
            want = (torch.randn(6, 3, generator=torch.Generator().manual_seed(7 + root)) * 10).to(dtype)
            assert torch.equal(t.view(torch.uint8), want.view(torch.uint8)), f"broadcast {dtype}"
            del out[f"broadcast_{dtype}"]
    t = x.clone()
    go("reduce", dist.reduce(t, group_dst=root, op=R.MAX, group=group, async_op=async_op))
    out["reduce"] = t if rank == root else []               # off the root the contents are unspecified
    ts = [torch.zeros(6, 3) for _ in range(size)]           # separate tensors
    go("all_gather", dist.all_gather(ts, x, group=group, async_op=async_op))
    out["all_gather"] = ts
    flat = torch.zeros(size * 4, dtype=torch.int64)         # back-to-back views: gathered in place
    go("all_gather", dist.all_gather(list(flat.chunk(size)), n.view(-1)[:4].clone(), group=group, async_op=async_op))
    out["all_gather_views"] = flat
    t = torch.zeros(size * 6, 3)
    go("all_gather_into_tensor", dist.all_gather_into_tensor(t, x, group=group, async_op=async_op))
    out["all_gather_into_tensor"] = t
    t = torch.zeros(3)
    go("reduce_scatter", dist.reduce_scatter(t, [x[i % 6].clone() * (i + 1) for i in range(size)], group=group, async_op=async_op))
    out["reduce_scatter"] = t
    t = torch.zeros(2, 3)
    go("reduce_scatter_tensor", dist.reduce_scatter_tensor(t, x[:2 * size].clone(), op=R.MAX, group=group, async_op=async_op))
    out["reduce_scatter_tensor"] = t
    t = torch.zeros(size * 6, 3)                            # torch 2.13's names for the two above
    go("all_gather_single", dist.all_gather_single(t, x, group=group, async_op=async_op))
    out["all_gather_single"] = t
    t = torch.zeros(2, 3)
    go("reduce_scatter_single", dist.reduce_scatter_single(t, x[:2 * size].clone(), op=R.MAX, group=group, async_op=async_op))
    out["reduce_scatter_single"] = t
    ts, ys = [torch.zeros(size * 2, 3), torch.zeros(size, 3)], [x[:2].clone(), x[2:3].clone()]
    with dist._coalescing_manager(group=group, async_ops=async_op) as cm:   # allgather_into_tensor_coalesced
        for t, y in zip(ts, ys):
            dist.all_gather_single(t, y, group=group)
    if async_op:
        cm.wait()
    out["all_gather_single_coalesced"] = ts
    t = torch.zeros(size * 2, 3)
    go("all_to_all_single", dist.all_to_all_single(t, x[:size * 2].clone(), group=group, async_op=async_op))
    out["all_to_all_single"] = t
    ins = [(p + 2 * rank) % 3 + 1 for p in range(size)]     # uneven: rank r sends (p + 2r) % 3 + 1 rows to p
    outs = [(rank + 2 * p) % 3 + 1 for p in range(size)]
    t = torch.zeros(sum(outs), 3)
    go("all_to_all_single", dist.all_to_all_single(t, x[:sum(ins)].clone(), outs, ins, group=group, async_op=async_op))
    out["all_to_all_single_uneven"] = t
    ots = [torch.zeros(2, 2) for p in range(size)]
    its = [x[:2, :2].clone() + p for p in range(size)]
    go("all_to_all", dist.all_to_all(ots, its, group=group, async_op=async_op))
    out["all_to_all"] = ots
    if group is None:                                       # uneven lists: Gloo has none
        ots = [torch.zeros(p + 1, 2) for p in range(size)]
        its = [torch.full((rank + 1, 2), 10.0 * rank + p) for p in range(size)]
        go("all_to_all", dist.all_to_all(ots, its, group=group, async_op=async_op))
        for p in range(size):
            assert torch.equal(ots[p], torch.full((p + 1, 2), 10.0 * p + rank)), f"uneven all_to_all {ots}"
    ts = [torch.zeros(6, 3) for _ in range(size)] if rank == root else None
    go("gather", dist.gather(x.clone(), ts, group_dst=root, group=group, async_op=async_op))
    out["gather"] = ts if ts is not None else []
    t = torch.zeros(6, 3)
    src = [x.clone() + p for p in range(size)] if rank == root else None
    go("scatter", dist.scatter(t, src, group_src=root, group=group, async_op=async_op))
    out["scatter"] = t
    go("barrier", dist.barrier(group=group, async_op=async_op))
    return out


def compare_every_op(rank: int, size: int) -> list[str]:
    """Every op, sync and async, on the comms world and a Gloo group: same outputs."""
    init(tag="compare_every_op")
    gloo = dist.new_group(backend="gloo")
    checked = []
    for async_op in (False, True):
        mine = every_op(None, rank, size, async_op)
        ref = every_op(gloo, rank, size, async_op)
        assert mine.keys() == ref.keys()
        mine_f, ref_f = mine.pop("_futures"), ref.pop("_futures")
        for name in mine_f.keys() & ref_f.keys():            # Gloo skips some broadcasts
            m, r = mine_f[name], ref_f[name]
            assert r is None or m == r, f"async {name}: the future holds {m}, Gloo's {r}"
        for k in mine:
            # float sums of more than 2 ranks may be added in another order than Gloo's
            assert_same(mine[k], ref[k], f"{k} async={async_op}", exact=size <= 2)
            checked.append(k)
    dist.destroy_process_group()
    return checked


def premul_and_avg(rank: int, size: int) -> list:
    """AVG and PREMUL_SUM (number and tensor factors) for all_reduce, reduce, reduce_scatter;
    returns each result's sum (the expected values are checked here too)."""
    init()
    x = torch.arange(8, dtype=torch.float64) * (rank + 1)
    total = sum(torch.arange(8, dtype=torch.float64) * (r + 1) for r in range(size))
    sums = []
    for factor in (0.5, torch.tensor([3.0], dtype=torch.float64)):
        op = dist._make_nccl_premul_sum(factor)
        f = float(factor)
        t = x.clone()
        dist.all_reduce(t, op=op)
        assert torch.equal(t, total * f), (t, total * f)
        sums.append(t.sum().item())
        t = x.clone()
        dist.reduce(t, dst=0, op=op)
        assert torch.equal(t, total * f if rank == 0 else x), t
        out, inp = torch.zeros(8 // size, dtype=torch.float64), x.clone()
        dist.reduce_scatter_tensor(out, inp, op=op)
        assert torch.equal(inp, x), "PREMUL_SUM must not scale the caller's input"
        assert torch.equal(out, (total * f).chunk(size)[rank]), out
        out.zero_()
        dist.reduce_scatter_tensor(out, inp, op=op, async_op=True).wait()
        assert torch.equal(out, (total * f).chunk(size)[rank]), out
        sums.append(out.sum().item())
    t = x.clone()
    dist.all_reduce(t, op=R.AVG)
    assert torch.equal(t, total / size)
    sums.append(t.sum().item())
    dist.destroy_process_group()
    return sums


# -- point to point -------------------------------------------------------------------------------
def point_to_point(rank: int, size: int) -> dict:
    """send/recv, isend/irecv, batch_isend_irecv (a ring), and receives from any source."""
    init()
    res = {}
    nxt, prv = (rank + 1) % size, (rank - 1) % size
    if rank == 0:
        dist.send(torch.arange(4.0), 1, tag=3)
    elif rank == 1:
        t = torch.zeros(4)
        res["recv"] = (dist.recv(t, 0, tag=3), t.tolist())
    send = torch.full((3,), float(rank))
    recv = torch.zeros(3)
    reqs = [dist.isend(send, nxt), dist.irecv(recv, prv)]
    for r in reqs:
        r.wait()
    res["isend_irecv"] = recv.tolist()
    strided = torch.zeros(3, 2)[:, 0]
    ops = [dist.P2POp(dist.irecv, strided, prv, tag=5), dist.P2POp(dist.isend, send * 10, nxt, tag=5)]
    for r in dist.batch_isend_irecv(ops):
        r.wait()
    res["batch"] = strided.tolist()
    if rank == 0:                                           # any source: every other rank sends once
        got = []
        for _ in range(size - 1):
            t = torch.zeros(2, dtype=torch.int64)
            src = dist.recv(t, tag=9)
            got.append((src, t.tolist()))
        w = dist.irecv(torch.zeros(2, dtype=torch.int64), tag=9)
        dist.barrier()
        w.wait()
        got.append((w._source_rank(), None))
        res["any"] = sorted(got, key=str)
    else:
        dist.send(torch.tensor([rank, rank * 2]), 0, tag=9)
        dist.barrier()
        if rank == size - 1:
            dist.send(torch.tensor([0, 0]), 0, tag=9)
    dist.destroy_process_group()
    return res


def objects(rank: int, size: int) -> list:
    init()
    got = [None] * size
    dist.all_gather_object(got, {"rank": rank, "pad": "x" * (rank * 100)})
    lst = [rank, {"from": rank}, "y" * 1000] if rank == 1 else [None, None, None]
    dist.broadcast_object_list(lst, src=1)
    dist.destroy_process_group()
    return [[o["rank"] for o in got], [len(o["pad"]) for o in got], lst[:2], len(lst[2])]


# -- Work semantics -------------------------------------------------------------------------------
def work_semantics(rank: int, size: int) -> dict:
    """is_completed() does not block; async work issued from another thread only enqueues;
    get_future() holds the output tensors, and its callbacks run off the progress thread, free to
    wait for more comms work (as PowerSGD's do); wait() raises comms errors."""
    init(timeout=timedelta(seconds=60))
    store = dist.distributed_c10d._get_default_store()
    res = {}
    t = torch.ones(5) * (rank + 1)
    t2 = torch.ones(2) * (rank + 1)
    if rank == 0:
        box = {}

        def issue():                          # like DDP's autograd thread: must return at once
            box["w"] = dist.all_reduce(t, async_op=True)
        th = threading.Thread(target=issue)
        th.start()
        th.join(30)
        w = box["w"]
        res["enqueued"] = not th.is_alive()
        res["pending"] = (w.is_completed(), w.is_success())    # the peer has not joined yet
        fut = w.get_future()
        chained = fut.then(lambda f: (threading.current_thread().name.split("_")[0],
                                      dist.all_reduce(t2, async_op=True).get_future().wait()[0].tolist()))
        res["future_pending"] = fut.done()
        store.set("go", "1")
        value = fut.wait()
        res["future_value"] = [v.data_ptr() == t.data_ptr() for v in value]
        res["callback"] = chained.wait()
        w.wait()
        res["done"] = (w.is_completed(), w.is_success(), w.exception())
    else:
        store.wait(["go"])
        dist.all_reduce(t)
        dist.all_reduce(t2)
    res["sum"] = t.tolist()
    # the future of a completed work: its callbacks run at once, on this thread
    w = dist.all_reduce(t, async_op=True)
    w.wait()
    res["then"] = w.get_future().then(lambda f: f.value()[0].sum().item()).wait()
    # errors: a mismatch raises the comms error from wait() and from the future
    g = dist.new_group(backend="comms")
    bad = torch.ones(4 + rank)
    w = dist.all_reduce(bad, group=g, async_op=True)
    try:
        w.wait()
        res["mismatch"] = None
    except comms.CommsError as e:
        res["mismatch"] = type(e).__name__
    try:
        w.get_future().wait()
        res["future_error"] = None
    except Exception as e:  # noqa: BLE001 - torch re-raises it as RuntimeError
        res["future_error"] = "ranks called" in str(e) or "mismatch" in str(e).lower()
    res["after"] = (w.is_completed(), w.is_success())
    dist.destroy_process_group()
    return res


def timeouts(rank: int, size: int) -> dict:
    """The group timeout and a per-op ``opts.timeout`` both bound a wait that no peer answers."""
    init()
    store = dist.distributed_c10d._get_default_store()
    res = {}
    short = dist.new_group(backend="comms", timeout=timedelta(seconds=1))
    long = dist.new_group(backend="comms", timeout=timedelta(seconds=120))
    if rank == 0:
        for name, g, opts_timeout in (("group", short, None), ("op", long, timedelta(seconds=1))):
            opts = dist.AllreduceOptions()
            if opts_timeout is not None:
                opts.timeout = opts_timeout
            try:
                g.allreduce([torch.ones(3)], opts).wait()
                res[name] = None
            except comms.CommTimeout as e:
                res[name] = type(e).__name__
        store.set("done", "1")
    else:
        store.wait(["done"])                 # never joins those all_reduces
    dist.barrier()                           # the world group is unaffected
    dist.destroy_process_group()
    return res


# -- groups and teardown -----------------------------------------------------------------------------
def subgroups(rank: int, size: int) -> dict:
    """new_group with extended_api: global ranks, group ranks, ops inside, mixed with Gloo."""
    init(tag="subgroups")
    res = {}
    evens = dist.new_group([r for r in range(size) if r % 2 == 0], backend="comms")
    tail = dist.new_group(list(range(1, size)))              # the world's backend: comms
    gloo_tail = dist.new_group(list(range(1, size)), backend="gloo")
    if rank % 2 == 0:
        res["evens"] = (evens._global_ranks, evens.rank(), evens.size(), dist.get_process_group_ranks(evens))
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=evens)
        res["evens_sum"] = t.item()
        t = torch.tensor([float(rank)])
        dist.broadcast(t, src=size - 1 - (size - 1) % 2, group=evens)     # a global rank
        res["evens_bcast"] = t.item()
    if rank >= 1:
        a, b = torch.tensor([rank * 1.5]), torch.tensor([rank * 1.5])
        dist.all_reduce(a, group=tail)
        dist.all_reduce(b, group=gloo_tail)
        res["tail"] = (a.item(), b.item(), dist.get_backend(tail), tail.name())
        if rank == 1 and size > 2:
            t = torch.zeros(1)
            res["tail_recv"] = dist.recv(t, group=tail)                  # global rank of the sender
        if rank == 2:
            dist.send(torch.ones(1), dst=1, group=tail)
    dist.destroy_process_group()
    return res


def teardown(rank: int, size: int) -> list:
    """destroy_process_group drains started work; a new world in the same job (same store keys)
    works; a subgroup can be destroyed alone."""
    out = []
    for generation in range(2):
        init()
        ts = [torch.full((1000,), float(rank + i)) for i in range(20)]
        works = [dist.all_reduce(t, async_op=True) for t in ts]
        g = dist.new_group(backend="comms")
        dist.all_reduce(torch.ones(1), group=g)
        dist.destroy_process_group(g)
        dist.destroy_process_group()
        out.append((all(w.is_completed() for w in works), all(w.is_success() for w in works),
                    ts[-1][0].item(), generation))
    return out


def run_all(rank: int, size: int, names: list[str]) -> dict:
    """Run several rank functions of this module in one job (one spawn instead of many), in
    order; returns name -> that function's result. A failure fails the whole job."""
    return {name: globals()[name](rank, size) for name in names}
