"""Naming and sweeping of shared-memory segments, so that none outlives its processes.

Every segment comms creates is named ``comms.<uid>.<creator pid>.<random>`` under /dev/shm. A rank
unlinks its own segment as soon as every local peer has mapped it, so a segment is visible only
during init. If a rank is killed inside that window, :func:`sweep_stale_segments` (run at every
init, and by the launcher and ``comms.testing.spawn`` after their children exit) removes segments
whose creator is no longer alive.
"""
from __future__ import annotations

import os
import secrets

SHM_DIR = "/dev/shm"
PREFIX = "comms."


def segment_name(pid: int | None = None) -> str:
    """A fresh segment name for ``pid`` (default: this process), without the leading slash."""
    return f"{PREFIX}{os.getuid()}.{pid or os.getpid()}.{secrets.token_hex(6)}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid is running: a zombie counts as dead, one we may not signal
    as alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:           # it exited between the two checks
        return False
    except (OSError, IndexError):
        return True


def sweep_stale_segments(pids: "set[int] | None" = None) -> list[str]:
    """Unlink this user's comms segments whose creator is dead (or, given ``pids``, created by one
    of ``pids`` and dead). Returns the names removed."""
    removed = []
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return removed
    mine = f"{PREFIX}{os.getuid()}."
    for name in names:
        if not name.startswith(mine):
            continue
        try:
            pid = int(name[len(mine):].split(".", 1)[0])
        except ValueError:
            continue
        if (pids is not None and pid not in pids) or pid_alive(pid):
            continue
        try:
            os.unlink(os.path.join(SHM_DIR, name))
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed
