"""Selection rules: one string grammar for the user's overrides, the tuned rules and the defaults.

Grammar (COMMS_ALGO, ``init(algo=...)``, ``set_algo``): ``#``-separated ``collective:low-high:algorithm`` (low <=
bytes < high; K/M/G binary, ``inf``) or ``collective:algorithm``, e.g. ``all_reduce:0-64K:direct#all_reduce:ring``;
``direct|rhd`` names alternatives for online timing (comms.selection.online; else the first is the choice). The
first rule covering a case wins, in layers: the user's, the tuned ones (comms.tune), the cost model's, then every
registered algorithm; one that declines (NotSupported) passes it on. The message size is the per-rank buffer for
all_reduce, broadcast and reduce, and the total bytes a rank sends otherwise.
"""
from __future__ import annotations

from typing import NamedTuple

from .. import algorithms, config
from ..diag import log as clog
from ..algorithms import deterministic
from ..algorithms.plan import Args, NotSupported, Plan
from ..config import _size
from ..errors import InvalidUsage
from .model import AUTO, Params, Route, default_rules

log = clog.get("ALGO")

# collectives with one algorithm worth using at every size
STATIC = "#".join(["reduce:binomial", "gather:linear", "scatter:linear", "barrier:dissemination"])


def defaults(size: int = 2, hosts: tuple = (), params: Params | None = None, route: Route = AUTO,
             oversub: float = 1.0) -> str:
    """The default rules for ``size`` ranks on ``hosts``: the cost model's choices and STATIC."""
    rules = default_rules(algorithms.REGISTRY, size, hosts, params or Params(), route, oversub)
    return "#".join(filter(None, [rules, STATIC]))


def build(args: Args, name: str) -> Plan:
    """The plan of algorithm ``name`` for ``args`` (its canonical-order variant under
    COMMS_DETERMINISTIC); raises NotSupported when the algorithm declines the case."""
    plan = algorithms.get(args.coll, name).fn(args)
    return (deterministic.plan(args, name) or plan) if args.deterministic else plan


class Rule(NamedTuple):
    coll: str
    low: int
    high: float
    names: tuple                   # the algorithms named, the first choice first

    @property
    def alternatives(self) -> tuple:
        """What online timing chooses among: every algorithm named, where there are several."""
        return self.names if len(self.names) > 1 else ()

    def __str__(self) -> str:
        high = "inf" if self.high == float("inf") else str(int(self.high))
        return f"{self.coll}:{self.low}-{high}:{'|'.join(self.names)}"


def parse(text: str, source: str = "COMMS_ALGO") -> list[Rule]:
    """The rules of ``text``; InvalidUsage naming ``source`` and the rule for anything malformed."""
    rules = []
    for item in filter(None, (t.strip() for t in text.split("#"))):
        parts = item.split(":")
        if len(parts) not in (2, 3):
            raise InvalidUsage(f"{source}: rule {item!r} must be collective:low-high:algorithm")
        coll, low, high = parts[0], 0, float("inf")
        if len(parts) == 3:
            lo, sep, hi = parts[1].partition("-")
            if not sep:
                raise InvalidUsage(f"{source}: range {parts[1]!r} in {item!r} must be low-high")
            try:
                low, high = _size(lo), float("inf") if hi.strip().lower() == "inf" else _size(hi)
            except ValueError:
                raise InvalidUsage(f"{source}: bad size in {item!r}") from None
        if coll not in algorithms.REGISTRY:
            raise InvalidUsage(f"{source}: unknown collective {coll!r} (known: {', '.join(algorithms.REGISTRY)})")
        names = [a.strip() for a in parts[-1].split("|")]
        unknown = [a for a in names if a not in algorithms.REGISTRY[coll]]
        if unknown:
            raise InvalidUsage(f"{source}: no algorithm {unknown[0]!r} for {coll} in {item!r} "
                               f"(known: {', '.join(algorithms.REGISTRY[coll])})")
        if len(set(names)) != len(names):
            raise InvalidUsage(f"{source}: {item!r} names an algorithm twice")
        rules.append(Rule(coll, low, high, tuple(names)))
    return rules


class Selector:
    """The layers of rules (user, tuned, default) and the registry's fallback order."""

    def __init__(self, override: str | None = None, default: str | None = None, tuned: str = ""):
        self.user = parse(config.get("ALGO"), "COMMS_ALGO") if override is None else parse(override, "algo override")
        self.tuned = parse(tuned, "tuned rules (comms.tune)")
        self.default = parse(default if default is not None else defaults(), "defaults")

    def with_user(self, override: str | None) -> "Selector":
        """These tuned and default rules with ``override`` as the user's (None: COMMS_ALGO's)."""
        sel = Selector(override, "", "")
        sel.tuned, sel.default = self.tuned, self.default
        return sel

    def _covering(self, coll: str, nbytes: int):
        return (r for r in self.user + self.tuned + self.default if r.coll == coll and r.low <= nbytes < r.high)

    def contest(self, coll: str, nbytes: int) -> tuple:
        """The alternatives of the first rule covering ``coll`` at ``nbytes`` (empty if it names one)."""
        return next((r.alternatives for r in self._covering(coll, nbytes)), ())

    def candidates(self, coll: str, nbytes: int) -> list[str]:
        """The algorithms to try in order: those of every covering rule, then the registry's."""
        named = [a for rule in self._covering(coll, nbytes) for a in rule.names]
        return list(dict.fromkeys(named + algorithms.names(coll)))

    def plan(self, args: Args, nbytes: int) -> Plan:
        """The first candidate's plan that builds; InvalidUsage with every one's reason if none does."""
        reasons = []
        for name in self.candidates(args.coll, nbytes):
            try:
                plan = build(args, name)
                log.debug("comms: %s of %d B on %d ranks -> %s", args.coll, nbytes, args.size, name)
                return plan
            except NotSupported as e:
                reasons.append(f"{name}: {e}")
        raise InvalidUsage(f"no algorithm can run {args.coll} of {nbytes} B on {args.size} ranks: {'; '.join(reasons)}")

    def table(self) -> list[str]:
        """Every rule, first to last, the user's and tuned ones marked."""
        return [f"{r}  (user)" for r in self.user] + [f"{r}  (tuned)" for r in self.tuned] \
            + [str(r) for r in self.default]
