"""The simulated hosts of tests/multihost.py (root only, Linux): their namespaces, links and CPUs on
this machine, how a command enters a host, and the teardown. :class:`HostNamespaces` builds and
removes them; ``SimulatedHosts`` (tests/multihost.py) extends it with running jobs across them.

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
  - optionally a rate limit (``tc qdisc ... tbf``, or ``htb`` with rate = ceil) on both ends of every inter-host link,
    and (``delay_us``) latency, emulated by comms' TCP test hook COMMS_TCP_DELAY_US (no netem here).

:meth:`HostNamespaces._host_command` is the command line that enters host i (its namespaces, the
tmpfs on /dev/shm, /etc/hosts and /etc/resolv.conf, the hostname, its CPUs); :meth:`HostNamespaces.exec`
runs a short command in a host's network namespace only.

Teardown runs in ``finally``/``__exit__``: the agents' process groups get SIGTERM, then every
process left in the namespaces gets SIGKILL, and the namespaces are deleted (which destroys their
veths and bridge). At start, namespaces (and run directories) with the prefix whose creating pid is
no longer alive are removed the same way, so a crashed earlier run (kill -9 of the harness) is
cleaned up by the next one.
"""
from __future__ import annotations

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
from pathlib import Path

from netns import PREFIX, HarnessError, cleanup_stale, delete, kill_processes, netns_list, run

SUBNET = "10.99.0"
SHM_SIZE = "512m"
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


class HostNamespaces:
    """``hosts`` simulated hosts with ``ranks_per_host`` ranks each (see the module docstring): built by
    ``__enter__``, removed by ``__exit__``/:meth:`teardown`. A subclass that starts processes in the
    hosts (each in its own process group) registers them in ``_procs`` under ``_lock``; :meth:`kill`
    stops them."""

    def __init__(self, hosts: int = 2, ranks_per_host: int = 2, rate: str | int | float | None = None,
                 prefix: str = PREFIX, subnet: str = SUBNET, echo: bool = False, shm_size: str = SHM_SIZE,
                 delay_us: float | None = None, cpus: str = "split", shaper: str = "tbf"):
        global _instances
        if not 1 <= hosts <= 200:
            raise ValueError(f"hosts must be in [1, 200], got {hosts}")
        if ranks_per_host < 1:
            raise ValueError(f"ranks_per_host must be positive, got {ranks_per_host}")
        self.hosts, self.ranks_per_host = hosts, ranks_per_host
        self.rate = None if rate is None else parse_rate(rate)
        self.prefix, self.subnet, self.echo, self.shm_size = prefix, subnet, echo, shm_size
        self.delay_us = delay_us
        if shaper not in ("tbf", "htb"):
            raise ValueError(f"shaper must be 'tbf' or 'htb', got {shaper!r}")
        self.shaper = shaper
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

    def __enter__(self) -> "HostNamespaces":
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
                if self.shaper == "tbf":
                    run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{int(self.rate)}bit",
                         "burst", str(burst), "latency", "50ms"])
                else:                      # htb: one class at rate = ceil, every packet through it
                    run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "1"])
                    run(["tc", "-n", ns, "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate",
                         f"{int(self.rate)}bit", "ceil", f"{int(self.rate)}bit"])
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

        def signal_running(sig: int) -> None:
            for p in procs:
                if p.poll() is None:
                    try:
                        os.killpg(p.pid, sig)
                    except ProcessLookupError:
                        pass
        signal_running(signal.SIGTERM)
        end = time.monotonic() + grace_s
        for p in procs:
            try:
                p.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        signal_running(signal.SIGKILL)
        kill_processes(self._created)
        for p in procs:
            p.wait()

    # -- inside the hosts ----------------------------------------------------------------------
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
