"""``python -m comms.info [--json]``: whether the job is authenticated, the topology, the registered
transports (with the cost model's route), every config knob with its value and source (a secret's
value hidden), and the algorithm selection table.

Under a launcher (RANK and WORLD_SIZE set, e.g. ``python -m comms.run -n 4 -m comms.info``) it
initialises a communicator and rank 0 prints what the whole group sees; otherwise it describes
this process alone.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

from . import algorithms, config
from .api import init
from .security import token
from .selection.model import Link, describe
from .selection.rules import Selector

SIZES = [8 << (2 * i) for i in range(13)]      # 8 B .. 128 MiB, x4


def _size(n: int) -> str:
    for unit, div in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


def transports_available() -> list[dict]:
    """Every registered transport (comms.transports.ORDER), in the order init tries them: its name,
    the cost model's default link, whether its exchanges of one step wait as one, and what it
    reports about this host (``Transport.describe()``)."""
    from .transports import ORDER
    return [{"name": cls.name, "link": asdict(cls.link), "waits_together": cls.waits_together,
             "describe": cls.describe()} for cls in ORDER]


def security() -> dict:
    """Whether this process runs an authenticated job, and from which knob (never the token)."""
    if not token.authenticated():
        return {"authenticated": False, "source": None}
    source = "COMMS_AUTH_TOKEN" if config.source("AUTH_TOKEN") == "env" else "COMMS_AUTH_TOKEN_FILE"
    return {"authenticated": True, "source": source}


def describe_security(sec: dict) -> str:
    if not sec["authenticated"]:
        return "unauthenticated: set COMMS_AUTH_TOKEN or COMMS_AUTH_TOKEN_FILE"
    return (f"authenticated ({sec['source']}): store values carry HMAC tags, data-plane connections open with a "
            "mutual challenge-response")


def gather(comm) -> dict:
    sel = comm._selector if comm is not None else Selector()
    table = {coll: {_size(n): sel.candidates(coll, n)[0] for n in SIZES} for coll in algorithms.REGISTRY}
    contested = {coll: {_size(n): list(alts) for n in SIZES if (alts := sel.contest(coll, n))}
                 for coll in algorithms.REGISTRY}
    return {
        "security": security(),
        "topology": comm.topology.as_dict() if comm is not None else None,
        "transports": {str(k): v for k, v in comm.transports.items()} if comm is not None else {},
        "transports_available": transports_available(),
        # one rank has no pair to route: its fallback would say nothing of a real job's
        "route": comm.route._asdict() if comm is not None and comm.size > 1 else None,
        "config": [{"name": n, "value": v, "source": s, "doc": d} for n, v, s, d in config.snapshot()],
        "rules": sel.table(),
        "cost_model": comm.calibration.params.as_dict() if comm is not None else None,
        "oversubscription": comm.oversubscription() if comm is not None else 1.0,
        "algorithms": {c: {n: a.doc for n, a in algos.items()} for c, algos in algorithms.REGISTRY.items()},
        "selection": table,
        "alternatives": {c: alts for c, alts in contested.items() if alts},   # timed online (comms.selection.online)
        "tuned": comm.calibration.rules if comm is not None else "",
    }


def render(info: dict, comm) -> str:
    out = ["# security", describe_security(info["security"]),
           "\n# topology", comm.topology.describe() if comm is not None else "(no communicator)"]
    if info["transports"]:
        out.append("transports from rank 0: " + ", ".join(f"{p}: {t}" for p, t in info["transports"].items()))
    out.append("\n# transports (tried in this order)")
    for t in info["transports_available"]:
        facts = "".join(f", {k} {v}" for k, v in t["describe"].items())
        out.append(f"  {t['name']:<8} default {Link(**t['link'])}, waits together {t['waits_together']}{facts}")
    route = info.get("route")
    if route:
        out.append(f"  route: {route['intra']} inside a host, {route['inter']} between hosts, "
                   f"{route['intra']} exchanges of a step wait {'together' if route['together'] else 'apart'}")
    else:
        out.append("  route: chosen per pair of ranks when a job starts (run under comms.run or torchrun to see it)")
    out.append("\n# config")
    for c in info["config"]:
        out.append(f"{c['name']:<24} {str(c['value']):<12} ({c['source']})  {c['doc']}")
    cm = info.get("cost_model")
    if cm:
        out.append(f"\n# cost model ({cm['source']}): {describe(cm)}")
        if info.get("oversubscription", 1.0) > 1.0:
            out.append(f"# priced with {info['oversubscription']:g} ranks per core: bandwidths and reduction speed "
                       f"divided by {info['oversubscription']:g} (every rank busy at once)")
    if comm is not None and comm.size > 1:
        out.append(f"# tuned rules (python -m comms.tune): {'in use, listed below' if info['tuned'] else 'none for this host signature'}")
    out.append("\n# selection rules (first match wins: user, then tuned, then the cost model's)")
    out.extend(f"  {r}" for r in info["rules"])
    out.append("\n# algorithms")
    for coll, algos in info["algorithms"].items():
        for name, doc in algos.items():
            out.append(f"  {coll + ':' + name:<30} {doc}")
    out.append("\n# selection by message size")
    header = f"{'collective':<16}" + "".join(f"{s:>10}" for s in info["selection"]["all_reduce"])
    out.append(header)
    alts = info.get("alternatives", {})
    for coll, row in info["selection"].items():
        out.append(f"{coll:<16}" + "".join(f"{a + ('*' if n in alts.get(coll, {}) else ''):>10}"
                                           for n, a in row.items()))
    if alts:
        out.append("* the rule names alternatives: the first calls of each size time them and keep the fastest "
                   "(COMMS_ONLINE_ROUNDS)")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m comms.info", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the same information as JSON")
    args = ap.parse_args(argv)
    comm = None
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        comm = init()
    else:
        from torch.distributed import HashStore
        comm = init(rank=0, world_size=1, store=HashStore())
    try:
        info = gather(comm)
        if comm.rank == 0:
            print(json.dumps(info, indent=1, default=str) if args.json else render(info, comm))
    finally:
        comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
