"""Simulate several hosts on one Linux machine (root only), and run torchrun jobs across them.

    from multihost import SimulatedHosts
    with SimulatedHosts(hosts=2, ranks_per_host=2, rate="2gbit") as sim:
        results = sim.torchrun("script.py", "arg")           # one torchrun agent per host
        assert all(r.ok for r in results), sim.report(results)

    python tests/multihost.py --hosts 2 --ranks 2 [--rate 2gbit] [--timeout S] [--rdzv c10d] -- script.py args...

Each simulated host gets
  - its own network namespace ``<prefix><pid>h<i>`` (prefix ``cmh``, pid of the creating process) with
    ``lo`` and ``eth0`` = 10.99.0.<i+1>/24; two hosts are joined by one veth pair, more hosts by veth
    pairs to a bridge in an extra "switch" namespace ``<prefix><pid>sw``. Nothing is added to the root
    namespace: every interface is created inside the namespaces, and every address lives there only;
  - its own IPC, mount and UTS namespaces (``unshare --ipc --mount --uts --propagation private``),
    a private 512 MiB tmpfs on /dev/shm, the hostname ``host<i>``, and an /etc/hosts naming every
    simulated host. comms therefore sees different hosts (different IPC namespace and /dev/shm): shared
    memory inside a host, TCP between hosts;
  - its own CPUs (``cpus="split"``, the default): the CPUs this process may use are dealt out round-robin,
    so host i runs on cpus[i::hosts] (hosts share CPUs only when there are more hosts than CPUs). Real
    hosts do not share cores; without this, ranks of one "host" spin on cores the other host's ranks and
    network stack need, and the topology detector cannot see the oversubscription. ``cpus="shared"``
    lets every host use every CPU;
  - optionally a token-bucket rate limit (``tc qdisc ... tbf``) on both ends of every inter-host link,
    and (``delay_us``) latency, emulated by comms' TCP test hook COMMS_TCP_DELAY_US (no netem here).

One agent per host starts that host's ranks: ``torchrun --nnodes H --nproc-per-node M --node-rank i
--master-addr 10.99.0.1 --master-port P`` (static rendezvous), or with ``rdzv="c10d"``
``--rdzv-backend c10d --rdzv-endpoint 10.99.0.1:P --rdzv-id ID``. Every output line is collected
(and, with ``echo``, printed) prefixed with ``[host<i>]``; each host's exit code and output are
returned. When a host fails the others get ``fail_grace`` seconds, then are killed.

Teardown runs in ``finally``/``__exit__``: the agents' process groups get SIGTERM, then every
process left in the namespaces gets SIGKILL, and the namespaces are deleted (which destroys their
veths and bridge). At start, namespaces (and run directories) with the prefix whose creating pid is
no longer alive are removed the same way, so a crashed earlier run (kill -9 of the harness) is
cleaned up by the next one.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from netns import PREFIX, HarnessError, cleanup_stale, delete, kill_processes, netns_list, run

SUBNET = "10.99.0"
SHM_SIZE = "512m"
_SCRUB = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
          "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE",
          "TORCHELASTIC_RUN_ID", "COMMS_HOST_ID", "COMMS_SOCKET_ADDR")
_instances = 0
_instances_lock = threading.Lock()


def why_unavailable() -> str | None:
    """None when the harness can run here, else the reason (for pytest.skip)."""
    if sys.platform != "linux":
        return f"simulated hosts need Linux network namespaces (this is {sys.platform})"
    if os.geteuid() != 0:
        return ("simulated hosts need root (network, IPC, mount and UTS namespaces, tc); "
                f"running as uid {os.geteuid()} (CI runs these tests as root)")
    for tool in ("ip", "tc", "unshare", "mount", "hostname"):
        if shutil.which(tool) is None:
            return f"simulated hosts need {tool!r} on PATH (iproute2 / util-linux)"
    return None


def parse_rate(rate: str | int | float) -> float:
    """A tc rate ("200mbit", "2gbit", "500kbit", "1000000" bit/s, "10mbps" bytes/s) in bit/s."""
    if isinstance(rate, (int, float)):
        return float(rate)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(bit|bps)?\s*", str(rate).lower())
    if not m:
        raise ValueError(f"rate {rate!r}: expected a tc rate such as 200mbit or 2gbit")
    value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[m.group(2)]
    return value * 8 if m.group(3) == "bps" else value


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


class SimulatedHosts:
    """``hosts`` simulated hosts with ``ranks_per_host`` ranks each (see the module docstring)."""

    def __init__(self, hosts: int = 2, ranks_per_host: int = 2, rate: str | int | float | None = None,
                 prefix: str = PREFIX, subnet: str = SUBNET, echo: bool = False, shm_size: str = SHM_SIZE,
                 delay_us: float | None = None, cpus: str = "split"):
        global _instances
        if not 1 <= hosts <= 200:
            raise ValueError(f"hosts must be in [1, 200], got {hosts}")
        if ranks_per_host < 1:
            raise ValueError(f"ranks_per_host must be positive, got {ranks_per_host}")
        self.hosts, self.ranks_per_host = hosts, ranks_per_host
        self.rate = None if rate is None else parse_rate(rate)
        self.prefix, self.subnet, self.echo, self.shm_size = prefix, subnet, echo, shm_size
        self.delay_us = delay_us
        if cpus not in ("split", "shared"):
            raise ValueError(f"cpus must be 'split' or 'shared', got {cpus!r}")
        allowed = sorted(os.sched_getaffinity(0))
        self.cpus = ([allowed[i::hosts] or [allowed[i % len(allowed)]] for i in range(hosts)] if cpus == "split"
                     else [allowed] * hosts)
        with _instances_lock:
            n = _instances
            _instances += 1
        self.base = f"{prefix}{os.getpid()}" + (f"_{n}" if n else "")
        self.netns = [f"{self.base}h{i}" for i in range(hosts)]
        self.switch = f"{self.base}sw" if hosts > 2 else None
        self.addrs = [f"{subnet}.{i + 1}" for i in range(hosts)]
        self.rundir: Path | None = None
        self._procs: list[subprocess.Popen] = []
        self._created: list[str] = []
        self.shaped: list[tuple[str, str]] = []       # (namespace, interface) of each rate-limited link end
        self._lock = threading.Lock()

    # -- setup / teardown ----------------------------------------------------------------------
    @property
    def master_addr(self) -> str:
        return self.addrs[0]

    @property
    def namespaces(self) -> list[str]:
        return self.netns + ([self.switch] if self.switch else [])

    def __enter__(self) -> "SimulatedHosts":
        reason = why_unavailable()
        if reason:
            raise HarnessError(reason)
        cleanup_stale(self.prefix)
        try:
            self._setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def _ip(self, ns: str, *args: str) -> None:
        run(["ip", "-n", ns, *args])

    def _setup(self) -> None:
        self.rundir = Path(tempfile.mkdtemp(prefix=f"{self.base}."))
        (self.rundir / "owner").write_text(f"{os.getpid()}\n")      # marks the directory as the harness's
        for ns in self.namespaces:
            if ns in netns_list():
                raise HarnessError(f"network namespace {ns} already exists")
            run(["ip", "netns", "add", ns])
            self._created.append(ns)
            self._ip(ns, "link", "set", "lo", "up")
            # hosts tuned for collectives: a connection that paused between phases keeps its window
            # (the kernel default restarts slow start after an idle RTO)
            run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv4.tcp_slow_start_after_idle=0"])
        shaped: list[tuple[str, str]] = []
        if self.hosts == 2:
            self._ip(self.netns[0], "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
                     "netns", self.netns[1])
            shaped += [(self.netns[0], "eth0"), (self.netns[1], "eth0")]
        elif self.hosts > 2:
            self._ip(self.switch, "link", "add", "br0", "type", "bridge")
            self._ip(self.switch, "link", "set", "br0", "up")
            for i, ns in enumerate(self.netns):
                self._ip(ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}", "netns", self.switch)
                self._ip(self.switch, "link", "set", f"p{i}", "master", "br0")
                self._ip(self.switch, "link", "set", f"p{i}", "up")
                shaped += [(ns, "eth0"), (self.switch, f"p{i}")]
        if self.hosts >= 2:
            for ns, addr in zip(self.netns, self.addrs):
                self._ip(ns, "addr", "add", f"{addr}/24", "dev", "eth0")
                self._ip(ns, "link", "set", "eth0", "up")
        if self.hosts >= 2:
            self._wait_links_up()
        if self.rate is not None:
            rate_bytes = self.rate / 8
            burst = max(int(rate_bytes * 0.004), 64 * 1024)          # 4 ms of traffic, at least 64 KiB
            for ns, dev in shaped:
                run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{int(self.rate)}bit",
                      "burst", str(burst), "latency", "50ms"])
        self.shaped = shaped
        hosts_file = self.rundir / "hosts"
        hosts_file.write_text("127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n"
                              + "".join(f"{a} host{i}\n::ffff:{a} host{i}\n" for i, a in enumerate(self.addrs)))
        # no nameserver: glibc asks 127.0.0.1 inside the namespace, so lookups never leave it
        (self.rundir / "resolv.conf").write_text("# simulated host (tests/multihost.py): no DNS\n"
                                                 "options timeout:1 attempts:1\n")

    def _wait_links_up(self, timeout_s: float = 10.0) -> None:
        """Wait until every host's eth0 has carrier (veth ends come up asynchronously)."""
        end = time.monotonic() + timeout_s
        for ns in self.netns:
            while "LOWER_UP" not in run(["ip", "-n", ns, "link", "show", "eth0"]).stdout:
                if time.monotonic() > end:
                    raise HarnessError(f"eth0 in {ns} has no carrier after {timeout_s:g} s")
                time.sleep(0.02)

    def teardown(self) -> None:
        """Kill every process of the run and delete its namespaces and run directory (idempotent)."""
        errors = []
        try:
            self.kill()
        except Exception as e:             # still delete the namespaces
            errors.append(e)
        try:
            delete(self._created)
        except Exception as e:
            errors.append(e)
        self._created = [n for n in self._created if n in netns_list()]
        if self.rundir is not None:
            shutil.rmtree(self.rundir, ignore_errors=True)
            self.rundir = None
        if errors or self._created:
            raise HarnessError(f"teardown incomplete: {errors or ''} namespaces left: {self._created}")

    def kill(self, grace_s: float = 3.0) -> None:
        """Stop every process of the run: SIGTERM to the agents' process groups, then SIGKILL to
        everything left in the namespaces."""
        with self._lock:
            procs, self._procs = self._procs, []
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        end = time.monotonic() + grace_s
        for p in procs:
            try:
                p.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        kill_processes(self._created)
        for p in procs:
            p.wait()

    # -- running things ------------------------------------------------------------------------
    def exec(self, host: int | str, argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a short command in a host's network namespace (only: no IPC/mount/UTS namespaces) and
        on its CPUs, e.g. ``sim.exec(0, ["ip", "addr"])``; ``host`` may also be "sw"."""
        ns = self.switch if host == "sw" else self.netns[int(host)]
        pin = [] if host == "sw" else ["taskset", "-c", ",".join(map(str, self.cpus[int(host)]))]
        return subprocess.run(pin + ["ip", "netns", "exec", ns, *argv], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)

    def link_bytes(self) -> dict[str, int]:
        """Bytes sent so far through each shaped interface ("<ns>/<dev>": root qdisc counter)."""
        out = {}
        for ns, dev in self.shaped:
            text = run(["tc", "-s", "-n", ns, "qdisc", "show", "dev", dev]).stdout
            m = re.search(r"Sent (\d+) bytes", text)
            out[f"{ns}/{dev}"] = int(m.group(1)) if m else 0
        return out

    def _host_command(self, i: int, argv: list[str]) -> list[str]:
        script = (f"mount -t tmpfs -o size={self.shm_size} tmpfs /dev/shm"
                  + "".join(f" && {{ [ ! -e /etc/{f} ] || mount --bind {shlex.quote(str(self.rundir / f))} /etc/{f}; }}"
                            for f in ("hosts", "resolv.conf")) +
                  f" && hostname host{i} && exec \"$@\"")
        pin = ["taskset", "-c", ",".join(map(str, self.cpus[i]))]
        return pin + ["ip", "netns", "exec", self.netns[i], "unshare", "--ipc", "--mount", "--uts",
                "--propagation", "private", "sh", "-c", script, "sh", *argv]

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
                            cpus=args.cpus) as sim:
            print(f"multihost: {args.hosts} hosts x {args.ranks} ranks, namespaces {', '.join(sim.namespaces)}, "
                  f"addresses {', '.join(sim.addrs)}, cpus {' | '.join(','.join(map(str, c)) for c in sim.cpus)}"
                  + (f", links limited to {args.rate}" if args.rate else ""),
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
