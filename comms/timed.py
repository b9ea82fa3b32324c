"""The timed table: what comms.autotune measured, and how the selection prices with it.

The table holds, per collective and algorithm, the slowest rank's time per call at each probe size
(:data:`PROBES`; None where the algorithm declined the size or was no longer timed), for one
layout (:func:`layout`: the rank count and the ranks per host); it applies only to communicators
of that layout (:func:`applies`: a split sub-communicator prices with the cost model alone). The
selection (comms.tuning.default_rules) prices an algorithm at

    cost(m) x correction(m),  correction = measured / modelled at the probes,

interpolated linearly in log(size) between probes and held constant beyond the grid
(:func:`correction`). At a probe the cheapest corrected algorithm is the one that measured
fastest; between probes the model's shape places the crossover. An algorithm that declined a probe
is not chosen at sizes next to it. Rank 0 merges the ranks' tables with :func:`combine`, and the
table is cached with the calibration.
"""
from __future__ import annotations

import math

PROBES = [8 << k for k in range(23)]            # 8 B .. 32 MiB, x2: a cost can step between two
# sizes, which interpolation across x4 missed (seen: recursive doubling over tcp under a 2 Gbit/s
# token bucket took 4x as long at 64 KiB as at 32 KiB, and the selector kept it there)


def layout(n: int, hosts: tuple) -> list:
    """What a timed table is valid for: the rank count and the ranks per host."""
    return [n, [len(g) for g in hosts]]


def combine(tables: list[dict]) -> dict:
    """Every rank's comms.autotune.measure -> one table: per entry the slowest rank's figure (None if any
    rank's algorithm declined)."""
    out = {"layout": tables[0]["layout"]}
    for coll, algos in tables[0].items():
        if coll == "layout":
            continue
        reached = min(len(t[coll][a]) for t in tables for a in algos)
        out[coll] = {a: [None if any(t[coll][a][i] is None for t in tables) else max(t[coll][a][i] for t in tables)
                         for i in range(reached)] for a in algos}
    return out


def applies(measured: dict | None, n: int, hosts: tuple) -> bool:
    return bool(measured) and measured.get("layout") == layout(n, hosts)


def correction(measured: dict, coll: str, algo: str, model) -> "callable | None":
    """The factor (a function of bytes) that turns ``model(bytes)`` into the measured time of
    ``algo``, or None when ``coll``/``algo`` was not measured. It returns math.inf next to a probe
    where the algorithm declined."""
    row = (measured.get(coll) or {}).get(algo)
    if row is None:
        return None
    points = []               # (log2 size, log ratio or None for a decline)
    for size, t in zip(PROBES, row):
        if t is None:
            points.append((math.log2(size), None))
            continue
        m = model(size)
        if m is None or not math.isfinite(m) or m <= 0:
            continue
        points.append((math.log2(size), math.log(max(t, 1e-3) / m)))
    if not points or all(r is None for _, r in points):
        return lambda nbytes: math.inf if points else 1.0

    def factor(nbytes: float) -> float:
        x = math.log2(max(nbytes, PROBES[0]))
        hit = next((r for px, r in points if px == x), False)
        if hit is not False:
            r = hit
        elif x <= points[0][0]:
            r = points[0][1]
        elif x >= points[-1][0]:
            r = points[-1][1]
        else:
            j = next(j for j in range(1, len(points)) if points[j][0] >= x)
            (x0, r0), (x1, r1) = points[j - 1], points[j]
            if r0 is None or r1 is None:
                return math.inf
            r = r0 + (r1 - r0) * (x - x0) / (x1 - x0)
        return math.inf if r is None else math.exp(r)
    return factor
