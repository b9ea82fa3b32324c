"""The regret tables of ``python -m bench.regret``: rows from launches, the table, the summary.

Contract, per row (one per op and size): every algorithm's time (us), ``auto`` (the default run's time), ``choice`` (the
algorithm the default run used), ``best`` (the fastest forced algorithm),
``regret`` = t_forced[choice] / t_best - 1 (choice regret: both figures come from forced runs,
so two runs of one algorithm do not add noise; where launches chose differently, which online
timing may do, ``choice`` lists them, ``a/b``, and each launch's choice is paired with that
launch's forced runs, or, unpaired, the slowest of them counts) and ``auto_regret`` = t_auto / t_best - 1.
In the paired (default) design they are paired by round (``--pairing round``, the default, with
``--stat mean``): every round of every launch gives the ratio of the two variants' means in that
round (the slowest rank's, ``round_mean_us`` from the worker), the median over all rounds is the
pair's ratio, and ``regret`` is the largest such ratio of the choice against any forced algorithm
that ran, minus 1 (``vs`` names it; at least the ratio against ``best``, the algorithm with the
lowest median, and at least 0 where every launch chose alike; launches that chose differently,
each the faster in its own launch, can beat every algorithm forced throughout: below 0). The reason: this VM moves between machine states that last
seconds (the same 8 MiB all_reduce on 2 ranks takes 0.7 ms, then 7 ms for 2 to 5 s, both ranks
at 100 % on cores of their own, no sleeps, no steal), so a launch's mean can pool one variant's
slow spell against another's fast one; two turns of one round sit within a fraction of a second.
``launch_regret``/``launch_auto_regret`` (``--pairing launch``) are the median over launches of
the launch's own ratio, the pairing before; the table shows it as ``launch``. A row
whose choice regret exceeds ``--bar`` (default 10 %) is marked ``<<``; one whose auto regret
alone exceeds it, ``(auto)``. ``split`` is the bench's own noise at that size: the launches
split into even and odd halves, the regret of one half's best algorithm scored by the other
half (the larger of the two ways). Above the bar, the launches disagree by more than the bar
about which algorithm is best, so no choice can be shown to be within it there; the verdict
does not change, the summary lists those sizes. One summary line per config and op.
"""
from __future__ import annotations

import statistics

from . import cli, report


def _rows_of(ln: report.Launch) -> dict[int, dict]:
    if not ln.ok:
        return {}
    return {r["nbytes"]: r for res in ln.doc["results"] for r in res["rows"] if not res["na"]}


def figure(row: dict, stat: str) -> float:
    """A launch's figure for one size: the slowest rank's mean (``stat`` "mean") or median time per op (µs)."""
    return max(row["rank_mean_us"]) if stat == "mean" else row["time_us"]


def label_of(op: str, variant: str) -> str:
    """The series name of a variant: ``comms`` for auto, ``comms@COMMS_ALGO=<op>:<algo>`` for a forced one."""
    return "comms" if variant == "auto" else f"comms@COMMS_ALGO={op}:{variant}"


def split_paired(op: str, launches: list[report.Launch]) -> dict[str, list[report.Launch]]:
    """The paired design's launches (each holding every variant's results) as one series per
    variant, indexed by launch, in the shape :func:`analyse` reads; a failed launch fails every
    series."""
    out: dict[str, list[report.Launch]] = {}
    for ln in launches:
        variants = [] if not ln.ok else list(dict.fromkeys(r["variant"] for r in ln.doc["results"] if "variant" in r))
        for v in variants:
            doc = dict(ln.doc, results=[r for r in ln.doc["results"] if r.get("variant") == v])
            out.setdefault(label_of(op, v), []).append(report.Launch(label_of(op, v), ln.index, ln.seconds, doc=doc))
        if not ln.ok:
            for series in out.values():
                series.append(ln)
    return out


def _pairs(per: dict, a: list[tuple[str, str | None]], b: str, nbytes: int, algo_b: str):
    """The (a row, b row) of every launch that ran both at ``nbytes``: ``a`` gives per launch the
    variant label and the algorithm its row must have run (None: any; so each launch may pair a
    different algorithm with b: the one the default chose in that launch), b's row must have run
    ``algo_b`` (a forced algorithm that declined does not count)."""
    out = []
    for i, (label, algo_a) in enumerate(a):
        da, db = per.get(label, []), per.get(b, [])
        ra = da[i].get(nbytes) if i < len(da) else None
        rb = db[i].get(nbytes) if i < len(db) else None
        if ra and rb and (algo_a is None or ra["algorithm"] == algo_a) and rb["algorithm"] == algo_b:
            out.append((ra, rb))
    return out


def _paired_ratio(per: dict, a: list[tuple[str, str | None]], b: str, nbytes: int, stat: str,
                  algo_b: str) -> float | None:
    """Median over launches of launch-wise t[a] / t[b] at ``nbytes`` (see :func:`_pairs`)."""
    ratios = [figure(ra, stat) / figure(rb, stat) for ra, rb in _pairs(per, a, b, nbytes, algo_b)]
    return statistics.median(ratios) if ratios else None


def _round_ratio(per: dict, a: list[tuple[str, str | None]], b: str, nbytes: int, algo_b: str) -> float | None:
    """Median, over every round of every launch, of that round's t[a] / t[b] at ``nbytes`` (the
    slowest rank's mean per op in the round, ``round_mean_us``; launches as :func:`_pairs`). None
    when a launch's rows lack round figures (so the caller falls back to launch-wise pairing) or
    no launch ran both."""
    ratios = []
    for ra, rb in _pairs(per, a, b, nbytes, algo_b):
        xa, xb = ra.get("round_mean_us"), rb.get("round_mean_us")
        if not xa or not xb or len(xa) != len(xb):
            return None
        ratios += [x / y for x, y in zip(xa, xb) if x > 0 and y > 0]
    return statistics.median(ratios) if ratios else None


def round_regret(per: dict, op: str, a: list[tuple[str, str | None]], timed: dict, nbytes: int):
    """Round-paired regret of a series (per launch: label and algorithm, as :func:`_pairs`) against
    every forced algorithm that ran: the largest ``_round_ratio(a, forced) - 1`` over them, with
    the algorithm it is measured against, or (None, None) without round figures. Comparing against
    every algorithm, not only the one with the lowest median, can only raise the figure."""
    worst, against = None, None
    for b in timed:
        r = _round_ratio(per, a, label_of(op, b), nbytes, b)
        if r is None:
            return None, None
        if worst is None or r - 1 > worst:
            worst, against = r - 1, b
    return worst, against


def split_regret(op: str, algos: list[str], per: dict, nbytes: int, stat: str, paired: bool) -> float | None:
    """How far the bench itself is from telling the best algorithm at ``nbytes``: the launches
    split into two halves (even and odd indices), each half's best algorithm (lowest median) scored
    by the other half as :func:`analyse` scores a choice (paired: the median of launch-wise ratios;
    otherwise the ratio of medians), the larger of the two regrets; None with fewer than two
    launches. Near 0 when the halves agree; above the bar, the launches disagree by more than the
    bar about which algorithm is best, so a choice's regret there is within the bench's noise."""
    def half(parity: int) -> dict[str, list]:
        out = {}
        for a in algos:
            series = per.get(label_of(op, a), [])[parity::2]
            rows = [d.get(nbytes) for d in series]
            if rows and all(r and r["algorithm"] == a for r in rows):
                out[a] = [figure(r, stat) for r in rows]
        return out
    halves = [half(0), half(1)]
    if not all(halves) or set(halves[0]) != set(halves[1]):
        return None
    worst = 0.0
    for h, g in ((0, 1), (1, 0)):
        pick = min(halves[h], key=lambda a: statistics.median(halves[h][a]))
        ref = min(halves[g], key=lambda a: statistics.median(halves[g][a]))
        if paired:
            r = statistics.median(x / y for x, y in zip(halves[g][pick], halves[g][ref]))
        else:
            r = statistics.median(halves[g][pick]) / statistics.median(halves[g][ref])
        worst = max(worst, r - 1)
    return worst


def analyse(op: str, algos: list[str], layouts, launches: dict[str, list[report.Launch]], bar: float,
            stat: str = "mean", paired: bool = False, pairing: str = "round") -> list[dict]:
    """One row per size: every algorithm's time (median over launches of :func:`figure`; None:
    declined or not run), the default's; ``paired``: the regrets are medians of launch-wise ratios
    (the series' launches line up by index), kept as ``launch_regret``/``launch_auto_regret``; with
    ``pairing`` "round" and ``stat`` "mean", where the rows carry round figures, ``regret`` and
    ``auto_regret`` are :func:`round_regret` instead (``vs``: the algorithm each is measured
    against); ``split``: :func:`split_regret`, the bench's own noise at that size, and ``noisy``:
    it exceeds the bar."""
    per = {label: [_rows_of(ln) for ln in lns] for label, lns in launches.items()}
    rows = []
    for lay in layouts:
        t, spread, rounds_of, wrong = {}, {}, {}, 0
        for algo in algos:
            label = label_of(op, algo)
            got = [d[lay.nbytes] for d in per.get(label, []) if lay.nbytes in d]
            wrong += sum(g["wrong"] for g in got)
            ran = [figure(g, stat) for g in got if g["algorithm"] == algo]
            t[algo] = statistics.median(ran) if ran else None
            spread[algo] = [round(x, 3) for x in ran]
            rounds_of[algo] = [[round(x, 3) for x in g["round_mean_us"]]
                               if g["algorithm"] == algo and g.get("round_mean_us") else None for g in got]
        auto = [d[lay.nbytes] for d in per.get("comms", []) if lay.nbytes in d]
        wrong += sum(g["wrong"] for g in auto)
        t_auto = statistics.median(figure(g, stat) for g in auto) if auto else None
        # per launch, the algorithm the default ran (launches may differ: online timing decides
        # in each launch); a launch's choice is scored against the forced runs of that launch
        chose = [(label_of(op, d[lay.nbytes]["algorithm"]), d[lay.nbytes]["algorithm"]) if lay.nbytes in d
                 else ("", None) for d in per.get("comms", [])]
        chosen = sorted({a for _, a in chose if a})
        choice = "/".join(chosen) if chosen else None
        timed = {a: v for a, v in t.items() if v is not None}
        best = min(timed, key=timed.get) if timed else None
        reg = max(timed[c] for c in chosen) / timed[best] - 1 if best and chosen and set(chosen) <= set(timed) else None
        areg = t_auto / timed[best] - 1 if best and t_auto is not None else None
        if paired and best and reg is not None:
            r = _paired_ratio(per, chose, label_of(op, best), lay.nbytes, stat, best)
            reg = None if r is None else r - 1
        if paired and best and areg is not None:
            r = _paired_ratio(per, [("comms", None)] * len(chose), label_of(op, best), lay.nbytes, stat, best)
            areg = None if r is None else r - 1
        launch_reg, launch_areg, vs, avs, by = reg, areg, None, None, "launch" if paired else "median"
        if paired and pairing == "round" and stat == "mean" and best:
            rreg, vs = round_regret(per, op, chose, timed, lay.nbytes) if reg is not None else (None, None)
            rareg, avs = round_regret(per, op, [("comms", None)] * len(chose), timed, lay.nbytes) \
                if areg is not None else (None, None)
            if (reg is None or rreg is not None) and (areg is None or rareg is not None):
                reg, areg, by = rreg, rareg, "round"
        split = split_regret(op, algos, per, lay.nbytes, stat, paired)
        rows.append({"bytes": lay.nbytes, "time_us": t, "launch_us": spread, "auto_us": t_auto, "split": split,
                     "paired_by": by, "vs": vs, "auto_vs": avs,
                     "launch_regret": launch_reg, "launch_auto_regret": launch_areg,
                     "noisy": split is not None and split > bar,
                     "auto_launch_us": [round(figure(g, stat), 3) for g in auto], "choice": choice, "best": best,
                     "round_us": rounds_of, "auto_round_us": [[round(x, 3) for x in g.get("round_mean_us") or []]
                                                              for g in auto],
                     "regret": reg, "auto_regret": areg, "over": reg is not None and reg > bar,
                     "auto_over": areg is not None and areg > bar, "wrong": wrong})
    return rows


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:+.1f}%"


def table(op: str, algos: list[str], rows: list[dict], bar: float, stat: str = "mean") -> list[str]:
    rounds = any(r.get("paired_by") == "round" for r in rows)
    cols = ["size"] + algos + ["auto", "choice", "best", "regret", "auto_regret"] + (["launch"] if rounds else []) \
        + ["split", ""]
    body = []
    for r in rows:
        cells = [cli.human_size(r["bytes"])] + [f"{r['time_us'][a]:.2f}" if r["time_us"][a] is not None else "-"
                                                for a in algos]
        flag = "<<" if r["over"] else ("(auto)" if r["auto_over"] else "")
        cells += [f"{r['auto_us']:.2f}" if r["auto_us"] is not None else "-", r["choice"] or "-", r["best"] or "-",
                  _pct(r["regret"]), _pct(r["auto_regret"])] + ([_pct(r.get("launch_regret"))] if rounds else []) \
            + [_pct(r.get("split")), flag]
        body.append(cells)
    w = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(cols)]
    fmt = lambda cs: "  ".join(c.rjust(w[i]) if i < len(cols) - 1 else c for i, c in enumerate(cs))
    how = ("regret = max over forced algorithms a of the median over rounds of t[choice] / t[a] in the same round, "
           "- 1; auto_regret the same for t[auto]; launch = the launch-paired regret, median of launch-wise "
           "t[choice] / t[best] - 1" if rounds else
           "regret = t[choice] / t[best] - 1, auto_regret = t[auto] / t[best] - 1")
    return [f"## {op}: {stat} time per op in us (slowest rank, median over launches); {how}; split = the regret "
            f"of one half of the launches' best, scored by the other half (the bench's own noise); << marks regret "
            f"> {bar * 100:g} %",
            fmt(cols).rstrip()] + [fmt(b).rstrip() for b in body]


def summary(config: str, op: str, rows: list[dict], bar: float) -> str:
    def worst(key):
        have = [r for r in rows if r[key] is not None]
        if not have:
            return "n/a"
        r = max(have, key=lambda r: r[key])
        return f"{_pct(r[key])} at {cli.human_size(r['bytes'])}"
    over = [cli.human_size(r["bytes"]) for r in rows if r["over"]]
    aover = [cli.human_size(r["bytes"]) for r in rows if r["auto_over"]]
    noisy = [cli.human_size(r["bytes"]) for r in rows if r.get("noisy")]
    return (f"# summary {config}, {op}: max regret {worst('regret')}, max auto_regret {worst('auto_regret')}; "
            f"sizes over the {bar * 100:g} % bar: {', '.join(over) or 'none'}"
            f" (auto_regret over: {', '.join(aover) or 'none'};"
            f" split over: {', '.join(noisy) or 'none'})"
            f" -> {'FAIL' if over else 'PASS'}")
