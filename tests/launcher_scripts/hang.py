"""Launcher child: writes ``rank<R>.pid`` into argv[1]; rank 1 hangs, the others exit 0."""
import os
import sys
import time

rank = int(os.environ["RANK"])
with open(os.path.join(sys.argv[1], f"rank{rank}.pid"), "w") as f:
    f.write(str(os.getpid()))
if rank == 1:
    print("rank 1 hanging", flush=True)
    time.sleep(600)
print(f"rank {rank} done")
