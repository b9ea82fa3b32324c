"""Online timing (comms.selection.online): rules that name alternatives, the schedule and the
agreed decision."""
from __future__ import annotations

import math

import numpy as np
import pytest

from comms import InvalidUsage
from comms.selection.online import LEAD_MAX, SWITCH, TIMED_MAX, Trial, decide, turn_calls
from comms.selection.rules import Selector, parse
from comms.testing import spawn

ENV = {"COMMS_CALIBRATE": "0", "COMMS_ONLINE_ROUNDS": "2", "COMMS_ONLINE_TURN_MS": "5"}


def test_rules_name_alternatives_in_the_grammar():
    (rule,) = parse("all_reduce:16K-64K:direct|rhd")
    assert (rule.names[0], rule.alternatives) == ("direct", ("direct", "rhd"))
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
    """Run the trial's calls: (round, alternative, timed) per call."""
    got = []
    while not t.done:
        row, alt = t.row, t.alt
        t0 = t.begin(True)
        got.append((row, alt, t0 != 0.0))
        t.end(t0)
    return got


def test_rounds_of_turns_sized_by_price_reversed_every_other_round():
    plans, ran = {}, {}
    # a: 2 ms a call, 3 untimed + 2 timed; b: 1 s, one of each; c: not priced, one of each
    assert turn_calls(0.002) == (3, 2) and turn_calls(1.0) == (1, 1) and turn_calls(math.inf) == (1, 1)
    assert turn_calls(1e-6) == (LEAD_MAX, TIMED_MAX) and turn_calls(1e-6, 0.5) == (LEAD_MAX // 2, TIMED_MAX // 2)
    assert turn_calls(0.002, 10) == (30, 20)
    t = Trial(["a", "b", "c"], [0.002, 1.0, math.inf], 3, key=("k",), plans=plans, ran=ran)
    assert not t.done and sum(lead + timed for _, _, lead, timed in t.schedule) == 3 * (5 + 2 + 2)
    turns = _drain(t)
    assert [alt for _, alt, _ in turns] == ([0] * 5 + [1] * 2 + [2] * 2 + [2] * 2 + [1] * 2 + [0] * 5
                                            + [0] * 5 + [1] * 2 + [2] * 2)
    assert [row for row, _, _ in turns] == [0] * 9 + [1] * 9 + [2] * 9
    assert [timed for _, _, timed in turns[:9]] == [False] * 3 + [True] * 2 + [False, True] * 2
    assert t.figures().shape == (3, 3) and np.isfinite(t.figures()).all() and t.done
    assert ("k",) not in plans


def _schedule(alts: list[str], seconds: dict, rounds: int, scale: float) -> list[str]:
    """The algorithm of every call of a trial's rounds, as comms.selection.online sizes them."""
    out = []
    for r in range(rounds):
        for a in (alts if r % 2 == 0 else alts[::-1]):
            out += [a] * sum(turn_calls(seconds[a], scale))
    return out


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


@pytest.mark.parametrize("slow,fast,rounds", [("ring", "direct", 2), ("direct", "ring", 2), ("ring", "direct", 5)])
def test_ranks_time_the_alternatives_and_all_keep_the_faster(slow, fast, rounds):
    """2 ranks, all_reduce:ring|direct of 1 MiB, one algorithm held 2 ms per call: the turns run as
    their prices size them, every sum is right, and after the rounds every rank runs the faster;
    forcing an algorithm and going back keeps the decision."""
    from workers import online_timed
    out = spawn(online_timed, 2, timeout=120, args=("all_reduce:ring|direct", slow, 400),
                env=dict(ENV, COMMS_ONLINE_ROUNDS=str(rounds)))
    assert out[0] == out[1], "ranks disagree"
    o = out[0]
    assert all(o["right"])
    trial = _schedule(["ring", "direct"], o["seconds"], rounds, 0.5)
    assert o["ran"] == trial + [fast] * (len(o["ran"]) - len(trial)) and len(o["ran"]) - len(trial) >= 50
    assert o["forced"] == "ring" and o["after"] == [fast, True]
    assert o["choices"] == [{"alternatives": ["ring", "direct"], "chosen": fast, "timed": ["direct", "ring"]}]


def test_asynchronous_calls_follow_the_schedule_untimed_and_keep_the_first():
    """Async calls are counted, not timed: the rounds time nothing, and the first alternative stays."""
    from workers import online_timed
    out = spawn(online_timed, 2, timeout=120, args=("all_reduce:direct|ring", "direct", 120, True), env=ENV)
    assert out[0] == out[1], "ranks disagree"
    o = out[0]
    assert all(o["right"])
    trial = _schedule(["direct", "ring"], o["seconds"], 2, 0.5)
    assert o["ran"] == trial + ["direct"] * (120 - len(trial)) and len(trial) < 100
    assert o["choices"] == [{"alternatives": ["direct", "ring"], "chosen": "direct", "timed": []}]


def test_online_rounds_zero_runs_the_first_alternative():
    from workers import online_timed
    env = dict(ENV, COMMS_ONLINE_ROUNDS="0")
    out = spawn(online_timed, 2, timeout=120, args=("all_reduce:direct|ring", "direct", 8), env=env)
    assert out[0]["ran"] == ["direct"] * 8 and out[0]["choices"] == []


def test_info_marks_the_sizes_left_to_online_timing(monkeypatch):
    from comms import info
    monkeypatch.setenv("COMMS_ALGO", "all_reduce:16K-64K:direct|rhd")
    got = info.gather(None)
    assert got["alternatives"] == {"all_reduce": {"32K": ["direct", "rhd"]}}     # the table's sizes are x4
    assert got["selection"]["all_reduce"]["32K"] == "direct"
    text = info.render(got, None)
    assert "direct*" in text and "COMMS_ONLINE_ROUNDS" in text and "all_reduce:16384-65536:direct|rhd  (user)" in text
