"""Functions that run inside spawned ranks (comms.testing.spawn needs module-level functions)."""
from __future__ import annotations

import hashlib
import os
import time

import numpy as np

import comms
from comms.dtypes import BF16, FLOATING, NUMPY_STORAGE, ReduceOp
from reference_collectives import assert_close, random_input, reduce_all

COLLS = ["all_reduce", "broadcast", "reduce", "all_gather", "reduce_scatter", "all_to_all", "gather", "scatter",
         "barrier", "sendrecv"]


def _valid(op: ReduceOp, dtype: int) -> bool:
    return not ((op.bitwise and dtype in FLOATING) or (op is ReduceOp.AVG and dtype not in FLOATING))


def _wrap(x: np.ndarray, dtype: int, use_torch: bool):
    """The buffer as the API sees it: numpy, or a torch tensor sharing the bytes."""
    if not use_torch and dtype != BF16:
        return x, x
    import torch
    t = torch.from_numpy(x.view(np.int16) if dtype == BF16 else x)
    if dtype == BF16:
        t = t.view(torch.bfloat16)
    return t, x


def make_case(seed: int, i: int, size: int, big: bool) -> dict:
    rng = np.random.default_rng([seed, i])
    coll = COLLS[rng.integers(len(COLLS))]
    dtype = int(rng.integers(9))
    op = ReduceOp(list(ReduceOp)[rng.integers(len(ReduceOp))])
    while not _valid(op, dtype):
        op = ReduceOp(list(ReduceOp)[rng.integers(len(ReduceOp))])
    if big and rng.random() < 0.3:
        count = int(rng.integers(200_000, 700_000))
    else:
        count = int(rng.choice([0, 1, 2, 3, 7, 64, 1000, 4099]))
    splits = rng.integers(0, 5, (size, size)).tolist()
    return dict(coll=coll, dtype=dtype, op=op, count=count, root=int(rng.integers(size)),
                torch=bool(rng.random() < 0.4), splits=splits, inplace=bool(rng.random() < 0.5))


def _inputs(seed, i, size, n, dtype, opname):
    return [random_input(np.random.default_rng([seed, i, r]), dtype, n, opname) for r in range(size)]


def run_cases(rank: int, size: int, seed: int, ncases: int, big: bool = True) -> list[str]:
    """Run ``ncases`` random collectives, check each against the reference, return output digests."""
    comm = comms.init(timeout=60)
    digests = []
    for i in range(ncases):
        c = make_case(seed, i, size, big)
        coll, dtype, op, n, root = c["coll"], c["dtype"], c["op"], c["count"], c["root"]
        st = NUMPY_STORAGE[dtype]
        what = f"case {i} {c} rank {rank}"
        if coll == "all_reduce":
            ins = _inputs(seed, i, size, n, dtype, op.name)
            buf = ins[rank].copy()
            comm.all_reduce(_wrap(buf, dtype, c["torch"])[0], op=op)
            assert_close(buf, reduce_all(ins, dtype, op.kernel, op is ReduceOp.AVG), dtype, size, what)
            digests.append(hashlib.sha1(buf.tobytes()).hexdigest())
        elif coll == "broadcast":
            ins = _inputs(seed, i, size, n, dtype, "SUM")
            buf = ins[rank].copy()
            comm.broadcast(_wrap(buf, dtype, c["torch"])[0], root=root)
            np.testing.assert_array_equal(buf.view(np.uint8), ins[root].view(np.uint8), err_msg=what)
        elif coll == "reduce":
            ins = _inputs(seed, i, size, n, dtype, op.name)
            buf = ins[rank].copy()
            comm.reduce(_wrap(buf, dtype, c["torch"])[0], root=root, op=op)
            if rank == root:
                assert_close(buf, reduce_all(ins, dtype, op.kernel, op is ReduceOp.AVG), dtype, size, what)
            else:
                np.testing.assert_array_equal(buf.view(np.uint8), ins[rank].view(np.uint8), err_msg=what)
        elif coll == "all_gather":
            ins = _inputs(seed, i, size, n, dtype, "SUM")
            out = np.zeros(size * n, st)
            if c["inplace"]:
                out[rank * n:(rank + 1) * n] = ins[rank]
                inp = out[rank * n:(rank + 1) * n]
            else:
                inp = ins[rank]
            comm.all_gather(_wrap(out, dtype, c["torch"])[0], _wrap(inp, dtype, c["torch"])[0])
            np.testing.assert_array_equal(out.view(np.uint8), np.concatenate(ins).view(np.uint8), err_msg=what)
        elif coll == "reduce_scatter":
            ins = _inputs(seed, i, size, size * n, dtype, op.name)
            out = np.zeros(n, st)
            comm.reduce_scatter(_wrap(out, dtype, c["torch"])[0], _wrap(ins[rank].copy(), dtype, c["torch"])[0], op=op)
            full = reduce_all(ins, dtype, op.kernel, op is ReduceOp.AVG)
            assert_close(out, full[rank * n:(rank + 1) * n], dtype, size, what)
        elif coll == "all_to_all":
            sp = c["splits"]
            width = 3
            ins = [random_input(np.random.default_rng([seed, i, r]), dtype, sum(sp[r]) * width, "SUM")
                   .reshape(-1, width) for r in range(size)]
            out = np.zeros((sum(sp[p][rank] for p in range(size)), width), st)
            comm.all_to_all(_wrap(out, dtype, c["torch"])[0], _wrap(ins[rank], dtype, c["torch"])[0],
                            out_splits=[sp[p][rank] for p in range(size)], in_splits=sp[rank])
            want = [ins[p][sum(sp[p][:rank]):sum(sp[p][:rank + 1])] for p in range(size)]
            np.testing.assert_array_equal(out, np.concatenate(want), err_msg=what)
        elif coll == "gather":
            ins = _inputs(seed, i, size, n, dtype, "SUM")
            out = np.zeros(size * n, st) if rank == root else None
            comm.gather(_wrap(out, dtype, c["torch"])[0] if out is not None else None,
                        _wrap(ins[rank], dtype, c["torch"])[0], root=root)
            if rank == root:
                np.testing.assert_array_equal(out, np.concatenate(ins), err_msg=what)
        elif coll == "scatter":
            ins = _inputs(seed, i, size, size * n, dtype, "SUM")
            out = np.zeros(n, st)
            comm.scatter(_wrap(out, dtype, c["torch"])[0],
                         _wrap(ins[root], dtype, c["torch"])[0] if rank == root else None, root=root)
            np.testing.assert_array_equal(out, ins[root][rank * n:(rank + 1) * n], err_msg=what)
        elif coll == "barrier":
            comm.barrier()
        elif coll == "sendrecv" and size > 1:
            ins = _inputs(seed, i, size, n, dtype, "SUM")
            dst, src = (rank + 1) % size, (rank - 1) % size
            out = np.zeros(n, st)
            w1 = comm.send(_wrap(ins[rank], dtype, c["torch"])[0], dst, tag=i, async_op=True)
            w2 = comm.recv(_wrap(out, dtype, c["torch"])[0], src, tag=i, async_op=True)
            w1.wait()
            w2.wait()
            np.testing.assert_array_equal(out.view(np.uint8), ins[src].view(np.uint8), err_msg=what)
    stats = comm.stats()
    comm.close()
    from comms.transports import NAMES
    return digests + ["stats:" + ",".join(sorted(n for n in NAMES if stats[f"{n}_tx_bytes"] > 0))]


def transports_seen(rank: int, size: int) -> dict:
    with comms.init(timeout=30) as comm:
        return {"transports": comm.transports, "local": comm.local_ranks}


def topology_of(rank: int, size: int) -> dict:
    os.environ["COMMS_HOST_ID"] = f"h{rank // 2}"
    with comms.init(timeout=30) as comm:
        return comm.topology.as_dict()


def deterministic_digests(rank: int, size: int, count: int) -> dict:
    """COMMS_DETERMINISTIC=1: all_reduce of order-sensitive floats under every algorithm."""
    os.environ["COMMS_HOST_ID"] = f"h{rank % 2}"
    from comms import algorithms
    x = np.random.default_rng(rank).standard_normal(count).astype(np.float32) * 1e3
    out = {}
    for algo in algorithms.names("all_reduce"):
        with comms.init(timeout=60, algo=f"all_reduce:{algo}") as comm:
            y = x.copy()
            comm.all_reduce(y)
            out[algo] = hashlib.sha1(y.tobytes()).hexdigest()
    return out


def calibrated_params(rank: int, size: int, sizes: tuple = ()) -> dict:
    """The cost model's figures after init, the selection table, the algorithm chosen at each of
    ``sizes`` (all_reduce), the sequence number of the first collective and its sum."""
    with comms.init(timeout=60) as comm:
        x = np.full(4, rank + 1, np.float32)
        comm.all_reduce(x)
        return {"params": comm.calibration.params.as_dict(), "route": list(comm.route),
                "rules": comm._selector.table(), "tuned": comm.calibration.rules,
                "signature": comm.calibration.signature, "seq": comm._engine.seq, "sum": x.tolist(),
                "chosen": [comm.algorithm_for("all_reduce", s) for s in sizes]}


def timer_prober(rank: int, size: int) -> dict:
    """Calibration's timer (Communicator._timer) after init: 3 runs of one recursive doubling all_reduce of 4 KiB,
    then one of 5 back to back, the bytes the shm transport moved meanwhile; hierarchical (it declines on one
    host); and a collective after them."""
    with comms.init(timeout=60) as comm:
        all_reduce = comm._timer()
        before = comm.stats()
        reduced = [all_reduce("recursive_doubling", 4096) for _ in range(3)]
        reduced.append(all_reduce("recursive_doubling", 4096, 5))
        after = comm.stats()
        x = np.full(4, rank + 1, np.float32)
        comm.all_reduce(x)
        return {"sum": x.tolist(), "reduced": reduced, "reduce_tx": after["shm_tx_bytes"] - before["shm_tx_bytes"],
                "hierarchical": all_reduce("hierarchical", 4096)}


def tcp_round_trip_us(rank: int, size: int) -> float:
    with comms.init(timeout=60) as comm:
        x = np.zeros(2, np.float32)
        comm.barrier()
        t0 = time.perf_counter()
        for _ in range(20):
            if rank == 0:
                comm.send(x, 1)
                comm.recv(x, 1)
            else:
                comm.recv(x, 0)
                comm.send(x, 0)
        return (time.perf_counter() - t0) / 20 * 1e6


def wait_beside_a_parked_collective(rank: int, size: int) -> dict:
    """Rank 1 starts an all_reduce (direct: its message reaches rank 0 at once) while rank 0 waits
    0.5 s for a message from rank 2; rank 0's wait must sleep, not spin on rank 1's message."""
    with comms.init(timeout=30) as comm:
        x, buf = np.ones(16, np.float32), np.zeros(4, np.float32)
        comm.barrier()
        out = {}
        if rank == 0:
            sleeps = comm.stats()["sleeps"]
            cpu, wall = time.process_time(), time.perf_counter()
            comm.recv(buf, 2)
            out = {"cpu": time.process_time() - cpu, "wall": time.perf_counter() - wall,
                   "sleeps": comm.stats()["sleeps"] - sleeps}
            comm.all_reduce(x)
        elif rank == 1:
            comm.all_reduce(x)
        else:
            time.sleep(0.5)
            comm.send(buf + 7, 0)
            comm.all_reduce(x)
        out["sum"] = float(x[0])
        return out


def switched_algorithms(rank: int, size: int) -> dict:
    """Communicator.set_algo on one communicator of 2 hosts x 2 ranks: every all_reduce algorithm
    in turn (the algorithm that ran and the sums), bad rules (the error, and the rules in force
    after it), a split made under forced rules, and the way back to the default."""
    from comms import algorithms
    os.environ["COMMS_HOST_ID"] = f"h{rank // 2}"
    out: dict = {"ran": {}}
    with comms.init(timeout=60) as comm:
        default = comm.algorithm_for("all_reduce", 4096)
        for algo in algorithms.names("all_reduce"):
            comm.set_algo(f"all_reduce:{algo}")
            x = np.full(1024, rank + 1, np.float32)
            comm.all_reduce(x)
            out["ran"][algo] = [comm.algorithm_ran("all_reduce", 4096), sorted(set(x.tolist()))]
        try:
            comm.set_algo("all_reduce:no_such")
        except comms.InvalidUsage as e:
            out["bad"] = str(e)
        out["after_bad"] = comm.algorithm_for("all_reduce", 4096)
        sub = comm.split(0, rank)
        out["split"] = sub.algorithm_for("all_reduce", 4096)
        sub.close()
        comm.set_algo(None)
        x = np.full(1024, rank + 1, np.float32)
        comm.all_reduce(x)
        out["default"] = [default, comm.algorithm_ran("all_reduce", 4096), sorted(set(x.tolist()))]
    return out


def online_timed(rank: int, size: int, rules: str, slow: str | None, calls: int, async_calls: bool = False,
                 delay: float = 0.002) -> dict:
    """Online timing (comms.selection.online) under ``rules`` naming alternatives: ``calls`` all_reduces of
    1 MiB (the algorithm each ran, and whether each sum was right), where every synchronous run of
    a plan of algorithm ``slow`` is held ``delay`` seconds longer; then a forced algorithm and back
    (the decision is kept), what online_choices reports, and the model's seconds per call of ring
    and direct (what sized the turns)."""
    with comms.init(timeout=60, algo=rules) as comm:
        run = comm._engine.run

        def held(enc, *a):
            if enc.plan.algorithm == slow:
                time.sleep(delay)
            return run(enc, *a)
        comm._engine.run = held
        ran, right = [], []
        for i in range(calls):
            x = np.full(1 << 18, rank + i, np.float32)
            w = comm.all_reduce(x, async_op=async_calls)
            if w is not None:
                w.wait()
            ran.append(comm.algorithm_ran("all_reduce", x.nbytes))
            right.append(bool(np.all(x == sum(r + i for r in range(size)))))
        comm.set_algo("all_reduce:ring")
        comm.all_reduce(np.zeros(1 << 18, np.float32))
        forced = comm.algorithm_ran("all_reduce", 1 << 20)
        comm.set_algo(None)
        x = np.full(1 << 18, 1.0, np.float32)
        comm.all_reduce(x)
        after = [comm.algorithm_ran("all_reduce", 1 << 20), bool(np.all(x == size))]
        choices = [{"alternatives": c["alternatives"], "chosen": c["chosen"], "timed": sorted(c["ratios"])}
                   for c in comm.online_choices()]
        seconds = {a: comm.price("all_reduce", a, 1 << 20) / 1e6 for a in ("ring", "direct")}
    return {"ran": ran, "right": right, "forced": forced, "after": after, "choices": choices, "seconds": seconds}


def two_host_params(rank: int, size: int) -> dict:
    """Each rank its own host (COMMS_HOST_ID): the cost model's parameters after init, and the
    all_reduce of 1..size still right."""
    import os
    os.environ["COMMS_HOST_ID"] = f"host{rank}"
    with comms.init(timeout=60) as comm:
        x = np.full(4, rank + 1, np.float32)
        comm.all_reduce(x)
        return {"params": comm.calibration.params.as_dict(), "route": list(comm.route), "sum": x.tolist()}


def many_queued_collectives(rank: int, size: int, n: int) -> dict:
    """``n`` asynchronous all_reduces that nobody waits for, each on its own data, then a synchronous
    one, then waits for them all: each has its own sum."""
    with comms.init(timeout=60) as comm:
        bufs = [np.full(3, float(rank + i), np.float32) for i in range(n)]
        works = [comm.all_reduce(b, async_op=True) for b in bufs]
        x = np.full(3, float(rank), np.float32)
        comm.all_reduce(x)
        for w in works:
            w.wait()
        wrong = [i for i, b in enumerate(bufs) if not (b == sum(r + i for r in range(size))).all()]
        return {"wrong": wrong, "x": x.tolist()}


def queued_collective_times_out(rank: int, size: int) -> dict:
    """Rank 0 starts an all_reduce that rank 1 never joins, then queues a second one behind it with
    a 1 s timeout: the queued one must fail with its own timeout, about 1 s on, not the first's
    30 s. Rank 1 stays alive meanwhile (no peer failure to hear of instead)."""
    with comms.init(timeout=30) as comm:
        if rank == 1:
            time.sleep(4)
            return {}
        first = comm.all_reduce(np.ones(2, np.float32), async_op=True)
        t0 = time.monotonic()
        second = comm.all_reduce(np.ones(2, np.float32), async_op=True, timeout=1.0)
        try:
            second.wait()
            return {"error": None}
        except comms.CommsError as e:
            out = {"error": type(e).__name__, "msg": str(e), "after": time.monotonic() - t0}
        try:
            first.wait()
        except comms.CommsError as e:
            out["first"] = type(e).__name__
        return out
