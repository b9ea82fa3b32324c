"""The torch.distributed backend "comms": every c10d op (sync and async) against Gloo, Work
semantics, subgroups, teardown, a differential test of random collective sequences, real clients
(DDP, FSDP2, DTensor tensor parallelism, functional collectives) against Gloo, and the examples.

Rank functions live in torch_workers.py, torch_differential.py and torch_model_workers.py."""
from __future__ import annotations

import os
import subprocess
import sys
import weakref

import pytest
import torch
import torch.distributed as dist

import comms
from comms.testing import spawn
import torch_differential
import torch_model_workers as models
import torch_workers as ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_registers_the_backend():
    assert comms.torch_backend.register() is True             # idempotent
    assert "comms" in dist.Backend.backend_list
    assert dist.Backend("comms") == "comms"
    assert dist.Backend.backend_capability["comms"] == ["cpu"]
    assert dist.Backend.default_device_backend_map["cpu"] == "gloo"     # the default stays Gloo


def test_single_rank_group_in_process():
    """A world of one in this process: sync work is a reused completed handle unless someone
    holds it; options may be bare ops or roots; misuse raises InvalidUsage."""
    dist.init_process_group("comms", store=dist.HashStore(), rank=0, world_size=1)
    try:
        pg = dist.group.WORLD
        assert (pg.name(), pg.rank(), pg.size(), dist.get_backend()) == ("comms", 0, 1, "comms")
        t = torch.arange(4.0)
        opts = dist.AllreduceOptions()
        opts.asyncOp = False
        w1 = pg.allreduce([t], opts)
        u = torch.arange(3.0)
        w2 = pg.allreduce([u], opts)
        assert w1 is not w2, "a handle someone holds must not be reused"
        assert w2.is_completed() and w2.wait() and w2.get_future().value()[0] is u
        pg.allreduce([torch.ones(1)], opts)
        assert w1.result()[0] is t and w2.result()[0] is u, "a kept handle keeps its own outputs"
        del w1, w2
        cached = weakref.ref(pg._done_work)
        for _ in range(3):
            pg.allreduce([t], opts)                                  # dropped at once: reused
        assert pg._done_work is cached()
        pg.allreduce([t], dist.ReduceOp.MAX).wait()
        pg.broadcast([t], 0).wait()
        assert torch.equal(t, torch.arange(4.0))
        with pytest.raises(comms.InvalidUsage, match="one tensor per call"):
            pg.allreduce([t, t], dist.AllreduceOptions())
        with pytest.raises(comms.InvalidUsage, match="expected 1 tensors"):
            dist.all_gather([t, t], t)
        with pytest.raises(comms.InvalidUsage):
            dist.all_reduce(torch.ones(3, dtype=torch.int32), op=dist.ReduceOp.AVG)
        dist.all_reduce(t)                                           # still usable
    finally:
        dist.destroy_process_group()


def test_allreduce_options_read_from_memory_agree_with_pybind():
    """The hot path's reading of AllreduceOptions (comms.torch_backend.peek) finds torch 2.13's
    layout, and gives pybind's answer for every op, asyncOp and timeout; COMMS_TORCH_PEEK=0 turns it off."""
    import datetime
    from comms.runtime.native import lib
    from comms.torch_backend import peek
    assert peek.ON, "no AllreduceOptions layout found: the hot path reads the options through pybind"
    kinds = list(dist.ReduceOp.RedOpType.__members__.values())
    seen = set()
    for kind in kinds:
        rop = dist._make_nccl_premul_sum(2.0) if kind == dist.ReduceOp.RedOpType.PREMUL_SUM else dist.ReduceOp(kind)
        for async_op in (False, True):
            for ms in (-1, 0, 1, 5000):
                o = dist.AllreduceOptions()
                o.reduceOp, o.asyncOp, o.timeout = rop, async_op, datetime.timedelta(milliseconds=ms)
                got = peek.SYNC_OPS.get(lib.cm_opts_peek(id(o)))
                assert got == peek.read_sync_op(o), (kind, async_op, ms)
                seen.add(got)
    assert len(seen) == len(kinds), "one op per kind but PREMUL_SUM (None)"
    env = dict(os.environ, COMMS_TORCH_PEEK="0")
    code = "import comms.torch_backend.peek as p, sys; sys.exit(0 if p.ON is False else 1)"
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=120).returncode == 0


# Several rank functions share one job (importing torch in fresh processes dominates the runtime).
TWO_RANKS = ["compare_every_op", "premul_and_avg", "objects", "work_semantics", "timeouts", "teardown"]
THREE_RANKS = ["compare_every_op", "point_to_point", "subgroups"]
CLIENTS = ["ddp", "fsdp", "tensor_parallel", "functional"]


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return spawn(ops.run_all, 2, timeout=200, args=(TWO_RANKS,))


@pytest.fixture(scope="module")
def three_ranks() -> list[dict]:
    return spawn(ops.run_all, 3, timeout=200, args=(THREE_RANKS,))


@pytest.fixture(scope="module")
def clients() -> list[dict]:
    return spawn(models.run_all, 2, timeout=240, args=(CLIENTS,))


@pytest.mark.parametrize("size", [2, 3])
def test_every_op_sync_and_async_matches_gloo(size, request):
    results = request.getfixturevalue("two_ranks" if size == 2 else "three_ranks")
    names = results[0]["compare_every_op"]
    assert len(names) == 2 * 34 and "all_to_all_single_uneven" in names and "all_gather_views" in names


def test_avg_and_premul_sum(two_ranks):
    # x = arange(8) * (rank + 1), summed over 2 ranks: 3 * arange(8); factors 0.5 and 3, then AVG.
    # Per factor: the all_reduce's sum, then this rank's reduce_scatter half (3 * 6 or 3 * 22, scaled).
    assert two_ranks[0]["premul_and_avg"] == [42.0, 9.0, 252.0, 54.0, 42.0]
    assert two_ranks[1]["premul_and_avg"] == [42.0, 33.0, 252.0, 198.0, 42.0]


def test_point_to_point_and_any_source(three_ranks):
    r = [x["point_to_point"] for x in three_ranks]
    assert r[1]["recv"] == (0, [0.0, 1.0, 2.0, 3.0])
    assert [x["isend_irecv"] for x in r] == [[2.0] * 3, [0.0] * 3, [1.0] * 3]
    assert [x["batch"] for x in r] == [[20.0] * 3, [0.0] * 3, [10.0] * 3]
    assert r[0]["any"] == [(1, [1, 2]), (2, None), (2, [2, 4])]


def test_object_collectives(two_ranks):
    for r in two_ranks:
        assert r["objects"] == [[0, 1], [0, 100], [1, {"from": 1}], 1000]


def test_work_semantics_and_errors(two_ranks):
    r0, r1 = (r["work_semantics"] for r in two_ranks)
    assert r0["enqueued"] and r0["pending"] == (False, False) and r0["future_pending"] is False
    assert r0["future_value"] == [True] and r0["done"] == (True, True, None)
    assert r0["callback"] == ("comms-future", [3.0, 3.0])
    for r in (r0, r1):
        assert r["sum"] == [3.0] * 5 and r["then"] == 30.0
        assert r["mismatch"] == "MismatchError" and r["future_error"] is True and r["after"] == (True, False)


def test_group_and_per_op_timeouts(two_ranks):
    assert two_ranks[0]["timeouts"] == {"group": "CommTimeout", "op": "CommTimeout"}


def test_subgroups_use_global_ranks(three_ranks):
    r = [x["subgroups"] for x in three_ranks]
    assert r[0]["evens"] == ([0, 2], 0, 2, [0, 2]) and r[2]["evens"] == ([0, 2], 1, 2, [0, 2])
    assert r[0]["evens_sum"] == r[2]["evens_sum"] == 2.0
    assert r[0]["evens_bcast"] == r[2]["evens_bcast"] == 2.0
    assert r[1]["tail"] == r[2]["tail"] == (4.5, 4.5, "comms", "comms")
    assert r[1]["tail_recv"] == 2 and "tail" not in r[0] and "evens" not in r[1]


def test_destroy_drains_and_reinit_works(two_ranks):
    for r in two_ranks:
        assert r["teardown"] == [(True, True, 39.0, 0), (True, True, 39.0, 1)]


@pytest.mark.parametrize("size,seed", [(2, 11), (3, 12)])
def test_differential_against_gloo(size, seed):
    """Random sequences through comms and Gloo: outputs and futures' values alike, no warning
    but torch's own deprecation notices (see torch_differential)."""
    counts = spawn(torch_differential.differential, size, timeout=180, args=(seed, 150))
    futures = counts[0].pop("futures")
    assert set(counts[0]) == set(torch_differential.COLLS)
    assert sum(counts[0].values()) > 120          # outputs compared (barrier has none)
    assert futures > 40                           # future tensors compared with Gloo's


def test_ddp_matches_gloo(clients):
    assert clients[0]["ddp"] == list(models.DDP_VARIANTS)


def test_fsdp2_matches_gloo(clients):
    assert clients[0]["fsdp"] == ["avg", "bf16", "premul"]


def test_dtensor_tensor_parallel_matches_gloo(clients):
    assert clients[0]["tensor_parallel"] == models.STEPS + 4      # outputs per step, then parameters


def test_functional_collectives_match_gloo(clients):
    assert clients[0]["functional"] == 22


def _launch(script: str, *args: str) -> str:
    cmd = [sys.executable, "-m", "comms.run", "-n", "2", "--timeout", "150", os.path.join(ROOT, "examples", script),
           *args]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=200)
    assert p.returncode == 0, f"{script} exited {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p.stdout


def test_example_ddp_train():
    out = _launch("ddp_train.py", "--check", "--epochs", "2")
    assert "[rank 0] epoch 1: loss" in out
    assert "[rank 0] comms and gloo parameters identical: True" in out
    assert "[rank 0] parameters in sync on 2 ranks: True" in out


def test_example_tp_inference():
    out = _launch("tp_inference.py")
    assert "(comms): max |tensor parallel - one process|" in out and "-> OK" in out
