"""The cost model (comms.tuning): how steps are priced per link, and the rules it writes."""
from __future__ import annotations

import math

from comms import algorithms
from comms.calibration import CALIBRATION_VERSION
from comms.tuning import AUTO, Link, Params, Route, cost, default_rules

NAMES = {"all_reduce": list(algorithms.REGISTRY["all_reduce"])}
ONE_HOST = lambda n: (tuple(range(n)),)               # noqa: E731
TWO_HOSTS = ((0, 1), (2, 3))
TCP = Route("tcp", "tcp", False)                     # COMMS_TRANSPORT=tcp: every peer over tcp


def links(shm: Link, tcp: Link) -> dict:
    return {"shm": shm, "tcp": tcp}


def test_one_host_recursive_algorithms_keep_their_step_counts():
    p = Params(links(Link(1.0, 10.0), Link(40.0, 1.0)), 10.0)
    shm = p.link("shm")
    for n in (2, 3, 4, 5, 8):
        p2 = 1 << (n.bit_length() - 1)
        lg, fold = int(math.log2(p2)), (2 if n != p2 else 0)
        for m in (8, 1 << 16, 1 << 22):
            rd = shm.t(lg + fold, (lg + fold) * m) + (lg + 1) * m / 10e3
            rhd = shm.t(2 * lg + fold, 2 * m * (p2 - 1) / p2 + fold * m) + (m * (p2 - 1) / p2 + (m if fold else 0)) / 10e3
            assert math.isclose(cost("all_reduce", "recursive_doubling", m, n, ONE_HOST(n), p, AUTO), rd)
            assert math.isclose(cost("all_reduce", "rhd", m, n, ONE_HOST(n), p, AUTO), rhd)


def test_recursive_steps_are_priced_on_the_link_they_use():
    """On 2 hosts x 2 ranks, recursive doubling's first exchange (rank ^ 1) stays on the host and
    the second (rank ^ 2) crosses: one shm step and one tcp step, not two tcp steps."""
    p = Params(links(Link(1.0, 10.0), Link(40.0, 1.0)), 1e6)
    shm, tcp = p.link("shm"), p.link("tcp")
    assert math.isclose(cost("all_reduce", "recursive_doubling", 8, 4, TWO_HOSTS, p, AUTO),
                        shm.t(1, 8) + tcp.t(1, 8) + 3 * 8 / 1e9)
    # rhd: halving moves m/2 across hosts (d = 2) and m/4 inside (d = 1), doubling the same back
    m = 1 << 20
    want = 2 * (tcp.t(1, m / 2) + shm.t(1, m / 4)) + 0.75 * m / 1e9     # reduced on arrival: 3/4 of m
    assert math.isclose(cost("all_reduce", "rhd", m, 4, TWO_HOSTS, p, AUTO), want)
    # forcing tcp prices every step on tcp
    assert math.isclose(cost("all_reduce", "recursive_doubling", 8, 4, TWO_HOSTS, p, TCP), tcp.t(2, 16) + 24 / 1e9)


def test_flat_steps_over_hosts_are_bound_by_the_slower_link():
    """A ring step over two hosts uses shm and tcp edges at once: the larger latency and the smaller
    bandwidth bound it, whichever class they come from (an oversubscribed host's shm may be slower)."""
    slow_shm = Params(links(Link(50.0, 1.0), Link(10.0, 2.0)), 1e6)
    ring = cost("all_reduce", "ring", 1 << 20, 4, TWO_HOSTS, slow_shm, AUTO)
    assert math.isclose(ring, Link(50.0, 1.0).t(6, 1.5 * (1 << 20)) + 0.75 * (1 << 20) / 1e9)
    # direct: one step; one shm latency, one tcp latency per tcp peer, and every transfer add up
    direct = cost("all_reduce", "direct", 1 << 20, 4, TWO_HOSTS, slow_shm, AUTO)
    assert math.isclose(direct, 50.0 + 2 * 10.0 + (1 << 20) / 1e3 + 2 * (1 << 20) / 2e3 + 4 * (1 << 20) / 1e9)
    assert math.isclose(cost("all_reduce", "direct", 8, 4, TWO_HOSTS, slow_shm, TCP), 3 * 10.0 + 24 / 2e3 + 32 / 1e9)


def test_a_third_transport_is_priced_from_its_own_link():
    """A link class is whatever transport the route names: a made-up "fake" transport between hosts
    (3 us, 12 GB/s, exchanges waiting apart) prices every cross-host step of 2 hosts x 2 ranks,
    shm the steps inside a host, with no list of names to edit."""
    fake = Link(3.0, 12.0)
    p = Params({"shm": Link(1.0, 10.0), "tcp": Link(40.0, 1.0), "fake": fake}, 1e6)
    route = Route("shm", "fake", True)
    shm = p.link("shm")
    assert p.link("fake") is fake
    # recursive doubling: the rank ^ 1 exchange on shm, the rank ^ 2 one on fake
    assert math.isclose(cost("all_reduce", "recursive_doubling", 8, 4, TWO_HOSTS, p, route),
                        1.0 + 3.0 + 8 / 10e3 + 8 / 12e3 + 3 * 8 / 1e9)
    m = 1 << 20
    # direct: one shm step latency for the host's peer, one fake step latency per cross-host peer
    assert math.isclose(cost("all_reduce", "direct", m, 4, TWO_HOSTS, p, route),
                        shm.t(1, m) + fake.t(2, 2 * m) + 4 * m / 1e9)
    # hierarchical: the ring inside each host on shm, between the leaders on fake
    assert math.isclose(cost("all_reduce", "hierarchical", m, 4, TWO_HOSTS, p, route),
                        shm.t(2, m) + fake.t(2, m / 2) + m / 1e9)
    # a ring over both hosts is bound by the slower of shm and fake in each respect
    assert math.isclose(cost("all_reduce", "ring", m, 4, TWO_HOSTS, p, route),
                        Link(3.0, 10.0).t(6, 1.5 * m) + 0.75 * m / 1e9)
    # tcp's figures play no part: changing them changes no price
    other = Params({"shm": Link(1.0, 10.0), "tcp": Link(400.0, 0.1), "fake": fake}, 1e6)
    for algo in ("direct", "ring", "recursive_doubling", "rhd", "tree", "hierarchical"):
        assert cost("all_reduce", algo, m, 4, TWO_HOSTS, p, route) \
            == cost("all_reduce", algo, m, 4, TWO_HOSTS, other, route)
    # the fake carrying every pair, its exchanges waiting apart, as forced tcp is priced
    alone = Route("fake", "fake", False)
    assert math.isclose(cost("all_reduce", "direct", 8, 4, TWO_HOSTS, p, alone), 3 * 3.0 + 24 / 12e3 + 32 / 1e9)
    assert math.isclose(cost("all_reduce", "direct", 8, 4, TWO_HOSTS, p, alone),
                        cost("all_reduce", "direct", 8, 4, TWO_HOSTS, Params(links(shm, fake), 1e6), TCP))


def test_registered_transports_bring_their_links(monkeypatch):
    """Params' link classes default to every registered transport's ``link``, a registered third
    one included; cached figures update them by name (names no transport has are kept); a name
    nobody knows gets tcp's figures, the contract's default."""
    import comms.transports as transports
    from comms.transports import ShmTransport, TcpTransport
    from comms.transports.base import Transport
    from comms.tuning import peer_waits

    class FakeTransport(Transport):
        name = "fake"
        link = Link(3.0, 12.0)
        waits_together = False

    registered = {cls.name: cls.link for cls in transports.ORDER}
    assert Params().links == registered and {"shm", "tcp"} <= set(registered)
    assert (ShmTransport.link, TcpTransport.link) == (Link(1.5, 6.0), Link(40.0, 1.5))
    monkeypatch.setattr(transports, "ORDER", transports.ORDER + (FakeTransport,))
    monkeypatch.setattr(transports, "NAMES", transports.NAMES + ("fake",))
    p = Params()
    assert list(p.links) == [*registered, "fake"] and p.link("fake") == Link(3.0, 12.0)
    assert p.link("nowhere") == TcpTransport.link
    assert Params({"shm": Link(1.0, 2.0)}).link("fake") == Link(3.0, 12.0)       # the registered default
    cached = Params.from_dict({"links": {"fake": {"alpha_us": 2.5, "beta_gbps": 20.0},
                                         "gone": {"alpha_us": 9.0, "beta_gbps": 1.0}},
                               "reduce_gbps": 7.0, "source": "test"})
    assert cached.links == {**registered, "fake": Link(2.5, 20.0), "gone": Link(9.0, 1.0)}
    assert Params.from_dict(cached.as_dict()) == cached
    half = cached.loaded(2.0)
    assert half.links["fake"] == Link(2.5, 10.0) and half.links["gone"] == Link(9.0, 0.5)
    # the fake's exchanges wait apart: direct on 2 hosts x 2 ranks waits on every peer, shared or not
    route = Route("fake", "tcp", FakeTransport.waits_together)
    assert peer_waits("all_reduce", "direct", 4, TWO_HOSTS, route, shared=True) == 3
    assert peer_waits("all_reduce", "direct", 4, ONE_HOST(4), route, shared=True) == 3
    assert peer_waits("all_reduce", "direct", 4, ONE_HOST(4), AUTO, shared=True) == 1


def test_rules_follow_the_per_step_latency():
    """Two ranks of one host: a small per-step latency moves the direct -> ring switch down, a
    large one up; the rules are contiguous and cover every size."""
    fast = default_rules(NAMES, 2, ONE_HOST(2), Params(links(Link(0.5, 20.0), Link(40.0, 1.5)), 14.0), AUTO)
    slow = default_rules(NAMES, 2, ONE_HOST(2), Params(links(Link(20.0, 20.0), Link(40.0, 1.5)), 14.0), AUTO)

    def switch(rules: str) -> int:
        first = rules.split("#")[0]
        assert first.startswith("all_reduce:0-") and first.endswith(":direct")
        return int(first.split(":")[1].split("-")[1])
    assert switch(fast) < switch(slow)
    for rules in (fast, slow):
        ranges = [r.split(":")[1].split("-") for r in rules.split("#")]
        assert ranges[0][0] == "0" and ranges[-1][1] == "inf"
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_calibration_cache_key_is_versioned():
    # v1 entries measured alpha as a ping-pong, per call; v2 ones hold no timed candidates; v3
    # ones timed them at every fourth power of two only (their tables do not fit today's PROBES); v4
    # ones timed short bursts through the engine alone, which ranked algorithms unlike a job; v5 ones
    # timed turns from their barrier, sized by one warm-up call (inside a link's burst allowance); v6
    # ones kept a probe's winner that a spell had put ahead of both neighbours' (never re-timed); v7
    # ones timed each confirming round right after moving the ranks (its first turn ran slow) and
    # took the step latency from one run of hops; v8 ones kept the link figures as fixed "shm" and
    # "tcp" fields instead of under "links", by transport name
    from comms.timed import PROBES
    assert CALIBRATION_VERSION == "v9" and len(PROBES) == 23 and PROBES[1] == 2 * PROBES[0]


def test_oversubscribed_hosts_share_bandwidth_and_reduction():
    """With 2 ranks per core every per-byte cost doubles (the latency already includes it), so the
    whole-buffer direct exchange gives way to the bandwidth-lean algorithms at smaller sizes."""
    p = Params(links(Link(5.0, 40.0), Link(40.0, 1.5)), 16.0)
    assert p.loaded(1.0) is p
    half = p.loaded(2.0)
    shm, tcp = half.link("shm"), half.link("tcp")
    assert (shm.alpha_us, shm.beta_gbps, tcp.beta_gbps, half.reduce_gbps) == (5.0, 20.0, 0.75, 8.0)
    m = 1 << 16
    assert math.isclose(cost("all_reduce", "direct", m, 4, ONE_HOST(4), half, AUTO),
                        5.0 + 3 * m / 20e3 + 4 * m / 8e3)

    def first_rhd(rules: str) -> int:
        return next(int(r.split(":")[1].split("-")[0]) for r in rules.split("#") if r.endswith(":rhd"))
    alone = default_rules(NAMES, 4, ONE_HOST(4), p, AUTO)
    shared = default_rules(NAMES, 4, ONE_HOST(4), p, AUTO, oversub=2.0)
    assert first_rhd(shared) < first_rhd(alone), (alone, shared)


def test_direct_pays_for_every_tcp_exchange_it_makes():
    """direct's tcp exchanges each cost a tcp step latency, its shm exchanges one shm latency
    together: over 2 hosts x 2 ranks (one shm and two tcp peers) recursive doubling's one shm and
    one tcp exchange are cheaper even for tiny messages, while on one host direct keeps them."""
    p = Params(links(Link(56.0, 1.8), Link(8.9, 0.3)), 9.7)
    two_hosts = default_rules(NAMES, 4, TWO_HOSTS, p, AUTO)
    assert two_hosts.startswith("all_reduce:0-") and two_hosts.split("#")[0].endswith(":recursive_doubling"), two_hosts
    for n in (2, 4):
        assert default_rules(NAMES, n, ONE_HOST(n), p, AUTO).split("#")[0].endswith(":direct")


def test_step_latency_is_the_least_of_its_runs_of_hops():
    """The hops run before and after the timed candidates; a run that caught the machine in a slow
    state (6.1 us, against 2.3 us twenty seconds later, on 4 ranks sharing 2 CPUs) does not set the
    step latency, in either order; figures are clamped to 0.05-1000 us."""
    from comms.calibration import _alpha
    assert _alpha("shm", [6.147, 2.295]) == 2.295 and _alpha("shm", [2.295, 6.147]) == 2.295
    assert _alpha("tcp", [41.0]) == 41.0
    assert _alpha("shm", [0.001, 0.002]) == 0.05 and _alpha("tcp", [5000.0, 2000.0]) == 1000.0
