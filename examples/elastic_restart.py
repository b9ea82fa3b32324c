"""Elastic restart under torchrun: a failed worker restarts the whole group, which re-initialises
and continues from its last checkpoint.

    torchrun --standalone --nproc-per-node 4 --max-restarts 3 --monitor-interval 0.5 \\
        examples/elastic_restart.py --steps 50 --checkpoint /tmp/ckpt.json

Each step, the workers all_reduce their gradients (here: a vector of their rank) through the
torch.distributed backend "comms", and rank 0 writes the step and the running sum to the
checkpoint. With ``--crash-at N``, rank 1 of the first attempt kills itself with SIGKILL at step
N. The survivors' next collective raises within about a second (the control plane), they exit
with an error, torchrun's agent sees the group failed, stops it and starts every worker again
(TORCHELASTIC_RESTART_COUNT counts the attempts). The new workers call init_process_group again,
which uses a fresh key space of the agent's store per attempt, load the checkpoint, and go on.
At the end rank 0 prints one JSON line: steps done, attempts, and whether the sum is right.
"""
from __future__ import annotations

import argparse
import json
import os
import signal

import torch
import torch.distributed as dist

import comms  # noqa: F401  (registers the "comms" backend)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--crash-at", type=int, default=-1)
    args = p.parse_args()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    dist.init_process_group("comms")
    rank, size = dist.get_rank(), dist.get_world_size()
    state = {"step": 0, "total": 0.0}
    if os.path.exists(args.checkpoint):
        with open(args.checkpoint) as f:
            state = json.load(f)
    while state["step"] < args.steps:
        if state["step"] == args.crash_at and rank == 1 and attempt == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        grad = torch.full((1024,), float(rank))
        dist.all_reduce(grad)
        state = {"step": state["step"] + 1, "total": state["total"] + float(grad[0])}
        if rank == 0:
            tmp = args.checkpoint + ".tmp"
            with open(tmp, "w") as f:
                json.dump(state, f)
            os.replace(tmp, args.checkpoint)          # a crash never leaves half a checkpoint
        dist.barrier()
    expected = args.steps * size * (size - 1) / 2
    if rank == 0:
        print(json.dumps({"steps": state["step"], "attempt": attempt, "correct": state["total"] == expected}),
              flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
