"""Launcher child: rank 1 exits 3 once every rank has written its pid; the others sleep 60 s.

argv[1] is a directory; each rank writes ``rank<R>.pid``, rank 0 also starts a ``sleep 60``
grandchild and writes ``grandchild.pid``.
"""
import os
import subprocess
import sys
import time

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
out = sys.argv[1]


def write(name, pid):
    with open(os.path.join(out, name + ".tmp"), "w") as f:
        f.write(str(pid))
    os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))


if rank == 0:
    child = subprocess.Popen(["sleep", "60"])
    write("grandchild.pid", child.pid)
write(f"rank{rank}.pid", os.getpid())
if rank == 1:
    names = [f"rank{r}.pid" for r in range(world)] + ["grandchild.pid"]
    end = time.monotonic() + 20
    while time.monotonic() < end and not all(os.path.exists(os.path.join(out, n)) for n in names):
        time.sleep(0.02)
    print("rank 1 giving up", file=sys.stderr)
    sys.exit(3)
time.sleep(60)
