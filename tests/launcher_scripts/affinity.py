"""Launcher child: prints the CPUs this rank may run on (its main thread and a thread it starts
later) and COMMS_BOUND_CPUS, as ``affinity rank=R cpus=0,1 thread=0,1 bound=0``."""
import os
import threading

seen = {}
t = threading.Thread(target=lambda: seen.update(cpus=sorted(os.sched_getaffinity(0))))
t.start()
t.join()
print(f"affinity rank={os.environ['RANK']} cpus={','.join(map(str, sorted(os.sched_getaffinity(0))))} "
      f"thread={','.join(map(str, seen['cpus']))} bound={os.environ.get('COMMS_BOUND_CPUS', '?')}")
