"""The topology detector: what every rank sees of its machine, assembled into one picture.

At init each rank reports (in its PeerInfo) its host identity, the cores it may run on and their
NUMA nodes, the NICs with their speeds, the RDMA devices present and the size of /dev/shm. The
communicator groups ranks into hosts by host identity (never by hostname or LOCAL_WORLD_SIZE),
picks the lowest rank of each host as its leader, and works out how oversubscribed each host is
(ranks per usable core). ``comm.topology`` holds the result; ``python -m comms.info`` prints it.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from .hostid import read_text as _read


def parse_cpulist(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def numa_of_cpus(cpus: list[int], root: str = "/sys/devices/system/node") -> dict[int, int]:
    """{cpu: NUMA node} for ``cpus`` (node 0 when the machine reports no NUMA layout)."""
    where: dict[int, int] = {}
    try:
        nodes = sorted(int(n[4:]) for n in os.listdir(root) if n.startswith("node") and n[4:].isdigit())
    except OSError:
        nodes = []
    for node in nodes:
        for cpu in parse_cpulist(_read(f"{root}/node{node}/cpulist")):
            where[cpu] = node
    return {c: where.get(c, 0) for c in cpus}


def nics(root: str = "/sys/class/net") -> list[dict]:
    """Network interfaces that are up, with their speed in Mbit/s (None when the driver won't say)."""
    out = []
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return out
    for name in names:
        if name == "lo" or _read(f"{root}/{name}/operstate") not in ("up", "unknown"):
            continue
        speed = _read(f"{root}/{name}/speed")
        out.append({"name": name, "speed_mbps": int(speed) if speed.lstrip("-").isdigit() and int(speed) > 0 else None})
    return out


def rdma_devices(root: str = "/sys/class/infiniband") -> list[str]:
    try:
        return sorted(os.listdir(root))
    except OSError:
        return []


def shm_bytes(path: str = "/dev/shm") -> int:
    try:
        st = os.statvfs(path)
        return st.f_blocks * st.f_frsize
    except OSError:
        return 0


def local_facts() -> dict:
    """What this process reports about its machine (goes into PeerInfo.extra at init)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    numa = numa_of_cpus(cpus)
    return {"cpus": cpus, "numa": sorted(set(numa.values())), "nics": nics(), "rdma": rdma_devices(),
            "shm_bytes": shm_bytes()}


@dataclass
class Host:
    index: int
    name: str                  # hostname (for people; grouping uses the host identity)
    identity: str
    ranks: list[int]
    leader: int
    cores: int                 # distinct usable cores across its ranks
    oversubscription: float    # ranks per usable core
    numa_nodes: list[int]
    nics: list[dict]
    rdma: list[str]
    shm_bytes: int


@dataclass
class Topology:
    size: int
    hosts: list[Host]
    host_of: list[int]                      # rank -> host index
    local_index: list[int]                  # rank -> index within its host
    numa_of: list[list[int]] = field(default_factory=list)   # rank -> NUMA nodes of its cores

    @classmethod
    def from_peers(cls, peers) -> "Topology":
        groups: dict[str, list[int]] = {}
        for p in peers:
            groups.setdefault(p.host, []).append(p.rank)
        hosts, host_of, local_index = [], [0] * len(peers), [0] * len(peers)
        for i, (ident, ranks) in enumerate(sorted(groups.items(), key=lambda kv: kv[1][0])):
            facts = [peers[r].extra.get("topology", {}) for r in ranks]
            cpus = set().union(*(set(f.get("cpus", [])) for f in facts)) or {0}
            numa = sorted(set().union(*(set(f.get("numa", [])) for f in facts)))
            first = facts[0]
            hosts.append(Host(i, peers[ranks[0]].hostname, ident, list(ranks), ranks[0], len(cpus),
                              round(len(ranks) / len(cpus), 3), numa, first.get("nics", []), first.get("rdma", []),
                              int(first.get("shm_bytes", 0))))
            for j, r in enumerate(ranks):
                host_of[r], local_index[r] = i, j
        numa_of = [list(p.extra.get("topology", {}).get("numa", [])) for p in peers]
        return cls(len(peers), hosts, host_of, local_index, numa_of)

    @property
    def uniform(self) -> bool:
        """Every host has the same number of ranks (hierarchical algorithms need this)."""
        return len({len(h.ranks) for h in self.hosts}) == 1

    def host_groups(self) -> tuple:
        return tuple(tuple(h.ranks) for h in self.hosts)

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        lines = [f"{self.size} rank{'s' if self.size != 1 else ''} on {len(self.hosts)} host"
                 f"{'s' if len(self.hosts) != 1 else ''}"]
        for h in self.hosts:
            nic = ", ".join(f"{n['name']} ({n['speed_mbps']} Mbit/s)" if n["speed_mbps"] else n["name"]
                            for n in h.nics) or "none"
            lines.append(f"  host {h.index} {h.name}: ranks {h.ranks} (leader {h.leader}); {h.cores} usable cores, "
                         f"{h.oversubscription:g} ranks per core; NUMA nodes {h.numa_nodes}; NICs {nic}; "
                         f"RDMA {', '.join(h.rdma) or 'none'}; /dev/shm {h.shm_bytes / 2**30:.1f} GiB")
        return "\n".join(lines)
