"""Online timing: where a selection rule names alternatives, the application's own calls choose.

A rule of the selector's grammar may name several algorithms, ``all_reduce:16K-64K:direct|rhd``.
The calibrated defaults write such rules where the timed figures of one launch could not tell the
algorithms apart (comms.tuning, :data:`comms.tuning.CONTEST`): the machine's state differs from one
launch to the next by more than that, so the launch that runs the job decides, on its own calls.
Users may write such rules too (``COMMS_ALGO``, ``set_algo``).

Contract, per plan key (collective, count, dtype, op, root, ...) whose first matching rule names
two or more alternatives that build a plan (one that declines the case drops out):

* Schedule. The key's first calls run every alternative :data:`SIZING_CALLS` times; at the next
  call one MAX all_reduce agrees on each one's time per call, which sizes its turn: about
  :data:`LEAD_S` of untimed calls, then about :data:`TIMED_S` of timed ones (:func:`turn_calls`).
  Then ``rounds`` rounds run every alternative one turn each, the order reversed every other
  round so that a drift of the machine hits each alike. The calls count whether synchronous or
  not, so every rank runs the same alternative at the same call (the ranks' calls are matched in
  order anyway). Every call computes the user's result; only the algorithm differs.
* Timing. A synchronous call is timed from entry to return; an asynchronous one is counted but
  not timed (its completion overlaps other work).
* Decision, at the key's next call: every rank contributes its mean time per round and
  alternative (``inf`` where it timed none), and one MAX all_reduce gives every rank the same
  figures, the slowest rank's (a collective ends when its slowest rank does). Over the rounds in
  which every alternative has a figure, each alternative's ratio to the first is the median of its
  per-round ratios; the lowest ratio wins if below ``1 - SWITCH``, else the first alternative
  (the rule's own pick) stays. The same figures on every rank give the same algorithm on every
  rank, kept for the communicator's life (``set_algo`` does not reset it).
* ``COMMS_ONLINE_ROUNDS=0`` turns this off: the first alternative runs. Under
  ``COMMS_DETERMINISTIC=1`` the switch does not change any result; otherwise, as with any
  change of algorithm, the last bits of a floating-point reduction may differ between the calls
  before the decision and those after (never between ranks).
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import numpy as np

from . import log as clog

log = clog.get("ALGO")

SWITCH = 0.02            # a challenger must be this much faster than the rule's pick to replace it
SIZING_CALLS = 4         # calls per alternative that size the turns (the first untimed)
LEAD_S = 0.006           # a turn starts with about this long of untimed calls (at most LEAD_MAX)...
TIMED_S = 0.004          # ...then about this long of timed ones (at least one, at most TIMED_MAX)
LEAD_MAX, TIMED_MAX = 64, 32


def turn_calls(seconds_per_call: float) -> tuple[int, int]:
    """(untimed, timed) calls of a turn of an alternative that takes ``seconds_per_call``. The
    untimed lead-in lets a link's token bucket spend the credit it gathered while a lighter
    alternative ran: on 2 simulated hosts under a 2 Gbit/s tbf (a 4 ms burst), turns of 64 calls
    of 16 KiB, all but the first timed, put recursive doubling at 0.97-1.00x hierarchical, where
    the bench's turns of 280 calls measured 1.17x."""
    t = max(seconds_per_call, 1e-7)
    return max(1, min(LEAD_MAX, math.ceil(LEAD_S / t))), max(1, min(TIMED_MAX, math.ceil(TIMED_S / t)))


class Trial:
    """One key's schedule and this rank's timings, sans-I/O: :class:`Contests` runs the calls.
    ``encs`` are the alternatives' encoded plans, each marked with this trial (``enc.trial``) while
    it lasts; ``key`` is the plan key, ``ran_key`` the communicator's (collective, bytes).

    Two schedules, one after the other: the sizing turns (:data:`SIZING_CALLS` of each
    alternative, ``sizing`` True), whose agreed times give each alternative its turn
    (:func:`turn_calls`, :meth:`plan_rounds`), then ``rounds`` rounds, each alternative one turn a
    round, the order reversed every other round."""

    def __init__(self, alts: list[str], rounds: int, encs: list | None = None, key: tuple = (),
                 ran_key: tuple = ()):
        self.alts, self.rounds, self.encs, self.key, self.ran_key = list(alts), rounds, encs or [], key, ran_key
        self.sizing = True
        self._begin([(0, alt, t > 0) for alt in range(len(self.alts)) for t in range(SIZING_CALLS)], 1)

    def _begin(self, schedule: list, rows: int) -> None:
        # per call: (round, alternative, timed)
        self.schedule, self.total, self.calls = schedule, len(schedule), 0
        self._sum = [[0.0] * len(self.alts) for _ in range(rows)]
        self._n = [[0] * len(self.alts) for _ in range(rows)]

    def plan_rounds(self, seconds_per_call) -> None:
        """Start the timed rounds, each alternative's turn sized from its agreed time per call."""
        turns = [turn_calls(float(t)) if math.isfinite(t) else (1, 1) for t in seconds_per_call]
        k = len(self.alts)
        self.sizing = False
        self._begin([(r, alt, i >= turns[alt][0])
                     for r in range(self.rounds) for alt in (range(k) if r % 2 == 0 else range(k - 1, -1, -1))
                     for i in range(sum(turns[alt]))], self.rounds)

    @property
    def done(self) -> bool:
        """Every call of the schedule has started: the next call sizes the rounds or decides."""
        return self.calls >= self.total

    def slot(self, call: int) -> tuple[int, int]:
        """(round, alternative index) of the schedule's call number ``call``."""
        return self.schedule[call][:2]

    def start(self) -> tuple[tuple[int, int], bool]:
        """The slot of the next call, counted now, and whether to time it."""
        r, alt, timed = self.schedule[self.calls]
        self.calls += 1
        return (r, alt), timed

    def record(self, slot: tuple[int, int], seconds: float) -> None:
        self._sum[slot[0]][slot[1]] += seconds
        self._n[slot[0]][slot[1]] += 1

    def figures(self) -> np.ndarray:
        """This rank's mean seconds per call, rounds x alternatives; inf where none was timed."""
        return np.array([[s / n if n else np.inf for s, n in zip(srow, nrow)]
                         for srow, nrow in zip(self._sum, self._n)], np.float64)


def decide(alts: list[str], agreed: np.ndarray) -> tuple[int, dict[str, float]]:
    """The winner's index from the agreed figures (rounds x alternatives, the slowest rank's), and
    every alternative's median ratio to the first over the rounds where all have a figure
    (an empty dict, and the first alternative, when no round does)."""
    full = [row for row in agreed if np.all(np.isfinite(row)) and row[0] > 0]
    if not full:
        return 0, {}
    ratios = {a: statistics.median(float(row[i] / row[0]) for row in full) for i, a in enumerate(alts)}
    best = min(range(len(alts)), key=lambda i: (ratios[alts[i]], i))
    return (best if ratios[alts[best]] < 1 - SWITCH else 0), ratios


class Contests:
    """A communicator's online timings: the trials in progress and the decisions, per (plan key,
    alternatives). ``agree`` is the communicator's MAX all_reduce of a float64 array, in place,
    which every rank calls at the same point; ``plans`` and ``ran`` are its plan cache (key ->
    encoded plan) and its record of the algorithm each (collective, bytes) last ran. A trial keeps
    the plan of the alternative whose turn it is in ``plans``, so the calls of a turn take the
    communicator's cached path; the communicator hands every run of a plan marked with a trial
    to :meth:`call`."""

    def __init__(self, rounds: int, agree: Callable[[np.ndarray], None], plans: dict, ran: dict):
        self.rounds = rounds
        self._agree, self._plans, self._ran = agree, plans, ran
        self._trials: dict[tuple, Trial] = {}
        self.decided: dict[tuple, tuple] = {}           # (key, alts) -> (encoded plan, ratios)

    def pick(self, key: tuple, alts: tuple, nbytes: int, ran_key: tuple, build: Callable[[str], object]):
        """The encoded plan the next call of ``key`` runs under a rule naming ``alts`` (for the
        caller to cache), or None when fewer than two alternatives build a plan (the caller plans
        as without alternatives); ``build(name)`` encodes an alternative's plan, None when it
        declines. The call after the sizing turns sizes the rounds, and the call after the rounds
        decides (one MAX all_reduce each, every rank alike)."""
        cid = (key, alts)
        got = self.decided.get(cid)
        if got is not None:
            return got[0]
        trial = self._trials.get(cid)
        if trial is None:
            names, encs = [], []
            for a in alts:
                enc = build(a)
                if enc is not None:
                    names.append(a)
                    encs.append(enc)
            if len(names) < 2 or self.rounds < 1:
                return None
            trial = self._trials[cid] = Trial(names, self.rounds, encs, key, ran_key)
            for enc in encs:
                enc.trial = trial
        if trial.done and trial.sizing:
            sized = trial.figures().ravel()
            self._agree(sized)
            trial.plan_rounds(sized)
        if not trial.done:
            return trial.encs[trial.slot(trial.calls)[1]]
        agreed = trial.figures()                        # a fresh array: agreed in place
        self._agree(agreed.ravel())
        win, ratios = decide(trial.alts, agreed)
        for enc in trial.encs:
            enc.trial = None
        del self._trials[cid]
        self.decided[cid] = (trial.encs[win], ratios)
        log.info("comms: %s of %d B: timed %s over %d rounds (time / %s's: %s) -> %s", key[0], nbytes,
                 "|".join(trial.alts), trial.rounds, trial.alts[0],
                 ", ".join(f"{a} {r:.3f}" for a, r in ratios.items()) or "none timed", trial.alts[win])
        return trial.encs[win]

    def call(self, enc, run: Callable[[], object], timeable: bool):
        """Run ``run()``, the call of ``enc``'s trial whose turn it is: counted, timed when the
        schedule says so and ``timeable`` (a synchronous call); then the plan cache gets the next
        call's alternative (or loses the key once the schedule is over, so that the next call
        decides)."""
        trial = enc.trial
        slot, timed = trial.start()
        self._ran[trial.ran_key] = enc.plan.algorithm
        if timed and timeable:
            t0 = time.perf_counter()
            out = run()
            trial.record(slot, time.perf_counter() - t0)
        else:
            out = run()
        if trial.done:
            self._plans.pop(trial.key, None)
        else:
            nxt = trial.encs[trial.slot(trial.calls)[1]]
            if nxt is not enc:
                self._plans[trial.key] = nxt
        return out

    def choices(self) -> list[dict]:
        """The decisions so far: key, alternatives, chosen algorithm, ratios to the first."""
        return [{"key": key, "alternatives": list(alts), "chosen": enc.plan.algorithm,
                 "ratios": {a: round(r, 4) for a, r in ratios.items()}}
                for (key, alts), (enc, ratios) in self.decided.items()]
