"""The cost model behind algorithm selection, and its calibration.

Every algorithm is priced as time = latency x steps + bytes / bandwidth (NCCL's tuning.cc), per
link class, plus the local reduction speed. A link class is a transport: every registered one
(comms.transports.ORDER) brings its default figures (``Transport.link``), calibration replaces them
with measured ones, and :class:`Params` holds them by the transport's name. A communicator's
:class:`Route` names the two classes its traffic takes: ``intra`` between ranks of one host (shm
where auto selection finds it), ``inter`` between hosts (tcp, or rdma), and whether intra's
exchanges of one step wait as one (``Transport.waits_together``).
Each step is priced on the link it uses: the recursive algorithms' exchange with rank ^ d stays on
intra while the partners share a host and goes over inter once they do not; a step of a flat
algorithm that uses both classes at once (a ring over hosts) is bound by the slower (the larger
latency and the smaller bandwidth: an oversubscribed host's shm can be slower than its tcp);
direct's one step adds up the bytes to every peer (the rank's thread moves them all), one intra
step latency for all its intra exchanges where they wait together (else one each) and one inter
step latency per inter exchange (each costs the thread its own syscalls).
:func:`default_rules` sweeps message sizes, picks the cheapest algorithm for each (with prices
corrected by the timed table of comms.timed where calibration measured the candidates; there a
near tie goes to the fewest waits on a peer), and writes the result as rules in the selector's
grammar (``all_reduce:0-16K:direct#...``): the defaults are data, printed by
``python -m comms.info`` and overridden with COMMS_ALGO in the same grammar.

Calibration (comms.calibration) measures the link figures and times the candidates (comms.autotune).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

SIZES = [0] + [1 << k for k in range(3, 31)]          # 8 B .. 1 GiB
TIE = 0.08                     # timed prices this close to the cheapest count as a tie...
TIE_SHARED = 0.20              # ...and this close where a host has more ranks than cores...
LATENCY_SHARE = 0.5            # ...at sizes where the model puts this share of the cost in step latencies
CONTEST = 0.10                 # timed prices this close to the cheapest are left to online timing (comms.online)...
CONTEST_SHARED = 0.50          # ...and this close where a host has more ranks than cores: the bench's
#                                launches measured 4 ranks on 2 cores 2x faster than the calibrating
#                                launch, with rhd behind recursive doubling by 31 % at calibration and
#                                ahead in 4 of the bench's 5 launches (0.81-0.96x; 32 KiB)
BOARD_SHARE = 0.9              # board's price, as a share of direct's: forced in the bench (all_reduce, 3
#                                launches, 8 B-2 KiB) board took 0.83-0.93x direct's time on 2 ranks
#                                with a core each and 0.96-0.99x on 4 ranks sharing 2 cores
CONTEST_MAX = 3                # at most this many alternatives per rule...
CONTEST_MAX_US = 1000.0        # ...and only where the pick's timed price is at most this: exploring
#                                costs a few dozen calls of each alternative, seconds of the job at
#                                8 MiB on 2 hosts (a tree 2x behind hierarchical), more calls than
#                                the bench gives one size; the bytes settle large sizes, and every
#                                miss of the regret bar that calibration alone made was at a size
#                                priced under 1 ms


class Route(NamedTuple):
    """The link classes a communicator's traffic takes (comms.bootstrap.Bootstrap.route): the
    transport that carries pairs of ranks on one host, the one that carries pairs on two hosts,
    and whether the first's exchanges of one step with several peers wait as one
    (Transport.waits_together)."""
    intra: str
    inter: str
    together: bool
    board: int = 0       # the largest all_reduce intra runs by itself for every rank (Transport.coll_bytes)


AUTO = Route("shm", "tcp", True)        # what auto selection gives without RDMA hardware


@dataclass(frozen=True)
class Link:
    alpha_us: float          # one message's latency
    beta_gbps: float         # GB/s of one stream

    def t(self, steps: float, nbytes: float) -> float:
        return steps * self.alpha_us + nbytes / (self.beta_gbps * 1e3)


def _registered() -> dict:
    """Every registered transport's default link (comms.transports.ORDER), by name. Imported here,
    not at the top: the transports import :class:`Link` from this module."""
    from .transports import ORDER
    return {cls.name: cls.link for cls in ORDER}


def describe_links(links: dict) -> str:
    """``shm Link(...), tcp Link(...)``: the link classes of :attr:`Params.links`, or of its
    :meth:`Params.as_dict` form (values as dicts), in their order."""
    return ", ".join(f"{name} {link if isinstance(link, Link) else Link(**link)}" for name, link in links.items())


@dataclass(frozen=True)
class Params:
    """The cost model's figures: one :class:`Link` per link class (transport name; by default every
    registered transport's ``link``), the reduction speed, where they come from, and the timed
    candidates of comms.autotune for one layout (or None)."""
    links: dict = field(default_factory=_registered)
    reduce_gbps: float = 8.0
    source: str = "defaults"
    measured: dict | None = None      # comms.autotune's timed candidates, for one layout (or None)

    def link(self, name: str) -> Link:
        """The figures of link class ``name``: this model's, else the registered transport's default,
        else (a name no transport has) the contract's default, tcp's figures (Transport.link)."""
        if name in self.links:
            return self.links[name]
        registered = _registered()
        if name in registered:
            return registered[name]
        from .transports.base import Transport
        return Transport.link

    def as_dict(self) -> dict:
        """JSON-ready: ``{"links": {name: {"alpha_us", "beta_gbps"}}, "reduce_gbps", "source",
        "measured"}`` (what calibration caches; :meth:`from_dict` reads it back)."""
        return asdict(self)

    def loaded(self, oversub: float) -> "Params":
        """These parameters with every rank of a host busy at once, ``oversub`` ranks per core
        (the most of any host): the bandwidths and the reduction speed, measured by two ranks while
        the others waited, are shared by ``oversub`` ranks per core; the step latency already
        includes it (it is measured with every rank of the link active)."""
        if oversub <= 1.0:
            return self
        return Params({name: Link(k.alpha_us, k.beta_gbps / oversub) for name, k in self.links.items()},
                      self.reduce_gbps / oversub, self.source, self.measured)

    @classmethod
    def from_dict(cls, d: dict) -> "Params":
        """The registered defaults updated by ``d["links"]`` (names no transport registers are kept),
        and ``d``'s reduction speed, source and timed candidates."""
        links = _registered()
        links.update({name: Link(**link) for name, link in d.get("links", {}).items()})
        return cls(links, d["reduce_gbps"], d.get("source", "cache"), d.get("measured"))


def _log2(n: int) -> int:
    return max(1, math.ceil(math.log2(n))) if n > 1 else 0


def _red(p: Params, nbytes: float) -> float:
    return nbytes / (p.reduce_gbps * 1e3)


def _pair_link(p: Params, host_of: list, pairs, route: Route) -> Link:
    """The link a step whose messages go between ``pairs`` of ranks is bound by: the route's inter
    link when any pair is on two hosts, else its intra link."""
    if any(host_of[a] != host_of[b] for a, b in pairs):
        return p.link(route.inter)
    return p.link(route.intra)


def _recursive_steps(n: int, hosts: tuple, p: Params, route: Route, nbytes, rounds: int, m: float) -> float:
    """Latency and transfer of the recursive algorithms' exchanges, each priced on the link it uses:
    ``rounds`` exchanges of ``nbytes(d)`` with partner rank ^ d for every d < p2 (the power-of-two
    core), plus the fold of the n - p2 extra ranks, in and out, ``m`` bytes each."""
    host_of = [0] * n
    for i, group in enumerate(hosts):
        for r in group:
            if r < n:
                host_of[r] = i
    p2 = 1 << (n.bit_length() - 1)
    total, d = 0.0, 1
    while d < p2:
        total += rounds * _pair_link(p, host_of, [(r, r ^ d) for r in range(p2)], route).t(1, nbytes(d))
        d <<= 1
    if n != p2:
        total += 2 * _pair_link(p, host_of, [(r, r - p2) for r in range(p2, n)], route).t(1, m)
    return total


def cost(coll: str, algo: str, m: int, n: int, hosts: tuple, p: Params, route: Route) -> float:
    """Estimated µs of ``algo`` for ``coll`` with ``m`` bytes (see selector: per-rank buffer for
    all_reduce/broadcast/reduce, bytes a rank sends otherwise) on ``n`` ranks of ``hosts``, whose
    traffic takes ``route``'s link classes."""
    H = max(1, len(hosts))
    L = n // H if hosts and n % H == 0 else n
    intra, inter = p.link(route.intra), p.link(route.inter)
    # a step of a flat algorithm over several hosts uses both link classes at once: the slower bounds it
    if H == 1 or route.intra == route.inter:
        flat = intra
    else:
        flat = Link(max(intra.alpha_us, inter.alpha_us), min(intra.beta_gbps, inter.beta_gbps))
    p2 = 1 << (n.bit_length() - 1)
    if n == 1:
        return 0.0
    if algo == "hierarchical" and (H < 2 or n % H or len({len(h) for h in hosts}) > 1):
        return math.inf       # it would decline: hierarchical needs >= 2 hosts of equal size
    if coll == "all_reduce":
        if algo == "board":
            # direct's exchange through the transport's shared slots: no headers, rings or matching
            if H > 1 or not route.board or m > route.board:
                return math.inf
            return BOARD_SHARE * (intra.t(1, (n - 1) * m) + _red(p, n * m))
        if algo == "direct":
            # one step; the rank's own thread moves every message, so the transfers to this host's
            # peers and to other hosts' add up. Intra exchanges that wait together (shm: one pass
            # over the rings serves them all) cost one step latency; otherwise, and over inter,
            # every exchange costs the thread its own syscalls and wake-ups: a step latency each
            if not route.together:
                return intra.t(L - 1, (L - 1) * m) + inter.t(n - L, (n - L) * m) + _red(p, n * m)
            return intra.t(1, (L - 1) * m) + inter.t(n - L, (n - L) * m) + _red(p, n * m)
        if algo == "ring":
            return flat.t(2 * (n - 1), 2 * (n - 1) * m / n) + _red(p, (n - 1) * m / n)
        if algo == "recursive_doubling":
            return _recursive_steps(n, hosts, p, route, lambda d: m, 1, m) + _red(p, (_log2(p2) + 1) * m)
        if algo == "rhd":
            # halving then doubling: the exchanges with partner rank ^ d move m * d / p2 each; the
            # halving reduces (p2 - 1) / p2 of the buffer on arrival as the ring does, the fold all of it
            return (_recursive_steps(n, hosts, p, route, lambda d: m * d / p2, 2, m)
                    + _red(p, (p2 - 1) * m / p2 + (m if n != p2 else 0)))
        if algo == "tree":
            return flat.t(2 * _log2(n), 2 * m + 2 * _log2(n) * min(m, 1 << 20)) + _red(p, m)
        if algo == "hierarchical":
            return (intra.t(2 * (L - 1), 2 * (L - 1) * m / L) + inter.t(2 * (H - 1), 2 * (H - 1) * m / (L * H))
                    + _red(p, m))
    if coll == "reduce_scatter":          # m: bytes a rank sends in total (n-1 blocks)
        blk = m / max(1, n - 1)
        if algo == "ring":
            return flat.t(n - 1, m) + _red(p, m)
        if algo == "recursive_halving":
            return math.inf if n & (n - 1) else flat.t(_log2(n), m) + _red(p, m) + 2 * n * blk / 10e3
        if algo == "hierarchical":
            return intra.t(L - 1, (L - 1) * H * blk) + inter.t(H - 1, (H - 1) * blk) + _red(p, m)
    if coll == "all_gather":
        blk = m / max(1, n - 1)
        if algo == "ring":
            return flat.t(n - 1, m)
        if algo == "bruck":
            return flat.t(_log2(n), m) + (n * blk) / 10e3
        if algo == "hierarchical":
            return inter.t(H - 1, (H - 1) * blk) + intra.t(L - 1, (L - 1) * H * blk)
    if coll == "broadcast":
        if algo == "binomial":
            seg = min(m, 1 << 20)
            return flat.t(_log2(n) + max(0, m / max(seg, 1) - 1), seg * _log2(n) + m)
        if algo == "ring":
            seg = min(m, 256 << 10)
            return flat.t(n - 1 + max(0, m / max(seg, 1) - 1), seg * (n - 1) + m)
        if algo == "hierarchical":
            return inter.t(_log2(H), _log2(H) * m) + intra.t(_log2(L), _log2(L) * m)
    if coll == "all_to_all":
        blk = m / max(1, n - 1)
        if algo == "pairwise":
            return flat.t(1 + (n - 1) / 8, m)
        if algo == "bruck":
            return flat.t(_log2(n), _log2(n) * n * blk / 2) + 2 * n * blk * _log2(n) / 10e3
        if algo == "hierarchical":
            return intra.t(1 + (L - 1) / 8, (L - 1) * H * blk) + inter.t(1 + (H - 1) / 8, (H - 1) * L * blk)
    return math.inf           # not priced: chosen only by explicit rules or as a fallback


def peer_waits(coll: str, algo: str, n: int, hosts: tuple, route: Route = AUTO,
               shared: bool = False) -> float:
    """How many times a rank of ``algo`` waits on its peers (all_reduce; inf where not counted):
    each wait is a chance to wait for a late or descheduled peer. The exchanges of the ring and the
    recursive algorithms wait on one peer each, one after another. Direct's one step receives from
    all n - 1 peers, and each message over ``route.inter`` (tcp) is a wait of its own. So is each
    over ``route.intra`` on cores of their own; but where those wait together (``route.together``,
    shm) and with ``shared`` (a host with more ranks than cores, where a waiting rank sleeps and
    gives its core away) they arrive in one round of the scheduler and count as one wait: what
    costs there is each sleep and wake-up, not the messages behind it (the cost model prices
    direct's shm exchanges as one step the same way). An intra link whose exchanges wait apart
    (tcp forced for every peer: ``Route("tcp", "tcp", False)``) makes every peer a wait of its own."""
    if coll != "all_reduce" or n < 2:
        return math.inf
    H = max(1, len(hosts))
    L = n // H if n % H == 0 else n
    p2 = 1 << (n.bit_length() - 1)
    fold = 2 if n != p2 else 0
    local = L - 1 if route.together else 0             # direct's peers that wait together
    direct = (n - 1 - local) + (min(local, 1) if shared else local)
    return {"direct": direct, "board": 1, "ring": 2 * (n - 1), "recursive_doubling": _log2(p2) + fold,
            "rhd": 2 * _log2(p2) + fold, "tree": 2 * _log2(n),
            "hierarchical": 2 * (L - 1) + 2 * (H - 1)}.get(algo, math.inf)


def latency_bound(coll: str, algo: str, m: int, n: int, hosts: tuple, p: "Params", route: Route) -> bool:
    """True where the model puts at least :data:`LATENCY_SHARE` of ``algo``'s cost at ``m`` bytes
    in its step latencies (its cost at 0 bytes): the sizes where waits, not bytes, make the time."""
    return cost(coll, algo, 0, n, hosts, p, route) >= LATENCY_SHARE * cost(coll, algo, m, n, hosts, p, route)


def _alternatives(picks: list, priced_at: list, i: int, priced: list, contest: float) -> str:
    """The rule at size index ``i``: its pick, and as alternatives (comms.online) the algorithms
    that one launch's timed prices cannot rank behind it: those within ``contest`` of the cheapest,
    and the picks of the neighbouring sizes within 2x (an outlier at one probe, seen: rhd timed 1.3x
    ring at 256 KiB on 1 host x 4 ranks between sizes where it won, and the bench's launches then
    measured it 15 % ahead); the closest first, at most CONTEST_MAX in all. The pick alone where its
    price exceeds CONTEST_MAX_US."""
    scores, pick = priced_at[i], picks[i]
    if not math.isfinite(scores[pick]) or scores[pick] > CONTEST_MAX_US:
        return pick
    low = min(scores.values())
    near = {picks[j] for j in (i - 1, i + 1) if 0 <= j < len(picks)}
    close = sorted((a for a in priced if a != pick and (scores[a] <= low * (1 + contest)
                                                          or (a in near and scores[a] <= 2 * low))),
                   key=lambda a: (scores[a], priced.index(a)))
    return "|".join([pick] + close[:CONTEST_MAX - 1])


def default_rules(algos: dict, n: int, hosts: tuple, p: Params, route: Route, oversub: float = 1.0) -> str:
    """The cheapest priced algorithm per size range, per collective, in the selector grammar, for
    ``n`` ranks on ``hosts`` whose traffic takes ``route``; ``oversub``: the most ranks per usable
    core of any host (see :meth:`Params.loaded`)."""
    from .timed import applies, correction
    p = p.loaded(oversub)
    timed = applies(p.measured, n, hosts)
    shared = oversub > 1.0                  # near ties (below): the margin and how direct's waits count
    margin = TIE_SHARED if shared else TIE
    contest = CONTEST_SHARED if shared else CONTEST
    rules = []
    for coll, names in algos.items():
        priced = [a for a in names if min(cost(coll, a, m, n, hosts, p, route) for m in (8, 1 << 20)) < math.inf]
        if len(priced) < 2:
            continue
        factor = {a: lambda m: 1.0 for a in priced}
        if timed:
            for a in priced:
                f = correction(p.measured, coll, a, lambda m, a=a: cost(coll, a, m, n, hosts, p, route))
                if f is not None:
                    factor[a] = f
        best, priced_at = [], []
        for m in SIZES:
            scores = {a: cost(coll, a, m, n, hosts, p, route) * factor[a](m) for a in priced}
            pick = min(priced, key=lambda a: (scores[a], priced.index(a)))
            if timed and math.isfinite(scores[pick]) and latency_bound(coll, pick, m, n, hosts, p, route):
                # Near ties. The timed figures come from one launch, and launches of one algorithm
                # differ by more than TIE on a busy machine, and by far more where ranks share
                # cores (2x between launches on 4 ranks on 2 cores): TIE_SHARED. Within the margin
                # the order is a coin toss, and each wait on a peer is one more chance to wait for
                # a late or descheduled peer, so the fewest waits (peer_waits) is the steadiest
                # pick. Only at latency-bound sizes: beyond them waits are a small part of the
                # time, and the bytes and the reductions settle a near tie.
                # Scored offline (calibrations against bench runs' forced-algorithm times; sizes
                # over the 10 % regret bar, summed over the (calibration, run) pairs):
                # - 1x4, 27 x 3 pairs: direct's shm messages as one wait 114 at 20 % and 139 at
                #   8 %; as n - 1 waits 196 and 214 (recursive doubling chosen at 16 B-2 KiB, where
                #   direct was faster in two of the three runs). 145 pairs (5 runs): ties at every
                #   size 238, latency-bound only 213.
                # - 1x2, 11 x 3 pairs: ties at every size 5 (recursive doubling at 512 KiB, which
                #   reduces twice rhd's elements), latency-bound only 0. 12 % instead of 8 % chose
                #   recursive doubling where it measured 20-40 % behind (256 KiB-1 MiB).
                # - 2x2 (2 ranks per core, tcp between): with direct's tcp messages counted one
                #   wait each, 0 in 2 x 2 pairs; with all its messages one wait, direct was chosen
                #   at 16 B-8 KiB and measured 17-36 % behind recursive doubling.
                near = [a for a in priced if scores[a] <= scores[pick] * (1 + margin)]
                pick = min(near, key=lambda a: (peer_waits(coll, a, n, hosts, route, shared),
                                                scores[a], priced.index(a)))
            best.append(pick)
            priced_at.append(scores)
        if timed:
            best = [_alternatives(best, priced_at, i, priced, contest) for i in range(len(SIZES))]
        start = 0
        for i in range(1, len(SIZES) + 1):
            if i == len(SIZES) or best[i] != best[start]:
                hi = "inf" if i == len(SIZES) else str(SIZES[i])
                rules.append(f"{coll}:{SIZES[start]}-{hi}:{best[start]}")
                start = i
    return "#".join(rules)
