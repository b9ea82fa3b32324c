"""``python -m bench.regret``: an end-to-end run on 2 ranks (both designs), the command line, and
the regret arithmetic (bench.regret_table) on made-up launches: the figure (mean or median), the
pairing by launch and by round, and the bench's own noise (split).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import backends, cli, driver, report  # noqa: E402


@pytest.mark.parametrize("design", ["paired", "separate"])
def test_regret_tool_end_to_end(tmp_path, design):
    """broadcast (three algorithms, one of which declines on one host), two sizes on 2 ranks, one
    launch, few ops, built-in cost model, both designs: the table has every algorithm column, the
    choice is a registered algorithm, and the regrets are computed as defined (with one launch the
    paired ratio is the ratio of the figures; no timing claims)."""
    from comms import algorithms
    out_json = tmp_path / "regret.json"
    env = dict(os.environ, COMMS_CALIBRATE="0")
    env.pop("COMMS_ALGO", None)
    p = subprocess.run([sys.executable, "-m", "bench.regret", "--ops", "broadcast", "-np", "2", "-b", "8", "-e", "64K",
                        "-f", "8192", "--launches", "1", "-n", "10", "-w", "2", "--json", str(out_json)]
                       + (["--separate"] if design == "separate" else ["--rounds", "3"]),
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=200)
    assert p.returncode == 0, p.stdout + p.stderr
    algos = algorithms.names("broadcast")
    lines = p.stdout.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.split()[:1] == ["size"])
    assert lines[head].split() == ["size", *algos, "auto", "choice", "best", "regret", "auto_regret"] \
        + (["launch"] if design == "paired" else []) + ["split"]
    assert any(ln.startswith("# COMMS_CALIBRATE=False (env); cost model: defaults") for ln in lines), p.stdout
    assert any(ln.startswith("# summary 1 host x 2 ranks, broadcast: max regret") for ln in lines)
    doc = json.loads(out_json.read_text())
    assert doc["schema"] == "comms-regret/1" and doc["nranks"] == 2 and doc["calibrate"] is False
    assert doc["design"] == design and ("side by side (paired by round, 3 rounds per size)" in p.stdout) == \
        (design == "paired")
    assert doc["rounds"] == (3 if design == "paired" else None)
    assert doc["pairing"] == ("round" if design == "paired" else None)
    assert doc["cost_model"]["source"] == "defaults" and any(r.startswith("broadcast:") for r in doc["rules"])
    assert {"shm", "tcp"} <= set(doc["cost_model"]["links"])
    res = doc["ops"]["broadcast"]
    assert res["algorithms"] == algos and res["not_launched"] == ["hierarchical"]     # one host: it declines
    assert [r["bytes"] for r in res["rows"]] == [8, 65536]
    for r in res["rows"]:
        assert set(r["time_us"]) == set(algos) and r["time_us"]["hierarchical"] is None
        assert r["choice"] in algos and r["time_us"][r["choice"]] is not None
        timed = {a: t for a, t in r["time_us"].items() if t is not None}
        assert r["best"] == min(timed, key=timed.get)
        assert r["launch_regret"] == pytest.approx(timed[r["choice"]] / timed[r["best"]] - 1)
        assert r["launch_auto_regret"] == pytest.approx(r["auto_us"] / timed[r["best"]] - 1)
        if design == "separate":
            assert r["paired_by"] == "median" and r["regret"] == r["launch_regret"]
            assert r["auto_regret"] == r["launch_auto_regret"] and r["round_us"][r["choice"]] == [None]
        else:
            # the worker's round figures (3 rounds, one launch), and the regret recomputed from them:
            # the worst median round ratio against any forced algorithm that ran
            assert r["paired_by"] == "round" and r["vs"] in timed and r["auto_vs"] in timed
            rounds = {a: r["round_us"][a][0] for a in timed}
            assert all(len(x) == 3 and min(x) > 0 for x in rounds.values()) and len(r["auto_round_us"][0]) == 3
            worst = max(statistics.median(x / y for x, y in zip(rounds[r["choice"]], rounds[a])) for a in timed)
            assert r["regret"] == pytest.approx(worst - 1, abs=1e-3) and r["regret"] >= 0
            aworst = max(statistics.median(x / y for x, y in zip(r["auto_round_us"][0], rounds[a])) for a in timed)
            assert r["auto_regret"] == pytest.approx(aworst - 1, abs=1e-3)
        assert r["over"] == (r["regret"] > doc["bar"]) and r["wrong"] == 0
        assert r["split"] is None and r["noisy"] is False         # one launch: no halves to compare
    rows = lines[head + 1: head + 3]
    assert [ln.split()[0] for ln in rows] == ["8", "64"] and all(len(ln.split()) >= len(algos) + 8 for ln in rows)


def test_regret_command_line(capsys):
    from bench import regret
    a = regret.parse_args(["--ops", "all_reduce,all_gather", "-b", "1K", "-e", "4K", "-f", "2", "-np", "4"])
    assert a.ops == ["all_reduce", "all_gather"] and a.sizes == [1024, 2048, 4096] and a.np == 4
    assert regret.place_of(a, "all_reduce") == "in" and regret.place_of(a, "all_gather") == "out"
    s = regret.parse_args(["--hosts", "2", "--ranks", "2", "--rate", "2gbit"])
    assert s.np == 4 and "2 hosts x 2 ranks" in s.config
    assert a.variant_rounds == cli.VARIANT_ROUNDS        # the default, when --rounds is not given
    for bad in (["--ops", "gather"], ["-np", "2", "--hosts", "2"], ["--rate", "1gbit"], ["--rounds", "0"]):
        with pytest.raises(SystemExit):
            regret.parse_args(bad)
    ns = regret.parse_args(["-np", "2", "--rounds", "5"])
    ns.ops, ns.places, ns.variants, ns.batch = ["all_reduce"], ["in"], ["auto", "ring"], 1
    cmd = driver.worker_args(ns, backends.Spec.parse("comms"), Path("out.json"))
    assert cmd[cmd.index("--variants") + 1] == "auto,ring" and cmd[cmd.index("--variant-rounds") + 1] == "5"
    assert set(regret.regret_ops()) >= {"all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all"}


def test_regret_ranks_by_the_slowest_ranks_mean_unless_told_median():
    """One size, two algorithms: "a" has the lower per-op median but long stalls (a higher mean),
    "b" the opposite. The default figure (the slowest rank's mean) ranks b first, --stat median a."""
    from bench import ops, regret, regret_table

    def launch(label, algo, median, means):
        row = {"nbytes": 64, "time_us": median, "rank_mean_us": means, "wrong": 0, "algorithm": algo}
        return report.Launch(label, 0, 1.0, doc={"results": [{"na": False, "rows": [row]}]})
    lns = {"comms": [launch("comms", "a", 20.0, [30.0, 40.0])],
           "comms@COMMS_ALGO=all_reduce:a": [launch("x", "a", 20.0, [30.0, 40.0])],
           "comms@COMMS_ALGO=all_reduce:b": [launch("y", "b", 25.0, [24.0, 26.0])]}
    lay = ops.plan(ops.OPS["all_reduce"], [64], 2, 4)
    mean = regret_table.analyse("all_reduce", ["a", "b"], lay, lns, 0.1)[0]
    assert mean["time_us"] == {"a": 40.0, "b": 26.0} and mean["best"] == "b" and mean["choice"] == "a"
    assert mean["regret"] == pytest.approx(40 / 26 - 1) and mean["over"]
    med = regret_table.analyse("all_reduce", ["a", "b"], lay, lns, 0.1, "median")[0]
    assert med["time_us"] == {"a": 20.0, "b": 25.0} and med["best"] == "a" and med["regret"] == 0.0
    assert regret.parse_args([]).stat == "mean" and regret.parse_args(["--stat", "median"]).stat == "median"


def test_paired_regret_is_the_median_of_launch_wise_ratios():
    """Three paired launches of two algorithms (choice b, best a): the medians give b/a = 21/20,
    the launch-wise ratios 1.2, 1.1 and 1.05, so the paired regret is 10 % and the separate-design
    reading of the same figures 5 %. split_paired turns each launch into one series per variant."""
    from bench import ops, regret_table

    def launch(i, times):
        results = [{"na": False, "variant": v, "rows": [{"nbytes": 64, "time_us": t, "rank_mean_us": [t, t],
                                                          "wrong": 0, "algorithm": "b" if v == "auto" else v}]}
                   for v, t in times.items()]
        return report.Launch("comms", i, 1.0, doc={"results": results})
    lns = [launch(0, {"auto": 12.0, "a": 10.0, "b": 12.0}), launch(1, {"auto": 33.0, "a": 30.0, "b": 33.0}),
           launch(2, {"auto": 21.0, "a": 20.0, "b": 21.0})]
    series = regret_table.split_paired("all_reduce", lns)
    assert sorted(series) == ["comms", "comms@COMMS_ALGO=all_reduce:a", "comms@COMMS_ALGO=all_reduce:b"]
    assert [ln.index for ln in series["comms@COMMS_ALGO=all_reduce:a"]] == [0, 1, 2]
    lay = ops.plan(ops.OPS["all_reduce"], [64], 2, 4)
    paired = regret_table.analyse("all_reduce", ["a", "b"], lay, series, 0.1, paired=True)[0]
    assert paired["time_us"] == {"a": 20.0, "b": 21.0} and paired["choice"] == "b" and paired["best"] == "a"
    assert paired["regret"] == pytest.approx(0.10) and paired["auto_regret"] == pytest.approx(0.10)
    assert regret_table.analyse("all_reduce", ["a", "b"], lay, series, 0.1)[0]["regret"] == pytest.approx(0.05)
    failed = regret_table.split_paired("all_reduce", lns[:1] + [report.Launch("comms", 1, 0.0, error="exit status 1")])
    assert all(len(v) == 2 and not v[1].ok for v in failed.values())


def test_round_paired_regret_pairs_each_round_and_takes_the_worst_algorithm():
    """Two paired launches, 4 rounds, choice a. In launch 0 the machine turns slow for the last
    round after b's turn (a 40 against b 10): the launch means say a loses 75 % to b there, the
    round ratios (1, 1, 1, 4) say it does not. b has the lowest median (it is best), but a loses
    8 % to d in every round (d's launch-0 mean is the higher), so the regret is 8 %, measured
    against d. Rows without round figures, or pairing="launch", fall back to the launch-wise ratio."""
    from bench import ops, regret, regret_table

    def launch(i, rounds, with_rounds=True):
        results = [{"na": False, "variant": v, "rows": [dict(
            {"nbytes": 64, "time_us": 0.0, "rank_mean_us": [statistics.fmean(x)] * 2, "wrong": 0,
             "algorithm": "a" if v == "auto" else v}, **({"round_mean_us": x} if with_rounds else {}))]}
            for v, x in rounds.items()]
        return report.Launch("comms", i, 1.0, doc={"results": results})
    slow = {"auto": [10.0, 10, 10, 40], "a": [10.0, 10, 10, 40], "b": [10.0] * 4, "d": [10 / 1.08] * 3 + [40 / 1.08]}
    calm = {"auto": [10.0] * 4, "a": [10.0] * 4, "b": [10.0] * 4, "d": [10 / 1.08] * 4}
    lay = ops.plan(ops.OPS["all_reduce"], [64], 2, 4)
    algos = ["a", "b", "d"]

    def row(lns, **kw):
        return regret_table.analyse("all_reduce", algos, lay, regret_table.split_paired("all_reduce", lns), 0.1, paired=True,
                              **kw)[0]
    r = row([launch(0, slow), launch(1, calm)])
    assert r["choice"] == "a" and r["best"] == "b" and r["paired_by"] == "round" and r["vs"] == r["auto_vs"] == "d"
    assert r["regret"] == pytest.approx(0.08) and r["auto_regret"] == pytest.approx(0.08) and not r["over"]
    assert r["launch_regret"] == pytest.approx(statistics.median([17.5 / 10, 10 / 10]) - 1) and r["launch_regret"] > 0.1
    assert r["round_us"]["b"] == [[10.0] * 4] * 2 and r["auto_round_us"][0] == [10.0, 10, 10, 40]
    per = {k: [regret_table._rows_of(ln) for ln in v] for k, v in regret_table.split_paired("all_reduce", [launch(0, slow)]).items()}
    assert regret_table._round_ratio(per, [(regret_table.label_of("all_reduce", "a"), "a")],
                                     regret_table.label_of("all_reduce", "b"), 64, "b") == pytest.approx(1.0)
    bare = row([launch(0, slow, False), launch(1, calm, False)])
    assert bare["paired_by"] == "launch" and bare["regret"] == bare["launch_regret"] and bare["vs"] is None
    told = row([launch(0, slow), launch(1, calm)], pairing="launch")
    assert told["paired_by"] == "launch" and told["regret"] == pytest.approx(r["launch_regret"])
    assert regret.parse_args([]).pairing == "round" and regret.parse_args(["--pairing", "launch"]).pairing == "launch"


def test_launches_that_chose_differently_are_each_scored_against_their_own_forced_runs():
    """Online timing may choose differently per launch: ``choice`` lists both, and each launch's
    choice is paired round by round with that launch's forced runs. Launches that each chose their
    own faster algorithm beat every algorithm forced throughout (a negative regret: 10/13 in half of
    the rounds against either); launches that each chose their slower one lose 30 % in half."""
    from bench import ops, regret_table

    def launch(i, auto_ran, times):
        results = [{"na": False, "variant": v, "rows": [{
            "nbytes": 64, "time_us": 0.0, "rank_mean_us": [x] * 2, "wrong": 0, "round_mean_us": [x] * 4,
            "algorithm": auto_ran if v == "auto" else v}]} for v, x in times.items()]
        return report.Launch("comms", i, 1.0, doc={"results": results})
    lay = ops.plan(ops.OPS["all_reduce"], [64], 2, 4)

    def row(*lns):
        series = regret_table.split_paired("all_reduce", list(lns))
        return regret_table.analyse("all_reduce", ["a", "b"], lay, series, 0.1, paired=True)[0]
    right = row(launch(0, "a", {"auto": 10.0, "a": 10.0, "b": 13.0}), launch(1, "b", {"auto": 10.0, "a": 13.0, "b": 10.0}))
    assert right["choice"] == "a/b" and right["paired_by"] == "round"
    assert right["regret"] == pytest.approx((1 + 10 / 13) / 2 - 1) and not right["over"]
    wrong = row(launch(0, "b", {"auto": 13.0, "a": 10.0, "b": 13.0}), launch(1, "a", {"auto": 13.0, "a": 13.0, "b": 10.0}))
    assert wrong["regret"] == pytest.approx(0.15) and wrong["over"]
    assert wrong["launch_regret"] == pytest.approx(0.15)


def test_split_regret_is_the_benchs_own_noise():
    """Four paired launches of two algorithms. When both halves (launches 0, 2 and 1, 3) rank a
    ahead the split regret is 0; when the odd half ranks b ahead, each half's best scored by the
    other gives 100/80 - 1 and 90/75 - 1 (medians of launch-wise ratios), so the split is 25 %,
    over a 10 % bar: the row is noisy and the summary names it, the verdict still the regret's."""
    from bench import ops, regret_table

    def launch(i, times):
        results = [{"na": False, "variant": v, "rows": [{"nbytes": 64, "time_us": t, "rank_mean_us": [t, t],
                                                          "wrong": 0, "algorithm": "a" if v == "auto" else v}]}
                   for v, t in times.items()]
        return report.Launch("comms", i, 1.0, doc={"results": results})
    lay = ops.plan(ops.OPS["all_reduce"], [64], 2, 4)

    def row(times):
        series = regret_table.split_paired("all_reduce", [launch(i, t) for i, t in enumerate(times)])
        return regret_table.analyse("all_reduce", ["a", "b"], lay, series, 0.1, paired=True)[0]
    agree = row([{"auto": 10.0, "a": 10.0, "b": 12.0}] * 4)
    assert agree["split"] == pytest.approx(0.0) and not agree["noisy"]
    flip = row([{"auto": 80.0, "a": 80.0, "b": 100.0}, {"auto": 90.0, "a": 90.0, "b": 75.0},
                {"auto": 80.0, "a": 80.0, "b": 100.0}, {"auto": 90.0, "a": 90.0, "b": 75.0}])
    assert flip["split"] == pytest.approx(100 / 80 - 1) and flip["noisy"]
    line = regret_table.summary("cfg", "all_reduce", [flip], 0.1)
    assert "split over: 64" in line and line.endswith("PASS" if not flip["over"] else "FAIL")
    # separate design: the ratio of the halves' medians
    series = {regret_table.label_of("all_reduce", v): [report.Launch("x", i, 1.0, doc={"results": [{"na": False, "rows": [
        {"nbytes": 64, "time_us": t, "rank_mean_us": [t], "wrong": 0, "algorithm": "a" if v == "auto" else v}]}]})
        for i, t in enumerate(ts)] for v, ts in {"auto": [1, 1], "a": [10.0, 10.0], "b": [11.0, 9.0]}.items()}
    sep = regret_table.analyse("all_reduce", ["a", "b"], lay, series, 0.1)[0]
    assert sep["split"] == pytest.approx(max(11 / 10, 10 / 9) - 1)


def test_regret_simulated_hosts_need_root(monkeypatch, capsys):
    import hostns
    from bench import regret
    monkeypatch.setattr(hostns, "why_unavailable", lambda: "simulated hosts need root (running as uid 1000)")
    assert regret.main(["--hosts", "2", "--ranks", "2"]) == 2
    assert "need root" in capsys.readouterr().err


def test_regret_tool_tunes_first_when_asked(tmp_path):
    """``--tune``: comms.tune runs once under the same launcher over the run's ops and sizes, into
    the run's pinned cache, and the rules the default then uses include its tuned ones; the
    caller's cache is left as it was."""
    out_json = tmp_path / "regret.json"
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), COMMS_CALIBRATE="1")
    env.pop("COMMS_ALGO", None)
    p = subprocess.run([sys.executable, "-m", "bench.regret", "--ops", "all_reduce", "-np", "2", "-b", "8", "-e", "8",
                        "--launches", "1", "-n", "10", "-w", "2", "--rounds", "2", "--tune", "--json", str(out_json)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "# comms.tune --ops all_reduce -b 8 -e 8 -f 4: exit 0" in p.stdout, p.stdout
    doc = json.loads(out_json.read_text())
    assert doc["tune"]["exit"] == 0
    tuned = [r for r in doc["rules"] if r.endswith("(tuned)")]
    assert tuned and all(r.startswith("all_reduce:") for r in tuned), doc["rules"]
    assert not (tmp_path / "cache" / "comms" / "calibration.json").exists()
