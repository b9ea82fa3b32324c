"""Timing of alternatives, the one mechanism behind online choices and ``python -m comms.tune``.

Where a rule names several (``all_reduce:16K-64K:direct|rhd``) and COMMS_ONLINE_ROUNDS > 0 (opt-in), a plan
key's calls run rounds of one :func:`turn_calls`-sized turn per alternative, the order reversed every other
round, all ranks alike, each call computing the user's result. A MAX all_reduce agrees on the slowest rank's
figures, and :func:`decide` picks for the communicator's life (a float sum's last bits may change then).
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import numpy as np

from ..diag import log as clog

log = clog.get("ALGO")

SWITCH = 0.02            # a challenger must be this much faster than the rule's pick to replace it (the median of
#                          paired ratios over rounds): below every margin the regret bar cares about (10 %); ties stay
LEAD_S = 0.006           # about this long of untimed calls starts a turn (turn_calls: a 4 ms tbf burst must drain)...
TIMED_S = 0.004          # ...then about this long of timed ones: 4 ms is 4 scheduler ticks here, so a
#                          rank descheduled once shows in the mean as it does in a job
LEAD_MAX, TIMED_MAX = 64, 32     # the calls of a turn at 8 B (1-5 us a call) stay under 0.5 ms


def turn_calls(seconds_per_call: float, scale: float = 1.0) -> tuple[int, int]:
    """(untimed, timed) calls of a turn of an alternative priced ``seconds_per_call``, each at least
    one; ``scale`` (COMMS_ONLINE_TURN_MS / 10) stretches turn and caps. The untimed lead-in spends the
    credit a token bucket gathered while a lighter alternative ran: on 2 simulated hosts (2 Gbit/s tbf,
    4 ms burst), turns of 64 calls of 16 KiB, all timed but the first, put recursive doubling at
    0.97-1.00x hierarchical where the bench's turns of 280 calls measured 1.17x."""
    t = max(seconds_per_call, 1e-7) / scale
    return (max(1, int(min(LEAD_MAX * scale, math.ceil(LEAD_S / t)))),
            max(1, int(min(TIMED_MAX * scale, math.ceil(TIMED_S / t)))))


class Trial:
    """One key's turns, (round, alternative, untimed calls, timed calls), and this rank's timings. It keeps
    ``plans[key]`` the plan whose turn it is (dropped after the last, so the next call reaches :meth:`Contests.pick`)
    and ``ran[ran_key]`` the last call's algorithm; the communicator brackets calls with :meth:`begin`/:meth:`end`."""

    def __init__(self, alts: list[str], seconds: list[float], rounds: int, encs: list | None = None, key: tuple = (),
                 ran_key: tuple = (), plans: dict | None = None, ran: dict | None = None, scale: float = 1.0):
        self.alts, self.encs, self.key, self.ran_key = list(alts), encs or [], key, ran_key
        self._plans, self._ran = {} if plans is None else plans, {} if ran is None else ran
        turns, k = [turn_calls(s, scale) for s in seconds], list(range(len(alts)))
        self.schedule = [(r, a, *turns[a]) for r in range(rounds) for a in (k if r % 2 == 0 else k[::-1])]
        self._fig = np.full((rounds, len(alts)), np.inf)         # mean seconds a call; one turn a cell
        self.turn, self.done, self._algo = -1, False, None
        self._next_turn()

    def _next_turn(self) -> None:
        self.turn += 1
        if self.turn >= len(self.schedule):
            self.done = True
            self._plans.pop(self.key, None)
            return
        self.row, self.alt, self.lead, self.timed = self.schedule[self.turn]
        self._stretch, self._t0, self._sync = self.timed, 0.0, False
        if self.encs:
            self._plans[self.key] = self.encs[self.alt]
            self._algo = self.encs[self.alt].plan.algorithm

    def begin(self, timeable: bool) -> float:
        """Count a call; returns its stretch's start (0.0 in the lead-in). The timed calls are one stretch, first
        start to last return, so time between calls counts as in a job (4 ranks on 2 cores, 8 KiB: timing calls
        alone put recursive doubling at 0.99x direct, the bench's loops at 0.71x); one with an async call is not."""
        self._ran[self.ran_key] = self._algo
        if self.lead:
            self.lead -= 1
            return 0.0
        if self.timed == self._stretch:
            self._t0, self._sync = time.perf_counter(), True
        self._sync = self._sync and timeable
        self.timed -= 1
        return self._t0

    def end(self, t0: float) -> None:
        """A call begun at ``t0`` (:meth:`begin`) returned; the turn's last records its stretch and moves on."""
        if not (self.lead or self.timed):
            if t0 and self._sync:
                self._fig[self.row, self.alt] = (time.perf_counter() - t0) / self._stretch
            self._next_turn()

    def figures(self) -> np.ndarray:
        """This rank's mean seconds per call, rounds x alternatives; inf where none was timed."""
        return self._fig.copy()


def decide(alts: list[str], agreed: np.ndarray) -> tuple[int, dict[str, float]]:
    """The winner's index from the agreed figures (rounds x alternatives), and each alternative's median ratio to
    the first over the rounds both timed. Over the rounds all timed, the lowest wins if more than SWITCH below 1."""
    def median_ratio(i: int, rows) -> float | None:
        got = [float(row[i] / row[0]) for row in rows if np.isfinite(row[[0, i]]).all() and row[0] > 0]
        return statistics.median(got) if got else None
    ratios = {a: r for i, a in enumerate(alts) if (r := median_ratio(i, agreed)) is not None}
    full = [row for row in agreed if np.isfinite(row).all()]
    med = [median_ratio(i, full) for i in range(len(alts))]
    if med[0] is None:
        return 0, ratios
    best = med.index(min(med))
    return (best if med[best] < 1 - SWITCH else 0), ratios


class Contests:
    """A communicator's trials and decisions per (plan key, alternatives); ``agree``: its MAX all_reduce in place."""

    def __init__(self, rounds: int, agree: Callable[[np.ndarray], None], plans: dict, ran: dict, turn_ms: float):
        self.rounds, self.scale = rounds, turn_ms / (1e3 * (LEAD_S + TIMED_S))
        self._agree, self._plans, self._ran = agree, plans, ran
        self._trials, self.decided = {}, {}        # (key, alts) -> Trial in progress; -> (encoded plan, ratios)

    def pick(self, key: tuple, alts: tuple, nbytes: int, ran_key: tuple, build: Callable[[str], object],
             seconds: Callable[[str], float]):
        """The plan the next call of ``key`` runs under a rule naming ``alts`` (``build(name)``: None where it declines;
        ``seconds(name)``: its price), None where fewer than two build. After the last turn: agree and decide."""
        cid = (key, alts)
        if cid in self.decided:
            return self.decided[cid][0]
        trial = self._trials.get(cid)
        if trial is None:
            built = {a: enc for a in alts if (enc := build(a)) is not None}
            if len(built) < 2 or self.rounds < 1:
                return None
            trial = self._trials[cid] = Trial(list(built), [seconds(a) for a in built], self.rounds,
                                                list(built.values()), key, ran_key, self._plans, self._ran, self.scale)
            for enc in trial.encs:
                enc.trial = trial
        if not trial.done:
            return trial.encs[trial.alt]
        figures = trial.figures()
        self._agree(figures.ravel())
        win, ratios = decide(trial.alts, figures)
        for enc in trial.encs:
            enc.trial = None
        del self._trials[cid]
        self.decided[cid] = (trial.encs[win], ratios)
        log.info("comms: %s of %d B: timed %s over %d rounds (time / %s's: %s) -> %s", key[0], nbytes,
                 "|".join(trial.alts), self.rounds, trial.alts[0],
                 ", ".join(f"{a} {r:.3f}" for a, r in ratios.items()) or "none timed", trial.alts[win])
        return trial.encs[win]

    def choices(self) -> list[dict]:
        """The decisions so far: key, alternatives, chosen algorithm, ratios to the first."""
        return [{"key": key, "alternatives": list(alts), "chosen": enc.plan.algorithm,
                 "ratios": {a: round(r, 4) for a, r in ratios.items()}}
                for (key, alts), (enc, ratios) in self.decided.items()]
