"""Timed candidates (comms.autotune): measurements correct the cost model's prices."""
from __future__ import annotations

import math

from comms import algorithms
from comms.rounds import contenders, doubtful, figures, lead, reps
from comms.timed import PROBES, applies, combine, correction
from comms.tuning import AUTO, Link, Params, Route, cost, default_rules

NAMES = {"all_reduce": list(algorithms.REGISTRY["all_reduce"])}
ONE_HOST = lambda n: (tuple(range(n)),)               # noqa: E731
P = Params({"shm": Link(2.0, 10.0), "tcp": Link(40.0, 1.5)}, 12.0)


def _table(n: int, hosts: list, rows: dict) -> dict:
    return {"layout": [n, hosts], "all_reduce": rows}


def _rule_at(rules: str, nbytes: int) -> str:
    """The first choice of the rule covering ``nbytes`` (a rule may name alternatives for online
    timing, ``direct|rhd``: the first is the pick, what these tests check)."""
    for r in rules.split("#"):
        coll, rng, algo = r.split(":")
        lo, hi = rng.split("-")
        if coll == "all_reduce" and int(lo) <= nbytes < (math.inf if hi == "inf" else int(hi)):
            return algo.split("|")[0]
    raise AssertionError(f"no rule for {nbytes} in {rules}")


def test_correction_is_exact_at_probes_and_geometric_between():
    model = lambda m: 10.0 + m / 1e3                     # noqa: E731
    row = [model(s) * (2.0 if i % 2 else 0.5) for i, s in enumerate(PROBES)]
    f = correction({"all_reduce": {"ring": row}}, "all_reduce", "ring", model)
    for i, s in enumerate(PROBES):
        assert math.isclose(model(s) * f(s), row[i])
    # halfway (in log size) between a 0.5 and a 2.0 probe: the geometric mean, 1.0
    assert math.isclose(f(math.sqrt(PROBES[0] * PROBES[1])), 1.0)
    assert math.isclose(f(0), 0.5) and math.isclose(f(PROBES[-1] * 64), f(PROBES[-1]))
    assert correction({"all_reduce": {}}, "all_reduce", "ring", model) is None


def test_a_declined_probe_makes_its_neighbourhood_unavailable():
    model = lambda m: 1.0 + m                            # noqa: E731
    row = [None] + [model(s) for s in PROBES[1:]]
    f = correction({"all_reduce": {"ring": row}}, "all_reduce", "ring", model)
    assert f(PROBES[0]) == math.inf and f(math.sqrt(PROBES[0] * PROBES[1])) == math.inf
    assert math.isclose(f(PROBES[1]), 1.0) and math.isclose(f(math.sqrt(PROBES[1] * PROBES[2])), 1.0)


def test_combine_takes_the_slowest_rank_and_any_decline():
    a = {"layout": [2, [2]], "all_reduce": {"ring": [1.0, None] + [3.0] * (len(PROBES) - 2)}}
    b = {"layout": [2, [2]], "all_reduce": {"ring": [2.0, 5.0] + [1.0] * (len(PROBES) - 2)}}
    c = combine([a, b])
    assert c["layout"] == [2, [2]] and c["all_reduce"]["ring"][:3] == [2.0, None, 3.0]


def test_measurements_overrule_the_model_at_every_probe():
    """The model alone prices direct cheapest for tiny messages on 2 ranks; a table in which tree
    measured fastest at small probes and ring at large ones makes the rules follow the table at
    every probe, for this layout only."""
    n, hosts = 2, ONE_HOST(2)
    assert _rule_at(default_rules(NAMES, n, hosts, P, AUTO), 8) == "direct"
    rows = {}
    for a in NAMES["all_reduce"]:
        rows[a] = [cost("all_reduce", a, s, n, hosts, P, AUTO) for s in PROBES]
        rows[a] = [t if math.isfinite(t) else None for t in rows[a]]
    fastest = lambda s: "tree" if s < 64 << 10 else "ring"          # noqa: E731
    for i, s in enumerate(PROBES):
        slowest = max(t for t in (rows[a][i] for a in rows) if t is not None)
        for a in rows:
            if rows[a][i] is not None:
                rows[a][i] = slowest * (0.5 if a == fastest(s) else 1.0 + 0.01 * len(a))
    timed = Params(P.links, P.reduce_gbps, "test", _table(n, [2], rows))
    rules = default_rules(NAMES, n, hosts, timed, AUTO)
    for s in PROBES:
        assert _rule_at(rules, s) == fastest(s), (s, rules)
    # another layout (a split sub-communicator, another host count) prices with the model alone
    other = Params(P.links, P.reduce_gbps, "test", _table(4, [4], rows))
    assert not applies(other.measured, n, hosts) and applies(timed.measured, n, hosts)
    assert default_rules(NAMES, n, hosts, other, AUTO) == default_rules(NAMES, n, hosts, P, AUTO)


def test_rounds_repeat_the_same_calls_on_every_rank():
    # turns of ROUND_S (25 ms), long enough to reach a steady state and to use up a link's burst
    # allowance, in at most ROUND_CALLS calls
    assert reps(1e-6) == 1000 and reps(1e-4) == 250 and reps(0.5) == 2
    assert reps(1e-3) == 25 and reps(5e-3) == 5 and reps(0.02) == 2
    assert all(reps(a) >= reps(b) for a, b in zip((1e-6, 1e-5, 1e-4, 1e-3), (1e-5, 1e-4, 1e-3, 1e-2)))


def test_a_turn_is_timed_after_a_lead_in_of_about_6_ms():
    # a link's burst allowance and the start after a barrier are left out of the timed calls: about
    # 6 ms of untimed calls, never more than a quarter of the timed ones, always at least one
    assert lead(1.3e-4) == 47 and lead(1e-3) == 6 and lead(5e-3) == 1 and lead(0.5) == 1
    assert lead(1e-6) == 250 and lead(2e-5) == 250 and lead(4e-5) == 150   # at most a quarter of 1000
    for t in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1.0):
        assert 1 <= lead(t) <= max(1, reps(t) // 4)
        assert lead(t) * t <= 0.006 + t


def test_only_latency_bound_near_ties_go_to_fewer_waits():
    """2 ranks: recursive doubling (one wait on a peer) timed 5 % behind rhd (two) at every probe.
    Where the model puts most of the cost in step latencies (64 B) the near tie goes to the fewer
    waits; where bytes make the time (32 MiB: recursive doubling reduces every element, rhd half)
    to the faster."""
    from comms.tuning import latency_bound
    n, hosts = 2, ONE_HOST(2)
    rows = {a: [None] * len(PROBES) for a in NAMES["all_reduce"]}
    for i, s in enumerate(PROBES):
        for a in rows:
            if a != "hierarchical":
                rows[a][i] = 1000.0 * (2 + i)
        rows["rhd"][i] = 1000.0 * (1 + i)
        rows["recursive_doubling"][i] = 1000.0 * (1 + i) * 1.05
    timed = Params(P.links, P.reduce_gbps, "test", _table(n, [2], rows))
    assert latency_bound("all_reduce", "rhd", 64, n, hosts, P, AUTO)
    assert not latency_bound("all_reduce", "rhd", 32 << 20, n, hosts, P, AUTO)
    rules = default_rules(NAMES, n, hosts, timed, AUTO)
    assert _rule_at(rules, 64) == "recursive_doubling" and _rule_at(rules, 32 << 20) == "rhd"


def test_near_ties_go_to_fewer_waits_on_a_peer():
    """4 ranks: direct measured 5 % faster than recursive doubling at small sizes. On cores of their
    own, within the tie margin recursive doubling (2 waits on a peer against direct's 3: its one
    step waits on every peer) wins. With 2 ranks per core direct's step counts one wait (its
    messages arrive in one round of the scheduler), so direct wins within the margin, TIE_SHARED,
    even where recursive doubling is the faster. A gap beyond the margin goes to the faster. On 2
    ranks both wait once."""
    from comms.tuning import TIE, TIE_SHARED, peer_waits
    n, hosts = 4, ONE_HOST(4)
    assert [peer_waits("all_reduce", a, n, hosts) for a in ("direct", "recursive_doubling", "rhd", "ring", "tree")] \
        == [3, 2, 4, 6, 4]
    assert [peer_waits("all_reduce", a, n, hosts, shared=True) for a in ("direct", "recursive_doubling", "ring")] \
        == [1, 2, 6]
    assert peer_waits("all_reduce", "direct", 4, ((0, 1), (2, 3))) == 3
    # sharing cores, direct's shm messages are one wait, its tcp messages one each
    assert peer_waits("all_reduce", "direct", 4, ((0, 1), (2, 3)), shared=True) == 3
    tcp = Route("tcp", "tcp", False)         # COMMS_TRANSPORT=tcp: every peer over tcp
    assert peer_waits("all_reduce", "direct", 4, ONE_HOST(4), route=tcp, shared=True) == 3
    assert peer_waits("all_reduce", "direct", 4, ONE_HOST(4), route=tcp) == 3
    assert peer_waits("all_reduce", "hierarchical", 4, ((0, 1), (2, 3))) == 4
    assert peer_waits("all_reduce", "direct", 2, ONE_HOST(2)) == peer_waits("all_reduce", "recursive_doubling", 2, ONE_HOST(2)) == 1
    assert peer_waits("broadcast", "ring", 4, hosts) == math.inf

    def rules(gap: float, oversub: float) -> str:
        """direct timed ``gap`` faster than recursive doubling (negative: slower), the rest slower."""
        rows = {a: [None] * len(PROBES) for a in NAMES["all_reduce"]}
        for i, s in enumerate(PROBES):
            for a in rows:
                if a != "hierarchical":
                    rows[a][i] = 1000.0 * (2 + i)
            rows["direct"][i] = 1000.0 * (1 + i) * (1 + max(0.0, -gap))
            rows["recursive_doubling"][i] = 1000.0 * (1 + i) * (1 + max(0.0, gap))
        timed = Params(P.links, P.reduce_gbps, "test", _table(n, [4], rows))
        return default_rules(NAMES, n, hosts, timed, AUTO, oversub)
    assert _rule_at(rules(0.05, 1.0), 64) == "recursive_doubling"
    assert _rule_at(rules(TIE * 2, 1.0), 64) == "direct"
    assert _rule_at(rules(-0.05, 1.0), 64) == "recursive_doubling"
    # with more ranks than cores launches differ more, and so does the margin; direct waits once
    assert TIE_SHARED > TIE * 2
    assert _rule_at(rules(0.05, 2.0), 64) == "direct"
    assert _rule_at(rules(-TIE * 2, 2.0), 64) == "direct"
    assert _rule_at(rules(-TIE_SHARED * 1.5, 2.0), 64) == "recursive_doubling"
    assert _rule_at(rules(TIE_SHARED * 1.5, 2.0), 64) == "direct"


def test_probes_are_paired_round_by_round():
    """A machine state that slows everything 10x for two rounds, landing on ring's turns of the
    third round but not rhd's: the mean over rounds ranks ring behind; paired by round, ring is
    10 % ahead, as it was in every round. The reference (the lowest mean) keeps its mean."""
    rhd = [1.0, 1.0, 10.0, 10.0, 1.0]
    ring = [0.9, 0.9, 9.0, 9.0, 9.0]         # its third turn fell in the slow state, rhd's did not
    assert sum(ring) > sum(rhd)
    fig = figures({"ring": ring, "rhd": rhd})
    assert fig["ring"] < fig["rhd"] and math.isclose(fig["ring"] / fig["rhd"], 0.9)
    assert fig["rhd"] == sum(rhd) / len(rhd)
    assert figures({"ring": ring}) == {"ring": sum(ring) / len(ring)}
    # an algorithm dropped after two rounds is paired with the reference's first two (its mean of
    # two fast rounds does not make it the reference)
    fig = figures({"ring": ring, "rhd": rhd, "tree": [2.0, 2.2]})
    assert math.isclose(fig["tree"] / fig["ring"], 2.1 / 0.9) and fig["rhd"] == sum(rhd) / len(rhd)


def test_contenders_narrow_as_the_rounds_add_up():
    """After the first rounds only the far-behind stop; later the bar tightens (DROP_RATIO), and
    the fastest always stays."""
    means = {"direct": [10.0, 10.0, 10.0, 10.0], "ring": [12.0, 12.0, 12.0, 12.0],
             "tree": [14.0, 14.0, 14.0, 14.0], "rhd": [40.0, 40.0, 40.0, 40.0]}
    everyone = list(means)
    assert contenders(means, everyone, 1) == everyone          # no verdict from one round
    assert contenders(means, everyone, 2) == ["direct", "ring", "tree"]
    assert contenders(means, ["direct", "ring", "tree"], 3) == ["direct", "ring"]
    assert contenders(means, ["direct", "ring"], 4) == ["direct", "ring"]
    assert contenders({"ring": [12.0] * 9, "direct": [10.0] * 9}, ["ring", "direct"], 9) == ["ring", "direct"]
    assert contenders({"ring": [13.0] * 9, "direct": [10.0] * 9}, ["ring", "direct"], 9) == ["direct"]


def test_a_probe_out_of_line_with_both_neighbours_is_confirmed_with_their_winner():
    """m14 of this VM's regret runs, 4 ranks on 2 CPUs: a spell hit direct's first rounds at 256 B
    (50.5 us between 23.4 and 22.6 us), so rhd led there by 1.64x. Both neighbours' winner gets the
    confirming rounds up to PRUNE_RATIO; one neighbour's alone only up to 1.5x (a real crossover
    next door is no reason to re-time an algorithm far behind)."""
    n128 = {"direct": 23.4, "recursive_doubling": 26.5, "rhd": 32.6, "tree": 31.8}
    n256 = {"direct": 50.5, "recursive_doubling": 68.5, "rhd": 30.8, "tree": 32.0}
    n512 = {"direct": 22.6, "recursive_doubling": 25.7, "rhd": 31.1, "tree": 29.5}
    assert sorted(doubtful([n128, n256, n512], 1)) == ["direct", "rhd", "tree"]
    ring_next = {"ring": 20.0, "direct": 60.0, "rhd": 40.0, "tree": 40.0}
    assert sorted(doubtful([n128, n256, ring_next], 1)) == ["rhd", "tree"]        # neighbours disagree
    assert sorted(doubtful([n256, n512], 0)) == ["rhd", "tree"]                   # one neighbour: 1.5x cap
    far = dict(n256, direct=3.5 * 30.8)
    assert sorted(doubtful([n128, far, n512], 1)) == ["rhd", "tree"]              # past PRUNE_RATIO
    assert doubtful([{"direct": 10.0}, {"rhd": 10.0}, {"direct": 10.0}], 1) == []


class _Recorder:
    """One rank standing in for a communicator of ``size``: records the calls the timing makes
    (set_algo, barrier, one ``call`` per collective on a tensor); every reduction of a numpy array
    (the round's figures, the budget's clocks) comes back as 128 (µs per call: 1.28e-4 s)."""

    def __init__(self, size: int):
        self.size, self.rank, self._deterministic, self._board = size, 0, False, 0
        self.events: list = []
        self.algo = None

    def _hosts(self):
        return (tuple(range(self.size)),)

    def set_algo(self, rule):
        self.algo = rule.split(":")[1] if rule else None

    def barrier(self):
        self.events.append("barrier")

    def all_reduce(self, x, op=None):
        import numpy as np
        if isinstance(x, np.ndarray):
            x[:] = 128.0
        else:
            self.events.append(("call", self.algo))


def test_confirmation_moves_the_ranks_once_a_round_and_settles_after_each_move():
    """Moving ranks to other CPUs slowed the first turn after the move (see settle_calls): the
    confirming rounds move the ranks once a round, not once per probe and round, and the first probe
    after a move runs settle_calls(call_s) untimed calls before its first turn's barrier and
    lead-in; the other probes of the round do not."""
    from comms import autotune
    from comms.autotune import CONFIRM_ROUNDS, PASSES
    from comms.rounds import settle_calls
    assert settle_calls(1e-4) == 300 and settle_calls(1e-6) == 1000 and settle_calls(1.0) == 1
    assert (settle_calls(1.28e-4), lead(1.28e-4), reps(1.28e-4)) == (234, 47, 195)
    comm = _Recorder(4)
    probes = [autotune._Probe(comm, "all_reduce", nbytes, ["direct", "rhd"], set()) for nbytes in (16 << 10, 32 << 10)]
    for p in probes:                               # a near tie at both: both are in doubt
        p.call_s = {"direct": 1.28e-4, "rhd": 1.28e-4}
        p.means = {"direct": [100.0] * 6, "rhd": [101.0] * 6}
    comm.events.clear()
    autotune._confirm(comm, "all_reduce", probes, 0.0, 0.0, math.inf, lambda k: comm.events.append(("place", k)))
    assert [e[1] for e in comm.events if e[0] == "place"] == [r % PASSES for r in range(CONFIRM_ROUNDS)]
    # each round: after the move, the settle calls (234) before the first turn's barrier, then per
    # probe and algorithm a barrier, the lead-in (47) and the timed calls (195)
    rounds, counts = [], None
    for e in comm.events:
        if e[0] == "place":
            counts = [0]
            rounds.append(counts)
        elif e == "barrier":
            counts.append(0)
        else:
            assert e[0] == "call" and e[1] in ("direct", "rhd")
            counts[-1] += 1
    assert comm.events[0][0] == "place" and len(rounds) == CONFIRM_ROUNDS
    assert all(counts == [0, 234] + [47 + 195] * 4 for counts in rounds), rounds
    assert all(len(p.means["direct"]) == len(p.means["rhd"]) == 6 + CONFIRM_ROUNDS for p in probes)
