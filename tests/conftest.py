"""Shared test setup: import path for the test helpers, a per-test deadline (SIGALRM), and an
end-of-session check that the suite leaked no /dev/shm segment and no child process."""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import sys
import tempfile

import pytest

from comms.runtime.cleanup import pid_alive

sys.path.insert(0, os.path.dirname(__file__))

# The suite's ranks calibrate the cost model into a cache of the session's own, not the user's
# ~/.cache/comms: figures measured while the suite loads the machine must not become the defaults of
# the user's later runs (and a user's cache must not steer the tests' selection).
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="comms-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)

TEST_DEADLINE_S = int(os.environ.get("COMMS_TEST_DEADLINE", "240"))


@pytest.fixture(autouse=True)
def _deadline():
    """Turn a hung test into a failure instead of a hung CI."""
    def expired(signum, frame):
        raise TimeoutError(f"test exceeded its {TEST_DEADLINE_S} s deadline")
    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(TEST_DEADLINE_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _our_segments() -> list[str]:
    try:
        return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"comms.{os.getuid()}."))
    except OSError:
        return []


def _children(pid: int | None = None) -> list[int]:
    """The live child processes of ``pid`` (this one), multiprocessing's helpers left out, but the
    children of its fork server (where comms.testing.spawn starts ranks) counted."""
    pid = os.getpid() if pid is None else pid
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids = [int(p) for p in f.read().split()]
    except OSError:
        return []
    alive = []
    for child in pids:
        try:
            with open(f"/proc/{child}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    continue
            with open(f"/proc/{child}/cmdline") as f:
                cmdline = f.read()
        except OSError:
            continue
        if "multiprocessing.forkserver" in cmdline:
            alive += _children(child)
        elif "multiprocessing.resource_tracker" not in cmdline:
            alive.append(child)
    return alive


@pytest.fixture(scope="session", autouse=True)
def _no_leaks():
    before = set(_our_segments())
    yield
    # a segment whose creator is still alive belongs to a running process (possibly not ours);
    # one whose creator is dead was leaked
    leaked = sorted(n for n in set(_our_segments()) - before if not pid_alive(int(n.split(".")[2])))
    kids = _children()
    assert not leaked, f"the test suite leaked /dev/shm segments: {leaked}"
    assert not kids, f"the test suite left child processes running: {kids}"
