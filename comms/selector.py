"""Algorithm selection: rules in one string grammar, defaults included.

Grammar (COMMS_ALGO, and ``init(algo=...)``): rules separated by ``#``; each rule is
``collective:low-high:algorithm`` or ``collective:algorithm`` (every size). Sizes are bytes with
optional K/M/G suffixes (binary); ``inf`` is unbounded; a rule covers low <= bytes < high. Example:

    all_reduce:0-64K:direct#all_reduce:64K-inf:ring

The algorithm may be a list of alternatives, ``direct|rhd``: the communicator times them on the
first calls of each size and keeps the fastest (comms.online); until then, and with online timing
off, the first is the choice. The calibrated defaults write such rules where the timed figures
were too close to call.

User rules are consulted first, then the defaults (written in the same grammar: the cost model of
comms.tuning prices every algorithm for this communicator's topology and writes the cheapest per
size range as rules), then every registered algorithm of the collective. An algorithm that
declines a case (NotSupported) passes it to the next candidate. The message size is the per-rank
buffer for all_reduce, broadcast and reduce, and the total bytes a rank sends otherwise.
"""
from __future__ import annotations

from typing import NamedTuple

from . import algorithms, config
from . import log as clog
from .algorithms import deterministic
from .algorithms.plan import Args, NotSupported, Plan
from .config import _size
from .errors import InvalidUsage
from .tuning import AUTO, Params, Route, default_rules

log = clog.get("ALGO")


STATIC = "#".join(["reduce:binomial", "gather:linear", "scatter:linear", "barrier:dissemination"])


def defaults(size: int = 2, hosts: tuple = (), params=None, route: Route = AUTO, oversub: float = 1.0) -> str:
    """The default rules for ``size`` ranks on ``hosts`` whose traffic takes ``route``'s link
    classes (``oversub``: the most ranks per core of any host): the cost model's choices plus the
    collectives that have one algorithm worth using."""
    names = {c: list(a) for c, a in algorithms.REGISTRY.items()}
    priced = default_rules(names, size, hosts, params or Params(), route, oversub)
    return "#".join(filter(None, [priced, STATIC]))


def build(args: Args, name: str) -> Plan:
    """The plan of algorithm ``name`` for ``args`` (its canonical-order variant under
    COMMS_DETERMINISTIC); raises NotSupported when the algorithm declines the case."""
    plan = algorithms.get(args.coll, name).fn(args)
    if args.deterministic:
        plan = deterministic.plan(args, name) or plan
    return plan


class Rule(NamedTuple):
    coll: str
    low: int
    high: float
    names: tuple                   # the algorithms the rule names, the first choice first

    @property
    def algorithm(self) -> str:
        """The first choice."""
        return self.names[0]

    @property
    def alternatives(self) -> tuple:
        """The algorithms online timing chooses among (comms.online): every one named, where the
        rule names several; empty otherwise."""
        return self.names if len(self.names) > 1 else ()

    def __str__(self) -> str:
        high = "inf" if self.high == float("inf") else str(int(self.high))
        return f"{self.coll}:{self.low}-{high}:{'|'.join(self.names)}"


def parse(text: str, source: str = "COMMS_ALGO") -> list[Rule]:
    rules = []
    for item in filter(None, (t.strip() for t in text.split("#"))):
        parts = item.split(":")
        if len(parts) == 2:
            coll, algo, low, high = parts[0], parts[1], 0, float("inf")
        elif len(parts) == 3:
            coll, rng, algo = parts
            lo, sep, hi = rng.partition("-")
            if not sep:
                raise InvalidUsage(f"{source}: range {rng!r} in {item!r} must be low-high")
            try:
                low = _size(lo)
                high = float("inf") if hi.strip().lower() == "inf" else _size(hi)
            except ValueError:
                raise InvalidUsage(f"{source}: bad size in {item!r}") from None
        else:
            raise InvalidUsage(f"{source}: rule {item!r} must be collective:low-high:algorithm")
        if coll not in algorithms.REGISTRY:
            raise InvalidUsage(f"{source}: unknown collective {coll!r} (known: {', '.join(algorithms.REGISTRY)})")
        names = [a.strip() for a in algo.split("|")]
        for a in names:
            if a not in algorithms.REGISTRY[coll]:
                raise InvalidUsage(f"{source}: no algorithm {a!r} for {coll} in {item!r} "
                                   f"(known: {', '.join(algorithms.REGISTRY[coll])})")
        if len(set(names)) != len(names):
            raise InvalidUsage(f"{source}: {item!r} names an algorithm twice")
        rules.append(Rule(coll, low, high, tuple(names)))
    return rules


def _user_rules(override: str | None) -> list[Rule]:
    """``override`` parsed (an init argument or set_algo's), or COMMS_ALGO's rules when None."""
    if override is not None:
        return parse(override, "algo override")
    return parse(config.get("ALGO"), "COMMS_ALGO")


class Selector:
    def __init__(self, override: str | None = None, default: str | None = None):
        self.user = _user_rules(override)
        self.default = parse(default if default is not None else defaults(), "defaults")

    def with_user(self, override: str | None) -> "Selector":
        """A selector with these defaults and ``override`` as the user rules (None: COMMS_ALGO's)."""
        sel = Selector.__new__(Selector)
        sel.user, sel.default = _user_rules(override), self.default
        return sel

    def contest(self, coll: str, nbytes: int) -> tuple:
        """The alternatives of the first rule that covers ``coll`` at ``nbytes`` (empty when that
        rule names one algorithm, or none covers it): what comms.online times."""
        for rule in self.user + self.default:
            if rule.coll == coll and rule.low <= nbytes < rule.high:
                return rule.alternatives
        return ()

    def candidates(self, coll: str, nbytes: int) -> list[str]:
        out = []
        for rule in self.user + self.default:
            if rule.coll == coll and rule.low <= nbytes < rule.high:
                out += [a for a in rule.names if a not in out]
        for name in algorithms.names(coll):
            if name not in out:
                out.append(name)
        return out

    def plan(self, args: Args, nbytes: int) -> Plan:
        reasons = []
        for name in self.candidates(args.coll, nbytes):
            try:
                plan = build(args, name)
            except NotSupported as e:
                reasons.append(f"{name}: {e}")
                continue
            log.debug("comms: %s of %d B on %d ranks -> %s", args.coll, nbytes, args.size, name)
            return plan
        raise InvalidUsage(f"no algorithm can run {args.coll} of {nbytes} B on {args.size} ranks: {'; '.join(reasons)}")

    def table(self) -> list[str]:
        return [str(r) + "  (user)" for r in self.user] + [str(r) for r in self.default]
