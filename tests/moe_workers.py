"""Functions that run inside spawned ranks for tests/test_moe.py, and the reference they check
against: every rank regenerates every rank's inputs from the case's seed and computes what it must
receive directly from them (no layout code of comms.moe is used here)."""
from __future__ import annotations

import os

import torch

import comms
from comms.moe import Dispatcher, dequantize, quantize

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# -- inputs and reference ------------------------------------------------------------------------
def rank_inputs(case: dict, world: int, rank: int):
    """(x, topk_idx, topk_weights) of ``rank`` for ``case`` (deterministic)."""
    E, K, H, T = case["experts"], case["k"], case["hidden"], case["tokens"][rank]
    epr = E // world
    g = torch.Generator().manual_seed(case["seed"] * 1009 + rank)
    x = torch.randn(T, H, generator=g).to(DTYPES[case["dtype"]])
    route = case["route"]
    idx = torch.full((T, K), -1, dtype=torch.int64)
    for t in range(T):
        if route == "one_rank":
            pool = torch.arange(case["target"] * epr, (case["target"] + 1) * epr)
        else:
            pool = torch.arange(E)
        chosen = pool[torch.randperm(pool.numel(), generator=g)][:K]
        idx[t, :chosen.numel()] = chosen
        idx[t] = idx[t, torch.randperm(K, generator=g)]               # -1 anywhere in the row
    if route == "no_expert":
        idx[::2] = -1
        if T:
            idx[-1] = -1
    elif route == "sparse":
        idx[torch.rand(T, K, generator=g) < 0.5] = -1
    w = torch.rand(T, K, generator=g)
    return x, idx, w


def owners(row: torch.Tensor, epr: int) -> list[int]:
    return sorted({int(e) // epr for e in row if e >= 0})


def reference_dispatch(case: dict, world: int, me: int, xform=lambda x: x):
    """What rank ``me`` must receive: (recv_x, recv_topk_idx, recv_topk_weights, tokens_per_expert)."""
    epr = case["experts"] // world
    xs, idxs, ws = [], [], []
    for s in range(world):
        x, idx, w = rank_inputs(case, world, s)
        x = xform(x)
        for t in range(idx.shape[0]):
            if me in owners(idx[t], epr):
                local = idx[t] - me * epr
                here = (idx[t] >= 0) & (local >= 0) & (local < epr)
                xs.append(x[t])
                idxs.append(torch.where(here, local, -1))
                ws.append(torch.where(here, w[t], 0.0))
    K, H = case["k"], case["hidden"]
    dt = DTYPES[case["dtype"]]
    rx = torch.stack(xs) if xs else torch.zeros(0, H, dtype=dt)
    ri = torch.stack(idxs) if idxs else torch.zeros(0, K, dtype=torch.int64)
    rw = torch.stack(ws) if ws else torch.zeros(0, K)
    tpe = [int((ri == e).sum()) for e in range(epr)]
    return rx, ri, rw, tpe


def reference_combine(case: dict, world: int, me: int) -> torch.Tensor:
    """Rank p returns y = recv_x * (p + 1); token t gets the float32 sum over its ranks, ascending."""
    x, idx, _ = rank_inputs(case, world, me)
    epr = case["experts"] // world
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for p in owners(idx[t], epr):
            out[t] += (x[t] * (p + 1)).float()
    return out.to(x.dtype)


def reference_ll(case: dict, world: int, me: int):
    """Low-latency: per local expert, the rows (source rank, then token) and the weighted output
    every source expects when expert e returns ``recv_x * (e + 1)``."""
    epr = case["experts"] // world
    per_expert = [[] for _ in range(epr)]
    for s in range(world):
        x, idx, _ = rank_inputs(case, world, s)
        for t in range(idx.shape[0]):
            for e in range(epr):
                if (idx[t] == me * epr + e).any():
                    per_expert[e].append(x[t])
    x, idx, w = rank_inputs(case, world, me)
    out = torch.zeros(x.shape, dtype=torch.float32)
    for k in range(idx.shape[1]):
        for t in range(x.shape[0]):
            e = int(idx[t, k])
            if e >= 0:
                out[t] += (x[t] * (e + 1)).float() * w[t, k]
    return per_expert, out.to(x.dtype)


def fp8_ok(q: torch.Tensor, scales: torch.Tensor, ref: torch.Tensor) -> bool:
    """Dequantised error within e4m3 tolerance: |err| <= amax of the 128-block / 16."""
    if not ref.numel():
        return q.numel() == 0
    deq = dequantize(q, scales)
    blocks = ref.float().view(ref.shape[0], -1, 128)
    bound = blocks.abs().amax(dim=-1, keepdim=True).expand_as(blocks).reshape(ref.shape) / 16 + 1e-6
    return bool(((deq - ref.float()).abs() <= bound).all())


# -- spawned jobs ----------------------------------------------------------------------------------
def _init(timeout: float = 60) -> comms.Communicator:
    """One intra-op thread per rank (as torchrun sets OMP_NUM_THREADS=1): several ranks share two
    cores here, and spinning OpenMP workers would starve each other."""
    torch.set_num_threads(1)
    return comms.init(timeout=timeout)


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(what)


def run_case(ep: Dispatcher, case: dict, world: int, rank: int, exact_combine: bool = True) -> None:
    what = f"rank {rank} case {case}"
    x, idx, w = rank_inputs(case, world, rank)
    rx, ri, rw, tpe, h = ep.dispatch(x, idx, w)
    ex, ei, ew, etpe = reference_dispatch(case, world, rank)
    _check(torch.equal(rx, ex) and rx.dtype == ex.dtype, f"recv_x differs: {what}")
    _check(torch.equal(ri, ei), f"recv_topk_idx differs: {what}\n{ri}\n{ei}")
    _check(torch.equal(rw, ew), f"recv_topk_weights differs: {what}")
    _check(tpe == etpe, f"tokens_per_expert {tpe} != {etpe}: {what}")
    # round trip, then a rank-dependent expert function
    n = torch.tensor([len(owners(r, case["experts"] // world)) for r in idx], dtype=x.dtype)
    _check(torch.equal(ep.combine(rx, h), x * n.unsqueeze(1)), f"round trip differs: {what}")
    out = ep.combine(rx * (rank + 1), h)
    want = reference_combine(case, world, rank)
    if exact_combine:
        _check(torch.equal(out, want), f"combine differs: {what}")
    else:
        tol = 2e-2 if x.dtype != torch.float32 else 1e-5
        _check(torch.allclose(out.float(), want.float(), rtol=tol, atol=tol), f"combine differs: {what}")
    # cached routing with new activations
    rx2, ri2, _, tpe2, _ = ep.dispatch(x * 2 - 1, handle=h)
    ex2 = reference_dispatch(case, world, rank, xform=lambda v: v * 2 - 1)[0]
    _check(torch.equal(rx2, ex2) and torch.equal(ri2, ei) and tpe2 == etpe, f"cached dispatch differs: {what}")
    _check(torch.equal(rx, ex), f"recv_x changed by a later call (a reused buffer?): {what}")
    if case["fp8"]:
        (q, sc), ri3, _, _, h3 = ep.dispatch(x, idx, w, fp8=True)
        eq, esc = quantize(ex)
        _check(q.dtype == torch.float8_e4m3fn and torch.equal(q.view(torch.uint8), eq.view(torch.uint8))
               and torch.equal(sc, esc) and torch.equal(ri3, ei), f"fp8 dispatch differs: {what}")
        _check(fp8_ok(q, sc, ex), f"fp8 error above tolerance: {what}")
        (q2, sc2), *_ = ep.dispatch(x, handle=h3, fp8=True)
        _check(torch.equal(q2.view(torch.uint8), eq.view(torch.uint8)) and torch.equal(sc2, esc),
               f"cached fp8 dispatch differs: {what}")
        _check(torch.equal(ep.combine(rx, h3), x * n.unsqueeze(1)), f"combine after fp8 differs: {what}")


def run_ll_case(ep: Dispatcher, case: dict, world: int, rank: int) -> None:
    what = f"rank {rank} low-latency case {case}"
    x, idx, w = rank_inputs(case, world, rank)
    cap, epr = case["cap"], case["experts"] // world
    recv, count, h = ep.low_latency_dispatch(x, idx, cap, fp8=case["fp8"])
    per_expert, want = reference_ll(case, world, rank)
    _check(count.tolist() == [len(r) for r in per_expert], f"recv_count {count.tolist()}: {what}")
    if case["fp8"]:
        q, sc = recv
        _check(tuple(q.shape) == (epr, cap * world, case["hidden"]), f"shape {q.shape}: {what}")
        for e in range(epr):
            if per_expert[e]:
                _check(fp8_ok(q[e, :len(per_expert[e])], sc[e, :len(per_expert[e])], torch.stack(per_expert[e])),
                       f"fp8 rows of expert {e}: {what}")
        scale = (torch.arange(epr) + rank * epr + 1).view(epr, 1, 1)
        out = ep.low_latency_combine((dequantize(q, sc) * scale).to(x.dtype), idx, w, h).float()
        mult = torch.where(idx >= 0, w * (idx + 1), 0.0).sum(dim=1, keepdim=True)
        amax = x.float().abs().amax(dim=1, keepdim=True) if x.numel() else x.float()
        _check(bool(((out - want.float()).abs() <= mult * amax / 8 + 1e-3).all()), f"fp8 low-latency combine: {what}")
        return
    _check(tuple(recv.shape) == (epr, cap * world, case["hidden"]), f"shape {recv.shape}: {what}")
    for e in range(epr):
        if per_expert[e]:
            _check(torch.equal(recv[e, :len(per_expert[e])], torch.stack(per_expert[e])), f"rows of expert {e}: {what}")
    scale = (torch.arange(epr) + rank * epr + 1).to(x.dtype).view(epr, 1, 1)
    out = ep.low_latency_combine(recv * scale, idx, w, h)
    _check(torch.equal(out, want), f"low-latency combine differs: {what}")


def run_cases(rank: int, world: int, cases: list[dict], single_copy: bool) -> dict:
    """Every case through normal, cached, fp8 and low-latency mode, checked against the reference;
    returns the load statistics so the parent can check them too. ``single_copy``: whether the
    dispatchers must be using the single-copy exchange (shared-memory windows)."""
    comm = _init()
    by_e: dict[int, Dispatcher] = {}
    for case in cases:
        key = (case["experts"], case["hidden"])
        if key not in by_e:
            by_e[key] = Dispatcher(comm, case["experts"], case["hidden"])
            _check(by_e[key].single.enabled == single_copy, f"rank {rank}: single copy is "
                   f"{by_e[key].single.reason}, expected {'on' if single_copy else 'off'}")
        ep = by_e[key]
        run_case(ep, case, world, rank)
        run_ll_case(ep, case, world, rank)
    loads = {f"{k[0]}x{k[1]}": (ep.load.routed.tolist(), ep.load.received.tolist(), ep.load.dispatches,
                                ep.global_load().tolist()) for k, ep in by_e.items()}
    comm.close()
    return loads


# -- bad input: every rank raises, nothing moves, the communicator stays usable ---------------------
def _outcome(fn) -> tuple[str, str]:
    try:
        fn()
    except comms.CommsError as e:
        return type(e).__name__, str(e)
    return "no error", ""


def run_bad_inputs(rank: int, world: int) -> dict:
    """One scenario per key; each returns (exception class, message) on this rank. After each,
    a valid dispatch must still round-trip. Returns the outcomes and byte counts."""
    comm = _init(30)
    E, H, K, T = 2 * world, 256, 2, 32
    ep = Dispatcher(comm, E, H)
    case = dict(seed=7, experts=E, k=K, hidden=H, dtype="bf16", tokens=[T] * world, route="random", target=0)
    x, idx, w = rank_inputs(case, world, rank)
    out: dict = {}

    def valid_round_trip() -> None:
        rx, _, _, _, h = ep.dispatch(x, idx, w)
        n = torch.tensor([len(owners(r, E // world)) for r in idx], dtype=x.dtype)
        _check(torch.equal(ep.combine(rx, h), x * n.unsqueeze(1)), f"rank {rank}: round trip after an error")

    def on(culprit: int, good, bad):
        return bad if rank == culprit else good

    def bad_idx(value, t=2, k=1):
        i = idx.clone()
        i[t, k] = value
        return i

    dup = idx.clone()
    dup[3] = torch.tensor([1, 1])
    scenarios = {
        "range": lambda: ep.dispatch(x, on(1, idx, bad_idx(E)), w),
        "negative": lambda: ep.dispatch(x, on(world - 1, idx, bad_idx(-2)), w),
        "duplicate": lambda: ep.dispatch(x, on(0, idx, dup), w),
        "k_mismatch": lambda: ep.dispatch(x, *on(world - 1, (idx, w), (torch.cat([idx, idx[:, :1] * 0 - 1], 1),
                                                                         torch.cat([w, w[:, :1]], 1)))),
        "hidden": lambda: ep.dispatch(on(1, x, x[:, :128].contiguous()), idx, w),
        "dtype_mismatch": lambda: ep.dispatch(on(0, x, x.float()), idx, w),
        "rows": lambda: ep.dispatch(x, on(1, idx, idx[:-1]), on(1, w, w[:-1])),
        "weights": lambda: ep.dispatch(x, idx, on(0, w, w.double())),
        "not_a_tensor": lambda: ep.dispatch(x, on(world - 1, idx, idx.tolist()), w),
        "fp8_hidden": lambda: Dispatcher(comm, E, 64).dispatch(x[:, :64].contiguous(), idx, w, fp8=True),
        "ll_capacity": lambda: ep.low_latency_dispatch(on(1, x, torch.cat([x, x[:1]])),
                                                       on(1, idx, torch.cat([idx, idx[:1]])), T),
        "ll_range": lambda: ep.low_latency_dispatch(x, on(0, idx, bad_idx(E + 5)), T),
        "ll_k_mismatch": lambda: ep.low_latency_dispatch(x, on(1, idx, idx[:, :1].contiguous()), T),
        "ll_combine_y": lambda: _ll_combine(ep, x, idx, w, T, bad_y=rank == world - 1),
        "ll_combine_idx": lambda: _ll_combine(ep, x, idx, w, T, bad_idx=rank == 0),
        "experts_mismatch": lambda: Dispatcher(comm, on(0, E, 2 * E), H),
    }
    def moved() -> int:                   # through the rings, or written straight into peers (single copy)
        st = ep.link_stats()
        return st["shm_tx_bytes"] + st["window_tx_bytes"]

    for name, fn in scenarios.items():
        before = moved()
        out[name] = _outcome(fn)
        out[name + ":bytes"] = moved() - before
        valid_round_trip()
    before = moved()
    valid_round_trip()
    out["valid:bytes"] = moved() - before

    class FakeProcessGroup:
        def __init__(self, c):
            self.comm = c
    out["process_group"] = Dispatcher(FakeProcessGroup(comm), E, H).num_experts
    out["not_a_group"] = _outcome(lambda: Dispatcher(object(), E, H))
    out["hier_auto"] = Dispatcher(comm, E, H).hier is None                 # one host: flat
    out["hier_forced"] = _outcome(lambda: Dispatcher(comm, E, H, hierarchical=True))
    # last: a bad y in combine poisons the exchange; every rank fails and the communicator is
    # aborted (a rank still finishing the dispatch may fail there: it is the same failure)
    def bad_combine():
        rx, _, _, _, h = ep.dispatch(x, idx, w)
        ep.combine(on(1, rx, rx[:-1]), h)
    out["combine_rows"] = _outcome(bad_combine)
    out["after_abort"] = _outcome(lambda: comm.barrier())
    comm.close()
    return out


def _ll_combine(ep, x, idx, w, cap, bad_y=False, bad_idx=False):
    recv, _, h = ep.low_latency_dispatch(x, idx, cap)
    y = recv[:, :-1] if bad_y else recv
    i = idx.flip(0) if bad_idx else idx
    return ep.low_latency_combine(y, i, w, h)


# -- hierarchical: two emulated hosts of two ranks --------------------------------------------------
def run_hierarchical(rank: int, world: int, cases: list[dict]) -> dict:
    """Cases through the hierarchical dispatcher (hosts {0,1},{2,3}, then {0,2},{1,3}) and the inter-
    host bytes of a routing where every token goes to both ranks of the other host."""
    result: dict = {}
    os.environ["COMMS_HOST_ID"] = f"host{rank // 2}"
    comm = _init()
    E, H, K, T = 8, 512, 2, 64
    hier, flat = Dispatcher(comm, E, H), Dispatcher(comm, E, H, hierarchical=False)
    _check(hier.hier is not None and flat.hier is None, "hierarchical mode not chosen")
    other = 1 - rank // 2
    # every token selects one expert on each rank of the other host
    idx = torch.stack([torch.full((T,), 4 * other), torch.full((T,), 4 * other + 2)], dim=1)
    x = torch.randn(T, H).bfloat16()
    w = torch.rand(T, K)
    for name, ep in (("flat", flat), ("hier", hier)):
        before = ep.link_stats()["tcp_tx_bytes"]
        rx, ri, rw, _, h = ep.dispatch(x, idx, w)
        mid = ep.link_stats()["tcp_tx_bytes"]
        back = ep.combine(rx, h)
        result[name] = (mid - before, ep.link_stats()["tcp_tx_bytes"] - mid)
        _check(torch.equal(back, x * 2), f"rank {rank}: {name} round trip")
        result[name + ":recv"] = (rx.float().sum().item(), ri.tolist(), rw.tolist())
    hier.close()
    for case in cases:
        ep = Dispatcher(comm, case["experts"], case["hidden"])
        run_case(ep, case, world, rank, exact_combine=False)
        run_ll_case(ep, case, world, rank)
        ep.close()
    comm.close()
    os.environ["COMMS_HOST_ID"] = f"host{rank % 2}"
    comm = comms.init(timeout=60)
    for case in cases[:3]:
        ep = Dispatcher(comm, case["experts"], case["hidden"])
        _check(ep.hier is not None and ep.topology.hosts == [[0, 2], [1, 3]], f"topology {ep.topology}")
        run_case(ep, case, world, rank, exact_combine=False)
        ep.close()
    comm.close()
    os.environ["COMMS_HOST_ID"] = "a" if rank < 3 else "b"      # hosts of 3 and 1 ranks: flat
    comm = comms.init(timeout=60)
    result["uneven_auto"] = Dispatcher(comm, E, H).hier is None
    result["uneven_forced"] = _outcome(lambda: Dispatcher(comm, E, H, hierarchical=True))
    comm.close()
    return result
