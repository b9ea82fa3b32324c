"""Rank functions running real torch.distributed clients (DDP, FSDP2, DTensor tensor parallelism,
functional collectives) twice in one job, once over the comms world group and once over a Gloo
group, and returning both results for comparison."""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn as nn

import comms  # noqa: F401 - registers the backend

STEPS = 4

# Every Gloo group made here, kept until the process exits. A Gloo group's destructor joins its
# worker threads, and those threads run the Python callbacks of hooks that hold the group (the
# PowerSGD state, _halving_hook's closure). Dropped on the main thread right after the last such
# callback, the group's last reference could go with the callback's closure on a worker thread,
# which then joined itself: std::system_error "Resource deadlock avoided", SIGABRT.
_GLOO_GROUPS: list[dist.ProcessGroup] = []


def _init(tag: str) -> dist.ProcessGroup:
    """The comms world plus a Gloo group over the same ranks, through the job's store under a
    prefix of its own (Gloo groups made again after destroy_process_group would otherwise read
    their predecessors' keys)."""
    from torch_workers import init
    torch.set_num_threads(1)
    init(tag=tag)
    _GLOO_GROUPS.append(dist.new_group(backend="gloo"))
    return _GLOO_GROUPS[-1]


def _batch(rank: int, step: int, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1000 * step + rank))


def _same(a: list, b: list, what: str, exact: bool = True) -> None:
    assert len(a) == len(b), what
    for i, (x, y) in enumerate(zip(a, b)):
        if exact:
            assert torch.equal(x, y), f"{what}[{i}]: comms {x} != gloo {y}"
        else:
            torch.testing.assert_close(x, y, msg=lambda m: f"{what}[{i}]: {m}")


class Net(nn.Module):
    """Three layers and a side branch (left out on some steps to test find_unused_parameters)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(12, 16)
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 4)
        self.side = nn.Linear(16, 4)

    def forward(self, x, use_side: bool = False):
        h = torch.relu(self.b(torch.relu(self.a(x))))
        return self.c(h) + (self.side(h) if use_side else 0)


# -- DDP ------------------------------------------------------------------------------------------
def _halving_hook(group, bucket):
    """A Python comm hook: all_reduce, then divide on the future's callback thread."""
    t = bucket.buffer()
    fut = dist.all_reduce(t, group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0].div_(dist.get_world_size(group)))


DDP_VARIANTS = {
    "plain": dict(bucket_cap_mb=0.001),             # several buckets in flight at once
    "find_unused": dict(find_unused_parameters=True),
    "static_graph": dict(static_graph=True),
    "bucket_view": dict(gradient_as_bucket_view=True, bucket_cap_mb=0.001),
    "python_hook": dict(),
    "fp16_hook": dict(),                            # torch's fp16_compress_hook
    "cpp_hook": dict(),                             # the C++ allreduce hook: calls the group from C++
    "powersgd": dict(),                             # its future callbacks wait for more all_reduces
}


def _train_ddp(rank: int, group, variant: str) -> list[torch.Tensor]:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.manual_seed(0)
    model = Net()
    ddp = DDP(model, process_group=group, **DDP_VARIANTS[variant])
    if variant == "python_hook":
        ddp.register_comm_hook(group, _halving_hook)
    elif variant == "fp16_hook":
        ddp.register_comm_hook(group, default_hooks.fp16_compress_hook)
    elif variant == "cpp_hook":
        ddp._register_builtin_comm_hook(dist.BuiltinCommHookType.ALLREDUCE)
    elif variant == "powersgd":
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd
        state = psgd.PowerSGDState(process_group=group, matrix_approximation_rank=1, start_powerSGD_iter=2,
                                   min_compression_rate=0.5)
        ddp.register_comm_hook(state, psgd.powerSGD_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    for step in range(STEPS):
        use_side = variant != "find_unused" or step % 2 == 1
        loss = ddp(_batch(rank, step, 8, 12), use_side).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def ddp(rank: int, size: int) -> list[str]:
    gloo = _init("ddp")
    world = dist.group.WORLD
    done = []
    for variant in DDP_VARIANTS:
        mine = _train_ddp(rank, world, variant)
        ref = _train_ddp(rank, gloo, variant)
        _same(mine, ref, f"DDP {variant}")
        torch.manual_seed(0)
        start = [p.detach() for p in Net().parameters()]
        assert not all(torch.equal(a, b) for a, b in zip(mine, start)), f"DDP {variant}: nothing trained"
        done.append(variant)
    dist.destroy_process_group()
    return done


# -- FSDP2 ----------------------------------------------------------------------------------------
def _train_fsdp(rank: int, mesh, variant: str, gloo: bool) -> list[torch.Tensor]:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    torch.manual_seed(0)
    model = Net()
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if variant == "bf16" else None
    kw = dict(mesh=mesh, **({"mp_policy": mp} if mp else {}))
    for layer in (model.a, model.b, model.c):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    if variant == "premul":          # comms: PREMUL_SUM(1/4) reduce-scatter; Gloo has none: SUM, then scale
        for m in (model.a, model.b, model.c, model):
            m.set_gradient_divide_factor(4.0)
            m.set_force_sum_reduction_for_comms(gloo)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for step in range(STEPS):
        model(_batch(rank, step, 8, 12), True).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def fsdp(rank: int, size: int) -> list[str]:
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    gloo = _init("fsdp")
    mine_mesh = init_device_mesh("cpu", (size,))
    assert dist.get_backend(mine_mesh.get_group()) == "comms"
    gloo_mesh = DeviceMesh.from_group(gloo, "cpu")
    done = []
    for variant in ("avg", "bf16", "premul"):
        mine = _train_fsdp(rank, mine_mesh, variant, gloo=False)
        ref = _train_fsdp(rank, gloo_mesh, variant, gloo=True)
        _same(mine, ref, f"FSDP2 {variant}")
        done.append(variant)
    dist.destroy_process_group()
    return done


# -- DTensor tensor parallelism -------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, dim: int = 16, hidden: int = 32):
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _run_tp(mesh) -> list[torch.Tensor]:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    torch.manual_seed(0)
    mlp = MLP()
    if mesh is not None:
        parallelize_module(mlp, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1)
    outs = []
    for step in range(STEPS):
        x = _batch(0, step, 4, 16)                      # tensor parallel: every rank sees the same batch
        y = mlp(x)
        y.square().sum().backward()
        opt.step()
        opt.zero_grad()
        outs.append(y.detach())
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in mlp.parameters()]
    return outs + [p.detach().clone() for p in full]


def tensor_parallel(rank: int, size: int) -> int:
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    gloo = _init("tensor_parallel")
    mine = _run_tp(init_device_mesh("cpu", (size,)))
    ref = _run_tp(DeviceMesh.from_group(gloo, "cpu"))
    _same(mine, ref, "TP")
    _same(mine, _run_tp(None), "TP vs one process", exact=False)
    dist.destroy_process_group()
    return len(mine)


# -- functional collectives -----------------------------------------------------------------------
def _funcol(group, rank: int, size: int) -> list[torch.Tensor]:
    import torch.distributed._functional_collectives as fc
    x = _batch(rank, 7, 4 * size, 3)
    outs = [
        fc.all_reduce(x, "sum", group),
        fc.all_reduce(x, "max", group),
        fc.all_reduce(x, "avg", group),
        fc.all_gather_tensor(x, 0, group),
        fc.all_gather_tensor(x, 1, group),
        fc.reduce_scatter_tensor(x, "sum", 0, group),
        fc.reduce_scatter_tensor(x, "avg", 0, group),
        fc.all_to_all_single(x, None, None, group),
        fc.all_to_all_single(x[:rank + size], [1 + (p if rank == 0 else 0) for p in range(size)],
                             [1 + (rank if p == 0 else 0) for p in range(size)], group),   # uneven
        fc.broadcast(x, 1 % size, group),
        *fc.all_reduce_coalesced([x, x[0] * 2], "sum", group),
        *fc.all_gather_into_tensor_coalesced([x, x[:1]], group),
        *fc.reduce_scatter_tensor_coalesced([x, x * 3], "sum", [0, 0], group),
        # torch 2.13's names for the four above
        fc.all_gather_single(x, 1, group),
        fc.reduce_scatter_single(x, "max", 0, group),
        *fc.all_gather_single_coalesced([x, x[:1]], group),
        *fc.reduce_scatter_single_coalesced([x, x * 3], "sum", [0, 0], group),
    ]
    return [fc.wait_tensor(o) if isinstance(o, fc.AsyncCollectiveTensor) else o for o in outs]


# torch 2.13's own notices for the deprecated functional spellings _funcol calls on purpose
FUNCOL_DEPRECATIONS = r"`torch\.distributed\._functional_collectives\.\w+` is deprecated"


def functional(rank: int, size: int) -> int:
    """Functional collectives (every spelling torch 2.13 has) on comms and Gloo: the same results,
    and no warning but torch's deprecation notices."""
    gloo = _init("functional")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=FUNCOL_DEPRECATIONS, category=FutureWarning)
        mine = [t.clone() for t in _funcol(dist.group.WORLD, rank, size)]
        ref = _funcol(gloo, rank, size)
    _same(mine, ref, "functional collectives")
    dist.destroy_process_group()
    return len(mine)


def run_all(rank: int, size: int, names: list[str]) -> dict:
    """Run several rank functions of this module in one job, in order: name -> result."""
    return {name: globals()[name](rank, size) for name in names}
