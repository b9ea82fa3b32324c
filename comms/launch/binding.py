"""CPU binding of local ranks, as ``mpirun --bind-to core`` does: one core per rank.

Two ranks that the scheduler moves between cores (or stacks on one core for a while) lose their
caches and wait for each other's time slices; on a 2-core machine that costs a shm all_reduce 30 to
40 % and makes its time swing from launch to launch. Binding each rank to a core of its own keeps
both in their caches and the timing stable.

Contract:

* ``plan(nproc, mode, cpus=None)`` returns, per local rank, the set of CPUs it is bound to, or None
  when it is left unbound. ``cpus`` defaults to the caller's affinity (``os.sched_getaffinity``), so
  a launcher that was itself started under ``taskset`` or a cgroup cpuset binds inside that set.
* ``mode`` (``COMMS_BIND``, or ``comms.run --bind``):
  - ``none``: no rank is bound;
  - ``core``: rank i gets CPU ``order[i % len(order)]`` (several ranks share a CPU when there are
    more ranks than CPUs);
  - ``auto`` (default): ``core``. With more ranks than CPUs that spreads them evenly (rank i on
    CPU i mod n): left to the scheduler, 4 ranks on 2 CPUs were often stacked 3 and 1, most of all
    while their control-plane threads woke (an 8 B all_reduce's median per 1000 calls swung
    between 7.4 and 17 us; bound, it held 7.4-7.6 us; ``python -m bench -np 4 -b 8 -e 8``, numpy
    calls, two runs of 5 launches: 11.7 and 11.8 us unbound, 9.8 and 8.1 us bound, MPI 10.5 and
    7.9 us).
* ``order`` lists the CPUs so that distinct physical cores come before their SMT siblings, and
  within that by package then core id (``/sys/devices/system/cpu/cpuN/topology``): two ranks on a
  hyperthreaded machine land on two cores, not on the two threads of one core. Without that sysfs
  information the CPUs keep their numeric order.
* ``apply(pid, cpus)`` binds a process that has not started threads yet (a freshly started child):
  its later threads inherit the set. It never raises: binding is an optimisation, and a failure
  (a CPU taken offline since, a restricted container) leaves the process where it was.
"""
from __future__ import annotations

import os
from pathlib import Path

MODES = ("auto", "core", "none")
_SYS = Path("/sys/devices/system/cpu")


def _topology(cpu: int) -> tuple[int, int, int] | None:
    """(package, core id, position among the core's SMT siblings) of ``cpu``, None when unknown."""
    top = _SYS / f"cpu{cpu}" / "topology"
    try:
        pkg = int((top / "physical_package_id").read_text())
        core = int((top / "core_id").read_text())
        siblings = _parse_list((top / "thread_siblings_list").read_text())
    except (OSError, ValueError):
        return None
    return pkg, core, sorted(siblings).index(cpu) if cpu in siblings else 0


def _parse_list(text: str) -> set[int]:
    """A sysfs CPU list such as ``0-3,8,10-11``."""
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def order(cpus) -> list[int]:
    """``cpus`` ordered physical cores first, then their SMT siblings (see the module docstring)."""
    cpus = sorted(cpus)
    tops = {c: _topology(c) for c in cpus}
    if any(t is None for t in tops.values()):
        return cpus
    return sorted(cpus, key=lambda c: (tops[c][2], tops[c][0], tops[c][1], c))


def plan(nproc: int, mode: str = "auto", cpus=None) -> list[set[int] | None]:
    """The CPU set of each of ``nproc`` local ranks (None: unbound) under ``mode``."""
    if mode not in MODES:
        raise ValueError(f"CPU binding {mode!r}: must be one of {', '.join(MODES)}")
    avail = order(os.sched_getaffinity(0) if cpus is None else cpus)
    if mode == "none" or not avail:
        return [None] * nproc
    return [{avail[i % len(avail)]} for i in range(nproc)]


def apply(pid: int, cpus: set[int] | None) -> bool:
    """Bind process ``pid`` to ``cpus`` (None: leave it); True when it is bound."""
    if cpus is None:
        return False
    try:
        os.sched_setaffinity(pid, cpus)
    except OSError:
        return False
    return True


def describe(bound: list[set[int] | None]) -> str:
    """``rank 0: cpu 0, rank 1: cpu 1`` or ``unbound``, for logs."""
    if all(b is None for b in bound):
        return "unbound"
    return ", ".join(f"rank {r}: cpu {','.join(map(str, sorted(b)))}" if b else f"rank {r}: unbound"
                     for r, b in enumerate(bound))
