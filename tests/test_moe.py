"""comms.moe: expert-parallel dispatch/combine (DeepEP semantics) checked against a reference that
routes directly from every rank's inputs.

The routing math and fp8 are property-tested in process (many hypothesis examples). End to end,
hypothesis draws a list of cases in the parent and ONE spawned job per world size runs them all
(normal, cached, fp8 and low-latency mode, round trip, load statistics), so the suite stays fast.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from comms.moe import dequantize, quantize
from comms.moe.hierarchical import Topology
from comms.moe.layout import check_topk, compute_layout, localize, sum_blocks, sum_blocks_reference
from comms.moe.rows import BufferPool, RowFormat
from comms.testing import spawn
from moe_workers import owners, rank_inputs, run_bad_inputs, run_cases, run_hierarchical

ROOT = Path(__file__).resolve().parent.parent


# -- the routing math, in process ------------------------------------------------------------------
@st.composite
def routings(draw):
    world = draw(st.integers(1, 5))
    epr = draw(st.integers(1, 4))
    E = world * epr
    k = draw(st.integers(1, min(E, 5)))
    T = draw(st.integers(0, 20))
    rows = [draw(st.lists(st.integers(-1, E - 1), min_size=k, max_size=k)
                 .filter(lambda r: len([e for e in r if e >= 0]) == len({e for e in r if e >= 0})))
            for _ in range(T)]
    return world, E, torch.tensor(rows, dtype=torch.int64).view(T, k)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(routings())
def test_layout_matches_brute_force(r):
    world, E, idx = r
    epr = E // world
    lay = compute_layout(idx, E, world)
    want = [[t for t in range(idx.shape[0]) if p in owners(idx[t], epr)] for p in range(world)]
    assert lay.send_counts == [len(w) for w in want]
    assert lay.send_idx.tolist() == [t for w in want for t in w]
    assert lay.expert_counts.tolist() == [int((idx == e).sum()) for e in range(E)]
    assert check_topk(idx, E) is None


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 12), st.integers(1, 4), st.integers(0, 6), st.data())
def test_check_topk_reports_the_first_bad_entry(E, k, T, data):
    idx = torch.tensor(data.draw(st.lists(st.lists(st.integers(-3, E + 2), min_size=k, max_size=k),
                                          min_size=T, max_size=T)), dtype=torch.int64).view(T, k)
    got = check_topk(idx, E)
    flat = [(t, j, int(idx[t, j])) for t in range(T) for j in range(k)]
    out = [f for f in flat if not -1 <= f[2] < E]
    if out:
        assert got == ("range", out[0])
        return
    chosen = [[e for e in idx[t].tolist() if e >= 0] for t in range(T)]
    dups = [t for t in range(T) if len(chosen[t]) != len(set(chosen[t]))]
    assert (got is None) == (not dups)
    if dups:
        assert got[0] == "duplicate" and got[1][0] == dups[0]


def test_localize_and_sum_blocks():
    idx = torch.tensor([[0, 5, -1], [3, 4, 2]])
    w = torch.tensor([[0.5, 0.25, 0.125], [1.0, 2.0, 3.0]])
    li, lw = localize(idx, w, rank=1, epr=3)
    assert li.tolist() == [[-1, 2, -1], [0, 1, -1]]
    assert lw.tolist() == [[0, 0.25, 0], [1.0, 2.0, 0]]
    rows = torch.tensor([[1.0], [2.0], [4.0]]).bfloat16()
    assert sum_blocks(rows, torch.tensor([1, 0, 1]), [2, 1], 3).tolist() == [[2.0], [5.0], [0.0]]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(routings(), st.sampled_from([1, 7, 1023, 1025, 2500]), st.integers(1, 200),
       st.sampled_from([torch.bfloat16, torch.float16, torch.float32, torch.float64]), st.booleans())
def test_sum_blocks_is_the_ordered_float32_sum(r, hidden, chunk_bytes, dtype, special):
    """The native kernel, its torch reference and a plain loop agree bit for bit (float32
    accumulation from zero, block order), also on inf/NaN/-0 and on rows wider than its block."""
    world, E, idx = r
    lay = compute_layout(idx, E, world)
    rows = (torch.randn(lay.send_idx.numel(), hidden) * 100).to(dtype)
    if special and rows.numel():
        flat = rows.view(-1)
        for v in (float("inf"), float("-inf"), -0.0, 1e-30, 3e38):
            flat[torch.randint(0, flat.numel(), (1,))] = v
    want = torch.zeros(idx.shape[0], hidden)
    off = 0
    for c in lay.send_counts:                     # block by block, as combine promises
        for i in range(off, off + c):
            want[lay.send_idx[i]] += rows[i].float()
        off += c
    want = want.to(dtype)
    got = sum_blocks(rows, lay.send_idx, lay.send_counts, idx.shape[0])
    ref = sum_blocks_reference(rows, lay.send_idx, lay.send_counts, idx.shape[0], chunk_bytes=chunk_bytes)
    assert got.dtype == dtype == ref.dtype
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    for other in (want, ref):                     # bitwise (-0 included); NaN payloads may differ from torch's
        nan = other.isnan()
        assert torch.equal(got.isnan(), nan)
        assert torch.equal(got[~nan].view(bits), other[~nan].view(bits))


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 9), st.integers(1, 3), st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
       st.floats(1e-3, 1e3), st.integers(0, 2 ** 31))
def test_fp8_round_trip_within_tolerance(n, blocks, dtype, scale, seed):
    x = (torch.randn(n, 128 * blocks, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)
    q, s = quantize(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (n, blocks) and s.dtype == torch.float32
    err = (dequantize(q, s) - x.float()).abs().view(n, blocks, 128)
    amax = x.float().abs().view(n, blocks, 128).amax(dim=-1, keepdim=True)
    assert bool((err <= amax / 16 + 1e-6).all())


def test_row_format_views_are_in_place():
    fmt = RowFormat([("ids", torch.int32, 3), ("x", torch.bfloat16, 5)], min_bytes=40)
    assert fmt.nbytes % 8 == 0 and fmt.nbytes >= 40
    buf = fmt.empty(4)
    x = torch.randn(6, 5).bfloat16()
    fmt.pack(buf, "x", x, torch.tensor([5, 0, 2, 2]))
    fmt.pack(buf, "ids", torch.arange(12, dtype=torch.int32).view(4, 3))
    assert torch.equal(fmt.take(buf, "x"), x[[5, 0, 2, 2]])
    assert fmt.view(buf, "ids")[3].tolist() == [9, 10, 11]
    assert fmt.view(buf, "x").data_ptr() == buf.data_ptr() + fmt.fields["x"][0]


def test_buffer_pool_reuses_memory_only_once_every_view_is_gone():
    pool = BufferPool(keep=2)
    a = pool.empty((1024, 4096), torch.bfloat16)            # 8 MiB: pooled
    a.fill_(1.0)
    where, view = a.data_ptr(), a[10:12]
    del a
    b = pool.empty((1024, 4096), torch.bfloat16)
    assert b.data_ptr() != where and float(view.sum()) == 2 * 4096   # a view still holds the first
    del view
    c = pool.empty((512, 4096), torch.float32)               # same bytes, other dtype: reused
    assert c.data_ptr() == where and c.is_contiguous() and c.shape == (512, 4096)
    assert pool.empty((3, 5), torch.float32).shape == (3, 5)  # small: plain torch.empty
    held = [pool.empty((1024, 4096), torch.bfloat16) for _ in range(4)]
    assert len({t.data_ptr() for t in held + [b, c]}) == 6 and len(pool._areas) <= 2


def test_topology_from_host_keys():
    t = Topology.from_host_keys([0, 1, 0, 1])
    assert t.hosts == [[0, 2], [1, 3]] and t.host_of == [0, 1, 0, 1] and t.local_of == [0, 0, 1, 1]
    assert t.hierarchical_ok
    assert not Topology.from_host_keys([0, 0, 0, 3]).hierarchical_ok
    assert not Topology.from_host_keys([0, 0, 0, 0]).hierarchical_ok


# -- end to end --------------------------------------------------------------------------------------
@st.composite
def moe_cases(draw, world):
    epr = draw(st.integers(1, 4))
    E = world * epr
    hidden = draw(st.sampled_from([1, 8, 33, 128, 256]))
    tokens = draw(st.lists(st.sampled_from([0, 1, 2, 5, 17, 40]), min_size=world, max_size=world))
    return dict(seed=draw(st.integers(0, 2 ** 20)), experts=E, k=draw(st.integers(1, min(E, 6))), hidden=hidden,
                dtype=draw(st.sampled_from(["bf16", "fp16", "fp32"])), tokens=tokens,
                route=draw(st.sampled_from(["random", "no_expert", "one_rank", "sparse"])),
                target=draw(st.integers(0, world - 1)),
                fp8=hidden % 128 == 0 and draw(st.booleans()), cap=max(max(tokens), 1) + draw(st.integers(0, 3)))


def edge_cases(world: int) -> list[dict]:
    """Always run: T = 0 everywhere, every token without an expert, every expert on one rank (and
    on 2 ranks, one large case)."""
    base = dict(seed=1, experts=2 * world, k=2, hidden=128, dtype="bf16", target=world - 1, fp8=True, cap=9)
    cases = [dict(base, tokens=[0] * world, route="random"),
             dict(base, tokens=[9] * world, route="no_expert", dtype="fp32"),
             dict(base, tokens=list(range(world)), route="one_rank", dtype="fp16", k=3)]
    if world == 2:      # buffers above 4 MiB come from the dispatcher's pool and are reused
        cases.append(dict(base, tokens=[1500, 1100], hidden=1024, route="random", fp8=False, cap=1500))
    return cases


def expected_loads(cases: list[dict], world: int) -> dict:
    """Load statistics every rank must report: routed [E] per rank and received per local expert."""
    out = {}
    for c in cases:
        key = f"{c['experts']}x{c['hidden']}"
        fresh, seen = (3, 5) if c["fp8"] else (2, 3)       # dispatches that route / that deliver rows
        routed, received = out.setdefault(key, ([[0] * c["experts"] for _ in range(world)], [0] * c["experts"]))
        for r in range(world):
            idx = rank_inputs(c, world, r)[1]
            for e in range(c["experts"]):
                n = int((idx == e).sum())
                routed[r][e] += fresh * n
                received[e] += seen * n
    return out


def draw_cases(world: int, n: int) -> list[dict]:
    """``n`` cases drawn by hypothesis in this process (no shrinking: they all run in one spawned
    job, and a failure names its case)."""
    drawn: list[dict] = []

    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(moe_cases(world))
    def collect(case):
        drawn.append(case)

    collect()
    return drawn


@pytest.mark.parametrize("world,single_copy", [(1, True), (2, True), (3, True), (4, True), (3, False)])
def test_dispatch_combine_properties(world, single_copy):
    """Single copy (shared-memory receive windows, the default on one host) and the all_to_all path."""
    cases = edge_cases(world) + draw_cases(world, 16)
    results = spawn(run_cases, world, timeout=200, args=(cases, single_copy and world > 1),
                    env={"COMMS_MOE_SINGLE_COPY": "1" if single_copy else "0"})
    want = expected_loads(cases, world)
    for rank, loads in enumerate(results):
        for key, (routed, received, dispatches, global_load) in loads.items():
            E = len(routed)
            epr = E // world
            assert routed == want[key][0][rank], (key, rank)
            assert received == want[key][1][rank * epr:(rank + 1) * epr], (key, rank)
            assert global_load == [sum(want[key][0][r][e] for r in range(world)) for e in range(E)]
            assert dispatches > 0


def test_bad_input_raises_on_every_rank_before_anything_moves():
    world = 3
    results = spawn(run_bad_inputs, world, timeout=200)
    expect = {"range": ("InvalidUsage", 1, "topk_idx[2, 1] = 6"), "negative": ("InvalidUsage", 2, "= -2"),
              "duplicate": ("InvalidUsage", 0, "selects expert 1 twice"), "k_mismatch": ("MismatchError", 2, "K=3"),
              "hidden": ("InvalidUsage", 1, "hidden=256"), "dtype_mismatch": ("MismatchError", 0, "float32"),
              "rows": ("InvalidUsage", 1, "x has 32 rows"), "weights": ("InvalidUsage", 0, "topk_weights"),
              "not_a_tensor": ("InvalidUsage", 2, "topk_idx must be"), "fp8_hidden": ("InvalidUsage", 0, "128"),
              "ll_capacity": ("InvalidUsage", 1, "33 tokens exceed max_tokens_per_rank = 32"),
              "ll_range": ("InvalidUsage", 0, "= 11"), "ll_k_mismatch": ("MismatchError", 1, "K=1"),
              "ll_combine_y": ("InvalidUsage", 2, "y must be"), "ll_combine_idx": ("InvalidUsage", 0, "differs"),
              "experts_mismatch": ("MismatchError", 0, "num_experts=6")}
    for name, (cls, culprit, text) in expect.items():
        for rank, out in enumerate(results):
            got_cls, msg = out[name]
            assert got_cls == cls, (name, rank, out[name])
            assert f"rank {culprit}" in msg and text in msg, (name, rank, msg)
    for rank, out in enumerate(results):
        for name in expect:
            if not name.startswith("ll_"):      # the fixed-size low-latency block always travels
                assert out[name + ":bytes"] < 1024, (name, rank, out[name + ":bytes"])
        assert out["valid:bytes"] > 16 * 1024
        assert out["process_group"] == 6
        assert out["not_a_group"][0] == "InvalidUsage" and "ProcessGroup" in out["not_a_group"][1]
        assert out["hier_auto"] is True
        assert out["hier_forced"][0] == "InvalidUsage" and "several hosts" in out["hier_forced"][1]
        assert out["combine_rows"][0] in (("InvalidUsage",) if rank == 1 else ("MismatchError", "PeerError")), \
            out["combine_rows"]
        assert out["after_abort"][0] != "no error"
    assert "combine: invalid input on rank 1" in results[1]["combine_rows"][1]


def test_hierarchical_crosses_hosts_once():
    world = 4
    cases = edge_cases(world)[1:] + draw_cases(world, 6)
    results = spawn(run_hierarchical, world, timeout=200, args=(cases,))
    row = 512 * 2                              # a bf16 token of hidden 512
    for rank, r in enumerate(results):
        (flat_d, flat_c), (hier_d, hier_c) = r["flat"], r["hier"]
        assert r["flat:recv"] == r["hier:recv"], rank
        # flat: every token crosses twice each way; hierarchical: once each way
        assert flat_d >= 2 * 64 * row and flat_c >= 2 * 64 * row, r["flat"]
        assert 64 * row <= hier_d <= 0.55 * flat_d, (hier_d, flat_d)
        assert 64 * row <= hier_c <= 0.55 * flat_c, (hier_c, flat_c)
        assert r["uneven_auto"] is True
        assert r["uneven_forced"][0] == "InvalidUsage" and "several hosts" in r["uneven_forced"][1]


def test_moe_layer_example():
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    proc = subprocess.run([sys.executable, "-m", "comms.run", "-n", "4", "--timeout", "150", "examples/moe_layer.py",
                           "--tokens", "48", "--hidden", "64", "--ffn", "96", "--experts", "8", "--topk", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for mode in ("fp32 normal", "fp32 low-latency", "bf16 normal", "bf16 low-latency"):
        assert sum(f"{mode}: OK" in line for line in proc.stdout.splitlines()) == 4, (mode, proc.stdout[-3000:])
