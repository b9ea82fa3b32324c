"""Aggregation over launches, the nccl-tests style tables, machine info, the JSON document
(the plot is bench.plot).

A launch's figure for a size is the slowest rank's median time per op (:mod:`bench.worker`). Over
launches, the table shows the median figure (``time``) and the smallest and largest (``min``,
``max``); bandwidths come from the median. ``vs_gloo`` is gloo's time over this row's time (above 1:
faster than gloo), on every row other than gloo's own. Rows are (op, size, place, backend); a row
of a mode its backend cannot run natively shows ``n/a`` and the footer gives the reason.
"""
from __future__ import annotations

import math
import os
import platform
import statistics
from dataclasses import dataclass, field

from . import backends, ops
from .cli import human_size

BASELINE = "gloo"      # the backend every other row is compared with


@dataclass
class Launch:
    """One fresh launch of one backend (by label): its JSON document, or why there is none."""
    backend: str
    index: int
    seconds: float
    doc: dict | None = None
    error: str | None = None
    tail: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.doc is not None


# -- machine -----------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    return None


def machine_info(env: dict[str, str] | None = None, specs: list[backends.Spec] | None = None) -> dict:
    """nproc, CPU model, memory, kernel, Python/torch/comms versions, and the knobs in ``env``
    (default: this process's environment; the driver passes the launches' environment)."""
    from importlib import metadata

    def version(dist: str) -> str:   # from the installed metadata: importing torch costs ~1.5 s of CPU
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count()
    knobs = {k: v for k, v in sorted((os.environ if env is None else env).items())
             if k.startswith(("COMMS_", "GLOO_", "TP_", "OMPI_", "UCX_")) or k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return {"nproc": os.cpu_count(), "affinity": affinity, "cpu": _cpu_model(), "mem_gib": _mem_gib(),
            "kernel": platform.release(), "python": platform.python_version(), "torch": version("torch"),
            "comms": version("comms"), "hostname": platform.node(), "env": knobs}


def header(command: str, args, info: dict, specs: list[backends.Spec], skipped: list[tuple[str, str]]) -> list[str]:
    """The ``#`` lines printed before the tables."""
    sizes = args.sizes
    step = f"+{human_size(args.stepbytes)}" if args.stepbytes else f"x{args.stepfactor:g}"
    iters = (f"{args.iters}" if args.iters else
             f"adaptive (~{args.target_time:g} s per size per launch; 8 B: 2000 ops)")
    mem = f", {info['mem_gib']:.1f} GiB RAM" if info["mem_gib"] else ""
    env = " ".join(f"{k}={v}" for k, v in info["env"].items()) or "(none)"
    places = " and ".join(ops.PLACE_NAMES[p] for p in args.places)
    lines = [
        "# bench: nccl-tests style collective benchmark (comms vs peers)",
        f"# command: {command}",
        f"# ops: {','.join(args.ops)}  places: {places}  dtype: {args.dtype}  root: {args.root}  ranks: {args.np}  "
        f"launches: {args.launches} per backend",
        f"# backends: {','.join(s.label for s in specs)}"
        + "".join(f"  (skipped {label}: not installed)" for label, _ in skipped),
        f"# sizes: {human_size(sizes[0])} .. {human_size(sizes[-1])}, step {step} ({len(sizes)} sizes)  "
        f"iters: {iters}  warmup: {args.warmup if args.warmup is not None else 'auto'}  check: {args.check}",
        "# timing: " + ("every op on its own" if args.batch == 1 else
                        f"batches of {args.batch} ops below 64 KiB, single ops above") + ", time.perf_counter",
        f"# machine: nproc {info['nproc']} (affinity {info['affinity']}), {info['cpu']}{mem}, "
        f"Linux {info['kernel']}",
        f"# software: Python {info['python']}, torch {info['torch']}, comms {info['comms']}",
        f"# env: {env}",
    ]
    for s in specs:
        if s.base == "mpi":
            from .driver import MPI_DEFAULTS
            mca = " ".join(f"{k}={(info['env'].get(k) or v)}" for k, v in MPI_DEFAULTS.items())
            lines.append(f"# {s.label}: mpirun --allow-run-as-root --oversubscribe -np {args.np}; {mca}")
        if s.env:
            lines.append(f"# {s.label}: {s.base} with " + " ".join(f"{k}={v}" for k, v in s.env.items()))
    lines.append("# figure: per launch, the slowest rank's median time per op; time = median over launches, "
                 "min/max = extremes over launches")
    return lines


# -- aggregation -------------------------------------------------------------------------------
def baseline(specs: list[backends.Spec]) -> str | None:
    """The label ``vs_gloo`` compares with: ``gloo`` itself, else the first gloo variant."""
    labels = [s.label for s in specs if s.base == BASELINE]
    return BASELINE if BASELINE in labels else (labels[0] if labels else None)


def aggregate(args, specs: list[backends.Spec], layouts: dict[str, list[ops.Layout]],
              launches: dict[str, list[Launch]]) -> list[dict]:
    """One row per (op, size, place, backend): ops in command-line order, then sizes, then places
    (out-of-place first), then backends in command-line order. Rows of a mode a backend cannot run
    natively carry its reason in ``na`` and no figures."""
    nranks, rows = args.np, []
    base = baseline(specs)
    for name in args.ops:
        op = ops.lookup(name, args.moe)
        found: dict[tuple, list[tuple[Launch, dict]]] = {}
        na_seen: dict[tuple, str] = {}
        for s in specs:
            for ln in launches.get(s.label, []):
                if not ln.ok:
                    continue
                for res in ln.doc["results"]:
                    if res["op"] != name:
                        continue
                    if res["na"]:
                        na_seen[(s.label, res["place"])] = res["na"]
                    for r in res["rows"]:
                        found.setdefault((s.label, res["place"], r["nbytes"]), []).append((ln, r))
        for lay in layouts[name]:
            factor = op.bus_factor_for(lay, nranks)
            for place in args.places:
                by_label = {}
                for s in specs:
                    hits = found.get((s.label, place, lay.nbytes), [])
                    figs = [r["time_us"] for _, r in hits]
                    med = statistics.median(figs) if figs else None
                    na = backends.BACKENDS[s.base].native(name, place, args.dtype) or na_seen.get((s.label, place))
                    row = {
                        "backend": s.label, "library": s.base, "env": dict(s.env), "op": name, "ranks": nranks,
                        "bytes": lay.nbytes, "count": lay.count, "dtype": args.dtype, "type": ops.nccl_name(args.dtype),
                        "redop": op.redop, "root": args.root if op.rooted else -1, "place": place,
                        "algorithm": "/".join(dict.fromkeys(r["algorithm"] for _, r in hits)) or "-",
                        "transport": "/".join(dict.fromkeys(ln.doc["transport"] for ln, _ in hits)) or "-",
                        "time_us": {"median": med, "min": min(figs) if figs else None,
                                    "max": max(figs) if figs else None},
                        "algbw": lay.nbytes / med / 1e3 if med else None,
                        "busbw": lay.nbytes / med / 1e3 * factor if med else None,
                        "bus_factor": factor,
                        "wrong": sum(r["wrong"] for _, r in hits) if hits and args.check else None,
                        "na": na, "vs_gloo": None,
                        "launch_us": figs, "launch_index": [ln.index for ln, _ in hits],
                        "iters": [r["iters"] for _, r in hits],
                        "rank_median_us": [r["rank_median_us"] for _, r in hits],
                    }
                    by_label[s.label] = row
                    rows.append(row)
                ref = by_label.get(base) if base else None
                for label, row in by_label.items():
                    if label != base and ref and ref["time_us"]["median"] and row["time_us"]["median"]:
                        row["vs_gloo"] = ref["time_us"]["median"] / row["time_us"]["median"]
    return rows


def shown_places(rows: list[dict], op: str, places: list[str]) -> list[str]:
    """The places the table shows for ``op``: those at least one backend of the run does natively."""
    return [p for p in places if any(r["op"] == op and r["place"] == p and not r["na"] for r in rows)]


# -- table -------------------------------------------------------------------------------------
_COLS = [  # (title, unit, width)
    ("size", "(B)", 12), ("count", "(elements)", 12), ("type", "", 8), ("redop", "", 6), ("root", "", 5),
    ("place", "", 5), ("backend", "", 8), ("algorithm", "", 10), ("transport", "", 9), ("time", "(us)", 10),
    ("min", "(us)", 10), ("max", "(us)", 10), ("algbw", "(GB/s)", 8), ("busbw", "(GB/s)", 8), ("#wrong", "", 7),
    ("vs_gloo", "(x)", 8),
]


def _us(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.2f}" if v < 1e5 else f"{v:.0f}"


def _bw(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _widths(rows: list[dict]) -> list[int]:
    w = [c[2] for c in _COLS]
    labels = [r["backend"] for r in rows] + [r["algorithm"] for r in rows] + [r["transport"] for r in rows]
    w[6] = max([w[6]] + [len(r["backend"]) for r in rows])
    w[7] = max([w[7]] + [len(r["algorithm"]) for r in rows])
    w[8] = max([w[8]] + [len(r["transport"]) for r in rows])
    del labels
    return w


def format_row(row: dict, widths: list[int] | None = None) -> str:
    t = row["time_us"]
    if row["na"]:
        wrong = "n/a"
    else:
        wrong = "N/A" if row["wrong"] is None else str(row["wrong"])
    cells = [str(row["bytes"]), str(row["count"]), row["type"], row["redop"], str(row["root"]), row["place"],
             row["backend"], row["algorithm"], row["transport"], _us(t["median"]), _us(t["min"]), _us(t["max"]),
             _bw(row["algbw"]), _bw(row["busbw"]), wrong, "-" if row["vs_gloo"] is None else f"{row['vs_gloo']:.2f}"]
    widths = widths or [c[2] for c in _COLS]
    return " " + " ".join(c.rjust(w) for c, w in zip(cells, widths))


def _size_note(op: ops.Op, nranks: int) -> str:
    if op.name == ops.MOE:
        return (f"# moe: dispatch + combine round trip, {op.num_experts(nranks)} experts, top-{op.topk}, hidden "
                f"{op.hidden}; size = one rank's tokens (tokens x hidden); busbw = bytes a rank sends to other "
                f"ranks in both phases / time")
    what = {"all_reduce": "the buffer", "broadcast": "the buffer", "reduce": "the buffer", "sendrecv": "the buffer",
            "all_gather": "the output (ranks x input)", "gather": "the root's output (ranks x input)",
            "reduce_scatter": "the input (ranks x output)", "scatter": "the root's input (ranks x output)",
            "all_to_all": "the whole send buffer"}[op.name]
    formula = {"all_reduce": "2(n-1)/n", "broadcast": "1", "reduce": "1", "sendrecv": "1"}.get(op.name, "(n-1)/n")
    return (f"# {op.name}: size = {what}; busbw = algbw x {formula} = {op.bus_factor(nranks):.3g} at {nranks} ranks")


def tables(rows: list[dict], args, specs: list[backends.Spec]) -> list[str]:
    """One table per op, showing the places some backend of the run does natively."""
    out = []
    widths = _widths(rows)
    titles = "#" + " ".join(t.rjust(w) for (t, _, _), w in zip(_COLS, widths))
    units = "#" + " ".join(u.rjust(w) for (_, u, _), w in zip(_COLS, widths))
    for name in args.ops:
        places = shown_places(rows, name, args.places)
        out += ["#", _size_note(ops.lookup(name, args.moe), args.np)]
        if not places:
            out.append(f"# {name}: no backend of this run does it natively (see the n/a notes below)")
            continue
        out += [titles, units]
        out += [format_row(r, widths) for r in rows if r["op"] == name and r["place"] in places]
    return out


def table(rows: list[dict]) -> list[str]:
    """All rows in one table (no per-op sections)."""
    widths = _widths(rows)
    titles = "#" + " ".join(t.rjust(w) for (t, _, _), w in zip(_COLS, widths))
    units = "#" + " ".join(u.rjust(w) for (_, u, _), w in zip(_COLS, widths))
    return [titles, units] + [format_row(r, widths) for r in rows]


# -- comparison of two backends (A/B of variants) ---------------------------------------------
def compare_pair(args, specs: list[backends.Spec]) -> tuple[str, str] | None:
    """``--compare A,B``, else the first two backends of the run that share a library."""
    if args.compare:
        labels = [s.label for s in specs]
        return tuple(args.compare) if all(c in labels for c in args.compare) else None
    for i, a in enumerate(specs):
        for b in specs[i + 1:]:
            if a.base == b.base:
                return a.label, b.label
    return None


def compare_rows(rows: list[dict], pair: tuple[str, str] | None) -> list[dict]:
    """Per (op, place, size) where both ran: A and B medians, A/B, and the median of per-round
    ratios (launch i of A against launch i of B: the rounds alternate, so a pair shares the
    machine's state of the moment)."""
    if not pair:
        return []
    a_lab, b_lab = pair
    index = {(r["op"], r["place"], r["bytes"], r["backend"]): r for r in rows}
    out = []
    order = {p: i for i, p in enumerate(ops.PLACES)}
    for r in sorted(rows, key=lambda r: (r["op"] != rows[0]["op"], r["op"], order[r["place"]], r["bytes"])):
        if r["backend"] != a_lab:
            continue
        b = index.get((r["op"], r["place"], r["bytes"], b_lab))
        if not b or not r["time_us"]["median"] or not b["time_us"]["median"]:
            continue
        pa, pb = dict(zip(r["launch_index"], r["launch_us"])), dict(zip(b["launch_index"], b["launch_us"]))
        paired = [pa[i] / pb[i] for i in sorted(pa) if i in pb and pb[i]]
        out.append({"op": r["op"], "place": r["place"], "bytes": r["bytes"], "a": a_lab, "b": b_lab,
                    "a_us": r["time_us"]["median"], "b_us": b["time_us"]["median"],
                    "ratio": r["time_us"]["median"] / b["time_us"]["median"],
                    "paired_ratio": statistics.median(paired) if paired else None,
                    "a_launch_us": r["launch_us"], "b_launch_us": b["launch_us"]})
    return out


def _compare_lines(cmp: list[dict], pair: tuple[str, str] | None) -> list[str]:
    if not pair:
        return []
    a, b = pair
    if not cmp:
        return [f"# compare {a} (A) with {b} (B): no size where both have a figure"]
    lines = [f"# compare A = {a} with B = {b}: A/B = A's median time / B's (above 1: A slower, by the % shown); "
             f"paired = median over rounds of A's launch / B's launch of the same round"]
    for c in cmp:
        pr = "" if c["paired_ratio"] is None else f"  paired {c['paired_ratio']:.3f}"
        lines.append(f"#   {c['op']:<14} {ops.PLACE_NAMES[c['place']]:<12} {human_size(c['bytes']):>9}: "
                     f"A {_us(c['a_us']):>9} us  B {_us(c['b_us']):>9} us  A/B {c['ratio']:.3f} "
                     f"({(c['ratio'] - 1) * 100:+.1f} %){pr}")
    if len(cmp) == 1:
        return lines
    geo = math.exp(statistics.mean(math.log(c["ratio"]) for c in cmp))
    lines.append(f"#   geometric mean A/B over {len(cmp)} rows: {geo:.3f} ({(geo - 1) * 100:+.1f} %)")
    return lines


# -- footer ------------------------------------------------------------------------------------
def footer(rows: list[dict], args, specs: list[backends.Spec], launches: dict[str, list[Launch]],
           skipped: list[tuple[str, str]] = (), pair: tuple[str, str] | None = None) -> list[str]:
    """nccl-tests' closing lines, the n/a reasons, the comparisons, skipped and failed launches."""
    wrong = sum(r["wrong"] or 0 for r in rows)
    unchecked = "" if args.check else " (not checked: -c 0)"
    lines = ["#", f"# Out of bounds values : {wrong} {'OK' if wrong == 0 else 'FAILED'}{unchecked}"]
    keys = list(dict.fromkeys((r["op"], r["place"], r["backend"]) for r in rows))
    for op, place, b in keys:
        bws = [r["busbw"] for r in rows if (r["op"], r["place"], r["backend"]) == (op, place, b)
               and r["busbw"] is not None]
        if bws:
            lines.append(f"# Avg bus bandwidth    : {statistics.mean(bws):.4f} GB/s  ({op} {ops.PLACE_NAMES[place]}, {b})")
    base = baseline(specs)
    for op, place, b in keys:
        pairs = [(r["vs_gloo"], r["bytes"]) for r in rows
                 if (r["op"], r["place"], r["backend"]) == (op, place, b) and r["vs_gloo"]]
        if pairs:
            geo = math.exp(statistics.mean(math.log(v) for v, _ in pairs))
            lo, hi = min(pairs), max(pairs)
            lines.append(f"# {b} vs {base} ({op} {ops.PLACE_NAMES[place]}): geometric mean {geo:.2f}x "
                         f"({base} time / {b} time), min {lo[0]:.2f}x at {human_size(lo[1])}, "
                         f"max {hi[0]:.2f}x at {human_size(hi[1])}")
    nas = {}
    for r in rows:
        if r["na"]:
            nas.setdefault((r["op"], r["place"]), {})[r["backend"]] = r["na"]
    for (op, place), why in nas.items():
        hidden = place not in shown_places(rows, op, args.places)
        reasons = "; ".join(f"{b}: {w}" for b, w in why.items())
        lines.append(f"# n/a {op} {ops.PLACE_NAMES[place]}{' (rows not shown)' if hidden else ''}: {reasons}")
    lines += _compare_lines(compare_rows(rows, pair), pair)
    for label, why in skipped:
        lines.append(f"# Skipped backend      : {label}: Open MPI / mpi4py not installed ({why}); "
                     f"run with --install-mpi as root")
    failed = [f"{ln.backend}#{ln.index + 1} ({ln.error})" for lns in launches.values() for ln in lns if not ln.ok]
    lines.append(f"# Failed launches      : {', '.join(failed) if failed else 'none'}")
    total = sum(ln.seconds for lns in launches.values() for ln in lns)
    lines.append(f"# Launch time          : {total:.1f} s over {sum(map(len, launches.values()))} launches")
    return lines


# -- JSON --------------------------------------------------------------------------------------
SCHEMA_ID = "comms-bench/2"


def json_doc(command: str, args, info: dict, specs: list[backends.Spec], rows: list[dict],
             launches: dict[str, list[Launch]], skipped: list[tuple[str, str]] = (),
             pair: tuple[str, str] | None = None) -> dict:
    """Everything, in the shape bench/schema.json describes: options, machine, rows, comparison,
    and each launch's raw document or error."""
    opts = {k: v for k, v in vars(args).items() if k not in ("sizes", "backends")}
    opts["backends"] = [s.label for s in args.backends]
    return {
        "schema": SCHEMA_ID, "command": command, "options": opts, "sizes": args.sizes, "machine": info,
        "backends": [{"label": s.label, "library": s.base, "env": dict(s.env)} for s in specs],
        "skipped": [{"label": label, "reason": why} for label, why in skipped],
        "rows": rows,
        "compare": {"a": pair[0], "b": pair[1], "rows": compare_rows(rows, pair)} if pair else None,
        "launches": {b: [{"index": ln.index, "seconds": ln.seconds, "error": ln.error, "doc": ln.doc}
                         for ln in lns] for b, lns in launches.items()},
    }
