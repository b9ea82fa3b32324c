"""Every algorithm's plans, run in-process over the in-memory transport (comms.testing.simulate), against
the numpy reference, with hypothesis drawing world sizes, dtypes, ops, counts, roots and
in-place/out-of-place. Fast: no processes, no native code."""
from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from comms import algorithms
from comms.testing import simulate
from comms.algorithms import deterministic  # noqa: F401  (algorithms.deterministic)
from comms.algorithms import ring
from comms.algorithms.plan import OUT, RECV, SEND, Args, Plan, Step
from comms.dtypes import BOOL, DTYPE_SIZES, FLOATING, ReduceOp
from reference_collectives import assert_close, random_input, reduce_all

DTYPES = list(range(9))
OPS = list(ReduceOp)


def valid_op(op: ReduceOp, dtype: int) -> bool:
    return not ((op.bitwise and dtype in FLOATING) or (op is ReduceOp.AVG and dtype not in FLOATING))


def u8(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).view(np.uint8).reshape(-1)


@st.composite
def layouts(draw):
    """(world size, ranks grouped by host): 1-3 hosts of 1-3 ranks in any rank order, sometimes uneven."""
    hosts, local = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sizes = [local] * hosts
    if hosts > 1 and draw(st.booleans()) and draw(st.booleans()):
        sizes[-1] = draw(st.integers(1, 3))
    n = sum(sizes)
    perm = draw(st.permutations(range(n)))
    groups, at = [], 0
    for s in sizes:
        groups.append(tuple(sorted(perm[at:at + s])))
        at += s
    return n, tuple(sorted(groups))


def run_plans(coll, algo, n, count, dtype, op, root=-1, inplace=False, splits=None, hosts=()):
    es = DTYPE_SIZES[dtype]
    plans = []
    for r in range(n):
        kw = {}
        if splits is not None:
            kw = dict(send_splits=tuple(s * es for s in splits[r]), recv_splits=tuple(splits[p][r] * es for p in range(n)))
        args = Args(coll, r, n, count, es, root=root, avg=op is ReduceOp.AVG, inplace=inplace, hosts=hosts,
                    board=board_bytes(hosts), **kw)
        plans.append(algorithms.get(coll, algo).fn(args))
    return plans


def board_bytes(hosts: tuple) -> int:
    """The board's capacity as a communicator on one host has it (comms.runtime.bootstrap: COMMS_SHM_BOARD_BYTES
    with the test's largest count of 40 elements of 8 B in mind, so both use and decline show)."""
    return 256 if len(hosts) <= 1 else 0


def plans_or_decline(coll, algo, n, count, dtype, op, hosts, **kw):
    try:
        return run_plans(coll, algo, n, count, dtype, op, hosts=hosts, **kw)
    except algorithms.NotSupported as e:
        assert declined(algo, n, count, hosts, e), (coll, algo, n, count, hosts, e)
        return None


def algos(coll):
    return st.sampled_from(algorithms.names(coll))


common = dict(lay=layouts(), count=st.integers(0, 40), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**32 - 1))


def declined(algo: str, n: int, count: int, hosts: tuple, exc: Exception) -> bool:
    """Whether an algorithm may decline this case (the documented NotSupported conditions)."""
    p2 = 1 << (n.bit_length() - 1)
    if algo == "hierarchical":
        return len(hosts) < 2 or len({len(h) for h in hosts}) > 1 or count < n or "equal splits" in str(exc)
    if algo == "bruck":
        return "equal splits" in str(exc)
    if algo == "recursive_halving":
        return n & (n - 1) != 0
    if algo == "board":
        return len(hosts) > 1 or "slots take" in str(exc)
    return (algo == "ring" and count < n) or (algo == "rhd" and count < p2)


def run_and_check_all_reduce(plans, ins, dtype, op, inplace) -> None:
    """Run the all_reduce ``plans`` on ``ins`` in the simulator; every rank must hold the reference's
    result, in the same bits."""
    n = len(plans)
    outs = [x.copy() if inplace else np.zeros_like(x) for x in ins]
    src = outs if inplace else ins
    simulate.run(plans, [u8(x) for x in src], [u8(x) for x in outs], dtype, op.kernel)
    want = reduce_all(ins, dtype, op.kernel, op is ReduceOp.AVG)
    for r in range(n):
        assert_close(outs[r], want, dtype, n, f"rank {r}")
        assert u8(outs[r]).tobytes() == u8(outs[0]).tobytes(), "ranks disagree bitwise"


@settings(max_examples=300, deadline=None)
@given(algo=algos("all_reduce"), op=st.sampled_from(OPS), inplace=st.booleans(), **common)
def test_all_reduce(algo, lay, count, dtype, op, inplace, seed):
    n, hosts = lay
    if not valid_op(op, dtype):
        return
    rng = np.random.default_rng(seed)
    ins = [random_input(rng, dtype, count, op.name) for _ in range(n)]
    try:
        plans = run_plans("all_reduce", algo, n, count, dtype, op, inplace=inplace, hosts=hosts)
    except algorithms.NotSupported as e:
        assert declined(algo, n, count, hosts, e), (algo, n, count, hosts, e)
        return
    run_and_check_all_reduce(plans, ins, dtype, op, inplace)


@settings(max_examples=150, deadline=None)
@given(hosts=st.integers(2, 3), local=st.integers(1, 3), count=st.integers(0, 200), seg=st.sampled_from([4, 12, 40]),
       dtype=st.sampled_from(DTYPES), op=st.sampled_from(OPS), inplace=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_all_reduce_hierarchical_pipelined(hosts, local, count, seg, dtype, op, inplace, seed):
    """Small segments force the software pipeline (many staggered segments) on small buffers."""
    from comms.algorithms import hierarchical
    if not valid_op(op, dtype):
        return
    n = hosts * local
    groups = tuple(tuple(range(h * local, (h + 1) * local)) for h in range(hosts))
    rng = np.random.default_rng(seed)
    ins = [random_input(rng, dtype, count, op.name) for _ in range(n)]
    with mock.patch.object(hierarchical, "SEGMENT_BYTES", seg):
        try:
            plans = run_plans("all_reduce", "hierarchical", n, count, dtype, op, inplace=inplace, hosts=groups)
        except algorithms.NotSupported:
            assert count < n
            return
        nseg = hierarchical.segments_for(count * DTYPE_SIZES[dtype], n, count)
    phases = sum(1 for st_ in plans[0].steps if st_.kind == 8) + 1
    assert phases == 2 * (local - 1) + 2 * (hosts - 1) + (nseg - 1) or phases == 1, (phases, nseg)
    run_and_check_all_reduce(plans, ins, dtype, op, inplace)


@settings(max_examples=200, deadline=None)
@given(algo=algos("reduce"), op=st.sampled_from(OPS), root=st.integers(0, 5), **common)
def test_reduce(algo, lay, count, dtype, op, root, seed):
    n, hosts = lay
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
def test_broadcast(algo, lay, count, dtype, root, seed):
    n, hosts = lay
    root %= n
    rng = np.random.default_rng(seed)
    bufs = [random_input(rng, dtype, count, "SUM") for _ in range(n)]
    want = bufs[root].copy()
    plans = plans_or_decline("broadcast", algo, n, count, dtype, ReduceOp.SUM, hosts, root=root, inplace=True)
    if plans is None:
        return
    simulate.run(plans, [u8(b) for b in bufs], [u8(b) for b in bufs], dtype, 0)
    for b in bufs:
        assert u8(b).tobytes() == u8(want).tobytes()


@settings(max_examples=150, deadline=None)
@given(algo=algos("all_gather"), inplace=st.booleans(), **common)
def test_all_gather(algo, lay, count, dtype, inplace, seed):
    n, hosts = lay
    rng = np.random.default_rng(seed)
    ins = [random_input(rng, dtype, count, "SUM") for _ in range(n)]
    want = np.concatenate(ins) if count else ins[0][:0]
    outs = [np.zeros_like(want) for _ in range(n)]
    if inplace:
        for r in range(n):
            outs[r][r * count:(r + 1) * count] = ins[r]
    src = [u8(outs[r])[r * count * DTYPE_SIZES[dtype]:] if inplace else u8(ins[r]) for r in range(n)]
    plans = plans_or_decline("all_gather", algo, n, count, dtype, ReduceOp.SUM, hosts, inplace=inplace)
    if plans is None:
        return
    simulate.run(plans, src, [u8(o) for o in outs], dtype, 0)
    for o in outs:
        assert u8(o).tobytes() == u8(want).tobytes()


@settings(max_examples=200, deadline=None)
@given(algo=algos("reduce_scatter"), op=st.sampled_from(OPS), **common)
def test_reduce_scatter(algo, lay, count, dtype, op, seed):
    n, hosts = lay
    if not valid_op(op, dtype):
        return
    rng = np.random.default_rng(seed)
    ins = [random_input(rng, dtype, n * count, op.name) for _ in range(n)]
    outs = [np.zeros(count, ins[0].dtype) for _ in range(n)]
    plans = plans_or_decline("reduce_scatter", algo, n, count, dtype, op, hosts)
    if plans is None:
        return
    simulate.run(plans, [u8(x) for x in ins], [u8(o) for o in outs], dtype, op.kernel)
    full = reduce_all(ins, dtype, op.kernel, op is ReduceOp.AVG)
    for r in range(n):
        assert_close(outs[r], full[r * count:(r + 1) * count], dtype, n, f"rank {r}")


@settings(max_examples=150, deadline=None)
@given(algo=algos("all_to_all"), lay=layouts(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**32 - 1),
       equal=st.booleans(), data=st.data())
def test_all_to_all(algo, lay, dtype, seed, equal, data):
    n, hosts = lay
    if equal:
        k = data.draw(st.integers(0, 4))
        splits = [[k] * n for _ in range(n)]
    else:
        splits = [[data.draw(st.integers(0, 5)) for _ in range(n)] for _ in range(n)]   # splits[src][dst] rows
    rng = np.random.default_rng(seed)
    ins = [random_input(rng, dtype, sum(splits[r]), "SUM") for r in range(n)]
    outs = [np.zeros(sum(splits[p][r] for p in range(n)), ins[0].dtype) for r in range(n)]
    plans = plans_or_decline("all_to_all", algo, n, 0, dtype, ReduceOp.SUM, hosts, splits=splits)
    if plans is None:
        assert not equal or (algo == "hierarchical" and (len(hosts) < 2 or len({len(h) for h in hosts}) > 1))
        return
    simulate.run(plans, [u8(x) for x in ins], [u8(o) for o in outs], dtype, 0)
    for r in range(n):
        parts = []
        for p in range(n):
            start = sum(splits[p][:r])
            parts.append(ins[p][start:start + splits[p][r]])
        np.testing.assert_array_equal(outs[r], np.concatenate(parts))


@settings(max_examples=100, deadline=None)
@given(root=st.integers(0, 5), **common)
def test_gather_scatter(lay, count, dtype, root, seed):
    n, hosts = lay
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


@settings(max_examples=150, deadline=None)
@given(lay=layouts(), count=st.integers(1, 300), dtype=st.sampled_from(DTYPES), op=st.sampled_from(OPS),
       inplace=st.booleans(), seed=st.integers(0, 2**32 - 1), block=st.integers(1, 64))
def test_ring_all_reduce_in_pipelined_rounds(lay, count, dtype, op, inplace, seed, block):
    """The ring cut into many rounds of gated sends (blocks of a few bytes) still reduces right."""
    n, hosts = lay
    if not valid_op(op, dtype) or count < n:
        return
    rng = np.random.default_rng(seed)
    ins = [random_input(rng, dtype, count, op.name) for _ in range(n)]
    with mock.patch.object(ring, "RING_BLOCK_BYTES", block), mock.patch.object(ring, "RING_PIPELINE_BYTES", 0):
        plans = run_plans("all_reduce", "ring", n, count, dtype, op, inplace=inplace, hosts=hosts)
    if n > 1 and op is not ReduceOp.AVG:
        rounds = max(1, min(count // n, ring.RING_MAX_ROUNDS, -(-count * DTYPE_SIZES[dtype] // (n * block))))
        assert sum(st.kind == RECV for st in plans[0].steps) == rounds * (n - 1)
        assert sum(st.kind == SEND and st.aux > 0 for st in plans[0].steps) == rounds * (2 * n - 3)
    run_and_check_all_reduce(plans, ins, dtype, op, inplace)


def test_simulator_holds_a_gated_send_until_its_gate_and_its_peers_later_sends_behind_it():
    """Rank 0 forwards what it receives from 1 to 2 (gated), then sends 2 its own block: 2 must get
    the forwarded bytes first, and a plan gated on bytes that never come deadlocks."""
    b = [np.arange(4, dtype=np.uint8) + 10 * r for r in range(3)]
    p0 = Plan("t", (Step(RECV, 1, OUT, 0, 2), Step(SEND, 2, OUT, 0, 2, aux=1), Step(SEND, 2, OUT, 2, 2)))
    p1 = Plan("t", (Step(SEND, 0, OUT, 0, 2),))
    p2 = Plan("t", (Step(RECV, 0, OUT, 0, 2), Step(RECV, 0, OUT, 2, 2)))
    simulate.run([p0, p1, p2], b, b, BOOL, 0)
    assert b[2].tolist() == [10, 11, 2, 3]
    with pytest.raises(simulate.Deadlock, match="gate=0"):
        simulate.run([p0, Plan("t", ()), p2], b, b, BOOL, 0)


def test_ring_declines_fewer_elements_than_ranks():
    with pytest.raises(algorithms.NotSupported):
        run_plans("all_reduce", "ring", 4, 3, 2, ReduceOp.SUM)


def _deterministic_all_reduce(algo, n, hosts, ins, dtype, op):
    es = DTYPE_SIZES[dtype]
    count = ins[0].size
    plans = []
    for r in range(n):
        a = Args("all_reduce", r, n, count, es, avg=op is ReduceOp.AVG, inplace=True, hosts=hosts,
                 deterministic=True, board=board_bytes(hosts))
        try:
            p = algorithms.get("all_reduce", algo).fn(a)
        except algorithms.NotSupported:
            return None
        plans.append(algorithms.deterministic.plan(a, algo) or p)
    outs = [x.copy() for x in ins]
    simulate.run(plans, [u8(o) for o in outs], [u8(o) for o in outs], dtype, op.kernel)
    return outs


@settings(max_examples=120, deadline=None)
@given(lay=layouts(), count=st.integers(1, 40), dtype=st.sampled_from([0, 1, 2, 3]),
       op=st.sampled_from([ReduceOp.SUM, ReduceOp.PROD, ReduceOp.AVG, ReduceOp.MAX]), seed=st.integers(0, 2**32 - 1),
       cut=st.integers(1, 40))
def test_deterministic_mode_is_bitwise_identical_across_algorithms_and_sizes(lay, count, dtype, op, seed, cut):
    """COMMS_DETERMINISTIC: every algorithm, every rank, and a shorter message all give the same bits."""
    n, hosts = lay
    rng = np.random.default_rng(seed)
    # arbitrary floats (not small integers) so that the order of operations shows in the bits
    ins = [rng.standard_normal(count).astype(np.float32) for _ in range(n)]
    if dtype == 1:
        from comms.testing import reference
        ins = [reference.f32_to_bf16(x) for x in ins]
    else:
        ins = [x.astype({0: np.float16, 2: np.float32, 3: np.float64}[dtype]) for x in ins]
    want = reduce_all(ins, dtype, op.kernel, op is ReduceOp.AVG)
    for algo in algorithms.names("all_reduce"):
        outs = _deterministic_all_reduce(algo, n, hosts, ins, dtype, op)
        if outs is None:
            continue
        for r, o in enumerate(outs):
            assert u8(o).tobytes() == u8(want).tobytes(), (algo, r)
    k = min(cut, count)
    short = _deterministic_all_reduce("ring" if k >= n else "direct", n, hosts, [x[:k].copy() for x in ins], dtype, op)
    assert u8(short[0]).tobytes() == u8(want[:k]).tobytes()


def test_deterministic_mode_changes_bits_only_where_order_matters():
    """Without deterministic mode ring and direct may differ in the last bits; with it they never do."""
    rng = np.random.default_rng(7)
    n = 5
    ins = [(rng.standard_normal(4096) * 10.0 ** rng.integers(-3, 4, 4096)).astype(np.float32) for _ in range(n)]
    plain = {}
    for algo in ("ring", "direct"):
        outs = [x.copy() for x in ins]
        simulate.run(run_plans("all_reduce", algo, n, 4096, 2, ReduceOp.SUM, inplace=True),
                     [u8(o) for o in outs], [u8(o) for o in outs], 2, 0)
        plain[algo] = outs[0]
    assert u8(plain["ring"]).tobytes() != u8(plain["direct"]).tobytes()   # the test data is order-sensitive
    det = {a: _deterministic_all_reduce(a, n, (), ins, 2, ReduceOp.SUM)[0] for a in ("ring", "direct", "tree")}
    assert u8(det["ring"]).tobytes() == u8(det["direct"]).tobytes() == u8(det["tree"]).tobytes()


def test_recursive_doubling_crosses_hosts_first():
    """The exchanges that cross hosts come first, largest distance first, then the rest ascending."""
    from comms.algorithms.patterns import crossing_first
    assert crossing_first(4) == [1, 2] and crossing_first(4, ((0, 1), (2, 3))) == [2, 1]
    assert crossing_first(4, ((0, 2), (1, 3))) == [1, 2]
    assert crossing_first(8, ((0, 1, 2, 3), (4, 5, 6, 7))) == [4, 1, 2]
    assert crossing_first(8, ((0, 1), (2, 3), (4, 5), (6, 7))) == [4, 2, 1]
    from comms.algorithms.plan import SEND, Args
    # where a host has more ranks than cores, intra-host first
    for hosts, crowded, first in [((), False, 1), (((0, 1), (2, 3)), False, 2), (((0, 1), (2, 3)), True, 1)]:
        plan = algorithms.get("all_reduce", "recursive_doubling").fn(Args("all_reduce", 0, 4, 8, 4, hosts=hosts,
                                                                             crowded=crowded))
        assert next(s.peer for s in plan.steps if s.kind == SEND) == first
