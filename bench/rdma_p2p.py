"""``python -m bench.rdma_p2p``: point-to-point between two simulated hosts over the rdma transport,
against libfabric's own ``fi_pingpong`` with the same provider, between the same namespaces.

The bars (the rdma transport's issue): comms' bandwidth at 1 MiB and 16 MiB at least 80 % of
fi_pingpong's, and its 8 B latency at most 1.5x fi_pingpong's, on the same provider.

    sudo .venv/bin/python -m bench.rdma_p2p [--rounds 5] [--sizes 8,1M,16M] [--provider tcp] [--rate R [--shaper htb]] [--cpus shared] [--json r.json]

Contract:

* Needs root, ``ip``/``tc``/``unshare`` (tests/multihost.py) and ``fi_pingpong`` (libfabric-bin);
  otherwise it prints why and exits 2 (a usage error also exits 2).
* Creates 2 simulated hosts x 1 rank (``SimulatedHosts``, each host on its own CPUs), links limited
  by ``--rate`` when given, kept for the whole run.
* Both sides measure the same thing, fi_pingpong's: a ping-pong of one message of each size,
  ``iters`` round trips after a warm-up; ``usec/xfer`` is the time of a round trip over 2, and MB/s
  is the size over that (MB = 10^6 B):
  - fi_pingpong: ``fi_pingpong -p PROVIDER -e rdm -S SIZE -I ITERS`` as the server in host1's
    namespace, the client in host0's; the client's row is the figure;
  - comms: one torchrun agent per host, ``COMMS_TRANSPORT=rdma FI_PROVIDER=PROVIDER``; rank 0
    (host0) ``comm.send``s then ``comm.recv``s, rank 1 the reverse, through the public calls; both
    ranks check that the transport between them is rdma.
* Runs ``--rounds`` rounds, each measuring both (the order flipping every round); prints one row per
  round and size and the medians; the verdict uses the median of the per-round ratios.
  ``--json FILE`` writes the same (schema ``comms-rdma-p2p/1``).
* Exit status 0 when every measurement ran (1 with ``--strict`` when a bar is missed); 1 when a
  measurement failed; 2 as above. Nothing is left behind (the harness deletes the namespaces).

With ``--worker`` the module is the rank side (started by torchrun; runs under any launcher).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from . import cli, p2p_common

ROOT = p2p_common.ROOT
SCHEMA = "comms-rdma-p2p/1"
BW_BAR = 0.80                 # comms MB/s / fi_pingpong MB/s, at least (sizes >= 1 MiB)
LAT_BAR = 1.5                 # comms usec / fi_pingpong usec, at most (sizes < 1 MiB)
MARK = "RDMA_P2P "
PP_PORT = 47592


def iterations(size: int, scale: float = 1.0) -> int:
    """Round trips per size, as fi_pingpong's own sweep picks them (fewer for large sizes)."""
    base = 2000 if size < 64 << 10 else 200 if size < 4 << 20 else 20
    return max(5, int(base * scale))


# -- rank side --------------------------------------------------------------------------------------
def worker(args) -> int:
    import numpy as np

    import comms

    with comms.init(timeout=300) as comm:
        peer = 1 - comm.rank
        if comm.size != 2 or comm.transports.get(peer) != "rdma":
            raise SystemExit(f"rdma_p2p worker: needs 2 ranks over rdma, got {comm.size} ranks, "
                             f"transports {comm.transports}")
        for size in args.sizes:
            buf = np.zeros(max(size, 1), np.uint8)[:size]
            iters = iterations(size, args.iters_scale)
            for n, timed in ((max(10, iters // 10), False), (iters, True)):
                comm.barrier()
                t0 = time.perf_counter()
                for _ in range(n):
                    if comm.rank == 0:
                        comm.send(buf, peer)
                        comm.recv(buf, peer)
                    else:
                        comm.recv(buf, peer)
                        comm.send(buf, peer)
                secs = time.perf_counter() - t0
            usec = secs / (2 * iters) * 1e6
            if comm.rank == 0:
                print(MARK + json.dumps({"size": size, "iters": iters, "usec": usec, "mbps": size / usec,
                                         "transport": comm.transports[peer]}), flush=True)
        st = comm.stats()
        if comm.rank == 0:
            print(MARK + json.dumps({"stats": {k: v for k, v in st.items() if k.startswith("rdma")}}), flush=True)
    return 0


# -- driver -----------------------------------------------------------------------------------------

def run_pingpong(sim, provider: str, size: int, iters: int) -> dict:
    """fi_pingpong host1 (server) <- host0 (client): the client's row."""
    argv = ["fi_pingpong", "-p", provider, "-e", "rdm", "-S", str(size), "-I", str(iters), "-B", str(PP_PORT)]
    with p2p_common.server_on_host1(sim, argv, PP_PORT):
        client = ["fi_pingpong", "-p", provider, "-e", "rdm", "-S", str(size), "-I", str(iters), "-P", str(PP_PORT),
                  sim.addrs[1]]
        p = sim.exec(0, client, timeout=300)
        rows = [ln.split() for ln in p.stdout.splitlines() if ln.split() and ln.split()[0][0].isdigit()]
        if p.returncode != 0 or not rows or len(rows[-1]) < 8:
            raise RuntimeError(f"fi_pingpong client: exit {p.returncode}: {p.stdout[-2000:]}")
        row = rows[-1]
        return {"size": size, "iters": iters, "usec": float(row[6]), "mbps": float(row[5]), "row": " ".join(row)}


def run_comms(sim, args, port: int) -> dict:
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "COMMS_CALIBRATE": "0", "OMP_NUM_THREADS": "1", "COMMS_TRANSPORT": "rdma", "FI_PROVIDER": args.provider}
    results = sim.torchrun("-m", "bench.rdma_p2p", "--worker", "--sizes", ",".join(map(str, args.sizes)),
                           "--iters-scale", f"{args.iters_scale:g}", port=port, timeout=args.timeout, env=env)
    if not all(r.ok for r in results):
        raise RuntimeError("comms ranks failed:\n" + sim.report(results))
    out = {"stats": {}}
    for line in results[0].lines():
        if MARK in line:
            d = json.loads(line.split(MARK, 1)[1])
            if "stats" in d:
                out["stats"] = d["stats"]
            else:
                out[d["size"]] = d
    if any(s not in out for s in args.sizes):
        raise RuntimeError("comms ranks did not report every size:\n" + sim.report(results))
    return out


def _ratio(size: int, comms_row: dict, pp_row: dict) -> tuple[str, float]:
    """(what, ratio): latency ratio (lower is better) below 1 MiB, bandwidth ratio at 1 MiB and up."""
    if size >= 1 << 20:
        return "bandwidth", comms_row["mbps"] / pp_row["mbps"]
    return "latency", comms_row["usec"] / pp_row["usec"]


def _meets(size: int, what: str, ratio: float) -> bool:
    return ratio >= BW_BAR if what == "bandwidth" else ratio <= LAT_BAR


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.rdma_p2p", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="rounds, each one fi_pingpong and one comms run (default 5)")
    ap.add_argument("--sizes", default="8,1M,16M", help="message sizes, comma-separated, K/M suffixes (default 8,1M,16M)")
    ap.add_argument("--provider", default="tcp", help="libfabric provider for both (default tcp: tcp;ofi_rxm)")
    ap.add_argument("--iters-scale", type=float, default=1.0, help="scale the round trips per size (default 1)")
    cli.sim_options(ap)
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a median misses its bar")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds a comms launch may take")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        args.sizes = [cli.parse_size(s) for s in args.sizes.split(",") if s.strip()]
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
    if not args.sizes or args.rounds < 1 or args.iters_scale <= 0:
        ap.error("--sizes needs at least one size; --rounds and --iters-scale must be positive")
    if args.worker:
        return worker(args)
    mh = p2p_common.simulated_hosts_or_reason("rdma_p2p", "fi_pingpong", "apt-get install -y libfabric-bin")
    if mh is None:
        return 2
    print(f"# rdma_p2p: 2 simulated hosts x 1 rank, provider {args.provider}, {args.rounds} rounds, sizes "
          f"{', '.join(map(str, args.sizes))} B, {cli.sim_label(args)}",
          flush=True)
    rounds = []
    with p2p_common.two_hosts(mh, args) as sim:
        print(f"{'round':>5} {'size':>9}  {'fi_pingpong us':>14} {'MB/s':>9}  {'comms us':>9} {'MB/s':>9}  "
              f"{'ratio':>6} {'(of)':<9}", flush=True)
        for i in range(args.rounds):
            order = ("fi_pingpong", "comms") if i % 2 == 0 else ("comms", "fi_pingpong")
            got = {}
            for what in order:
                if what == "comms":
                    got["comms"] = run_comms(sim, args, 29500 + i)
                else:
                    got["fi_pingpong"] = {s: run_pingpong(sim, args.provider, s, iterations(s, args.iters_scale))
                                          for s in args.sizes}
            for s in args.sizes:
                c, p = got["comms"][s], got["fi_pingpong"][s]
                what, ratio = _ratio(s, c, p)
                rounds.append({"round": i, "order": list(order), "size": s, "fi_pingpong": p, "comms": c,
                               "ratio": ratio, "of": what})
                print(f"{i:>5} {s:>9}  {p['usec']:>14.2f} {p['mbps']:>9.1f}  {c['usec']:>9.2f} {c['mbps']:>9.1f}  "
                      f"{ratio:>6.3f} {what:<9}", flush=True)
            rounds[-1]["stats"] = got["comms"]["stats"]
    medians, ok = {}, True
    for s in args.sizes:
        rows = [r for r in rounds if r["size"] == s]
        what = rows[0]["of"]
        med = {"fi_pingpong_usec": statistics.median(r["fi_pingpong"]["usec"] for r in rows),
               "fi_pingpong_mbps": statistics.median(r["fi_pingpong"]["mbps"] for r in rows),
               "comms_usec": statistics.median(r["comms"]["usec"] for r in rows),
               "comms_mbps": statistics.median(r["comms"]["mbps"] for r in rows),
               "ratio": statistics.median(r["ratio"] for r in rows), "of": what}
        med["meets_bar"] = _meets(s, what, med["ratio"])
        ok &= med["meets_bar"]
        medians[s] = med
        bar = f">= {BW_BAR:.0%} of fi_pingpong's bandwidth" if what == "bandwidth" else \
            f"<= {LAT_BAR:g}x fi_pingpong's latency"
        print(f"# {s} B: median {what} ratio {med['ratio']:.3f} (fi_pingpong {med['fi_pingpong_usec']:.2f} us "
              f"{med['fi_pingpong_mbps']:.1f} MB/s, comms {med['comms_usec']:.2f} us {med['comms_mbps']:.1f} MB/s): "
              f"{'meets' if med['meets_bar'] else 'misses'} the bar ({bar})", flush=True)
    if args.json:
        p2p_common.write_json(args.json, SCHEMA, args, machine=p2p_common.machine(), rounds=rounds,
                              median={str(k): v for k, v in medians.items()},
                              bars={"bandwidth": BW_BAR, "latency": LAT_BAR}, meets_bars=ok)
    return 1 if args.strict and not ok else 0



if __name__ == "__main__":
    sys.exit(p2p_common.run_main("rdma_p2p", main))
