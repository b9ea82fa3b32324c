"""Who am I, as far as peers are concerned: the host identity and the process facts exchanged at init.

Two ranks may share memory when they see the same kernel (boot id), the same IPC namespace and the
same /dev/shm (device and inode of the mount), and when each finds the probe file the other created
in /dev/shm (:func:`comms.runtime.bootstrap` checks this both ways). LOCAL_WORLD_SIZE and hostnames are
never used. ``COMMS_HOST_ID`` overrides the whole identity (containers that share a host, tests
that simulate several hosts); the probe is then skipped.
"""
from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass, field

from .. import config
from .cleanup import SHM_DIR, segment_name


def read_text(path: str) -> str:
    """A small text file's contents, stripped; "" where it cannot be read (sysfs, procfs)."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo; "" where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        return ""


def _ns_inode(kind: str) -> int:
    try:
        return os.stat(f"/proc/self/ns/{kind}").st_ino
    except OSError:
        return 0


def host_identity() -> str:
    """A string equal for exactly the processes that can share a /dev/shm segment."""
    override = config.get("HOST_ID")
    if override:
        return f"user:{override}"
    try:
        st = os.stat("/dev/shm")
        shm = f"{st.st_dev}:{st.st_ino}"
    except OSError:
        shm = "none"
    return f"boot:{read_text('/proc/sys/kernel/random/boot_id')}/ipc:{_ns_inode('ipc')}/shm:{shm}"


@dataclass
class PeerInfo:
    """What each rank publishes in the first round of init."""
    rank: int
    host: str
    hostname: str
    pid: int
    pid_ns: int
    cores: int
    probe: str = ""                 # a file this rank created in /dev/shm ("" when COMMS_HOST_ID is set)
    extra: dict = field(default_factory=dict)

    @classmethod
    def mine(cls, rank: int) -> "PeerInfo":
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
        probe = ""
        if not config.get("HOST_ID"):
            name = segment_name()
            try:
                os.close(os.open(os.path.join(SHM_DIR, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
                probe = name
            except OSError:
                probe = ""
        from .topology import local_facts
        return cls(rank, host_identity(), socket.gethostname(), os.getpid(), _ns_inode("pid"), cores, probe,
                   {"topology": local_facts()})

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d, rank: int) -> "PeerInfo":
        """The PeerInfo rank ``rank`` published (JSON from the store), its fields' types checked."""
        from ..errors import TransportError
        types = {"rank": int, "host": str, "hostname": str, "pid": int, "pid_ns": int, "cores": int, "probe": str,
                 "extra": dict}
        if not isinstance(d, dict) or set(d) != set(types) or \
                not all(isinstance(d[k], t) and not (t is int and isinstance(d[k], bool)) for k, t in types.items()) \
                or d["rank"] != rank or d["cores"] < 1 or "/" in d["probe"]:
            raise TransportError(f"init (info): rank {rank} published a malformed description of itself: a rank of "
                                 "another version of comms, or not a rank at all", op="init", peer=rank)
        return cls(**d)

    def sees_probe_of(self, other: "PeerInfo") -> bool:
        """Whether ``other``'s probe file is visible here (True when there is nothing to check)."""
        if not other.probe:
            return True
        return os.path.exists(os.path.join(SHM_DIR, other.probe))

    def drop_probe(self) -> None:
        if self.probe:
            try:
                os.unlink(os.path.join(SHM_DIR, self.probe))
            except OSError:
                pass

    def same_host(self, other: "PeerInfo") -> bool:
        return self.host == other.host

    def same_pid_namespace(self, other: "PeerInfo") -> bool:
        return self.same_host(other) and self.pid_ns == other.pid_ns and self.pid_ns != 0
