"""Launcher child: checks the torchrun-style environment and the launcher's TCPStore.

Every rank prints its env (and stops there with ``--no-store``), sets ``key<rank>`` in the store,
reads every other rank's key, then (with ``--pg``) runs a gloo all_reduce through ``init_process_group(init_method="env://")``.
"""
import os
import sys
from datetime import timedelta

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
print(f"env RANK={rank} WORLD_SIZE={world} LOCAL_RANK={os.environ['LOCAL_RANK']} "
      f"LOCAL_WORLD_SIZE={os.environ['LOCAL_WORLD_SIZE']} GROUP_RANK={os.environ['GROUP_RANK']} "
      f"args={sys.argv[1:]}")
print(f"to stderr from {rank}", file=sys.stderr)
if "--no-store" in sys.argv:  # quick mode: environment and output only
    sys.exit(0)
import torch.distributed as dist  # noqa: E402

store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                      timeout=timedelta(seconds=20))
store.set(f"key{rank}", f"value{rank}")
got = [store.get(f"key{r}").decode() for r in range(world)]
print("store " + ",".join(got))
if "--pg" in sys.argv:
    import torch
    dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=20))
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    print(f"allreduce {t.item():g}")
    dist.destroy_process_group()
print("no newline at end", end="")
