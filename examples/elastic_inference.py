"""A data-parallel inference loop that keeps serving when a replica dies, and takes a replacement back.

    python examples/elastic_inference.py --replicas 4 --kill-rank 2 --kill-at 10

The supervisor (this module's ``main``, standing in for an elastic agent) hosts the store and
starts the replicas. Each step, every replica serves its share of a batch of requests with its
copy of the model (a matrix product here) and the replicas all_gather what they served. Then:

* replica ``--kill-rank`` kills itself with SIGKILL at step ``--kill-at`` (a crash);
* the survivors' next call raises PeerError within about a second (the control plane); they
  ``shrink()`` and go on serving, the batch now split over one replica fewer, the unfinished step
  served again;
* the supervisor sees the process exit and starts a replacement, which calls ``comms.join()``;
* at the end of each step the group calls ``grow()``, which brings in whoever waits; rank 0 then
  sends the model and the step to the newcomer (``sync``), and the group serves at full size.

Each replica prints one JSON line at the end; the supervisor prints the summary: steps served, the
group sizes seen, and whether every answer matched the reference.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

DIM = 64


def _requests(step: int, batch: int) -> np.ndarray:
    return np.random.default_rng(step).standard_normal((batch, DIM)).astype(np.float32)


def _sync(comm, model: np.ndarray, step: int) -> int:
    """After a membership change: every replica gets rank 0's model; the group resumes at the
    earliest step any replica has not finished."""
    comm.broadcast(model, root=0)
    s = np.array([step], np.int64)
    comm.all_reduce(s, op="min")
    return int(s[0])


def worker(args) -> None:
    import comms
    joining = os.environ.get("COMMS_EXAMPLE_JOIN") == "1"
    comm = comms.join(timeout=60) if joining else comms.init(timeout=60)
    model = np.zeros((DIM, DIM), np.float32)
    if comm.rank == 0 and not joining:
        model[:] = np.random.default_rng(0).standard_normal((DIM, DIM)).astype(np.float32)
    step = _sync(comm, model, 0 if not joining else 1 << 62)
    sizes, served, correct, recoveries = [comm.size], 0, True, 0
    reference = np.random.default_rng(0).standard_normal((DIM, DIM)).astype(np.float32)
    while step < args.steps or (comm.size < args.replicas and step < args.steps * 20):
        try:
            if step == args.kill_at and os.environ.get("RANK") == str(args.kill_rank) and not joining:
                os.kill(os.getpid(), signal.SIGKILL)
            batch = _requests(step, args.batch)
            mine = batch[comm.rank::comm.size]
            answers = mine @ model.T                   # this replica's share of the batch
            time.sleep(args.step_ms / 1e3)             # the rest of the serving work
            counts = np.zeros(comm.size, np.int64)
            comm.all_gather(counts, np.array([len(answers)], np.int64))
            correct &= bool(np.array_equal(answers, mine @ reference.T)) and int(counts.sum()) == args.batch
            served += len(answers)
            step += 1
            grown = comm.grow()                        # a newcomer starts here, after its join
            if grown is not comm:
                comm.close()
                comm = grown
                step = _sync(comm, model, step)
                sizes.append(comm.size)
        except comms.PeerError as e:
            print(f"replica {comm.rank}: {e}", file=sys.stderr, flush=True)
            old, comm = comm, comm.shrink()
            old.close()
            recoveries += 1
            step = _sync(comm, model, step)
            sizes.append(comm.size)
    print(json.dumps({"rank": comm.rank, "size": comm.size, "steps": step, "served": served, "sizes": sizes,
                      "recoveries": recoveries, "correct": correct, "joined": joining}), flush=True)
    comm.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--step-ms", type=float, default=20.0)
    p.add_argument("--kill-rank", type=int, default=2)
    p.add_argument("--kill-at", type=int, default=10)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    from torch.distributed import TCPStore
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    env = dict(os.environ, WORLD_SIZE=str(args.replicas), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port),
               TORCHELASTIC_USE_AGENT_STORE="True")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", *(argv or sys.argv[1:])]
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r)), stdout=subprocess.PIPE, text=True)
             for r in range(args.replicas)]
    replaced = False
    deadline = time.monotonic() + 300
    try:
        while any(pr.poll() is None for pr in procs) and time.monotonic() < deadline:
            dead = [pr for pr in procs if pr.poll() is not None and pr.returncode < 0]
            if dead and not replaced:                 # an elastic agent's job: start a replacement
                print(f"supervisor: a replica died ({signal.Signals(-dead[0].returncode).name}); starting a "
                      "replacement", flush=True)
                procs.append(subprocess.Popen(cmd, env=dict(env, COMMS_EXAMPLE_JOIN="1"), stdout=subprocess.PIPE,
                                              text=True))
                replaced = True
            time.sleep(0.05)
    finally:
        for pr in procs:
            if pr.poll() is None:
                pr.kill()
    print("supervisor: exit codes", [pr.returncode for pr in procs], flush=True)
    reports = [json.loads(line) for pr in procs for line in pr.stdout.read().splitlines() if line.startswith("{")]
    summary = {"replicas": args.replicas, "replaced": replaced, "reports": len(reports),
               "final_size": max((r["size"] for r in reports), default=0),
               "steps": min((r["steps"] for r in reports), default=0),
               "sizes_seen": sorted({s for r in reports for s in r["sizes"]}),
               "all_correct": all(r["correct"] for r in reports)}
    print(json.dumps(summary), flush=True)
    ok = summary["all_correct"] and summary["final_size"] == args.replicas and summary["steps"] >= args.steps
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
