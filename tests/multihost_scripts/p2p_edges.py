"""Large point-to-point messages over TCP between two simulated hosts (1 rank each), in the orders
that exercise the receive side of native/tcp.c: a receive posted before, just after, long after and
in the middle of its message's arrival, a collective queued behind an early p2p message, a receive
from any source, and a receive whose deadline passes while the bytes still flow. Every byte is
checked. Rank 1 prints ``P2P-EDGES-OK`` at the end; any failure raises.

    python tests/multihost.py --hosts 2 --ranks 1 --rate 1gbit -- tests/multihost_scripts/p2p_edges.py
"""
from __future__ import annotations

import time

import numpy as np

import comms
from comms.errors import CommsError, CommTimeout

MiB = 1 << 20


def payload(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def expect(buf: np.ndarray, seed: int, what: str) -> None:
    want = payload(buf.size, seed)
    if not np.array_equal(buf, want):
        bad = int(np.flatnonzero(buf != want)[0])
        raise SystemExit(f"p2p_edges: {what}: {buf.size} bytes differ first at byte {bad}")


def main() -> None:
    with comms.init(timeout=120) as comm:
        assert comm.size == 2 and comm.transports[1 - comm.rank] == "tcp", comm.transports
        sizes = [MiB, 3 * MiB + 1, 8 * MiB - 3, 300 << 10, 16 * MiB]
        if comm.rank == 0:
            # 1. a stream of synchronous sends, odd sizes
            for i, n in enumerate(sizes):
                comm.send(payload(n, i), 1)
            # 2. sent long before the receive is posted: rank 1 first takes the marker behind them
            for i, n in enumerate(sizes[:3]):
                comm.send(payload(n, 100 + i), 1, tag=2)
            comm.send(np.zeros(1, np.uint8), 1, tag=8)
            # 3. the receive is posted while the message arrives (rank 1 waits for tag 5 meanwhile)
            big = comm.send(payload(64 * MiB, 300), 1, tag=3, async_op=True)
            comm.send(payload(16, 301), 1, tag=5)
            big.wait()
            # 4. a collective behind an early p2p message
            w = comm.send(payload(8 * MiB, 400), 1, tag=4, async_op=True)
            x = np.full(1024, 1.0, np.float32)
            comm.all_reduce(x)
            w.wait()
            assert float(x[0]) == 2.0
            # 5. any source
            comm.send(payload(5 * MiB, 500), 1, tag=6)
            comm.barrier()
            # 6. rank 1's receive times out while this 192 MiB message still crawls over the link
            try:
                comm.send(np.zeros(192 * MiB, np.uint8), 1, tag=7, timeout=60)
            except CommsError:
                pass
            print("P2P-EDGES-SENT", flush=True)
        else:
            for i, n in enumerate(sizes):
                buf = np.zeros(n, np.uint8)
                comm.recv(buf, 0)
                expect(buf, i, f"stream message {i}")
            comm.recv(np.zeros(1, np.uint8), 0, tag=8)     # behind the tag 2 messages: they came first
            for i, n in enumerate(sizes[:3]):
                buf = np.zeros(n, np.uint8)
                comm.recv(buf, 0, tag=2)
                expect(buf, 100 + i, f"late receive {i}")
            small = np.zeros(16, np.uint8)
            w5 = comm.recv(small, 0, tag=5, async_op=True)     # the progress thread drains tag 3 for it
            time.sleep(0.15)
            big = np.zeros(64 * MiB, np.uint8)
            comm.recv(big, 0, tag=3)                           # posted while tag 3 is still arriving
            w5.wait()
            expect(small, 301, "tag 5 behind a 64 MiB message")
            expect(big, 300, "64 MiB message received while it arrived")
            x = np.full(1024, 1.0, np.float32)
            comm.all_reduce(x)
            assert float(x[0]) == 2.0
            buf = np.zeros(8 * MiB, np.uint8)
            comm.recv(buf, 0, tag=4)
            expect(buf, 400, "p2p message ahead of a collective")
            buf = np.zeros(5 * MiB, np.uint8)
            assert comm.recv(buf, None, tag=6) == 0
            expect(buf, 500, "receive from any source")
            comm.barrier()
            buf = np.zeros(192 * MiB, np.uint8)
            t0 = time.monotonic()
            try:
                comm.recv(buf, 0, tag=7, timeout=0.5)
            except CommTimeout:
                took = time.monotonic() - t0
            else:
                raise SystemExit("p2p_edges: a 192 MiB receive with a 0.5 s timeout completed (is the link limited?)")
            if took > 2.0:
                raise SystemExit(f"p2p_edges: the 0.5 s receive timeout fired after {took:.2f} s")
            print(f"P2P-EDGES-OK timeout_after={took:.2f}", flush=True)


if __name__ == "__main__":
    main()
