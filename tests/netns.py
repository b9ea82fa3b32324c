"""The network namespaces of tests/multihost.py: finding them, the processes inside them, and
removing them, including what a crashed earlier run left behind (:func:`cleanup_stale`).

A harness's namespaces are named ``<prefix><pid>[_<n>]h<i>`` (host i) and ``...sw`` (the switch),
``pid`` being the creating process: a name whose pid no longer runs belongs to a dead run. Every
command raises :class:`HarnessError` on failure (unless told not to check).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

PREFIX = "cmh"
NETNS_DIR = "/var/run/netns"


class HarnessError(RuntimeError):
    pass


def run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if check and p.returncode != 0:
        raise HarnessError(f"{shlex.join(argv)} failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    return p


def alive(pid: int) -> bool:
    """True if ``pid`` runs (zombies, which may linger in containers, count as dead)."""
    from comms.runtime.cleanup import pid_alive
    return pid_alive(pid)


def netns_list() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except OSError:
        return []


def netns_pids(name: str) -> list[int]:
    """Processes whose network namespace is the named one (like ``ip netns pids``)."""
    try:
        st = os.stat(os.path.join(NETNS_DIR, name))
    except OSError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            ns = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (ns.st_dev, ns.st_ino) == (st.st_dev, st.st_ino):
            pids.append(int(entry))
    return pids


def kill_processes(names: list[str], deadline_s: float = 10.0) -> None:
    end = time.monotonic() + deadline_s
    while True:
        pids = [p for n in names for p in netns_pids(n) if alive(p)]
        if not pids:
            return
        if time.monotonic() > end:
            raise HarnessError(f"processes {pids} in namespaces {names} survive SIGKILL")
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def delete(names: list[str]) -> None:
    kill_processes(names)
    for n in names:
        if n in netns_list():
            run(["ip", "netns", "del", n], check=False)


def name_re(prefix: str) -> re.Pattern:
    return re.compile(rf"^{re.escape(prefix)}(\d+)(?:_\d+)?(?:h\d+|sw)$")


def ours(prefix: str = PREFIX) -> list[str]:
    """Namespaces with the harness prefix (of any run, alive or not)."""
    rx = name_re(prefix)
    return [n for n in netns_list() if rx.match(n)]


def cleanup_stale(prefix: str = PREFIX) -> list[str]:
    """Delete namespaces and run directories left by runs whose creating process is dead (a
    crashed or killed harness): their processes are killed first. Returns the namespaces removed."""
    rx = name_re(prefix)
    stale = [n for n in netns_list() if (m := rx.match(n)) and not alive(int(m.group(1)))]
    if stale:
        delete(stale)
    drx = re.compile(rf"^{re.escape(prefix)}(\d+)(?:_\d+)?\.")
    for d in Path(tempfile.gettempdir()).glob(f"{prefix}*.*"):
        m = drx.match(d.name)
        if m and d.is_dir() and not alive(int(m.group(1))) and ((d / "owner").exists() or not any(d.iterdir())):
            shutil.rmtree(d, ignore_errors=True)
    return stale
