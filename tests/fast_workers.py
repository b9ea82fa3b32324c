"""Rank functions of tests/test_fast_path.py: the synchronous all_reduce fast path (one native call
for a shape an earlier call built a plan for) against the reference, its misuse and its failures."""
from __future__ import annotations

import time

import numpy as np

import comms
from comms.dtypes import BF16, BOOL, F16, F32, F64, I32, I64, U8, ReduceOp
from reference_collectives import assert_close, random_input, reduce_all
from workers import _wrap

# (dtype, op, torch?) covered by repeated_calls: each shape is called several times with new data
CASES = [(F32, ReduceOp.SUM, False), (F32, ReduceOp.SUM, True), (F64, ReduceOp.AVG, False),
         (I32, ReduceOp.MAX, False), (I64, ReduceOp.PROD, True), (U8, ReduceOp.BXOR, False),
         (BOOL, ReduceOp.BOR, False), (F16, ReduceOp.MIN, True), (BF16, ReduceOp.SUM, True)]


def repeated_calls(rank: int, size: int, count: int) -> dict:
    """Every case called 4 times with fresh random data; the results must match the reference
    every time, and each call is one collective (the sequence number moves by one)."""
    out: dict = {"seq_steps": [], "digests": []}
    with comms.init(timeout=60) as comm:
        for ci, (dtype, op, use_torch) in enumerate(CASES):
            for call in range(4):
                ins = [random_input(np.random.default_rng([ci, call, r]), dtype, count, op.name)
                       for r in range(size)]
                x = ins[rank].copy()
                buf, view = _wrap(x, dtype, use_torch)
                before = comm._engine.seq
                comm.all_reduce(buf, op)
                out["seq_steps"].append(comm._engine.seq - before)
                assert_close(view, reduce_all(ins, dtype, op.kernel, op is ReduceOp.AVG), dtype, size,
                             f"case {ci} call {call} rank {rank}")
                out["digests"].append(view.tobytes().hex())
        out["fast_shapes"] = len(comm._hot)
    return out


def misuse_on_a_fast_shape(rank: int, size: int, peek: bool) -> dict:
    """After a float32 x 4 all_reduce ran (so the shape has a fast path), buffers of the same dtype
    and count that cannot be used in place must still be refused before any byte moves; the
    communicator stays usable. ``peek``: the fast path reads the array's fields from its memory
    (comms.runtime.arrays), else it takes ffi.from_buffer."""
    import torch
    from comms import operations
    operations._PEEK = peek and operations._PEEK
    errors = {}
    with comms.init(timeout=30) as comm:
        for _ in range(3):
            comm.all_reduce(np.ones(4, np.float32))
        ro = np.ones(4, np.float32)
        ro.flags.writeable = False
        strided = np.ones(8, np.float32)[::2]
        tstrided = torch.ones(8)[::2]
        late = np.ones(4, np.float32)             # used in place, then made read-only: the same object
        comm.all_reduce(late)
        late.flags.writeable = False
        for name, buf in (("read-only", ro), ("strided", strided), ("torch strided", tstrided),
                          ("made read-only", late)):
            try:
                comm.all_reduce(buf)
                errors[name] = None
            except comms.InvalidUsage as e:
                errors[name] = str(e)
        x = np.full(4, rank + 1, np.float32)
        comm.all_reduce(x)
        return {"errors": errors, "after": x.tolist(), "ro": ro.tolist(), "late": late.tolist(),
                "peek": operations._PEEK}


def rules_change_between_fast_calls(rank: int, size: int) -> dict:
    """set_algo between calls of one shape: the next call runs the new rules' plan."""
    out = {}
    with comms.init(timeout=30) as comm:
        for algo in ("ring", "direct", "rhd", "ring"):
            comm.set_algo(f"all_reduce:{algo}")
            for _ in range(3):
                x = np.full(256, rank + 1, np.float32)
                comm.all_reduce(x)
            out[algo] = [comm.algorithm_ran("all_reduce", 1024), sorted(set(x.tolist()))]
    return out


def fails_on_a_fast_shape(rank: int, size: int, how: str) -> dict:
    """A failure inside a fast-path call: ``mismatch`` (rank 1 calls with another count) or
    ``timeout`` (rank 1 does not call at all). Every rank reports the exception it got, and whether
    the next call raised too."""
    with comms.init(timeout=1.5 if how == "timeout" else 30) as comm:
        for _ in range(3):
            comm.all_reduce(np.ones(4, np.float32))
        seq = comm._engine.seq + 1
        out = {"expected_seq": seq}
        try:
            if rank == 1 and how == "mismatch":
                comm.all_reduce(np.ones(5, np.float32))
            elif rank == 1 and how == "timeout":
                time.sleep(3)
                return out
            else:
                comm.all_reduce(np.ones(4, np.float32))
            out["error"] = None
        except comms.CommsError as e:
            out["error"] = (type(e).__name__, e.op, e.seq, e.rank, e.peer)
        try:
            comm.all_reduce(np.ones(4, np.float32))
            out["next"] = None
        except comms.CommsError as e:
            out["next"] = type(e).__name__
        return out


def another_thread_during_a_fast_call(rank: int, size: int, how: str) -> dict:
    """Rank 0 is inside a fast-path call (rank 1 joins it 0.6 s late) while another thread of rank
    0 uses the communicator: ``counters`` reads the native context (it must wait until the call
    ends, not run beside it), ``abort`` aborts the communicator (the call must end at once with
    the abort's error)."""
    import threading
    with comms.init(timeout=30) as comm:
        for _ in range(3):
            comm.all_reduce(np.ones(4, np.float32))
        comm.barrier()
        out: dict = {}
        if rank == 1:
            time.sleep(0.6)
            out["error"] = None
            try:                 # rank 0's data may be on the board already: the first call may end well
                for _ in range(2 if how == "abort" else 1):
                    comm.all_reduce(np.ones(4, np.float32))
            except comms.CommsError as e:
                out["error"] = type(e).__name__
            return out

        def other():
            time.sleep(0.2)
            t = time.monotonic()
            if how == "counters":
                comm._engine.counters()
            else:
                comm.abort("from another thread")
            out["other"] = (t, time.monotonic())
        th = threading.Thread(target=other)
        th.start()
        t0 = time.monotonic()
        try:
            comm.all_reduce(np.ones(4, np.float32))
            out["error"] = None
        except comms.CommsError as e:
            out["error"] = (type(e).__name__, str(e))
        out["call"] = (t0, time.monotonic())
        th.join()
        return out


def other_collectives_repeated(rank: int, size: int, use_torch: bool) -> dict:
    """broadcast, all_gather (apart and in place, alternating), reduce_scatter and all_to_all of numpy
    arrays, each shape called 4 times with new data: every result matches the expected one, each call
    is one collective, and every shape reached the fast path. Then, on those fast shapes, buffers that
    cannot be used as the plan was built for: refused (or, a read-only input, run by the checked path),
    and the communicator stays usable. ``use_torch``: the calls take torch tensors sharing the arrays'
    memory (the misuse is numpy's)."""
    import torch
    T = torch.from_numpy if use_torch else (lambda a: a)
    c = 3
    out: dict = {"seq_steps": [], "errors": {}}
    with comms.init(timeout=60) as comm:
        def one(fn, *args):
            before = comm._engine.seq
            fn(*args)
            out["seq_steps"].append(comm._engine.seq - before)

        for call in range(4):
            base = 100.0 * call
            for root in (0, size - 1):
                b = np.full(c, base + rank, np.float32)
                one(comm.broadcast, T(b), root)
                assert b.tolist() == [base + root] * c, (call, root, b)
            g = np.full(size * c, -1.0, np.float32)
            one(comm.all_gather, T(g), T(np.full(c, base + rank, np.float32)))
            assert g.tolist() == [base + r for r in range(size) for _ in range(c)], g
            for k in (c, c + 1):     # in place (the input is the own block): at the shape above, apart's plan
                g = np.full(size * k, -1.0, np.float32)     # is refused (checked path); at c + 1 it is its own
                g[rank * k:(rank + 1) * k] = base + rank
                one(comm.all_gather, T(g), T(g)[rank * k:(rank + 1) * k])
                assert g.tolist() == [base + r for r in range(size) for _ in range(k)], g
            x = np.arange(size * c, dtype=np.float64) + base + rank
            y = np.empty(c, np.float64)
            one(comm.reduce_scatter, T(y), T(x))
            want = [sum(base + r + rank * c + i for r in range(size)) for i in range(c)]
            assert y.tolist() == want, (y, want)
            one(comm.reduce_scatter, T(x)[rank * c:(rank + 1) * c], T(x))   # in place: the output is the own block
            assert x[rank * c:(rank + 1) * c].tolist() == want, (x, want)
            s = (np.arange(size * c, dtype=np.int32) + 1000 * rank + int(base)).reshape(size, c)
            d = np.empty_like(s)
            one(comm.all_to_all, T(d), T(s))
            assert d.tolist() == [[1000 * p + int(base) + rank * c + i for i in range(c)] for p in range(size)], d
        out["fast"] = sorted(k[0] + " in place" * (k[-1] == "in") for k in comm._hot if isinstance(k[0], str))

        ro = np.full(c, rank, np.float32)
        ro.flags.writeable = False
        g = np.empty(size * c, np.float32)
        comm.all_gather(g, ro)                                           # a read-only input is fine
        out["ro_input"] = g.tolist()
        s = np.zeros((size, c), np.int32)
        misuse = {
            "read-only output": lambda: comm.all_gather(_ro(np.empty(size * c, np.float32)),
                                                        np.ones(c, np.float32)),
            "input elsewhere in the output": lambda: comm.all_gather(g, g[((rank + 1) % size) * c:][:c]),
            "all_to_all in place": lambda: comm.all_to_all(s, s),
            "strided output": lambda: comm.reduce_scatter(np.empty(2 * c, np.float64)[::2],
                                                          np.ones(size * c, np.float64)),
            "read-only broadcast": lambda: comm.broadcast(_ro(np.ones(c, np.float32)), 0),
        }
        for name, fn in misuse.items():
            try:
                fn()
                out["errors"][name] = None
            except comms.InvalidUsage as e:
                out["errors"][name] = str(e)
        b = np.full(c, rank + 1.0, np.float32)
        comm.broadcast(b, size - 1)
        out["after"] = b.tolist()
    return out


def _ro(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a
