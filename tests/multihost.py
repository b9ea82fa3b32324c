"""Simulate several hosts on one Linux machine (root only), and run torchrun jobs across them.

    from multihost import SimulatedHosts
    with SimulatedHosts(hosts=2, ranks_per_host=2, rate="2gbit") as sim:
        results = sim.torchrun("script.py", "arg")           # one torchrun agent per host
        assert all(r.ok for r in results), sim.report(results)

    python tests/multihost.py --hosts 2 --ranks 2 [--rate 2gbit] [--timeout S] [--rdzv c10d] -- script.py args...

The hosts themselves (network, IPC, mount and UTS namespaces, CPUs, rate limits, teardown) are built by
:class:`hostns.HostNamespaces` (tests/hostns.py), which :class:`SimulatedHosts` extends with running
jobs across them.

One agent per host starts that host's ranks: ``torchrun --nnodes H --nproc-per-node M --node-rank i
--master-addr 10.99.0.1 --master-port P`` (static rendezvous), or with ``rdzv="c10d"``
``--rdzv-backend c10d --rdzv-endpoint 10.99.0.1:P --rdzv-id ID``. Every output line is collected
(and, with ``echo``, printed) prefixed with ``[host<i>]``; each host's exit code and output are
returned. When a host fails the others get ``fail_grace`` seconds, then are killed.

:func:`main` is the command line above: it builds the hosts, runs the script (or, with ``--raw``, any
command) on every host and exits 0 when every host did.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from hostns import HostNamespaces, why_unavailable
from netns import HarnessError, kill_processes

_SCRUB = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
          "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE",
          "TORCHELASTIC_RUN_ID", "COMMS_HOST_ID", "COMMS_SOCKET_ADDR")


@dataclass
class HostResult:
    host: int
    returncode: int | None
    output: str
    timed_out: bool = False
    killed: bool = False          # killed by the harness (timeout, or another host failed)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def lines(self) -> list[str]:
        """Output lines without the ``[host<i>] `` prefix."""
        tag = f"[host{self.host}] "
        return [ln[len(tag):] if ln.startswith(tag) else ln for ln in self.output.splitlines()]


class SimulatedHosts(HostNamespaces):
    """``hosts`` simulated hosts with ``ranks_per_host`` ranks each (see the module docstring), and the
    jobs run across them: one agent per host (:meth:`run`, :meth:`torchrun`)."""

    # -- running things ------------------------------------------------------------------------
    def _env(self, i: int, extra: dict | None) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in _SCRUB and not k.startswith("TORCHELASTIC_")}
        env.update(PYTHONUNBUFFERED="1", CMH_HOST=str(i), CMH_HOSTS=str(self.hosts),
                   CMH_RANKS_PER_HOST=str(self.ranks_per_host))
        if self.delay_us:
            env["COMMS_TCP_DELAY_US"] = f"{self.delay_us:g}"
        env.update({k: str(v) for k, v in (extra or {}).items()})
        return env

    def run(self, commands: list[list[str]], timeout: float = 120, env: dict | None = None,
            fail_grace: float = 15.0) -> list[HostResult]:
        """Run ``commands[i]`` as host i's agent (in its namespaces), wait for all of them and
        return each host's result. Past ``timeout`` everything is killed (``timed_out``); after a
        host fails, the others get ``fail_grace`` seconds. Processes an earlier run() left in the
        hosts (daemons) are killed first. ``env`` adds to (and overrides) this process's environment,
        from which RANK, MASTER_ADDR, COMMS_HOST_ID and the like are removed."""
        if self.rundir is None:
            raise HarnessError("SimulatedHosts.run() outside the with-block")
        if len(commands) != self.hosts:
            raise ValueError(f"need {self.hosts} commands, got {len(commands)}")
        kill_processes(self._created)        # nothing from an earlier run() may linger
        outputs: list[list[str]] = [[] for _ in range(self.hosts)]
        procs, readers = [], []
        try:
            for i, argv in enumerate(commands):
                p = subprocess.Popen(self._host_command(i, argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=self._env(i, env), start_new_session=True)
                with self._lock:
                    self._procs.append(p)
                procs.append(p)
                t = threading.Thread(target=self._read, args=(i, p.stdout, outputs[i]), daemon=True)
                t.start()
                readers.append(t)
            deadline = time.monotonic() + timeout
            failed_at = None
            timed_out = False
            while any(p.poll() is None for p in procs):
                now = time.monotonic()
                if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
                    failed_at = now
                if now > deadline or (failed_at is not None and now > failed_at + fail_grace):
                    timed_out = now > deadline
                    break
                time.sleep(0.05)
            running = [p.poll() is None for p in procs]
            if any(running):
                self.kill()
        finally:
            if any(p.poll() is None for p in procs):   # an exception (KeyboardInterrupt, test deadline)
                self.kill()
            for t in readers:
                t.join(10)
        results = []
        for i, p in enumerate(procs):
            if running[i]:
                outputs[i].append(f"[host{i}] harness: killed after "
                                  + (f"the {timeout:g} s timeout" if timed_out else
                                     f"another host failed ({fail_grace:g} s grace)"))
            results.append(HostResult(i, p.returncode, "\n".join(outputs[i]), timed_out and running[i], running[i]))
        return results

    def _read(self, i: int, stream, sink: list[str]) -> None:
        for raw in iter(stream.readline, b""):
            line = f"[host{i}] {raw.decode(errors='replace').rstrip()}"
            sink.append(line)
            if self.echo:
                print(line, flush=True)
        stream.close()

    def torchrun_command(self, i: int, script_and_args: list[str], rdzv: str = "static", port: int = 29500,
                         torchrun_args: list[str] = ()) -> list[str]:
        """Host i's torchrun command line."""
        exe = Path(sys.executable).with_name("torchrun")
        base = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
        argv = base + ["--nnodes", str(self.hosts), "--nproc-per-node", str(self.ranks_per_host),
                       "--log-dir", str(self.rundir / "torchrun" / f"host{i}")]
        if rdzv == "static":
            argv += ["--node-rank", str(i), "--master-addr", self.master_addr, "--master-port", str(port)]
        elif rdzv == "c10d":
            argv += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"{self.master_addr}:{port}",
                     "--rdzv-id", self.base, "--local-addr", self.addrs[i]]
        else:
            raise ValueError(f"rdzv must be 'static' or 'c10d', got {rdzv!r}")
        return argv + list(torchrun_args) + list(script_and_args)

    def torchrun(self, script: str, *args: str, rdzv: str = "static", port: int = 29500, timeout: float = 120,
                 env: dict | None = None, torchrun_args: list[str] = (), fail_grace: float = 15.0) -> list[HostResult]:
        """Run ``script args`` under one torchrun agent per host (``script`` may be ``-m`` then a module)."""
        cmds = [self.torchrun_command(i, [script, *args], rdzv, port, torchrun_args) for i in range(self.hosts)]
        return self.run(cmds, timeout=timeout, env=env, fail_grace=fail_grace)

    @staticmethod
    def report(results: list[HostResult]) -> str:
        return "\n".join(f"host{r.host}: exit {r.returncode}{' (timed out)' if r.timed_out else ''}"
                         f"{' (killed)' if r.killed and not r.timed_out else ''}\n{r.output}" for r in results)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        k = argv.index("--")
        own, rest = argv[:k], argv[k + 1:]
    else:
        own, rest = argv, []
    ap = argparse.ArgumentParser(
        prog="python tests/multihost.py",
        description="Simulate HOSTS hosts x RANKS ranks on this machine (network + IPC/mount/UTS namespaces, "
                    "needs root) and run a script under one torchrun agent per host.",
        epilog="example: python tests/multihost.py --hosts 2 --ranks 2 --rate 2gbit -- bench.py --size 16M")
    ap.add_argument("--hosts", type=int, default=2)
    ap.add_argument("--ranks", type=int, default=2, help="ranks per host (torchrun --nproc-per-node)")
    ap.add_argument("--rate", default=None, help="limit every inter-host link (tc tbf), e.g. 2gbit, 200mbit")
    ap.add_argument("--delay-us", type=float, default=None,
                    help="latency added to every TCP message (comms' test hook COMMS_TCP_DELAY_US; no netem here)")
    ap.add_argument("--shaper", choices=["tbf", "htb"], default="tbf", help="the qdisc enforcing --rate (default tbf)")
    ap.add_argument("--cpus", choices=["split", "shared"], default="split",
                    help="split: each host runs on its own share of the CPUs (default); shared: every host on all")
    ap.add_argument("--timeout", type=float, default=600, help="kill everything after S seconds (default 600)")
    ap.add_argument("--rdzv", choices=["static", "c10d"], default="static", help="torchrun rendezvous (default static)")
    ap.add_argument("--port", type=int, default=29500, help="master / rendezvous port on host0 (default 29500)")
    ap.add_argument("--raw", action="store_true", help="run the command itself on every host instead of torchrun "
                                                        "(env CMH_HOST is the host index)")
    ap.add_argument("--quiet", action="store_true", help="print the output only at the end")
    args = ap.parse_args(own)
    if not rest:
        ap.error("nothing to run: put the script and its arguments after --")
    reason = why_unavailable()
    if reason:
        print(f"multihost: {reason}", file=sys.stderr)
        return 2

    stopping = []

    def terminate(signum, frame):
        if not stopping:                 # the first signal stops the run; later ones must not cut the teardown short
            stopping.append(signum)
            raise KeyboardInterrupt(f"signal {signum}")
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):      # SIGINT too: `&` jobs start with it ignored
        signal.signal(sig, terminate)
    try:
        with SimulatedHosts(args.hosts, args.ranks, args.rate, echo=not args.quiet, delay_us=args.delay_us,
                            cpus=args.cpus, shaper=args.shaper) as sim:
            print(f"multihost: {args.hosts} hosts x {args.ranks} ranks, namespaces {', '.join(sim.namespaces)}, "
                  f"addresses {', '.join(sim.addrs)}, cpus {' | '.join(','.join(map(str, c)) for c in sim.cpus)}"
                  + (f", links limited to {args.rate} ({args.shaper})" if args.rate else ""),
                  flush=True)
            if args.raw:
                results = sim.run([rest] * args.hosts, timeout=args.timeout)
            else:
                results = sim.torchrun(*rest, rdzv=args.rdzv, port=args.port, timeout=args.timeout)
    except KeyboardInterrupt as e:
        print(f"multihost: interrupted ({e or 'SIGINT'}); every host stopped and torn down",
              file=sys.stderr, flush=True)
        return 130
    if args.quiet:
        for r in results:
            print(r.output)
    for r in results:
        state = "timed out" if r.timed_out else "killed" if r.killed else f"exit {r.returncode}"
        print(f"multihost: host{r.host}: {state}", flush=True)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
