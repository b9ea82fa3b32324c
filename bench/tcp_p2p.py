"""``python -m bench.tcp_p2p``: point-to-point TCP between two simulated hosts, comms against iperf3.

The bar (issue #4): comms' point-to-point TCP between two simulated hosts reaches at least 90 % of
iperf3 on one stream between the same namespaces, measured in the same run.

    sudo .venv/bin/python -m bench.tcp_p2p [--rounds 5] [--time 5] [--size 16M] [--rate 2gbit] [--json r.json]

Contract:

* Needs root, ``ip``/``tc``/``unshare`` (tests/multihost.py) and ``iperf3`` on PATH;
  otherwise it prints why and exits 2 (a usage error also exits 2).
* Creates 2 simulated hosts x 1 rank (``SimulatedHosts``, each host on its own CPUs), links limited
  by ``--rate`` (tc tbf, both directions) when given, and keeps them for the whole run.
* Runs ``--rounds`` rounds; each round measures both, one after the other, the order flipping every
  round so drift on a busy machine hits both alike:
  - iperf3: ``iperf3 -s -1`` in host1's namespace (on host1's CPUs), ``iperf3 -c 10.99.0.2 -t T -J``
    in host0's; the figure is the receiver's ``end.sum_received.bits_per_second``;
  - comms: one torchrun agent per host (``sim.torchrun``), ``comms.init()`` from the torchrun
    environment; rank 0 (host0) ``comm.send``s ``--size`` byte messages to rank 1 (host1), which
    ``comm.recv``s them, for about T seconds, one direction like iperf3. Rank 1 times from the end of
    the first message to the end of the last one and reports bytes / time. Both ranks check that the
    transport between them is tcp, and rank 1 checks each message's sequence number at both ends.
* Prints one row per round (iperf3 Gbit/s, comms Gbit/s, comms / iperf3, and the TCP segments each
  retransmitted: iperf3's own count, host0's TcpRetransSegs over the comms run) and the medians; the
  verdict uses the median of the per-round ratios. ``--json FILE`` writes the same
  (schema ``comms-tcp-p2p/1``: options, machine, rounds, medians, bar, meets_bar).
* Exit status 0 when every measurement ran (whatever the ratio, unless ``--min-ratio R`` is given
  and the median ratio is below R: then 1); 1 when a measurement failed; 2 as above.
* Nothing is left behind: the harness kills every process in the namespaces and deletes them.

With ``--worker`` the module is the rank side (started by torchrun; not for direct use).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from . import cli, p2p_common

ROOT = p2p_common.ROOT
SCHEMA = "comms-tcp-p2p/1"
BAR = 0.90
IPERF_PORT = 5201
MARK = "TCP_P2P "


# -- rank side --------------------------------------------------------------------------------------
def _cpu() -> float:
    """CPU seconds this process used so far (every thread, user + system)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def worker(args) -> int:
    import numpy as np

    import comms

    with comms.init(timeout=args.time + 120) as comm:
        if comm.size != 2:
            raise SystemExit(f"tcp_p2p worker: needs 2 ranks, got {comm.size}")
        peer = 1 - comm.rank
        transport = comm.transports.get(peer)
        if transport != "tcp":
            raise SystemExit(f"tcp_p2p worker: rank {comm.rank} reaches rank {peer} over {transport!r}, not tcp")
        buf = np.zeros(args.size // 8, np.int64)
        comm.barrier()
        if comm.rank == 0:
            cpu0, t0 = _cpu(), time.perf_counter()
            seq, end = 0, t0 + args.time
            while True:
                last = time.perf_counter() >= end and seq >= 2
                buf[0] = buf[-1] = -1 if last else seq       # -1: the last message
                comm.send(buf, 1)
                if last:
                    break
                seq += 1
            cpu = (_cpu() - cpu0) / (time.perf_counter() - t0)
            print(MARK + json.dumps({"rank": 0, "messages": seq + 1, "transport": transport, "cpu": cpu}), flush=True)
        else:
            seq, t_first, t_last = 0, 0.0, 0.0
            while True:
                comm.recv(buf, 0)
                t = time.perf_counter()
                head, tail = int(buf[0]), int(buf[-1])
                if head != tail or head not in (seq, -1):
                    raise SystemExit(f"tcp_p2p worker: message {seq} arrived with sequence numbers {head}/{tail}")
                if seq == 0:
                    t_first, cpu0 = t, _cpu()
                t_last = t
                seq += 1
                if head == -1:
                    break
            nbytes = (seq - 1) * buf.nbytes                  # every message after the first one
            secs = t_last - t_first
            cpu = (_cpu() - cpu0) / secs if secs > 0 else 0.0
            stats = comm.stats() if hasattr(comm, "stats") else {}
            print(MARK + json.dumps({"rank": 1, "messages": seq, "bytes": nbytes, "seconds": secs,
                                     "bits_per_second": nbytes * 8 / secs if secs > 0 else 0.0,
                                     "transport": transport, "message_bytes": buf.nbytes, "cpu": cpu,
                                     "stats": {k: v for k, v in stats.items() if isinstance(v, (int, float))}}),
                  flush=True)
    return 0


# -- driver -----------------------------------------------------------------------------------------

def run_iperf3(sim, seconds: float) -> dict:
    """One single-stream iperf3 run host0 -> host1; the receiver's bit rate and the raw summary."""
    argv = ["iperf3", "-s", "-1", "-B", sim.addrs[1], "-p", str(IPERF_PORT)]
    with p2p_common.server_on_host1(sim, argv, IPERF_PORT, grace=5.0):
        p = sim.exec(0, ["iperf3", "-c", sim.addrs[1], "-p", str(IPERF_PORT), "-t", f"{seconds:g}", "-J"],
                     timeout=seconds + 60)
        try:
            doc = json.loads(p.stdout)
        except ValueError:
            raise RuntimeError(f"iperf3 client: exit {p.returncode}, output not JSON: {p.stdout[-2000:]}") from None
        if p.returncode != 0 or "error" in doc:
            raise RuntimeError(f"iperf3 client: exit {p.returncode}: {doc.get('error', p.stdout[-2000:])}")
        recv, sent = doc["end"]["sum_received"], doc["end"]["sum_sent"]
        cpu = doc["end"].get("cpu_utilization_percent", {})
        return {"bits_per_second": float(recv["bits_per_second"]), "bytes": int(recv["bytes"]),
                "seconds": float(recv["seconds"]), "retransmits": sent.get("retransmits"),
                "sender_bits_per_second": float(sent["bits_per_second"]),
                "cpu_sender": cpu.get("host_total", 0.0) / 100, "cpu_receiver": cpu.get("remote_total", 0.0) / 100}


def _retransmits(sim) -> int:
    """TCP segments host0's network namespace has retransmitted so far (TcpRetransSegs, /proc/net/snmp)."""
    lines = [line.split() for line in sim.exec(0, ["cat", "/proc/net/snmp"]).stdout.splitlines()
             if line.startswith("Tcp:")]
    return int(lines[1][lines[0].index("RetransSegs")])


def run_comms(sim, args, port: int) -> dict:
    retrans = _retransmits(sim)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "COMMS_CALIBRATE": "0", "OMP_NUM_THREADS": "1"}
    results = sim.torchrun("-m", "bench.tcp_p2p", "--worker", "--time", f"{args.time:g}", "--size", str(args.size),
                           port=port, timeout=args.time + args.timeout, env=env)
    if not all(r.ok for r in results):
        raise RuntimeError("comms ranks failed:\n" + sim.report(results))
    docs = {}
    for r in results:
        for line in r.lines():
            if MARK in line:
                d = json.loads(line.split(MARK, 1)[1])
                docs[d["rank"]] = d
    if sorted(docs) != [0, 1]:
        raise RuntimeError("comms ranks did not report:\n" + sim.report(results))
    rx = docs[1]
    out = {k: rx[k] for k in ("bits_per_second", "bytes", "seconds", "messages", "message_bytes", "transport",
                              "stats")}
    out["cpu_sender"], out["cpu_receiver"] = docs[0]["cpu"], rx["cpu"]
    out["retransmits"] = _retransmits(sim) - retrans       # the whole run, rendezvous included
    return out


def _machine() -> dict:
    return dict(p2p_common.machine(), iperf3=subprocess.run(["iperf3", "--version"], stdout=subprocess.PIPE,
                                                            text=True).stdout.splitlines()[0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tcp_p2p", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="rounds, each one iperf3 and one comms run (default 5)")
    ap.add_argument("--time", type=float, default=5.0, help="seconds per measurement (default 5)")
    ap.add_argument("--size", type=cli.parse_size, default=16 << 20, help="comms message bytes, K/M/G suffixes (default 16M)")
    cli.sim_options(ap)
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--min-ratio", type=float, default=None, help="exit 1 when the median ratio is below this")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds a comms run may take beyond --time")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.size < 16 or args.size % 8:
        ap.error("--size must be a multiple of 8 bytes, at least 16")
    if args.rounds < 1 or args.time <= 0:
        ap.error("--rounds and --time must be positive")
    if args.worker:
        return worker(args)

    mh = p2p_common.simulated_hosts_or_reason("tcp_p2p", "iperf3",
                                              "DEBIAN_FRONTEND=noninteractive apt-get install -y iperf3")
    if mh is None:
        return 2
    print(f"# tcp_p2p: 2 simulated hosts x 1 rank, host0 -> host1, {args.rounds} rounds of {args.time:g} s, "
          f"comms messages of {args.size / 2**20:g} MiB, {cli.sim_label(args)}",
          flush=True)
    rounds = []
    with p2p_common.two_hosts(mh, args) as sim:
        print(f"{'round':>5}  {'iperf3 Gbit/s':>13}  {'comms Gbit/s':>12}  {'ratio':>6}  {'retransmits iperf3/comms':>24}",
              flush=True)
        for i in range(args.rounds):
            order = ("iperf3", "comms") if i % 2 == 0 else ("comms", "iperf3")
            got = {}
            for what in order:
                got[what] = run_iperf3(sim, args.time) if what == "iperf3" else run_comms(sim, args, 29500 + i)
            ratio = got["comms"]["bits_per_second"] / got["iperf3"]["bits_per_second"]
            rounds.append({"round": i, "order": list(order), "iperf3_gbps": got["iperf3"]["bits_per_second"] / 1e9,
                           "comms_gbps": got["comms"]["bits_per_second"] / 1e9, "ratio": ratio,
                           "iperf3": got["iperf3"], "comms": got["comms"]})
            retrans = f"{got['iperf3']['retransmits']}/{got['comms']['retransmits']}"
            print(f"{i:>5}  {rounds[-1]['iperf3_gbps']:>13.2f}  {rounds[-1]['comms_gbps']:>12.2f}  {ratio:>6.3f}  "
                  f"{retrans:>24}", flush=True)
    med = {k: statistics.median(r[k] for r in rounds) for k in ("iperf3_gbps", "comms_gbps", "ratio")}
    meets = med["ratio"] >= BAR
    print(f"median  {med['iperf3_gbps']:>13.2f}  {med['comms_gbps']:>12.2f}  {med['ratio']:>6.3f}")
    print(f"# median ratio {med['ratio']:.3f}: {'meets' if meets else 'misses'} the bar "
          f"(comms >= {BAR:.0%} of iperf3)")
    if args.json:
        p2p_common.write_json(args.json, SCHEMA, args, machine=_machine(), rounds=rounds, median=med, bar=BAR,
                              meets_bar=meets)
    if args.min_ratio is not None and med["ratio"] < args.min_ratio:
        return 1
    return 0



if __name__ == "__main__":
    sys.exit(p2p_common.run_main("tcp_p2p", main))
