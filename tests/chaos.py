"""Chaos: ranks are killed, stopped or cut off while they run checksummed collectives; the survivors
detect it, shrink, check and go on, and replacements join back.

    python tests/chaos.py --ranks 4 --rounds 100 [--seed S] [--json FILE]
    python tests/chaos.py --hosts 2 --ranks-per-host 2 --rounds 20      (simulated hosts, root only)
        [--cpus shared|split] [--rate 2gbit [--shaper tbf|htb]]

The supervisor (this module's ``main``) hosts the store and starts the ranks; they run the mixed
collectives of bench.mixed (all_reduce, all_gather, broadcast, reduce_scatter, all_to_all) without
pause, each result checked whole against its exact reference. Each round the supervisor publishes
the round's plan, waits until every member runs, lets them run 50-300 ms more, then hits one member
at random: ``kill`` (SIGKILL) or ``stop`` (SIGSTOP; once the survivors reported, SIGKILL), or, with
simulated hosts, ``cut`` (a host's link down: the other host's ranks are the survivors, the cut
host's ranks must end with an error, and are killed if they do not within seconds). The survivors
catch comms.PeerError, ``shrink()``, agree on the next operation (bench.mixed.agree) and report. A
round whose failure leaves 2 ranks or fewer (a third failure would leave one), and every 10th round,
then grows the group back to full size: the members call ``grow()`` after the shrink, and the
replacements, which the supervisor started with the round (after the link is back, for a cut), wait
in ``comms.join()`` for it.

Summary (one JSON line, and --json): rounds survived of N, detection time (median, max: from the
supervisor's signal to each survivor's PeerError, both time.time() of this machine), wrong results
(must be 0), operations checked, and leaks once every process ended: comms' /dev/shm segments of our
ranks, the supervisor's open fds against the start, and leftover processes. Exit 0 when all is well.
The supervisor itself (rounds, leak checks) is tests/chaos_supervisor.py.
"""
from __future__ import annotations

import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]     # bench.mixed; chaos_supervisor


def _store(timeout: float):
    from datetime import timedelta
    from torch.distributed import TCPStore
    return TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                    timeout=timedelta(seconds=timeout))


def worker() -> int:
    """One rank: CHAOS_WID names it for the supervisor; CHAOS_JOIN=r makes it a replacement that
    joins at the end of round r."""
    import comms
    from bench.mixed import agree, run_op
    timeout = float(os.environ.get("CHAOS_TIMEOUT", "60"))
    wid = os.environ["CHAOS_WID"]
    store = _store(timeout)
    joined = os.environ.get("CHAOS_JOIN")
    k = ops = 0
    wrong: list = []
    recoveries = 0
    if joined is None:
        comm, r, done = comms.init(timeout=timeout), 0, False
    else:                                            # the members grow at the end of round `joined`
        comm, r = comms.join(timeout=timeout), int(joined) + 1
        done = json.loads(store.get(f"chaos/plan/{joined}"))["last"]
    k = agree(comm, 0)
    while not done:
        plan = json.loads(store.get(f"chaos/plan/{r}"))
        store.add(f"chaos/ready/{r}", 1)
        try:
            while True:                              # until a member fails
                ok, op = run_op(comm, k)
                ops += 1
                if not ok:                       # told at once: a victim's own report would die with it
                    wrong.append((r, k, op))
                    store.set(f"chaos/wrong/{store.add('chaos/wrong', 1)}", json.dumps([int(wid), r, k, op]))
                    print(f"chaos[{wid}]: WRONG result of op {k} ({op}) in round {r}", file=sys.stderr, flush=True)
                k += 1
        except comms.PeerError as e:
            t_err = time.time()
            failed = sorted(e.failed)
        old, comm = comm, comm.shrink()
        old.close()
        recoveries += 1
        k = agree(comm, k + 1)
        store.set(f"chaos/det/{r}/{wid}", json.dumps({"t": t_err, "failed": failed, "size": comm.size,
                                                      "ops": ops, "wrong": len(wrong)}))
        if plan["grow"]:
            grown = comm.grow(count=plan["grow"])
            if grown is not comm:
                comm.close()
                comm = grown
            k = agree(comm, k)
        done, r = plan["last"], r + 1
    store.set(f"chaos/final/{wid}", json.dumps({"ops": ops, "wrong": wrong, "recoveries": recoveries,
                                                "size": comm.size}))
    comm.close()
    return 0


if __name__ == "__main__":
    if os.environ.get("CHAOS_WID") is not None:
        sys.exit(worker())
    from chaos_supervisor import main
    sys.exit(main())
