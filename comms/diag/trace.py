"""Post-mortem of flight-recorder dumps: which rank hung, and where.

    python -m comms.trace analyze DIR [--json]

Reads every ``*.rank<R>.json`` dump in DIR (see comms.diag.flight), groups them by communicator, and
walks the collective sequence numbers that every rank's ring still covers. At the first number
where the ranks disagree it reports:

- ranks that never reached it (missing: behind, or they skipped a collective),
- ranks that called a different operation (or the same one with another dtype, count or root),
- ranks still waiting in it (started, not done) while others finished or never came.

Ranks without a dump at all are reported as missing too (a dead or wedged process).
Exit status: 0 when a divergence was found and reported, 1 when the ranks agree, 2 on bad input.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections import defaultdict


def load(directory: str) -> dict[str, dict[int, dict]]:
    """{communicator prefix: {rank: dump}} from every dump file in ``directory``."""
    comms: dict[str, dict[int, dict]] = defaultdict(dict)
    for path in sorted(glob.glob(os.path.join(directory, "*.rank*.json"))):
        with open(path) as f:
            doc = json.load(f)
        comms[doc["comm"]][int(doc["rank"])] = doc
    return dict(comms)


def _signature(e: dict) -> tuple:
    return (e["op"], e["dtype"], e["count"], e["root"], e["redop"])


def _describe(e: dict) -> str:
    root = f", root {e['root']}" if e["root"] >= 0 else ""
    return f"{e['op']}({e['dtype']} x {e['count']}{root})"


def analyze_comm(dumps: dict[int, dict]) -> dict:
    """The first divergence among one communicator's ranks (see the module docstring)."""
    size = max(d["size"] for d in dumps.values())
    absent = [r for r in range(size) if r not in dumps]
    colls = {r: {e["seq"]: e for e in d["entries"] if e["kind"] == "coll"} for r, d in dumps.items()}
    last = {r: max(c) if c else 0 for r, c in colls.items()}
    first = max((min(c) if c else 1) for c in colls.values()) if colls else 1
    top = max(last.values(), default=0)
    for seq in range(first, top + 1):
        present = {r: c[seq] for r, c in colls.items() if seq in c}
        missing = sorted(r for r in colls if seq not in colls[r])
        sigs = defaultdict(list)
        for r, e in present.items():
            sigs[_signature(e)].append(r)
        waiting = sorted(r for r, e in present.items() if e["state"] == "started")
        failed = sorted(r for r, e in present.items() if e["state"] == "failed")
        if not missing and len(sigs) == 1 and not waiting and not failed and not absent:
            continue
        majority = max(sigs.values(), key=len) if sigs else []
        different = sorted(r for group in sigs.values() if group is not majority for r in group)
        report = {"seq": seq, "missing": missing + absent, "different_op": different,
                  "waiting": waiting, "failed": failed,
                  "calls": {r: _describe(e) for r, e in sorted(present.items())},
                  "last_seq": {r: last[r] for r in sorted(last)}}
        culprits = sorted(set(missing + absent + different))
        report["culprits"] = culprits or waiting
        return report
    return {}


def explain(comm: str, rep: dict) -> list[str]:
    if not rep:
        return [f"{comm}: all ranks agree on every collective in their recorders"]
    lines = [f"{comm}: ranks diverge at collective seq {rep['seq']}"]
    for r in rep["missing"]:
        lines.append(f"  rank {r} never reached seq {rep['seq']} (its last collective is seq "
                     f"{rep['last_seq'].get(r, 'unknown: no dump')}): behind, or it skipped a collective")
    for r in rep["different_op"]:
        lines.append(f"  rank {r} called {rep['calls'][r]} where the others called something else")
    if rep["waiting"]:
        lines.append(f"  ranks {', '.join(map(str, rep['waiting']))} are waiting in {rep['calls'][rep['waiting'][0]]}")
    if rep["failed"]:
        lines.append(f"  ranks {', '.join(map(str, rep['failed']))} failed in seq {rep['seq']}")
    lines.append(f"  suspect: rank{'s' if len(rep['culprits']) != 1 else ''} "
                 f"{', '.join(map(str, rep['culprits']))}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m comms.trace", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    an = sub.add_parser("analyze", help="name the ranks that diverged, from a directory of dumps")
    an.add_argument("dir")
    an.add_argument("--json", action="store_true", help="print the findings as JSON")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.dir):
        print(f"comms.trace: {args.dir} is not a directory", file=sys.stderr)
        return 2
    comms = load(args.dir)
    if not comms:
        print(f"comms.trace: no flight-recorder dumps (*.rank<R>.json) in {args.dir}", file=sys.stderr)
        return 2
    reports = {c: analyze_comm(d) for c, d in sorted(comms.items())}
    if args.json:
        print(json.dumps(reports, indent=1))
    else:
        for c, rep in reports.items():
            print("\n".join(explain(c, rep)))
    return 0 if any(reports.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
