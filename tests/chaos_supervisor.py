"""The supervisor of tests/chaos.py: the store, the rounds, the replacements and the leak checks.

On one host it starts ``--ranks`` ranks itself. With ``--hosts 2`` (root only) it builds two
simulated hosts (tests/hostns.py), enters host 0's network namespace, where it hosts the store, and
starts each host's ranks in that host's network namespace with COMMS_HOST_ID=host<i> (shared memory
within a host, TCP between the two). A ``cut`` takes host 1's link down (host 1 never holds the
store): host 0's ranks are the survivors; host 1's ranks are killed once the survivors reported and
must not have ended normally; the link comes back up before the replacements start on host 1.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

CHAOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chaos.py")
CLONE_NEWNET = 0x40000000


class ChaosError(Exception):
    pass


@dataclass
class Rank:
    wid: int
    host: int
    proc: subprocess.Popen
    died: str = ""                          # how the supervisor ended it ("" while a member)


@dataclass
class Run:
    args: argparse.Namespace
    store: object
    logdir: str
    sim: object = None
    ranks: list = field(default_factory=list)
    detect: list = field(default_factory=list)       # seconds, one per survivor and failure
    kinds: dict = field(default_factory=dict)
    partial: int = 0                                 # PeerErrors that named part of a cut host's ranks
    by_kind: dict = field(default_factory=dict)      # failure -> its detection times
    ops: dict = field(default_factory=dict)          # worker -> operations it checked, as it last reported
    grows: int = 0
    problems: list = field(default_factory=list)

    def members(self) -> list[Rank]:
        return [r for r in self.ranks if not r.died]

    def start(self, host: int, join_round: int | None = None) -> Rank:
        wid = len(self.ranks)
        env = dict(os.environ, WORLD_SIZE=str(self.args.full), MASTER_ADDR=self.addr, MASTER_PORT=str(self.store.port),
                   TORCHELASTIC_USE_AGENT_STORE="True", CHAOS_WID=str(wid), RANK=str(wid),
                   CHAOS_TIMEOUT=str(self.args.comms_timeout), COMMS_TIMEOUT=str(self.args.comms_timeout))
        if join_round is not None:
            env["CHAOS_JOIN"] = str(join_round)
        cmd = [sys.executable, CHAOS]
        if self.sim is not None:
            env["COMMS_HOST_ID"] = f"host{host}"
            cmd = ["ip", "netns", "exec", self.sim.netns[host], *cmd]   # execs: the pid is the rank's
        with open(os.path.join(self.logdir, f"rank{wid}.log"), "w") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if self.args.verbose:
            print(f"chaos: worker {wid} (pid {proc.pid}) on host {host}" + ("" if join_round is None else
                  f", joins after round {join_round}"), file=sys.stderr, flush=True)
        rank = Rank(wid, host, proc)
        self.ranks.append(rank)
        return rank

    @property
    def addr(self) -> str:
        return self.sim.master_addr if self.sim is not None else "127.0.0.1"

    def unexpected_exits(self) -> list[Rank]:
        return [r for r in self.members() if r.proc.poll() is not None]

    def wait_for(self, what: str, cond, timeout: float) -> None:
        end = time.monotonic() + timeout
        while not cond():
            bad = self.unexpected_exits()
            if bad:
                raise ChaosError(f"{what}: rank(s) {[r.wid for r in bad]} exited with "
                                 f"{[r.proc.returncode for r in bad]} (logs in {self.logdir})")
            if time.monotonic() > end:
                raise ChaosError(f"{what}: not within {timeout:.0f} s (logs in {self.logdir})")
            time.sleep(0.01)

    def link(self, host: int, up: bool) -> None:
        subprocess.run(["ip", "-n", self.sim.netns[host], "link", "set", "eth0", "up" if up else "down"], check=True)
        if up:
            self.sim._wait_links_up()


def _round(run: Run, r: int, rng: random.Random) -> None:
    a = run.args
    members = run.members()
    kinds = ["kill", "stop"] + (["cut"] if run.sim is not None else [])
    kind = a.kinds[r % len(a.kinds)] if a.kinds else rng.choice(kinds)
    if kind == "cut":
        victims = [m for m in members if m.host == 1]
        if not victims or len(victims) == len(members):
            kind = rng.choice(["kill", "stop"])
    if kind != "cut":
        victims = [rng.choice(members)]
    left = len(members) - len(victims)
    grow = a.full - left if (left <= 2 or r % 10 == 9) else 0
    last = r == a.rounds - 1
    run.store.set(f"chaos/plan/{r}", json.dumps({"kind": kind, "grow": grow, "last": last}))
    if a.verbose:
        print(f"chaos: round {r}: {kind} of workers {[v.wid for v in victims]} among {[m.wid for m in members]}, "
              f"grow {grow}", file=sys.stderr, flush=True)
    homes = [h for h in range(max(a.hosts, 1))           # where the replacements go
             for _ in range(a.ranks_per_host - sum(m.host == h and m not in victims for m in members))]
    run.wait_for(f"round {r}: members running", lambda: run.store.add(f"chaos/ready/{r}", 0) == len(members), 120)
    # the replacements start once the last ones run as members: join() hands out tickets in the order
    # processes ask, so a replacement started while the last round's were still on their way could
    # take a ticket granted to them (the grow of a cut round grants before its replacements start)
    if grow and kind != "cut":        # they wait in comms.join() until the members grow()
        for h in homes:
            run.start(h, join_round=r)
    time.sleep(rng.uniform(0.05, 0.3))
    t_sig = time.time()
    if kind == "cut":
        run.link(1, up=False)
    else:
        os.kill(victims[0].proc.pid, signal.SIGKILL if kind == "kill" else signal.SIGSTOP)
    for v in victims:
        v.died = kind
    run.kinds[kind] = run.kinds.get(kind, 0) + 1
    survivors = [m for m in members if m not in victims]
    keys = [f"chaos/det/{r}/{s.wid}" for s in survivors]
    run.wait_for(f"round {r}: survivors report", lambda: run.store.check(keys), 120)
    want = sorted(v.wid for v in victims)
    for s, key in zip(survivors, keys):
        det = json.loads(run.store.get(key))
        run.ops[s.wid] = det["ops"]
        run.detect.append(det["t"] - t_sig)
        run.by_kind.setdefault(kind, []).append(det["t"] - t_sig)
        if det["size"] != len(survivors):
            run.problems.append(f"round {r}: rank {s.wid} shrank to {det['size']}, not {len(survivors)}")
        if not 1 <= len(det["failed"]) <= len(victims):
            run.problems.append(f"round {r}: rank {s.wid} was told ranks {det['failed']} failed; the victims "
                                f"were workers {want}")
        elif len(det["failed"]) < len(victims):    # a cut host's ranks are declared one by one: the call
            run.partial += 1                       # raises at the first; shrink agrees on them all
    for v in victims:
        if v.proc.poll() is None:
            v.proc.kill()
        rc = v.proc.wait(30)
        if kind == "cut" and rc == 0:
            run.problems.append(f"round {r}: cut-off worker {v.wid} ended normally")
    if kind == "cut":
        run.link(1, up=True)
    if grow and kind == "cut":                     # once the link is back
        for h in homes:
            run.start(h, join_round=r)
    run.grows += bool(grow)


def _leaks(run: Run, fds0: int) -> dict:
    pids = {r.proc.pid for r in run.ranks}
    uid = os.getuid()
    shm = sorted(n for n in os.listdir("/dev/shm")
                 if n.startswith(f"comms.{uid}.") and n.split(".")[2].isdigit() and int(n.split(".")[2]) in pids)
    children = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid():
                        children.append(int(p))
            except (OSError, ValueError, IndexError):
                pass
    end = time.monotonic() + 10                    # the store's server closes its ranks' connections
    while len(os.listdir("/proc/self/fd")) > fds0 and time.monotonic() < end:
        time.sleep(0.05)
    return {"shm_segments": shm, "fds_start": fds0, "fds_end": len(os.listdir("/proc/self/fd")),
            "leftover_processes": children + [r.proc.pid for r in run.ranks if r.proc.returncode is None]}


def supervise(run: Run) -> dict:
    a = run.args
    rng = random.Random(a.seed)
    fds0 = len(os.listdir("/proc/self/fd"))
    survived, error = 0, None
    t0 = time.monotonic()
    try:
        for i in range(a.full):
            run.start(i // a.ranks_per_host)
        for r in range(a.rounds):
            _round(run, r, rng)
            survived += 1
            if a.verbose:
                print(f"chaos: round {r} done: {len(run.members())} members, detection {run.detect[-1]:.3f} s",
                      file=sys.stderr, flush=True)
        end = time.monotonic() + 120
        for m in run.members():
            m.proc.wait(max(1.0, end - time.monotonic()))
    except (ChaosError, subprocess.TimeoutExpired) as e:
        error = str(e)
    finally:
        for rk in run.ranks:
            if rk.proc.poll() is None:
                rk.proc.kill()
            rk.proc.wait()
        if run.sim is not None:
            for h in range(a.hosts):
                run.link(h, up=True)
    finals = {}
    for rk in run.ranks:
        key = f"chaos/final/{rk.wid}"
        if run.store.check([key]):
            finals[rk.wid] = json.loads(run.store.get(key))
            run.ops[rk.wid] = finals[rk.wid]["ops"]
    nwrong = run.store.add("chaos/wrong", 0)           # [worker, round, op number, collective] of each
    wrong = [json.loads(run.store.get(k)) if run.store.check([k]) else "lost" for k in
             (f"chaos/wrong/{i}" for i in range(1, nwrong + 1))]
    bad_exit = {rk.wid: rk.proc.returncode for rk in run.ranks if not rk.died and rk.proc.returncode != 0}
    d = sorted(run.detect)
    leaks = _leaks(run, fds0)
    summary = {"rounds": a.rounds, "survived": survived, "ranks": a.full, "hosts": a.hosts, "seed": a.seed,
               "link": None if run.sim is None else {"cpus": a.cpus, "rate": a.rate, "shaper": a.shaper if a.rate else None},
               "failures": run.kinds, "grows": run.grows, "processes": len(run.ranks),
               "detect_median_s": statistics.median(d) if d else None, "detect_max_s": d[-1] if d else None,
               "detections": len(d), "detect_by_kind": {k: [statistics.median(v), max(v)] for k, v in run.by_kind.items()}, "ops_checked": sum(run.ops.values()),
               "partial_failed": run.partial, "wrong": len(wrong), "wrong_ops": wrong[:20], "bad_exits": bad_exit, "problems": run.problems,
               "error": error, "leaks": leaks, "seconds": time.monotonic() - t0, "logs": run.logdir}
    summary["ok"] = (survived == a.rounds and not wrong and not bad_exit and not run.problems and error is None
                     and not leaks["shm_segments"] and not leaks["leftover_processes"]
                     and leaks["fds_end"] <= leaks["fds_start"])
    return summary


def _enter_netns(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name}")
    finally:
        os.close(fd)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="chaos: kill, stop or cut ranks of a group running checked collectives")
    p.add_argument("--ranks", type=int, default=4, help="ranks on one host (ignored with --hosts)")
    p.add_argument("--hosts", type=int, default=0, help="simulated hosts (root only); 0: one real host")
    p.add_argument("--ranks-per-host", type=int, default=2)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--kinds", default=None, help="failures in this order, cycling (kill,stop,cut); default: "
                   "each round one at random")
    p.add_argument("--cpus", choices=("shared", "split"), default="shared",
                   help="simulated hosts: both on every CPU, or each on its own")
    p.add_argument("--rate", default=None, help="simulated hosts: shape the link to this rate (e.g. 2gbit)")
    p.add_argument("--shaper", choices=("tbf", "htb"), default="tbf", help="with --rate: the qdisc")
    p.add_argument("--comms-timeout", type=float, default=60.0, help="COMMS_TIMEOUT of the ranks")
    p.add_argument("--json", default=None)
    p.add_argument("--verbose", "-v", action="store_true")
    a = p.parse_args(argv)
    if a.hosts not in (0, 2):
        p.error("--hosts: 0 (one host) or 2")
    a.full = a.hosts * a.ranks_per_host if a.hosts else a.ranks
    if a.hosts == 0:
        a.ranks_per_host = a.full
    a.kinds = a.kinds.split(",") if a.kinds else None
    if a.kinds and (set(a.kinds) - {"kill", "stop", "cut"} or ("cut" in a.kinds and not a.hosts)):
        p.error("--kinds: kill, stop, and with --hosts cut")
    if a.full < 3:
        p.error("at least 3 ranks: a failure must leave 2")
    from torch.distributed import TCPStore
    logdir = tempfile.mkdtemp(prefix="chaos-")
    sim = None
    if a.hosts:
        from hostns import HostNamespaces
        sim = HostNamespaces(hosts=2, ranks_per_host=a.ranks_per_host, cpus=a.cpus, rate=a.rate,
                             shaper=a.shaper).__enter__()
        _enter_netns(sim.netns[0])                 # the store lives on host 0 (threads started later follow)
    try:
        store = TCPStore(sim.master_addr if sim else "127.0.0.1", 0, is_master=True, wait_for_workers=False)
        summary = supervise(Run(a, store, logdir, sim))
        del store
    finally:
        if sim is not None:
            sim.teardown()
    if summary["ok"]:
        shutil.rmtree(logdir, ignore_errors=True)
        summary["logs"] = None
    print(json.dumps(summary), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0 if summary["ok"] else 1
