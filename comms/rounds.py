"""How the timed candidates' rounds are sized and judged (comms.autotune runs them).

A probe (one collective at one size) is timed in rounds; in each round every contender runs one
turn of back-to-back calls (:func:`reps` of them, after :func:`lead` untimed ones, and
:func:`settle_calls` more where the ranks were just moved to other CPUs). :func:`figures` turns
the rounds into one price per algorithm, paired round by round; :func:`contenders` narrows the
algorithms still worth a turn as the rounds add up; :func:`doubtful` says which algorithms'
order at a probe is still in doubt once the sweeps are done. Everything here is pure: the same
figures give the same answers on every rank, which is what keeps the ranks' calls matched.
"""
from __future__ import annotations

import math

import numpy as np

DROP_RATIO = {2: 1.5, 3: 1.35, 4: 1.25}          # after r rounds, one this far behind the fastest
                                                 # (paired) is no contender there (the last entry from then on)
CLOSE = 1.15                                     # contenders this close to the fastest are in doubt
PRUNE_RATIO = 3.0                                # a neighbour's winner this close is in doubt too
ROUND_S = 0.025                                  # a timed turn lasts about this long...
ROUND_CALLS = 1000                               # ...in at most this many calls, and at least MIN_CALLS
MIN_CALLS = 2
SETTLE_S = 0.03                                  # untimed calls after the ranks moved CPUs
LEAD_S = 0.006                                   # untimed calls that start a turn: about this long,
                                                 # and at most a quarter of the turn's timed calls


def reps(call_s: float) -> int:
    """Back-to-back calls per timed turn for a call of about ``call_s`` seconds (the slowest
    rank's latest time per call, so every rank runs the same count): turns of :data:`ROUND_S`, as the
    bench's (about 30 ms a variant a round). Short bursts after a barrier are not what a job sees:
    on 4 ranks sharing 2 cores a 64 KiB ring took 53 us a call over its first 32 calls and 60-74 us
    from then on, while rhd stayed at 35-43 us, so 4 ms turns priced the ring 1.22x rhd where the
    bench measures 1.4x. A link can also let a short burst through faster than it sustains (a token
    bucket, a switch buffer): 4 ms turns of 256 KiB on 2 hosts at 2 Gbit/s (a tc bucket of 1 MB)
    priced ring under tree, which sustained 1.6x faster. Fast calls stop at :data:`ROUND_CALLS`
    (5 ms of 5 us calls on 2 ranks with cores of their own): a thousand calls are far past the
    start of a turn, and the probes of small sizes would otherwise take most of the budget."""
    return max(MIN_CALLS, min(ROUND_CALLS, int(ROUND_S / max(call_s, 1e-9))))


def settle_calls(call_s: float) -> int:
    """Untimed calls, about :data:`SETTLE_S` of them (at least one, at most :data:`ROUND_CALLS`), that
    run before the first timed turn after the ranks were moved to other CPUs
    (comms.autotune._placements). The first turn after a move ran slow. Over ten calibrations on 4
    ranks sharing 2 CPUs, whose confirming rounds (comms.autotune._confirm) each moved the ranks
    and flipped the order of the turns, direct timed 1.17x rhd (geometric mean over rounds) where
    its turn came first and 0.84x where it came second; in the sweeps' rounds, which move the ranks
    once a sweep, 1.00x and 1.04x. The lead-in of a turn (:func:`lead`, 6 ms) is too short to
    absorb it. With this settling (and one move per confirming round), ten calibrations more gave
    0.97x and 1.05x."""
    return max(1, min(ROUND_CALLS, int(SETTLE_S / max(call_s, 1e-9))))


def lead(call_s: float) -> int:
    """Untimed calls that start a turn, after its barrier: about :data:`LEAD_S` of them, at most a
    quarter of :func:`reps`, at least one (which also builds the forced plan). A turn is timed from
    where the link and the ranks run as they do in the middle of a job, not from a rest: a token
    bucket (a tc tbf of 1 MB on 2 hosts at 2 Gbit/s; a NIC's or a switch's buffers) lets the first
    megabyte through at wire speed, and an algorithm that sends more than the link sustains ran its
    first ~5 ms of a turn that much faster. Timed from the barrier, a 16 KiB all_reduce on
    2 hosts x 2 ranks priced recursive doubling at 122 us and hierarchical at 125 us a call; timed
    from 6 ms on, 139 and 125 us, as the bench's 132 and 114 us ranked them."""
    return max(1, min(reps(call_s) // 4, math.ceil(LEAD_S / max(call_s, 1e-9))))


def figures(means: dict) -> dict:
    """{algo: µs per call} from {algo: [the slowest rank's mean µs per call in each round, None
    where it was not timed]}, the algorithms' turns interleaved round by round (a list may also
    stop early: no more rounds). Paired: the fastest by mean of those timed in the most rounds is
    the reference, and every other one is priced at the reference's mean times the median over rounds
    of its ratio to the reference in the same round. A round's mean keeps the stalls of its ~25 ms (what a job pays);
    the pairing keeps out what this VM does over seconds: it moves between states that last 2 to 5 s
    (an 8 MiB all_reduce on 2 ranks took 0.7 ms, then 7 ms, both ranks at 100 % on cores of their
    own), and a state change in the middle of a probe lands on some algorithms' turns and not
    others', which means over the rounds pool into the ranking; two turns of one round sit within a
    fraction of a second."""
    ran = {a: [x for x in v if x is not None] for a, v in means.items()}
    fig = {a: float(np.mean(v)) for a, v in ran.items() if v}
    if len(fig) < 2:
        return fig
    most = max(len(ran[a]) for a in fig)
    ref = min((a for a in fig if len(ran[a]) == most), key=fig.get)      # of those timed in the most rounds
    out = {}
    for a in fig:
        ratios = [x / y for x, y in zip(means[a], means[ref]) if x is not None and y is not None and x > 0 and y > 0]
        out[a] = fig[ref] * float(np.median(ratios)) if ratios else fig[a]
    return out


def contenders(means: dict, alive: list, rounds: int) -> list:
    """The algorithms of ``alive`` still worth timing at this probe after ``rounds`` rounds: within
    ``DROP_RATIO[rounds]`` (the last entry past it) of the fastest by :func:`figures` over the
    rounds so far, their order kept. The bar tightens as the rounds add up: a close contender gets
    every round, one far behind stops costing turns (it keeps the figure of the rounds it ran)."""
    fig = figures({a: means[a] for a in alive})
    if not fig:
        return list(alive)
    best = min(fig.values())
    ratio = DROP_RATIO.get(rounds, DROP_RATIO[max(DROP_RATIO)] if rounds > max(DROP_RATIO) else math.inf)
    return [a for a in alive if fig[a] <= ratio * best]


def doubtful(figs: list[dict], i: int) -> list:
    """The algorithms whose order at probe ``i`` is in doubt, given every probe's figures: those
    within :data:`CLOSE` of the fastest, and the fastest of a neighbouring probe where it is within
    :data:`DROP_RATIO` (first entry) here, or within :data:`PRUNE_RATIO` where both neighbours'
    fastest is that one algorithm; empty when fewer than two.

    A probe whose winner differs from both neighbours' common winner is most often a spell of the
    machine that hit the neighbours' winner in its first rounds here, and then dropped it from the
    rounds after (4 ranks on 2 CPUs, 256 B: direct timed 50.5 us between 23.4 us at 128 B and
    22.6 us at 512 B, 1.64x rhd's 30.8 us, and the rules gave 256 B to rhd, which the bench measured
    22 % behind direct)."""
    fig = figs[i]
    if len(fig) < 2:
        return []
    best = min(fig.values())
    out = [a for a in fig if fig[a] <= CLOSE * best]
    winners = [min(figs[j], key=figs[j].get) for j in (i - 1, i + 1) if 0 <= j < len(figs) and figs[j]]
    both = winners[0] if len(winners) == 2 and winners[0] == winners[1] else None
    for w in winners:
        cap = PRUNE_RATIO if w == both else DROP_RATIO[min(DROP_RATIO)]
        if w in fig and w not in out and fig[w] <= cap * best:
            out.append(w)
    return out if len(out) > 1 else []
