"""Tuning (``python -m comms.tune``): :func:`sweep` times the :func:`candidates` at each size through
online timing (comms.selection.online), and :func:`tune` turns the winners into rules, each covering its
size up to the next one's, which the command line keeps for the host signature (calibrate.save_rules).
"""
from __future__ import annotations

import math

import numpy as np

from .model import ranges

GROSS = 2.0              # a candidate moves and reduces its bytes in at most this times the time the frugalest one
#                          does: #25 saw a pick that moved 2.7x the inter-host bytes win one calibration's timing. Step
#                          latencies are left to the timing: on ranks sharing cores the calibrated one moved 2-37x
#                          between fresh calibrations (2 simulated hosts x 2 ranks, shared CPUs: shm 2.3-84.6 us)
OPS = ("all_reduce", "broadcast", "all_gather", "reduce_scatter", "all_to_all")
MAX_CALLS = 200_000      # per size: 7 algorithms x 11 rounds x at most 960 calls a turn (100 ms turns) is ~74,000


def _caller(comm, op: str, nbytes: int):
    """A call of ``op`` whose selector message size is about ``nbytes``, and that size."""
    n = comm.size
    if op in ("all_reduce", "broadcast"):
        buf = np.ones(max(1, nbytes // 4), np.float32)
        return (lambda: comm.all_reduce(buf)) if op == "all_reduce" else (lambda: comm.broadcast(buf, 0)), buf.nbytes
    per = max(1, nbytes // 4 // (n - 1))
    part, whole = np.ones(per, np.float32), np.ones(per * n, np.float32)
    if op == "all_gather":
        return (lambda: comm.all_gather(whole, part)), part.nbytes * (n - 1)
    if op == "reduce_scatter":
        return (lambda: comm.reduce_scatter(part, whole)), part.nbytes * (n - 1)
    out = np.empty_like(whole)
    return (lambda: comm.all_to_all(out, whole)), part.nbytes * (n - 1)


def candidates(comm, op: str, nbytes: int) -> list[str]:
    """The algorithms the model does not call grossly worse at ``nbytes``, cheapest first: those whose bytes (the
    price without step latencies) take at most GROSS times the least, or less than the cheapest's price. Step
    latency is the timing's to judge: on 2 simulated hosts x 2 ranks sharing 2 CPUs, rhd, priced 1.7-2.0x
    recursive doubling at 512 B (twice its steps), measured 0.90x its time."""
    from .. import algorithms
    prices = {a: comm.price(op, a, nbytes) for a in algorithms.names(op)}
    data = {a: comm.price(op, a, nbytes, steps=False) for a in prices}
    least, cheapest = min(data.values()), min(prices.values())
    keep = (a for a, t in prices.items() if math.isfinite(t) and (data[a] <= GROSS * least or data[a] < cheapest))
    return sorted(keep, key=prices.get)


def sweep(comm, op: str, sizes: list[int]) -> tuple[list[int], list[str]]:
    """Collective: the trial's winner at each size, as (selector sizes, picks)."""
    done, picks, at = comm.online_decided(), [], []
    for nbytes in sizes:
        call, m = _caller(comm, op, nbytes)
        if at and m <= at[-1]:
            continue
        names = candidates(comm, op, m)
        comm.set_algo(f"{op}:{m}-{m + 1}:{'|'.join(names)}")
        for _ in range(MAX_CALLS):
            call()
            if len(names) < 2 or comm.online_decided() > done:      # not online_choices(): it builds a list
                break
        else:
            raise RuntimeError(f"comms.tune: {op} of {m} B did not decide in {MAX_CALLS} calls")
        choices = comm.online_choices()
        picks.append(choices[-1]["chosen"] if len(choices) > done else comm.algorithm_ran(op, m))
        done = len(choices)
        at.append(m)
    comm.set_algo(None)
    return at, picks


def tune(comm, ops: list[str], sizes: list[int]) -> str:
    """Collective: the winners of ``ops`` at ``sizes`` as rules (the selector's grammar)."""
    return "#".join(rule for op in ops for rule in ranges(op, *sweep(comm, op, sizes)))
