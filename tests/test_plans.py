"""Every algorithm's plans, run in-process over the in-memory transport (comms.simulate), against
the numpy reference, with hypothesis drawing world sizes, dtypes, ops, counts, roots and
in-place/out-of-place. Fast: no processes, no native code."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from comms import algorithms, simulate
from comms.algorithms.plan import Args
from comms.dtypes import BOOL, DTYPE_SIZES, FLOATING, ReduceOp
from reference_collectives import assert_close, random_input, reduce_all

DTYPES = list(range(9))
OPS = list(ReduceOp)


def valid_op(op: ReduceOp, dtype: int) -> bool:
    return not ((op.bitwise and dtype in FLOATING) or (op is ReduceOp.AVG and dtype not in FLOATING))


def u8(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).view(np.uint8).reshape(-1)


def run_plans(coll, algo, n, count, dtype, op, root=-1, inplace=False, splits=None):
    es = DTYPE_SIZES[dtype]
    plans = []
    for r in range(n):
        kw = {}
        if splits is not None:
            kw = dict(send_splits=tuple(s * es for s in splits[r]), recv_splits=tuple(splits[p][r] * es for p in range(n)))
        args = Args(coll, r, n, count, es, root=root, avg=op is ReduceOp.AVG, inplace=inplace, **kw)
        plans.append(algorithms.get(coll, algo).fn(args))
    return plans


def algos(coll):
    return st.sampled_from(algorithms.names(coll))


common = dict(n=st.integers(1, 6), count=st.integers(0, 40), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**32 - 1))


@settings(max_examples=300, deadline=None)
@given(algo=algos("all_reduce"), op=st.sampled_from(OPS), inplace=st.booleans(), **common)
def test_all_reduce(algo, n, count, dtype, op, inplace, seed):
    if not valid_op(op, dtype):
        return
    rng = np.random.default_rng(seed)
    ins = [random_input(rng, dtype, count, op.name) for _ in range(n)]
    try:
        plans = run_plans("all_reduce", algo, n, count, dtype, op, inplace=inplace)
    except algorithms.NotSupported:
        assert algo == "ring" and count < n
        return
    outs = [x.copy() if inplace else np.zeros_like(x) for x in ins]
    src = outs if inplace else ins
    simulate.run(plans, [u8(x) for x in src], [u8(x) for x in outs], dtype, op.kernel)
    want = reduce_all(ins, dtype, op.kernel, op is ReduceOp.AVG)
    for r in range(n):
        assert_close(outs[r], want, dtype, n, f"rank {r}")
        assert u8(outs[r]).tobytes() == u8(outs[0]).tobytes(), "ranks disagree bitwise"


@settings(max_examples=200, deadline=None)
@given(algo=algos("reduce"), op=st.sampled_from(OPS), root=st.integers(0, 5), **common)
def test_reduce(algo, n, count, dtype, op, root, seed):
    if not valid_op(op, dtype):
        return
    root %= n
    rng = np.random.default_rng(seed)
    ins = [random_input(rng, dtype, count, op.name) for _ in range(n)]
    bufs = [x.copy() for x in ins]
    simulate.run(run_plans("reduce", algo, n, count, dtype, op, root=root, inplace=True),
                 [u8(b) for b in bufs], [u8(b) for b in bufs], dtype, op.kernel)
    assert_close(bufs[root], reduce_all(ins, dtype, op.kernel, op is ReduceOp.AVG), dtype, n, "root")
    for r in range(n):
        if r != root:
            assert u8(bufs[r]).tobytes() == u8(ins[r]).tobytes(), "non-root buffer modified"


@settings(max_examples=150, deadline=None)
@given(algo=algos("broadcast"), root=st.integers(0, 5), **common)
def test_broadcast(algo, n, count, dtype, root, seed):
    root %= n
    rng = np.random.default_rng(seed)
    bufs = [random_input(rng, dtype, count, "SUM") for _ in range(n)]
    want = bufs[root].copy()
    simulate.run(run_plans("broadcast", algo, n, count, dtype, ReduceOp.SUM, root=root, inplace=True),
                 [u8(b) for b in bufs], [u8(b) for b in bufs], dtype, 0)
    for b in bufs:
        assert u8(b).tobytes() == u8(want).tobytes()


@settings(max_examples=150, deadline=None)
@given(algo=algos("all_gather"), inplace=st.booleans(), **common)
def test_all_gather(algo, n, count, dtype, inplace, seed):
    rng = np.random.default_rng(seed)
    ins = [random_input(rng, dtype, count, "SUM") for _ in range(n)]
    want = np.concatenate(ins) if count else ins[0][:0]
    outs = [np.zeros_like(want) for _ in range(n)]
    if inplace:
        for r in range(n):
            outs[r][r * count:(r + 1) * count] = ins[r]
    src = [u8(outs[r])[r * count * DTYPE_SIZES[dtype]:] if inplace else u8(ins[r]) for r in range(n)]
    simulate.run(run_plans("all_gather", algo, n, count, dtype, ReduceOp.SUM, inplace=inplace),
                 src, [u8(o) for o in outs], dtype, 0)
    for o in outs:
        assert u8(o).tobytes() == u8(want).tobytes()


@settings(max_examples=200, deadline=None)
@given(algo=algos("reduce_scatter"), op=st.sampled_from(OPS), **common)
def test_reduce_scatter(algo, n, count, dtype, op, seed):
    if not valid_op(op, dtype):
        return
    rng = np.random.default_rng(seed)
    ins = [random_input(rng, dtype, n * count, op.name) for _ in range(n)]
    outs = [np.zeros(count, ins[0].dtype) for _ in range(n)]
    simulate.run(run_plans("reduce_scatter", algo, n, count, dtype, op), [u8(x) for x in ins], [u8(o) for o in outs],
                 dtype, op.kernel)
    full = reduce_all(ins, dtype, op.kernel, op is ReduceOp.AVG)
    for r in range(n):
        assert_close(outs[r], full[r * count:(r + 1) * count], dtype, n, f"rank {r}")


@settings(max_examples=150, deadline=None)
@given(algo=algos("all_to_all"), n=st.integers(1, 6), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**32 - 1),
       data=st.data())
def test_all_to_all(algo, n, dtype, seed, data):
    splits = [[data.draw(st.integers(0, 5)) for _ in range(n)] for _ in range(n)]   # splits[src][dst] rows
    rng = np.random.default_rng(seed)
    ins = [random_input(rng, dtype, sum(splits[r]), "SUM") for r in range(n)]
    outs = [np.zeros(sum(splits[p][r] for p in range(n)), ins[0].dtype) for r in range(n)]
    simulate.run(run_plans("all_to_all", algo, n, 0, dtype, ReduceOp.SUM, splits=splits),
                 [u8(x) for x in ins], [u8(o) for o in outs], dtype, 0)
    for r in range(n):
        parts = []
        for p in range(n):
            start = sum(splits[p][:r])
            parts.append(ins[p][start:start + splits[p][r]])
        np.testing.assert_array_equal(outs[r], np.concatenate(parts))


@settings(max_examples=100, deadline=None)
@given(root=st.integers(0, 5), **common)
def test_gather_scatter(n, count, dtype, root, seed):
    root %= n
    rng = np.random.default_rng(seed)
    ins = [random_input(rng, dtype, count, "SUM") for _ in range(n)]
    outs = [np.zeros(n * count, ins[0].dtype) for _ in range(n)]
    simulate.run(run_plans("gather", "linear", n, count, dtype, ReduceOp.SUM, root=root),
                 [u8(x) for x in ins], [u8(o) for o in outs], dtype, 0)
    np.testing.assert_array_equal(outs[root], np.concatenate(ins))
    got = [np.zeros(count, ins[0].dtype) for _ in range(n)]
    simulate.run(run_plans("scatter", "linear", n, count, dtype, ReduceOp.SUM, root=root),
                 [u8(outs[root])] * n, [u8(g) for g in got], dtype, 0)
    for r in range(n):
        np.testing.assert_array_equal(got[r], ins[r])


@pytest.mark.parametrize("algo", algorithms.names("barrier"))
@pytest.mark.parametrize("n", range(1, 7))
def test_barrier_completes_only_with_everyone(algo, n):
    plans = run_plans("barrier", algo, n, 0, BOOL, ReduceOp.SUM)
    empty = [np.zeros(0, np.uint8)] * n
    simulate.run(plans, empty, empty, BOOL, 0)
    if n > 1:   # without one rank's plan, the others cannot finish
        plans[n - 1] = algorithms.Plan("absent", ())
        with pytest.raises(simulate.Deadlock):
            simulate.run(plans, empty, empty, BOOL, 0)


def test_ring_declines_fewer_elements_than_ranks():
    with pytest.raises(algorithms.NotSupported):
        run_plans("all_reduce", "ring", 4, 3, 2, ReduceOp.SUM)
