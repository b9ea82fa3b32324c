"""Run under tests/multihost.py (torchrun per simulated host): every collective across hosts.

    python tests/multihost.py --hosts 2 --ranks 2 -- tests/multihost_scripts/collectives.py SEED NCASES

Each rank runs tests/workers.py:run_cases (random collectives checked against the reference),
then checks on a second communicator that the bits agree on every rank, that its peers on the same
simulated host (the torchrun node: ranks GROUP_RANK*LOCAL_WORLD_SIZE ...) are reached over shm and
all others over tcp, that local_ranks and the hostnames match that layout, and that the topology
(where comms has one) counts the hosts. Prints ``MULTIHOST-OK rank=R ...`` on success.
"""
from __future__ import annotations

import hashlib
import os
import socket
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # tests/

import comms  # noqa: E402
from workers import run_cases  # noqa: E402


def gather_bytes(comm, data: bytes, width: int) -> list[bytes]:
    mine = np.frombuffer(data.ljust(width, b"\0")[:width], np.uint8).copy()
    out = np.zeros(comm.size * width, np.uint8)
    comm.all_gather(out, mine)
    return [out[r * width:(r + 1) * width].tobytes().rstrip(b"\0") for r in range(comm.size)]


def main() -> None:
    seed, ncases = int(sys.argv[1]), int(sys.argv[2])
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    per_host = int(os.environ["LOCAL_WORLD_SIZE"])
    out = run_cases(rank, size, seed, ncases)
    digests, stats = out[:-1], out[-1]
    across = os.environ.get("MULTIHOST_ACROSS", "tcp")          # the transport expected between hosts
    want_stats = "stats:" + ",".join(sorted({"shm", across}))
    assert stats == want_stats, f"rank {rank}: expected traffic on shm and on {across}, got {stats}"
    same_host = [r for r in range(size) if r // per_host == rank // per_host]
    with comms.init(timeout=60) as comm:
        assert comm.rank == rank and comm.size == size
        assert comm.local_ranks == same_host, f"rank {rank}: local_ranks {comm.local_ranks}, want {same_host}"
        want = {p: "shm" if p in same_host else across for p in range(size) if p != rank}
        assert comm.transports == want, f"rank {rank}: transports {comm.transports}, want {want}"
        sums = gather_bytes(comm, hashlib.sha256("".join(digests).encode()).hexdigest().encode(), 64)
        assert len(set(sums)) == 1, f"rank {rank}: ranks computed different bits: {sums}"
        names = [n.decode() for n in gather_bytes(comm, socket.gethostname().encode(), 64)]
        for r in range(size):
            same = names[r] == names[rank]
            assert same == (r in same_host), f"rank {rank}: hostnames {names} do not match hosts of {per_host} ranks"
        hosts = "n/a"
        topo = getattr(type(comm), "topology", None)
        if topo is not None:
            t = comm.topology
            hosts = len(t.hosts)
            assert hosts == size // per_host, f"rank {rank}: topology reports {hosts} hosts: {t.describe()}"
            assert sorted(tuple(h.ranks) for h in t.hosts) == [tuple(range(h * per_host, (h + 1) * per_host))
                                                               for h in range(size // per_host)], t.describe()
        comm.barrier()
    # one write of the whole line: the harness runs Python unbuffered, where print() writes the text and
    # its newline separately, and a host's two ranks share one pipe (their lines could interleave)
    line = (f"MULTIHOST-OK rank={rank} host={socket.gethostname()} local={','.join(map(str, same_host))} "
            f"transports={','.join(f'{p}:{t}' for p, t in sorted(want.items()))} topology_hosts={hosts} "
            f"digest={sums[0].decode()[:16]}\n")
    os.write(1, line.encode())


if __name__ == "__main__":
    main()
