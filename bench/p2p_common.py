"""What the two point-to-point benchmarks (``bench.tcp_p2p`` against iperf3, ``bench.rdma_p2p``
against fi_pingpong) share: the simulated hosts of tests/multihost.py, an entry point whose
teardown a signal cannot cut short, and the JSON document they write.

Both run on 2 simulated hosts x 1 rank, which needs root (network namespaces, veth, tc).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent


def harness():
    """tests/hostns.py and tests/multihost.py (and tests/netns.py, which they import), for every
    benchmark that builds simulated hosts (also bench.launch's ``--hosts``)."""
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import hostns
    import multihost
    return hostns, multihost


def simulated_hosts_or_reason(prog: str, tool: str, install_hint: str):
    """tests/multihost.py when the simulated hosts can be built and ``tool`` is on PATH; otherwise
    None, after printing the reason (as ``prog: ...`` on stderr)."""
    hostns, multihost = harness()
    reason = hostns.why_unavailable() or (None if shutil.which(tool) else
                                          f"{tool} is not on PATH (as root: {install_hint}, or bash .ci/setup.sh)")
    if reason:
        print(f"{prog}: {reason}", file=sys.stderr)
        return None
    return multihost


@contextlib.contextmanager
def two_hosts(multihost, args):
    """2 simulated hosts x 1 rank (``args.rate``, ``args.shaper``, ``args.cpus``: bench.cli.sim_options),
    after printing their CPUs."""
    with multihost.SimulatedHosts(hosts=2, ranks_per_host=1, rate=args.rate, cpus=args.cpus,
                                  shaper=args.shaper) as sim:
        print(f"# cpus: host0 {sim.cpus[0]}, host1 {sim.cpus[1]}; load average {os.getloadavg()[0]:.2f}", flush=True)
        yield sim


@contextlib.contextmanager
def server_on_host1(sim, argv: list[str], port: int, grace: float = 10.0):
    """Runs ``argv`` (a reference tool's server) on host1's CPUs and in its namespace, and yields once
    something listens on TCP ``port`` there; on the way out the server gets ``grace`` seconds to exit
    before its process group is killed."""
    server = subprocess.Popen(["taskset", "-c", ",".join(map(str, sim.cpus[1])), "ip", "netns", "exec", sim.netns[1],
                               *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        end = time.monotonic() + 10
        while f":{port}" not in sim.exec(1, ["ss", "-Hltn", f"sport = :{port}"]).stdout:
            if server.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"{argv[0]} server did not start: {server.communicate()[0]}")
            time.sleep(0.05)
        yield server
    finally:
        try:
            server.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait()


def write_json(path: str, schema: str, args, **fields) -> None:
    """The results document: schema, command line, options (less the hidden --worker), then ``fields``."""
    doc = {"schema": schema, "command": " ".join(sys.argv),
           "options": {k: v for k, v in vars(args).items() if k != "worker"}}
    doc.update(fields)
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")


def run_main(prog: str, main: Callable[[], int]) -> int:
    """``main()`` with SIGTERM and SIGHUP turned into KeyboardInterrupt, so that the simulated hosts'
    context managers tear everything down. Only the first signal interrupts: later ones must not cut
    the teardown short. RuntimeError exits 1, an interrupt 130."""
    stopping = []

    def terminate(signum, frame):
        if not stopping:
            stopping.append(signum)
            raise KeyboardInterrupt(f"signal {signum}")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, terminate)
    try:
        return main()
    except RuntimeError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(f"{prog}: interrupted ({e or 'SIGINT'}); the simulated hosts are torn down", file=sys.stderr)
        return 130


def machine() -> dict:
    """The machine facts each document records."""
    return {"nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "loadavg": os.getloadavg(),
            "kernel": os.uname().release}
