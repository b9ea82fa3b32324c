"""Collective algorithms as sans-I/O plans, and the registry the selector draws from.

Each algorithm is a function ``plan(args: Args) -> Plan`` registered with :func:`algorithm` under
(collective, name). It may raise :class:`NotSupported` to decline a case (for example ring with
fewer elements than ranks); the selector then tries the next candidate.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .plan import Args, Builder, NotSupported, Plan, Step, COLL_IDS  # noqa: F401


@dataclass(frozen=True)
class AlgoInfo:
    coll: str
    name: str
    fn: Callable[[Args], Plan]
    doc: str


REGISTRY: dict[str, dict[str, AlgoInfo]] = {c: {} for c in COLL_IDS}


def algorithm(coll: str, name: str, doc: str):
    """Register ``fn`` as algorithm ``name`` of collective ``coll``."""
    def deco(fn):
        if name in REGISTRY[coll]:
            raise RuntimeError(f"algorithm {coll}:{name} registered twice")
        REGISTRY[coll][name] = AlgoInfo(coll, name, fn, doc)
        return fn
    return deco


def get(coll: str, name: str) -> AlgoInfo:
    try:
        return REGISTRY[coll][name]
    except KeyError:
        known = ", ".join(REGISTRY.get(coll, {})) or "none"
        raise KeyError(f"no algorithm {name!r} for {coll} (known: {known})") from None


def names(coll: str) -> list[str]:
    return list(REGISTRY[coll])


# importing the modules registers their algorithms
from . import bruck, direct, hierarchical, linear, pairwise, recursive, ring, tree  # noqa: E402,F401
from . import board  # noqa: E402,F401  (last: the fallback order of the selector's candidates)
