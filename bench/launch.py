"""How the benchmarks start one launch of ``bench.worker``: ``python -m comms.run`` on this host,
or one torchrun agent per simulated host (tests/multihost.py's SimulatedHosts, root only) for
``--hosts H --ranks M [--rate R] [--shaper tbf|htb] [--cpus split|shared]``. Used by ``python -m bench`` and ``python -m bench.regret``.

Across simulated hosts Gloo must use the hosts' own interface: GLOO_SOCKET_IFNAME defaults to
``eth0`` there (``lo`` on one host). MPI does not run across them.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from . import backends, driver, p2p_common, report


def simulated_hosts(args):
    """(SimulatedHosts to enter, None) for ``args.hosts``/``args.ranks``/``args.rate``/``cpus``/``shaper``, or (None, why not)."""
    hostns, multihost = p2p_common.harness()
    why = hostns.why_unavailable()
    if why:
        return None, why
    return multihost.SimulatedHosts(args.hosts, args.ranks, args.rate, cpus=args.cpus, shaper=args.shaper), None


class Launcher:
    """Runs one launch of the worker: ``comms.run`` on this host, or torchrun on simulated hosts."""

    def __init__(self, args, tmp: Path, sim=None):
        self.args, self.tmp, self.sim, self.count = args, tmp, sim, 0

    def env_delta(self, spec: backends.Spec | None) -> dict[str, str]:
        full = driver.launch_env(spec)
        if "GLOO_SOCKET_IFNAME" not in os.environ and "GLOO_SOCKET_IFNAME" not in (spec.env if spec else {}):
            full["GLOO_SOCKET_IFNAME"] = "eth0"           # the simulated hosts' interface, not loopback
        return {k: v for k, v in full.items() if os.environ.get(k) != v}

    def command(self, ns, argv: list[str], spec: backends.Spec | None, timeout: float):
        """(ok, error, seconds, tail) of one run of ``python argv...`` on every rank."""
        self.count += 1
        t0 = time.monotonic()
        if self.sim is None:
            import subprocess
            env = driver.launch_env(spec)
            cmd = [sys.executable, "-m", "comms.run", "-n", str(self.args.np), "--timeout", f"{timeout:g}"] + argv
            p = subprocess.Popen(cmd, env=env, cwd=driver._ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
            try:
                out, _ = p.communicate(timeout=timeout + 60)
            except BaseException:
                driver.stop(p, grace=10.0)
                raise
            return p.returncode, time.monotonic() - t0, out.splitlines()
        port = 29500 + self.count % 400
        res = self.sim.torchrun(*argv, port=port, timeout=timeout, env=self.env_delta(spec))
        if self.args.verbose:
            sys.stderr.write(self.sim.report(res) + "\n")
        rc = 0 if all(r.ok for r in res) else (124 if any(r.timed_out for r in res) else 1)
        return rc, time.monotonic() - t0, res[0].lines() + [ln for r in res[1:] for ln in r.lines()]

    def launch(self, ns, spec: backends.Spec, index: int, prog: driver.Progress) -> report.Launch:
        if self.sim is None:
            return driver.run_launch(ns, spec, index, self.tmp, prog)
        out = self.tmp / f"{spec.label.replace('/', '_').replace('=', '_').replace(':', '_')}-{index}.json"
        rc, secs, lines = self.command(ns, driver.worker_args(ns, spec, out), spec, ns.timeout)
        ln = report.Launch(spec.label, index, secs, tail=lines[-30:])
        if rc == 124:
            ln.error = f"timed out after {ns.timeout:g} s"
        elif rc:
            ln.error = f"exit status {rc}"
        elif not out.exists():
            ln.error = "no result file"
        else:
            ln.doc = json.loads(out.read_text())
        return ln

    def info(self) -> dict | None:
        """rank 0's ``comms.info --json`` under this launcher and the caller's environment."""
        rc, _, lines = self.command(None, ["-m", "comms.info", "--json"], None, 180)
        text = [ln.split("] ", 1)[1] if ln.startswith("[rank ") and "] " in ln else ln for ln in lines]
        starts = [i for i, ln in enumerate(text) if ln == "{"]
        for s in starts:
            for e in range(s + 1, len(text)):
                if text[e] == "}":
                    try:
                        return json.loads("\n".join(text[s:e + 1]))
                    except ValueError:
                        continue
        driver.note(f"comms.info failed (exit {rc}): {' | '.join(lines[-5:])}")
        return None
