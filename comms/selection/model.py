"""The cost model: each algorithm priced as time = latency x steps + bytes / bandwidth (NCCL's tuning.cc) per
link class (:class:`Params` holds a :class:`Link` per transport; a :class:`Route` names a communicator's) plus
the reduction speed. A step is priced on the link it uses (a flat step spanning hosts on the slower); k ranks
of a host crossing its link at once get 1/k each (2 simulated hosts x 2 ranks, 2 Gbit/s tbf, 16 MiB: without
this, direct, recursive doubling, rhd and hierarchical measured 2.4-2.8x the model's time, ring and tree 1.1-1.3x).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import NamedTuple

from ..algorithms.ring import CHAIN_SEGMENT_BYTES
from ..algorithms.tree import SEGMENT_BYTES as TREE_SEGMENT_BYTES

SIZES = [0] + [1 << k for k in range(3, 31)]          # 8 B .. 1 GiB: where a rule may change
BOARD_SHARE = 0.9        # board's price over direct's until calibration times it: forced in the bench (all_reduce,
#                          8 B-2 KiB, 3 launches), board took 0.83-0.93x direct's time on 2 ranks with a core each
COPY_GBPS = 10.0         # a local copy's speed, for the rotations of bruck and recursive halving: a
#                          32 MiB numpy copy measured 9.3-11.4 GB/s on the 2-vCPU dev VM (7 copies). Within the cache
#                          (CACHE_REDUCE_BYTES) a copy goes at least at the cached reduce's speed: at 10 GB/s, 1x4 gave
#                          32 KiB to the ring in all_gather (17 % behind bruck) and reduce_scatter (11 % behind halving)
BURST_BYTES = 64 << 10   # a link prices steps of up to this size at its burst speed (a token bucket lets them
#                          through at the wire's speed; back to back the floor, a host's bytes at the sustained speed,
#                          bounds them). On 2 simulated hosts x 2 ranks, 2 Gbit/s, tree's 32 KiB was then priced 237 us
#                          where it took 209-280 (htb) and 134-194 (tbf); at 16 KiB its two crossings went at the
#                          sustained speed, 387 us, and comms.tune's filter (GROSS) left it out at 32 KiB, where it was
#                          the best (htb, shared CPUs: 40 % regret after tune). The defaults' picks on 16 bench runs of
#                          both shapers were the same at 16 and 64 KiB (offline)
CACHE_REDUCE_BYTES = 256 << 10  # buffers up to this size reduce at Params.cache_reduce_gbps: cm_reduce (float32
#                          SUM) ran at 32-39 GB/s on 16-256 KiB, 25 at 1 MiB and 12-14 from 4 MiB on the dev VM. At the
#                          32 MiB speed alone recursive doubling's whole-buffer reduce lost it 32 KiB on 1x2 (ring: 21 %
#                          slower)


class Route(NamedTuple):
    """The link classes of a communicator's traffic (Bootstrap.route)."""
    intra: str               # the transport between ranks of one host
    inter: str               # the one between hosts
    together: bool           # whether intra's exchanges of one step wait as one (Transport.waits_together)
    board: int = 0           # the largest all_reduce intra runs by itself (0: none)


AUTO = Route("shm", "tcp", True)        # what auto selection gives without RDMA hardware


@dataclass(frozen=True)
class Link:
    alpha_us: float          # one step's latency
    beta_gbps: float         # GB/s of one stream, sustained
    burst_gbps: float = 0.0  # GB/s of a step of at most BURST_BYTES after a pause (0: beta_gbps)
    each_us: float = 0.0     # a step's latency more for each other rank of its host crossing it at once (inside a
    #                          host: for each peer beyond the first of a step waiting on them together)
    op_us: float = 0.0       # once per all_reduce between hosts (calibrate.fit measures these two)

    def t(self, steps: float, nbytes: float) -> float:
        """µs of ``steps`` steps moving ``nbytes`` in all (at the burst speed up to BURST_BYTES a step)."""
        burst = nbytes <= BURST_BYTES * max(steps, 1) and self.burst_gbps > self.beta_gbps
        return steps * self.alpha_us + nbytes / ((self.burst_gbps if burst else self.beta_gbps) * 1e3)

    def shared(self, k: float) -> "Link":
        """This link as each of ``k`` streams crossing it at once sees it."""
        return self if k <= 1 else replace(self, alpha_us=self.alpha_us + (k - 1) * self.each_us,
                                           beta_gbps=self.beta_gbps / k, burst_gbps=self.burst_gbps / k)


def _registered() -> dict:
    """Every registered transport's default link, by name (imported late: transports import Link)."""
    from ..transports import ORDER
    return {cls.name: cls.link for cls in ORDER}


def describe(d: dict) -> str:
    """``shm Link(...), tcp Link(...), reduce 11.1 GB/s (42.0 within the cache), board 0.9x direct`` from
    :meth:`Params.as_dict`."""
    links = ", ".join(f"{name} {Link(**link)}" for name, link in d["links"].items())
    return f"{links}, reduce {d['reduce_gbps']} GB/s ({d.get('cache_reduce_gbps') or d['reduce_gbps']} within the " \
           f"cache), board {d.get('board_share', BOARD_SHARE)}x direct"


@dataclass(frozen=True)
class Params:
    """The model's figures: a :class:`Link` per transport name, the reduction speed, their source."""
    links: dict = field(default_factory=_registered)
    reduce_gbps: float = 8.0     # until calibration measures it: below the 11.6-15.1 GB/s of cm_reduce
    #                              (float32 SUM, 32 MiB) on the dev VM, as a slower host's would be
    source: str = "defaults"
    cache_reduce_gbps: float = 0.0   # the same within the cache (CACHE_REDUCE_BYTES); 0: reduce_gbps
    board_share: float = BOARD_SHARE  # the board's price over direct's (calibrate: its time over direct's price)

    def link(self, name: str) -> Link:
        """This model's figures for ``name``, else its registered default, else the contract's."""
        from ..transports.base import Transport
        return self.links.get(name) or _registered().get(name, Transport.link)

    def as_dict(self) -> dict:             # what the cache and comms.info hold
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Params":
        links = {**_registered(), **{name: Link(**link) for name, link in d.get("links", {}).items()}}
        return cls(links, d["reduce_gbps"], d.get("source", "cache"), d.get("cache_reduce_gbps", 0.0),
                   d.get("board_share", BOARD_SHARE))

    def scaled(self, share: float = 1.0, alpha: float = 1.0, links=None) -> "Params":
        """The speeds of ``links`` (None: all) and the reduction's divided by ``share`` (k ranks per core all busy:
        two measured the bandwidths while the others waited; latencies include the sharing), step latencies times
        ``alpha`` (0: the bytes alone). Between hosts the wire sets the speed: on 2 simulated hosts x 2 ranks, a
        host's on one core, 2 Gbit/s, with the tcp link's speeds halved too 128 KiB-32 MiB were priced 1.6x slow."""
        share = max(share, 1.0)
        return replace(self, links={n: replace(k, alpha_us=k.alpha_us * alpha, each_us=k.each_us * alpha,
                                               op_us=k.op_us * alpha, **({} if links is not None and n not in links else
                                               {"beta_gbps": k.beta_gbps / share, "burst_gbps": k.burst_gbps / share}))
                                    for n, k in self.links.items()},
                       reduce_gbps=self.reduce_gbps / share, cache_reduce_gbps=self.cache_reduce_gbps / share)


def _log2(n: int) -> int:
    return max(1, math.ceil(math.log2(n))) if n > 1 else 0


def _powers(n: int):          # 1, 2, 4, ... below n >= 1
    return (1 << k for k in range(_log2(n)))


def cost(coll: str, algo: str, m: int, n: int, hosts: tuple, p: Params, route: Route, floor: bool = True) -> float:
    """Estimated µs of ``algo`` for ``coll`` of ``m`` bytes (the selector's message size, see
    comms.selection.rules) on ``n`` ranks of ``hosts``; inf where it would decline or is not priced.
    ``floor=False``: an all_reduce's steps alone, the link's sustained speed not a bound (calibration fits them)."""
    if n == 1:
        return 0.0
    if algo == "hierarchical" and (len(hosts) < 2 or n % len(hosts) or len({len(h) for h in hosts}) > 1):
        return math.inf                 # it declines: it needs two or more hosts of equal size
    H = max(1, len(hosts))
    L = n // H if hosts and n % H == 0 else n
    intra, inter = p.link(route.intra), p.link(route.inter)
    crossing = inter.shared(L)          # every rank of a host crosses at once
    flat = intra if H == 1 or route.intra == route.inter else \
        Link(max(intra.alpha_us, inter.alpha_us), min(intra.beta_gbps, inter.beta_gbps),
             min(max(k.burst_gbps, k.beta_gbps) for k in (intra, inter)))
    rho = p.cache_reduce_gbps if m <= CACHE_REDUCE_BYTES and p.cache_reduce_gbps else p.reduce_gbps
    red = lambda nbytes: nbytes / (rho * 1e3)                   # noqa: E731
    copy = lambda nbytes: nbytes / (max(COPY_GBPS, rho) * 1e3)   # noqa: E731
    p2 = 1 << (n.bit_length() - 1)
    blk = m / max(1, n - 1)
    host_of = {r: i for i, group in enumerate(hosts) for r in group}

    def most(pairs) -> int:
        """The most of (sender, receiver) ``pairs`` whose senders are on one host and receivers on others."""
        sent = Counter(host_of.get(a, 0) for a, b in pairs if host_of.get(a, 0) != host_of.get(b, 0))
        return max(sent.values(), default=0)

    def fan(peers: int, nbytes: float) -> float:
        """One phase exchanging with ``peers`` ranks of this host at once: one latency (and each_us for each peer
        beyond the first) where intra waits on them together, else one each."""
        return intra.t(1, nbytes) + max(peers - 1, 0) * intra.each_us if route.together else intra.t(peers, nbytes)

    def on(k: int) -> Link:
        """The link of a step in which at most ``k`` ranks of a host cross to others: intra, or inter shared k ways."""
        return inter.shared(k) if k else intra

    prices = {}
    if coll == "all_reduce":
        # the recursive algorithms' exchanges with rank ^ d (d < p2, the power-of-two core) and the fold of the n - p2
        # extra ranks into it and back: how many of a host's ranks cross at once in each
        across = {d: most([(r, r ^ d) for r in range(p2)]) for d in _powers(p2)}
        fold = most([(r, r - p2) for r in range(p2, n)] + [(r - p2, r) for r in range(p2, n)])

        def recursive(nbytes, rounds: int) -> float:
            """The recursive exchanges, ``rounds`` of ``nbytes(d)`` each, each on its pairs' link, plus the fold."""
            return sum(rounds * on(k).t(1, nbytes(d)) for d, k in across.items()) + 2 * on(fold).t(1, m) * (n != p2)

        # direct: one thread moves all peers' bytes; intra exchanges waiting together cost one latency (and each_us
        # for each peer beyond the first), inter each one
        direct = fan(L - 1, (L - 1) * m) + crossing.t(n - L, (n - L) * m) + red(n * m)
        # tree: m bytes up and down the binomial tree of rank 0 in TREE_SEGMENT_BYTES segments, pipelined: each level's
        # segment time on its pairs' link, plus (segments - 1) times the slowest's; the root reduces one child's bytes
        # a level. On 2 simulated hosts x 2 ranks (2 Gbit/s, shared CPUs) at 256 KiB-16 MiB, tree priced so came within
        # 0.97-1.02x of its measured time; as 2m + 2 log2(n) segments on the slower link it was priced 1.1-2.7x
        segments = max(1, math.ceil(m / TREE_SEGMENT_BYTES))
        up = {d: [(r + d, r) for r in range(0, n - d, 2 * d)] for d in _powers(n)}    # child to parent, a level each
        levels = [on(most(pairs)).t(1, m / segments) for pairs in up.values()]
        prices = {
            "direct": direct,
            "board": p.board_share * direct if H == 1 and 0 < route.board and m <= route.board else math.inf,
            "ring": flat.t(2 * (n - 1), 2 * (n - 1) * m / n) + red((n - 1) * m / n),
            # each exchange reduces the whole buffer, and so does the fold of the extra ranks
            "recursive_doubling": recursive(lambda d: m, 1) + red((_log2(p2) + (n != p2)) * m),
            "rhd": recursive(lambda d: m * d / p2, 2) + red((p2 - 1) * m / p2 + (m if n != p2 else 0)),
            "tree": 2 * (sum(levels) + (segments - 1) * max(levels)) + red(_log2(n) * m),
            "hierarchical": intra.t(2 * (L - 1), 2 * (L - 1) * m / L)
            + crossing.t(2 * (H - 1), 2 * (H - 1) * m / (L * H)) + red(m),
        }
        if H > 1:   # back to back, no op beats the wire: a host's bytes out at the sustained speed (a token bucket
            # lets a burst through). 2 simulated hosts x 2 ranks, 2 Gbit/s tbf: 128-512 KiB took 1.01-1.07x the bytes
            # one host sends at 0.25 GB/s, recursive doubling's 8 KiB 1.12x; unbounded, it won 8 KiB, 1.6x behind tree
            tree = [q for pairs in up.values() for a, b in pairs for q in ((a, b), (b, a))]      # up, then down
            sent = {"direct": max(len(g) * (n - len(g)) for g in hosts) * m,    # each rank to every other host's
                    "ring": most([(r, (r + 1) % n) for r in range(n)]) * 2 * (n - 1) * m / n,
                    "recursive_doubling": (sum(across.values()) + fold) * m,
                    "rhd": sum(k * 2 * m * d / p2 for d, k in across.items()) + fold * m,
                    "tree": most(tree) * m, "hierarchical": 2 * (H - 1) * m / H}
            prices = {a: max(t + inter.op_us, floor * sent.get(a, 0) / (inter.beta_gbps * 1e3))
                      for a, t in prices.items()}
    elif coll == "reduce_scatter":
        prices = {"ring": flat.t(n - 1, m) + red(m),
                  "recursive_halving": math.inf if n & (n - 1) else flat.t(_log2(n), m) + red(m) + copy(m),
                  "hierarchical": intra.t(L - 1, (L - 1) * H * blk) + crossing.t(H - 1, (H - 1) * blk) + red(m)}
    elif coll == "all_gather":
        prices = {"ring": flat.t(n - 1, m), "bruck": flat.t(_log2(n), m) + copy(n * blk),
                  "hierarchical": crossing.t(H - 1, (H - 1) * blk) + intra.t(L - 1, (L - 1) * H * blk)}
    elif coll == "broadcast":
        tseg, rseg = min(m, TREE_SEGMENT_BYTES), min(m, CHAIN_SEGMENT_BYTES)
        prices = {"binomial": flat.t(_log2(n) + max(0, m / max(tseg, 1) - 1), tseg * _log2(n) + m),
                  "ring": flat.t(n - 1 + max(0, m / max(rseg, 1) - 1), rseg * (n - 1) + m),
                  "hierarchical": inter.t(_log2(H), _log2(H) * m) + intra.t(_log2(L), _log2(L) * m)}
    elif coll == "all_to_all":
        # pairwise posts every exchange at once (algorithms/pairwise.py); hierarchical copies its own blocks, regroups
        # inside the host, then every rank of a host crosses to its column's ranks on the other hosts at once
        prices = {"pairwise": fan(L - 1, (L - 1) * blk) + crossing.t(n - L, (n - L) * blk),
                  "bruck": flat.t(_log2(n), _log2(n) * n * blk / 2) + copy(2 * n * blk * _log2(n)),
                  "hierarchical": copy(H * blk) + fan(L - 1, (L - 1) * H * blk) + crossing.t(H - 1, (H - 1) * L * blk)}
    return prices.get(algo, math.inf)


def default_rules(algos: dict, n: int, hosts: tuple, p: Params, route: Route, oversub: float = 1.0) -> str:
    """The cheapest priced algorithm per size range (ties: the registry's order) of each collective with two or
    more priced, in the selector's grammar, for ``n`` ranks on ``hosts`` (``oversub``: :meth:`Params.scaled`)."""
    p, rules = p.scaled(oversub, links={route.intra}), []
    for coll, names in algos.items():
        priced = [a for a in names if min(cost(coll, a, m, n, hosts, p, route) for m in (8, 1 << 20)) < math.inf]
        if len(priced) > 1:
            best = [min(priced, key=lambda a: (cost(coll, a, m, n, hosts, p, route), priced.index(a))) for m in SIZES]
            rules += ranges(coll, SIZES, best)
    return "#".join(rules)


def ranges(coll: str, sizes: list, picks: list) -> list[str]:
    """Rules from the pick at each of ``sizes`` (ascending), each up to the next (0 and inf at the ends), merged."""
    starts = [i for i, pick in enumerate(picks) if i == 0 or pick != picks[i - 1]]
    edges = [0] + [sizes[i] for i in starts[1:]] + ["inf"]
    return [f"{coll}:{low}-{high}:{picks[i]}" for i, low, high in zip(starts, edges, edges[1:])]
