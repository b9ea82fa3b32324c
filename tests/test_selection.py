"""Selection: the cost model (comms.selection.model), how steps are priced per link and the rules it
writes; the layers of rules; the tuning step (python -m comms.tune) and what init does with it."""
from __future__ import annotations

import math

from comms import algorithms
from comms.selection.model import AUTO, BOARD_SHARE, Link, Params, Route, cost, default_rules

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
            rd = shm.t(lg + fold, (lg + fold) * m) + (lg + (n != p2)) * m / 10e3      # a reduction per exchange
            rhd = shm.t(2 * lg + fold, 2 * m * (p2 - 1) / p2 + fold * m) + (m * (p2 - 1) / p2 + (m if fold else 0)) / 10e3
            assert math.isclose(cost("all_reduce", "recursive_doubling", m, n, ONE_HOST(n), p, AUTO), rd)
            assert math.isclose(cost("all_reduce", "rhd", m, n, ONE_HOST(n), p, AUTO), rhd)


def test_recursive_steps_are_priced_on_the_link_they_use():
    """On 2 hosts x 2 ranks, recursive doubling's first exchange (rank ^ 1) stays on the host and
    the second (rank ^ 2) crosses: one shm step and one tcp step, not two tcp steps; both ranks of
    a host cross at once, each at half the link's bandwidth."""
    p = Params(links(Link(1.0, 10.0), Link(40.0, 1.0)), 1e6)
    shm, tcp = p.link("shm"), p.link("tcp")
    assert math.isclose(cost("all_reduce", "recursive_doubling", 8, 4, TWO_HOSTS, p, AUTO),
                        shm.t(1, 8) + Link(40.0, 0.5).t(1, 8) + 2 * 8 / 1e9)
    # rhd: halving moves m/2 across hosts (d = 2) and m/4 inside (d = 1), doubling the same back
    m = 1 << 20
    want = 2 * (Link(40.0, 0.5).t(1, m / 2) + shm.t(1, m / 4)) + 0.75 * m / 1e9     # reduced on arrival: 3/4 of m
    assert math.isclose(cost("all_reduce", "rhd", m, 4, TWO_HOSTS, p, AUTO), want)
    # forcing tcp prices every step on tcp, the crossing one shared
    assert math.isclose(cost("all_reduce", "recursive_doubling", 8, 4, TWO_HOSTS, p, TCP),
                        tcp.t(1, 8) + tcp.shared(2).t(1, 8) + 16 / 1e9)


def test_tree_is_priced_level_by_level_and_pipelined_in_segments():
    """Tree (binomial reduce to rank 0, then broadcast) on 2 hosts x 2 ranks: its level d = 1 pairs
    stay on their hosts, its d = 2 pair (0, 2) crosses alone (not shared); up to one segment it
    is both levels twice, larger ones pipeline, adding the slowest level per extra segment."""
    from comms.algorithms.tree import SEGMENT_BYTES
    p = Params(links(Link(1.0, 10.0), Link(40.0, 1.0)), 1e6)
    shm, tcp = p.link("shm"), p.link("tcp")
    m = SEGMENT_BYTES // 2
    assert math.isclose(cost("all_reduce", "tree", m, 4, TWO_HOSTS, p, AUTO),
                        2 * (shm.t(1, m) + tcp.t(1, m)) + 2 * m / 1e9)
    m = 4 * SEGMENT_BYTES
    seg = SEGMENT_BYTES
    assert math.isclose(cost("all_reduce", "tree", m, 4, TWO_HOSTS, p, AUTO),
                        2 * (shm.t(1, seg) + 4 * tcp.t(1, seg)) + 2 * m / 1e9)


def test_flat_steps_over_hosts_are_bound_by_the_slower_link():
    """A ring step over two hosts uses shm and tcp edges at once: the larger latency and the smaller
    bandwidth bound it, whichever class they come from (an oversubscribed host's shm may be slower)."""
    slow_shm = Params(links(Link(50.0, 1.0), Link(10.0, 2.0)), 1e6)
    ring = cost("all_reduce", "ring", 1 << 20, 4, TWO_HOSTS, slow_shm, AUTO)
    assert math.isclose(ring, Link(50.0, 1.0).t(6, 1.5 * (1 << 20)) + 0.75 * (1 << 20) / 1e9)
    # direct: one step; one shm latency, one tcp latency per tcp peer, and every transfer add up,
    # the host's two ranks crossing at once at half the link each
    direct = cost("all_reduce", "direct", 1 << 20, 4, TWO_HOSTS, slow_shm, AUTO)
    assert math.isclose(direct, 50.0 + 2 * 10.0 + (1 << 20) / 1e3 + 2 * (1 << 20) / 1e3 + 4 * (1 << 20) / 1e9)


def test_all_to_all_is_priced_as_its_plans_run():
    """Pairwise all_to_all posts every exchange at once: on one host of 4 ranks one shm latency
    and each_us for each of the other two peers, as direct's exchange; on 2 hosts x 2 ranks its
    crossing blocks go at half the link each, both ranks of a host sending at once. Hierarchical
    copies its own blocks, regroups inside the host, then crosses shared the same way: with hosts
    of one rank it is pairwise plus that copy, so pairwise keeps the tie."""
    from comms.selection.model import COPY_GBPS
    shm, tcp = Link(2.0, 10.0, 0.0, 0.5), Link(40.0, 1.0, 0.0, 3.0)
    p = Params(links(shm, tcp), 8.0)             # no reduction; copies at COPY_GBPS (above the 8 GB/s reduce)
    m, blk = 3 << 10, 1 << 10                   # a rank's bytes out on 4 ranks, a block
    assert math.isclose(cost("all_to_all", "pairwise", m, 4, ONE_HOST(4), p, AUTO), shm.t(1, m) + 2 * 0.5)
    assert math.isclose(cost("all_to_all", "pairwise", m, 4, TWO_HOSTS, p, AUTO),
                        shm.t(1, blk) + tcp.shared(2).t(2, 2 * blk))
    assert math.isclose(cost("all_to_all", "hierarchical", m, 4, TWO_HOSTS, p, AUTO),
                        2 * blk / (COPY_GBPS * 1e3) + shm.t(1, 2 * blk) + tcp.shared(2).t(1, 2 * blk))
    solo = ((0,), (1,))
    assert cost("all_to_all", "hierarchical", 8, 2, solo, p, AUTO) > cost("all_to_all", "pairwise", 8, 2, solo, p, AUTO)


def test_reduce_scatter_halving_pays_the_copy_its_plan_makes():
    """Recursive halving lands each half in scratch and reduces it after (one copy of the bytes it
    receives, m); ring reduces as it receives. Both copy the input in and the block out alike. Copies
    of buffers within the cache go at least at the cached reduce's speed."""
    from comms.selection.model import COPY_GBPS
    shm = Link(2.0, 10.0)
    p = Params(links(shm, Link(40.0, 1.0)), 8.0)
    m = 3 << 20
    red = m / 8e3
    assert math.isclose(cost("reduce_scatter", "recursive_halving", m, 4, ONE_HOST(4), p, AUTO),
                        shm.t(2, m) + red + m / (COPY_GBPS * 1e3))
    assert math.isclose(cost("reduce_scatter", "ring", m, 4, ONE_HOST(4), p, AUTO), shm.t(3, m) + red)
    # within the cache a copy is no slower than a reduce of its bytes (cache_reduce_gbps, 40 here)
    p = Params(links(shm, Link(40.0, 1.0)), 8.0, cache_reduce_gbps=40.0)
    m = 24 << 10
    assert math.isclose(cost("reduce_scatter", "recursive_halving", m, 4, ONE_HOST(4), p, AUTO),
                        shm.t(2, m) + 2 * m / 40e3)


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
                        1.0 + 3.0 + 8 / 10e3 + 8 / 6e3 + 2 * 8 / 1e9)
    m = 1 << 20
    # direct: one shm step latency for the host's peer, one fake step latency per cross-host peer
    assert math.isclose(cost("all_reduce", "direct", m, 4, TWO_HOSTS, p, route),
                        shm.t(1, m) + fake.shared(2).t(2, 2 * m) + 4 * m / 1e9)
    # hierarchical: the ring inside each host on shm, across the columns on fake, both of a host's
    # ranks (one per column) crossing at once
    assert math.isclose(cost("all_reduce", "hierarchical", m, 4, TWO_HOSTS, p, route),
                        shm.t(2, m) + fake.shared(2).t(2, m / 2) + m / 1e9)
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
    assert math.isclose(cost("all_reduce", "direct", 8, 4, TWO_HOSTS, p, alone),
                        3 * 3.0 + 8 / 12e3 + 16 / 6e3 + 32 / 1e9)         # the crossing 16 B at half the link
    assert math.isclose(cost("all_reduce", "direct", 8, 4, TWO_HOSTS, p, alone),
                        cost("all_reduce", "direct", 8, 4, TWO_HOSTS, Params(links(shm, fake), 1e6), TCP))


def test_registered_transports_bring_their_links(monkeypatch):
    """Params' link classes default to every registered transport's ``link``, a registered third
    one included; cached figures update them by name (names no transport has are kept); a name
    nobody knows gets tcp's figures, the contract's default."""
    import comms.transports as transports
    from comms.transports import ShmTransport, TcpTransport
    from comms.transports.base import Transport

    class FakeTransport(Transport):
        name = "fake"
        link = Link(3.0, 12.0)
        waits_together = False

    registered = {cls.name: cls.link for cls in transports.ORDER}
    assert Params().links == registered and {"shm", "tcp"} <= set(registered)
    assert Params().link("shm") == ShmTransport.link and Params().link("tcp") == TcpTransport.link
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
    half = cached.scaled(2.0)
    assert half.links["fake"] == Link(2.5, 10.0) and half.links["gone"] == Link(9.0, 0.5)


def test_rules_follow_the_per_step_latency():
    """Four ranks of one host: a small per-step latency moves the direct -> ring switch down, a
    large one up; the rules are contiguous and cover every size."""
    fast = default_rules(NAMES, 4, ONE_HOST(4), Params(links(Link(0.5, 20.0), Link(40.0, 1.5)), 14.0), AUTO)
    slow = default_rules(NAMES, 4, ONE_HOST(4), Params(links(Link(20.0, 20.0), Link(40.0, 1.5)), 14.0), AUTO)

    def switch(rules: str) -> int:
        first = rules.split("#")[0]
        assert first.startswith("all_reduce:0-") and first.endswith(":direct")
        return int(first.split(":")[1].split("-")[1])
    assert switch(fast) < switch(slow)
    for rules in (fast, slow):
        ranges = [r.split(":")[1].split("-") for r in rules.split("#")]
        assert ranges[0][0] == "0" and ranges[-1][1] == "inf"
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_oversubscribed_hosts_share_bandwidth_and_reduction():
    """With 2 ranks per core every per-byte cost doubles (the latency already includes it), so the
    whole-buffer direct exchange gives way to the bandwidth-lean algorithms at smaller sizes."""
    p = Params(links(Link(5.0, 40.0), Link(40.0, 1.5)), 16.0)
    assert p.scaled(1.0) == p and p.scaled(0.5) == p
    half = p.scaled(2.0)
    shm, tcp = half.link("shm"), half.link("tcp")
    assert (shm.alpha_us, shm.beta_gbps, tcp.beta_gbps, half.reduce_gbps) == (5.0, 20.0, 0.75, 8.0)
    assert p.scaled(alpha=0.0).link("tcp") == Link(0.0, 1.5) and p.scaled(alpha=0.0).reduce_gbps == 16.0
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
    # where a step waiting on several peers at once costs each_us more a peer beyond the first (4 ranks on 2
    # cores beside a busy loop: direct of 8 B took 53-63 us, recursive doubling's two steps 30-36), it loses them
    slow, plain = (Params(links(Link(6.0, 10.0, 0.0, each), Link(8.9, 0.3)), 9.7) for each in (15.0, 0.0))
    gap = cost("all_reduce", "direct", 8, 4, ONE_HOST(4), slow, AUTO) - cost("all_reduce", "direct", 8, 4,
                                                                               ONE_HOST(4), plain, AUTO)
    assert math.isclose(gap, 2 * 15.0)                                     # 3 peers: 2 beyond the first
    assert default_rules(NAMES, 4, ONE_HOST(4), slow, AUTO).split("#")[0].endswith(":recursive_doubling")
    assert default_rules(NAMES, 2, ONE_HOST(2), slow, AUTO).split("#")[0].endswith(":direct")   # one peer: no more


def test_rules_cover_each_size_up_to_the_next():
    from comms.selection.model import ranges
    assert ranges("all_reduce", [8, 32, 128, 512], ["board", "board", "ring", "rhd"]) == \
        ["all_reduce:0-128:board", "all_reduce:128-512:ring", "all_reduce:512-inf:rhd"]
    assert ranges("broadcast", [64], ["ring"]) == ["broadcast:0-inf:ring"]


def test_layers_user_then_tuned_then_model_then_registry():
    from comms.selection.rules import Selector
    sel = Selector("all_reduce:0-1K:ring", "all_reduce:0-inf:direct", "all_reduce:0-64K:rhd")
    assert sel.candidates("all_reduce", 100)[:3] == ["ring", "rhd", "direct"]
    assert sel.candidates("all_reduce", 4096)[:2] == ["rhd", "direct"]
    assert sel.candidates("all_reduce", 1 << 20)[0] == "direct"
    assert set(sel.candidates("all_reduce", 1 << 20)) == set(algorithms.REGISTRY["all_reduce"])
    assert [r for r in sel.table() if r.endswith("(tuned)")] == ["all_reduce:0-65536:rhd  (tuned)"]
    later = sel.with_user("all_reduce:tree")
    assert later.candidates("all_reduce", 100)[:2] == ["tree", "rhd"] and sel.user[0].names == ("ring",)


def test_tuning_never_times_what_the_model_calls_grossly_worse():
    """The tuner's candidates, cheapest first: on 2 hosts x 2 ranks over a slow link, at 16 MiB,
    direct (4x hierarchical's bytes on the link) is no candidate, however a timing might go; the
    flat ring (1.5x) is one. At 512 B, where latency decides, every algorithm whose bytes cost less
    than the cheapest's whole price is one, rhd's twice the steps of recursive doubling included."""
    from types import SimpleNamespace

    from comms.selection.tune import GROSS, candidates
    p = Params(links(Link(1.0, 10.0), Link(50.0, 0.25)), 10.0)

    def price(coll, algo, nbytes, steps=True):
        return cost(coll, algo, nbytes, 4, TWO_HOSTS, p.scaled(alpha=1.0 if steps else 0.0), AUTO)
    comm = SimpleNamespace(price=price)
    m = 16 << 20
    got = candidates(comm, "all_reduce", m)
    prices = {a: price("all_reduce", a, m) for a in algorithms.REGISTRY["all_reduce"]}
    data = {a: price("all_reduce", a, m, False) for a in prices}
    assert got[0] == min(prices, key=prices.get) == "hierarchical" == min(data, key=data.get)
    assert all(data[a] <= GROSS * data["hierarchical"] for a in got)
    assert data["direct"] > 3.5 * data["hierarchical"] and 1.3 < data["ring"] / data["hierarchical"] < 1.6
    assert not {"direct", "board"} & set(got) and "ring" in got
    assert got == sorted(got, key=prices.get)
    small = candidates(comm, "all_reduce", 512)
    assert small[0] == "recursive_doubling" and {"rhd", "ring", "direct", "tree", "hierarchical"} <= set(small)
    assert price("all_reduce", "rhd", 512) > 1.5 * price("all_reduce", "recursive_doubling", 512)


def test_tune_writes_rules_that_later_inits_use(tmp_path):
    """``python -m comms.tune`` on 2 ranks times the candidates at each size, writes the winners as
    rules into the cache entry of the host signature, and the next init uses them after the
    user's rules and before the model's; ``--dry-run`` writes nothing."""
    import json
    import os
    import subprocess
    import sys

    from comms.testing import spawn
    from workers import calibrated_params
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    env.pop("COMMS_ALGO", None)
    cmd = [sys.executable, "-m", "comms.tune", "-n", "2", "-b", "8", "-e", "32K", "-f", "64", "--rounds", "2"]
    from comms.selection.rules import parse
    from comms.selection.tune import OPS
    dry = subprocess.run(cmd + ["--dry-run", "--ops", ",".join(OPS)], env=env, capture_output=True, text=True,
                         timeout=180)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    printed = [line[9:] for line in dry.stdout.splitlines() if line.startswith("[rank 0] ") and "#" != line[9:10]]
    assert {r.coll for r in parse(printed[-1])} == set(OPS), dry.stdout      # every op the tuner offers, timed
    cache = tmp_path / "comms" / "calibration.json"
    assert "rules" not in next(iter(json.loads(cache.read_text()).values()))
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    (sig, entry), = json.loads(cache.read_text()).items()
    rules = entry["rules"].split("#")
    assert f"[rank 0] {entry['rules']}" in p.stdout and f"written for {sig}" in p.stdout
    # sizes 8 B, 512 B and 32 KiB: each pick covers its size up to the next one's, 0 to inf in all
    edges = [r.split(":")[1].split("-") for r in rules]
    assert edges[0][0] == "0" and edges[-1][1] == "inf" and all(a[1] == b[0] for a, b in zip(edges, edges[1:]))
    assert {e for pair in edges for e in pair} <= {"0", "512", "32768", "inf"}
    pick = {int(lo): r.split(":")[2] for r, (lo, _) in zip(rules, edges)}
    sizes = (8, 512, 32768)
    out = spawn(calibrated_params, 2, timeout=120, args=(sizes,), env={"XDG_CACHE_HOME": str(tmp_path)})
    assert out[0]["tuned"] == entry["rules"] and out[0]["signature"] == sig
    assert [r.replace("  (tuned)", "") for r in out[0]["rules"] if r.endswith("(tuned)")] == \
        [str(r) for r in parse(entry["rules"])]
    want = [pick[max(lo for lo in pick if lo <= s)] for s in sizes]
    assert out[0]["chosen"] == want and out[0]["sum"] == [3.0] * 4
    user = spawn(calibrated_params, 2, timeout=120, args=(sizes,),
                 env={"XDG_CACHE_HOME": str(tmp_path), "COMMS_ALGO": "all_reduce:tree"})
    assert user[0]["chosen"] == ["tree"] * 3


def test_a_burst_prices_small_steps_at_the_wire_speed():
    """A link with a burst speed prices a step of up to BURST_BYTES at it and a larger one at the
    sustained speed; streams crossing at once share both, and each adds each_us to the step. With
    the figures calibration fitted on 2 simulated hosts x 2 ranks (2 Gbit/s tbf), tree keeps 8 KiB
    (the bench's best there: 42 us against hierarchical's 52), which the sustained speed alone
    gives to hierarchical."""
    from comms.selection.model import BURST_BYTES
    link = Link(10.0, 0.25, 2.5, 3.0)
    assert math.isclose(link.t(2, 2 * BURST_BYTES), 20.0 + 2 * BURST_BYTES / 2.5e3)
    assert math.isclose(link.t(1, BURST_BYTES + 1), 10.0 + (BURST_BYTES + 1) / 0.25e3)
    assert link.shared(2) == Link(13.0, 0.125, 1.25, 3.0) and Link(10.0, 0.25).t(1, 8) == Link(10.0, 0.25, 0.1).t(1, 8)
    shm = Link(2.5, 7.5)

    def rule_at(tcp: Link, m: int) -> str:
        rules = default_rules(NAMES, 4, TWO_HOSTS, Params(links(shm, tcp), 10.0, "t", 37.0), AUTO, 2.0)
        return next(r.split(":")[2] for r in rules.split("#")
                    if int(r.split(":")[1].split("-")[0]) <= m < float(r.split(":")[1].split("-")[1]))
    assert rule_at(Link(6.0, 0.3, 0.0, 5.0), 8192) == "hierarchical"
    assert rule_at(Link(6.0, 0.3, 7.0, 5.0), 8192) == "tree"
    assert rule_at(Link(6.0, 0.3, 7.0, 5.0), 16 << 20) == "hierarchical"


def test_between_hosts_no_all_reduce_beats_the_bytes_a_host_sends():
    """Back to back, an all_reduce between hosts takes at least the bytes one host sends at the link's
    sustained speed, however fast a burst moves its steps; op_us is paid once. On 2 hosts x 2 ranks, of
    m bytes: direct sends m from each rank to each rank of the other host, recursive doubling and rhd
    m from both ranks (rhd half each way), ring 2 (n - 1) m / n over the one ring edge leaving a host,
    tree m up then m down, hierarchical 2 (H - 1) m / H from the host's columns together."""
    m, tcp = 8192, Link(1.0, 0.25, 100.0, 0.0, 5.0)
    p = Params(links(Link(1.0, 10.0), tcp), 16.0)
    sent = {"direct": 4 * m, "recursive_doubling": 2 * m, "rhd": 2 * m, "ring": 1.5 * m, "tree": m, "hierarchical": m}
    for algo, nbytes in sent.items():
        steps = cost("all_reduce", algo, m, 4, TWO_HOSTS, p, AUTO, floor=False)
        assert cost("all_reduce", algo, m, 4, TWO_HOSTS, p, AUTO) == max(steps, nbytes / 0.25e3), algo
        free = Params(links(Link(1.0, 10.0), Link(1.0, 0.25, 100.0)), 16.0)        # no cost per op
        assert math.isclose(steps - cost("all_reduce", algo, m, 4, TWO_HOSTS, free, AUTO, floor=False), 5.0), algo
    assert cost("all_reduce", "recursive_doubling", m, 4, TWO_HOSTS, p, AUTO) == 2 * m / 0.25e3   # it binds here
    assert cost("all_reduce", "recursive_doubling", m, 4, ONE_HOST(4), p, AUTO) < m / 0.25e3       # one host: no wire


def test_calibration_fits_the_figures_that_price_its_probes(monkeypatch, tmp_path):
    """Calibration times the all_reduces of its PROBES (each the median over rounds: an outlier run moves
    nothing) and fits the figures that price them as they ran: all_reduces that took the model's time on a
    known link give that link back. One host of 2: the step latency; of 4 ranks sharing 2 cores: the latency
    and each_us; on one host also the board's time over direct's price; between hosts: the tcp link's
    latencies, cost per op and burst speed (the intra link keeps its
    registered latency: with 2 ranks a host, its steps and the crossings come in pairs). The ranks agree on the
    slowest rank's figures once."""
    from types import SimpleNamespace

    from comms.dtypes import ReduceOp
    from comms.selection import calibrate as cal
    from comms.transports.shm import ShmTransport
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cal, "_beta", lambda comm, peer, reps, nbytes=4 << 20: 8.0)      # GB/s
    monkeypatch.setattr(cal, "_reduce_gbps", lambda nbytes=32 << 20, calls=1: 10.0 if nbytes > 1 << 20 else 30.0)
    calls, probes, agreed = iter(range(10 ** 6)), [], []
    truth = Link(30.0, 8.0, 20.0, 4.0, 12.0)          # the link between hosts the all_reduces below ran on
    ran = {"hosts": ONE_HOST(2), "shm": Link(2.0, 8.0), "share": 1.0}

    def all_reduce(algo, nbytes, reps=1):
        probes.append((algo, nbytes, reps))
        p = Params({"shm": ran["shm"], "tcp": truth}, 10.0, "t", 30.0, 0.7).scaled(ran["share"], links={"shm"})
        took = cost("all_reduce", algo, nbytes, sum(map(len, ran["hosts"])), ran["hosts"], p, route(), False) * 1e-6
        return took * (10.0 if next(calls) % 7 == 6 else 1.0)          # every 7th run: 10x slower

    class Store(dict):
        def set(self, k, v):
            self[k] = v.encode() if isinstance(v, str) else v

        def get(self, k):
            return dict.__getitem__(self, k)

    def route():                                    # one host's shm has a board of 4 KiB
        return Route("shm", "tcp", True, 4096 if len(ran["hosts"]) == 1 else 0)

    def calibrate(hosts, oversub=1.0) -> Params:     # one rank's view: agreeing on the slowest rank's figures
        probes.clear()
        comm = SimpleNamespace(size=sum(map(len, hosts)), rank=0, prefix="t/", route=route(),
                               oversubscription=lambda: oversub, all_reduce=lambda buf, op: agreed.append(op),
                               topology=SimpleNamespace(hosts=[SimpleNamespace(ranks=h, cores=2, nics=[])
                                                               for h in hosts],
                                                        host_groups=lambda: tuple(map(tuple, hosts))))
        return cal.calibrate(comm, Store(), all_reduce).params

    def timed(kind, reps):
        return {p for p in probes if p[2] == reps} == {(a, b, reps) for a, b in cal.PROBES[kind]}
    one = calibrate([[0, 1]])
    assert timed("pair", cal.HOST_REPS) and one.links["shm"] == Link(2.0, 8.0) and agreed == [ReduceOp.MAX]
    assert (one.reduce_gbps, one.cache_reduce_gbps, one.board_share) == (10.0, 30.0, 0.7)
    ran.update(hosts=ONE_HOST(4), shm=Link(3.0, 8.0, 0.0, 2.5), share=2.0)
    busy = calibrate([[0, 1, 2, 3]], oversub=2.0)
    assert timed("peers", cal.HOST_REPS) and busy.links["shm"] == Link(3.0, 8.0, 0.0, 2.5), busy.links["shm"]
    assert busy.board_share == 0.7
    ran.update(hosts=TWO_HOSTS, shm=Link(ShmTransport.link.alpha_us, 8.0), share=1.0)
    two = calibrate([[0, 1], [2, 3]])
    assert timed("hosts", cal.FIT_REPS) and two.links["tcp"] == truth and two.links["shm"] == ran["shm"], two.links
    assert two.board_share == BOARD_SHARE          # no board between hosts: the default stays


def test_the_timer_moves_its_bytes_in_one_native_call_per_plan():
    """Calibration's all_reduce timer runs its plan as the fast path runs a collective: every run's bytes go
    through the transport, the times are those of real runs, an algorithm that declines is None, and the
    collectives after it agree."""
    from comms.testing import spawn
    from workers import timer_prober
    out = spawn(timer_prober, 3, timeout=120, env={"COMMS_CALIBRATE": "0"})
    for o in out:
        assert all(0 < t < 5 for t in o["reduced"]), o
        # recursive doubling on 3 ranks: rank 2 folds into rank 0 (4 KiB there, 4 KiB back), 0 and 1 exchange; 8 runs
        assert o["reduce_tx"] == 8 * 4096 * {0: 2, 1: 1, 2: 1}[out.index(o)], o
        assert o["hierarchical"] is None and o["sum"] == [6.0] * 4


def test_buffers_within_the_cache_reduce_at_its_speed():
    """A buffer of up to CACHE_REDUCE_BYTES is reduced at cache_reduce_gbps, a larger one at
    reduce_gbps (0 for the cache's speed: reduce_gbps everywhere); oversubscription shares both."""
    from comms.selection.model import CACHE_REDUCE_BYTES
    shm, hosts = {"shm": Link(1.0, 10.0)}, ((0, 1),)
    fast, slow = Params(shm, 10.0, "t", 40.0), Params(shm, 10.0, "t")
    for m, gain in ((CACHE_REDUCE_BYTES, CACHE_REDUCE_BYTES / 10e3 - CACHE_REDUCE_BYTES / 40e3),
                    (CACHE_REDUCE_BYTES * 2, 0.0)):
        rd = [cost("all_reduce", "recursive_doubling", m, 2, hosts, p, AUTO) for p in (slow, fast)]
        assert math.isclose(rd[0] - rd[1], gain, abs_tol=1e-9), (m, rd)   # it reduces the whole buffer once
    assert fast.scaled(2).cache_reduce_gbps == 20.0 and Params.from_dict(fast.as_dict()).cache_reduce_gbps == 40.0
