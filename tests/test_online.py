"""Online timing (comms.online): rules that name alternatives, the schedule, the agreed decision,
and the calibrated defaults that write such rules."""
from __future__ import annotations

import math

import numpy as np
import pytest

from comms import InvalidUsage, algorithms
from comms.online import LEAD_MAX, PRUNE, PRUNE_AFTER, SIZING_CALLS, SWITCH, TIMED_MAX, Trial, decide, turn_calls
from comms.selector import Selector, parse
from comms.testing import spawn
from comms.timed import PROBES, layout
from comms.tuning import AUTO, Link, Params, cost, default_rules

ENV = {"COMMS_CALIBRATE": "0", "COMMS_ONLINE_ROUNDS": "2"}


def test_rules_name_alternatives_in_the_grammar():
    (rule,) = parse("all_reduce:16K-64K:direct|rhd")
    assert (rule.algorithm, rule.alternatives) == ("direct", ("direct", "rhd"))
    assert str(rule) == "all_reduce:16384-65536:direct|rhd"
    assert parse(str(rule)) == [rule]
    sel = Selector("all_reduce:16K-64K:direct|rhd", "all_reduce:ring")
    assert sel.contest("all_reduce", 32 << 10) == ("direct", "rhd")
    assert sel.contest("all_reduce", 8) == ()                  # the default rule names one
    assert sel.candidates("all_reduce", 32 << 10)[:3] == ["direct", "rhd", "ring"]
    assert Selector("all_reduce:ring#all_reduce:direct|rhd", "").contest("all_reduce", 8) == ()
    with pytest.raises(InvalidUsage, match="no algorithm 'nope'"):
        parse("all_reduce:direct|nope")
    with pytest.raises(InvalidUsage, match="twice"):
        parse("all_reduce:direct|direct")


def _drain(t: Trial) -> list[tuple[int, int, bool]]:
    """Run a phase's calls: (round, alternative, timed) per call."""
    got = []
    while not t.done:
        row, alt = t.row, t.alt
        t0 = t.begin(True)
        got.append((row, alt, t0 != 0.0))
        t.end(t0)
    return got


def test_sizing_turns_then_rounds_of_turns_sized_by_time_reversed_every_other_round():
    plans, ran = {}, {}
    t = Trial(["a", "b", "c"], rounds=3, key=("k",), plans=plans, ran=ran)
    assert t.phase == "sizing" and t.calls == 3 * SIZING_CALLS
    sizing = _drain(t)
    assert [alt for _, alt, _ in sizing] == [0] * SIZING_CALLS + [1] * SIZING_CALLS + [2] * SIZING_CALLS
    assert [timed for _, _, timed in sizing] == ([False] + [True] * (SIZING_CALLS - 1)) * 3
    f = t.figures()
    assert f.shape == (1, 3) and np.isfinite(f).all()
    # a: 2 ms a call, 3 untimed + 2 timed; b: 1 s, one of each; c: 1 us, the most of each
    assert turn_calls(0.002) == (3, 2) and turn_calls(1.0) == (1, 1) and turn_calls(1e-6) == (LEAD_MAX, TIMED_MAX)
    t.plan_rounds(np.array([0.002, 1.0, math.inf]))
    assert t.phase == "early" and not t.done and t.calls == PRUNE_AFTER * (5 + 2 + 2)
    early = _drain(t)
    assert [alt for _, alt, _ in early] == [0] * 5 + [1] * 2 + [2] * 2 + [2] * 2 + [1] * 2 + [0] * 5
    assert [row for row, _, _ in early] == [0] * 9 + [1] * 9
    assert [timed for _, _, timed in early[:9]] == [False] * 3 + [True] * 2 + [False, True] * 2
    assert t.figures().shape == (3, 3) and np.isinf(t.figures()[2]).all()
    # c ran 2x the fastest in both early rounds: dropped; the last round runs a and b
    t.prune(np.array([[1.0, 1.1, 2.0], [1.2, 1.0, 2.1], [np.inf] * 3]))
    assert t.alive == [0, 1] and t.phase == "rounds"
    assert [(row, alt) for row, alt, _ in _drain(t)] == [(2, 0)] * 5 + [(2, 1)] * 2
    assert ("k",) not in plans


def test_pruning_drops_only_what_is_far_behind_in_every_early_round():
    def alive_after(rows) -> list[int]:
        t = Trial(["a", "b", "c"], rounds=4)
        _drain(t)
        t.plan_rounds(np.full(3, 1e-3))
        _drain(t)
        t.prune(np.array(rows + [[np.inf] * 3] * 2))
        return t.alive
    far = 1 + 2 * PRUNE
    assert alive_after([[1.0, far, 1.0], [1.0, far, 1.0]]) == [0, 2]
    assert alive_after([[1.0, far, 1.0], [1.0, 1.0, 1.0]]) == [0, 1, 2]      # behind in one round only
    assert alive_after([[1.0, far, np.inf], [1.0, far, 1.0]]) == [0, 1, 2]   # a round missing a figure
    assert alive_after([[far, 1.0, far], [far, 1.0, far]]) == [1]            # the pick too: decided at once


def test_the_decision_pairs_rounds_and_keeps_the_first_unless_another_is_clearly_faster():
    alts = ["a", "b"]
    # b is faster in the median round; one round where b stalled does not change that
    agreed = np.array([[10.0, 7.0], [12.0, 9.0], [10.0, 50.0], [11.0, 8.0]])
    win, ratios = decide(alts, agreed)
    assert win == 1 and ratios["a"] == 1.0 and ratios["b"] < 0.8
    # within SWITCH: the rule's own pick stays
    close = np.array([[10.0, 10.0 * (1 - SWITCH / 2)]] * 3)
    assert decide(alts, close)[0] == 0
    # rounds where an alternative has no figure (inf: a rank timed none) do not count
    assert decide(alts, np.array([[10.0, math.inf], [10.0, 20.0]])) == (0, {"a": 1.0, "b": 2.0})
    assert decide(alts, np.full((2, 2), math.inf)) == (0, {})
    # the pick dropped after the early rounds: the faster of the others wins outright, even by less
    # than SWITCH; ratios to the pick come from the rounds it ran
    three = ["a", "b", "c"]
    agreed = np.array([[20.0, 10.0, 10.1], [20.0, 10.0, 10.1], [np.inf, 10.0, 10.1]])
    win, ratios = decide(three, agreed, [1, 2])
    assert win == 1 and ratios == {"a": 1.0, "b": 0.5, "c": 0.505}
    assert decide(three, agreed[:, [0, 2, 1]], [1, 2])[0] == 2
    assert decide(three, agreed, [1])[0] == 1


@pytest.mark.parametrize("slow,fast,rounds", [("ring", "direct", 2), ("direct", "ring", 2), ("ring", "direct", 5)])
def test_ranks_time_the_alternatives_and_all_keep_the_faster(slow, fast, rounds):
    """2 ranks, all_reduce:ring|direct of 1 MiB, one algorithm held 2 ms per call: the sizing
    turns come first, every sum is right, and after 2 rounds every rank runs the faster (with 5
    rounds, the slow one is dropped after PRUNE_AFTER = 2); forcing an algorithm and going back
    keeps the decision."""
    from workers import online_timed
    out = spawn(online_timed, 2, timeout=120, args=("all_reduce:ring|direct", slow, 400),
                env=dict(ENV, COMMS_ONLINE_ROUNDS=str(rounds)))
    assert out[0] == out[1], "ranks disagree"
    o = out[0]
    assert all(o["right"])
    assert o["ran"][:2 * SIZING_CALLS] == ["ring"] * SIZING_CALLS + ["direct"] * SIZING_CALLS
    # the slow one's turns: 3 untimed + 2 timed calls at 2-3 ms a call, 2 + 2 where a loaded machine
    # stretched its sizing calls to 3-4 ms (comms.online.turn_calls); the fast one's at most 64 + 32
    from comms.online import turn_calls
    rounds = o["ran"][2 * SIZING_CALLS:]
    decided = len(rounds) - next(i for i, a in enumerate(reversed(rounds)) if a != fast)
    sized = {2 * sum(turn_calls(ms / 1000)) for ms in (2.0, 2.5, 2.99, 3.0, 3.5, 3.99)}
    assert sized == {2 * 5, 2 * 4}
    assert rounds[:decided].count(slow) in sized and decided <= 2 * (5 + LEAD_MAX + TIMED_MAX)
    assert rounds[decided:] == [fast] * (len(rounds) - decided) and len(rounds) - decided >= 100
    assert o["forced"] == "ring" and o["after"] == [fast, True]
    assert o["choices"] == [{"alternatives": ["ring", "direct"], "chosen": fast, "timed": ["direct", "ring"]}]


def test_asynchronous_calls_follow_the_schedule_untimed_and_keep_the_first():
    """Async calls are counted, not timed: the sizing agrees on no time (turns of one untimed and
    one timed call), the rounds time nothing, and the first alternative stays."""
    from workers import online_timed
    out = spawn(online_timed, 2, timeout=120, args=("all_reduce:direct|ring", "direct", 20, True), env=ENV)
    assert out[0] == out[1], "ranks disagree"
    o = out[0]
    assert all(o["right"])
    sizing = ["direct"] * SIZING_CALLS + ["ring"] * SIZING_CALLS
    rounds = ["direct"] * 2 + ["ring"] * 2 + ["ring"] * 2 + ["direct"] * 2
    assert o["ran"] == sizing + rounds + ["direct"] * (20 - len(sizing) - len(rounds))
    assert o["choices"] == [{"alternatives": ["direct", "ring"], "chosen": "direct", "timed": []}]


def test_online_rounds_zero_runs_the_first_alternative():
    from workers import online_timed
    env = dict(ENV, COMMS_ONLINE_ROUNDS="0")
    out = spawn(online_timed, 2, timeout=120, args=("all_reduce:direct|ring", "direct", 8), env=env)
    assert out[0]["ran"] == ["direct"] * 8 and out[0]["choices"] == []


def _measured(n: int, hosts: tuple, p: Params, times: dict) -> dict:
    """A timed table whose every algorithm measured ``times[a]`` x its modelled cost (a number, or
    a function of the probe's size)."""
    names = list(algorithms.REGISTRY["all_reduce"])
    def factor(a, s):
        f = times.get(a, 1.0)
        return f(s) if callable(f) else f
    row = lambda a: [cost("all_reduce", a, s, n, hosts, p, AUTO) * factor(a, s) for s in PROBES]  # noqa: E731
    return {"layout": layout(n, hosts), "all_reduce": {a: row(a) for a in names}}


def test_calibrated_defaults_leave_close_calls_to_online_timing():
    """Where the timed figures of two algorithms lie within CONTEST of each other the rule names
    both (the cheaper first); far apart, one."""
    hosts = ((0, 1, 2, 3),)
    base = Params({"shm": Link(2.0, 6.0), "tcp": Link(40.0, 1.5)}, 8.0)
    names = {"all_reduce": list(algorithms.REGISTRY["all_reduce"])}

    def rule_at(times: dict, m: int) -> str:
        p = Params(base.links, base.reduce_gbps, "test", _measured(4, hosts, base, times))
        return next(r.split(":")[2] for r in default_rules(names, 4, hosts, p, AUTO).split("#")
                    if int(r.split(":")[1].split("-")[0]) <= m < float(r.split(":")[1].split("-")[1]))
    m = 64 << 10
    plain = rule_at({}, m)
    assert "|" not in plain or len(plain.split("|")) <= 3
    first = plain.split("|")[0]
    # every other algorithm 3x its model: the pick stands alone
    assert rule_at({a: 3.0 for a in names["all_reduce"] if a != first}, m) == first
    # one other algorithm measured 5 % behind the pick: both are named, the pick first
    other = next(a for a in names["all_reduce"] if a != first and cost("all_reduce", a, m, 4, hosts, base, AUTO) < math.inf)
    ratio = 1.05 * cost("all_reduce", first, m, 4, hosts, base, AUTO) / cost("all_reduce", other, m, 4, hosts, base, AUTO)
    times = {a: 3.0 for a in names["all_reduce"] if a not in (first, other)} | {other: ratio}
    assert rule_at(times, m) == f"{first}|{other}"


def test_info_marks_the_sizes_left_to_online_timing(monkeypatch):
    from comms import info
    monkeypatch.setenv("COMMS_ALGO", "all_reduce:16K-64K:direct|rhd")
    got = info.gather(None)
    assert got["alternatives"] == {"all_reduce": {"32K": ["direct", "rhd"]}}     # the table's sizes are x4
    assert got["selection"]["all_reduce"]["32K"] == "direct"
    text = info.render(got, None)
    assert "direct*" in text and "COMMS_ONLINE_ROUNDS" in text and "all_reduce:16384-65536:direct|rhd  (user)" in text


def test_a_neighbouring_sizes_pick_is_an_alternative_when_within_2x():
    """An algorithm that wins the sizes on both sides but timed 1.4x the pick at one probe (an
    outlier of one launch) stays an alternative there; at 2.5x it does not."""
    hosts = ((0, 1, 2, 3),)
    base = Params({"shm": Link(2.0, 6.0), "tcp": Link(40.0, 1.5)}, 8.0)
    names = {"all_reduce": ["ring", "rhd"]}
    m = 1 << 20
    ring = lambda s: cost("all_reduce", "ring", s, 4, hosts, base, AUTO)          # noqa: E731
    rhd = lambda s: cost("all_reduce", "rhd", s, 4, hosts, base, AUTO)            # noqa: E731

    def rules(at_m: float) -> str:
        times = {"ring": 1.0, "rhd": lambda s: (at_m if s == m else 0.5) * ring(s) / rhd(s)}
        p = Params(base.links, base.reduce_gbps, "test", _measured(4, hosts, base, times))
        return default_rules(names, 4, hosts, p, AUTO)
    assert f"all_reduce:{m}-{2 * m}:ring|rhd" in rules(1.4).split("#")
    assert f"all_reduce:{m}-{2 * m}:ring" in rules(2.5).split("#")


def test_no_alternatives_where_a_call_costs_more_than_contest_max_us():
    """At sizes whose pick is priced above CONTEST_MAX_US the rule names the pick alone, however
    close the others timed: exploring would cost seconds there."""
    from comms.tuning import CONTEST_MAX_US
    hosts = ((0, 1, 2, 3),)
    base = Params({"shm": Link(2.0, 6.0), "tcp": Link(40.0, 1.5)}, 8.0)
    p = Params(base.links, base.reduce_gbps, "test", _measured(4, hosts, base, {}))
    rules = default_rules({"all_reduce": ["ring", "rhd"]}, 4, hosts, p, AUTO).split("#")
    for r in rules:
        lo = int(r.split(":")[1].split("-")[0])
        priced = min(cost("all_reduce", a, lo, 4, hosts, base, AUTO) for a in ("ring", "rhd"))
        if priced > CONTEST_MAX_US:
            assert "|" not in r, r
    assert any("|" in r for r in rules) and "|" not in rules[-1]
