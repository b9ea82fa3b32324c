"""Aggregation over launches, the nccl-tests style table, machine info and the JSON document.

A launch's figure for a size is the slowest rank's median time per op (:mod:`bench.worker`). Over
launches, the table shows the median figure (``time``) and the smallest and largest (``min``,
``max``); bandwidths come from the median. ``vs_gloo`` is gloo's time over this row's time (above 1:
faster than gloo), on every row other than gloo's own.
"""
from __future__ import annotations

import math
import os
import platform
import statistics
from dataclasses import dataclass, field

from . import ops
from .cli import human_size

BASELINE = "gloo"      # the backend every other row is compared with


@dataclass
class Launch:
    """One ``python -m comms.run`` of one backend: its JSON document, or why there is none."""
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


def machine_info(env: dict[str, str] | None = None) -> dict:
    """nproc, CPU model, memory, kernel, Python/torch/comms versions, and the knobs in ``env``
    (default: this process's environment; the driver passes the launches' environment)."""
    import torch
    try:
        import comms
        comms_version = getattr(comms, "__version__", "?")
    except Exception as e:  # noqa: BLE001 - the header should still print
        comms_version = f"unavailable ({type(e).__name__})"
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count()
    knobs = {k: v for k, v in sorted((os.environ if env is None else env).items())
             if k.startswith(("COMMS_", "GLOO_", "TP_")) or k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return {"nproc": os.cpu_count(), "affinity": affinity, "cpu": _cpu_model(), "mem_gib": _mem_gib(),
            "kernel": platform.release(), "python": platform.python_version(), "torch": torch.__version__,
            "comms": comms_version, "hostname": platform.node(), "env": knobs}


def header(command: str, args, info: dict) -> list[str]:
    """The ``#`` lines printed before the table."""
    sizes = args.sizes
    step = f"+{human_size(args.stepbytes)}" if args.stepbytes else f"x{args.stepfactor:g}"
    iters = (f"{args.iters}" if args.iters else
             f"adaptive (~{args.target_time:g} s per size per launch; 8 B: 2000 ops)")
    mem = f", {info['mem_gib']:.1f} GiB RAM" if info["mem_gib"] else ""
    env = " ".join(f"{k}={v}" for k, v in info["env"].items()) or "(none)"
    return [
        "# bench: nccl-tests style collective benchmark (comms vs peers)",
        f"# command: {command}",
        f"# op: {args.op}  dtype: {args.dtype}  ranks: {args.np}  launches: {args.launches} per backend  "
        f"backends: {','.join(args.backends)}",
        f"# sizes: {human_size(sizes[0])} .. {human_size(sizes[-1])}, step {step} ({len(sizes)} sizes)  "
        f"iters: {iters}  warmup: {args.warmup if args.warmup is not None else 'auto'}  check: {args.check}",
        "# timing: " + ("every op on its own" if args.batch == 1 else
                        f"batches of {args.batch} ops below 64 KiB, single ops above") + ", time.perf_counter",
        f"# machine: nproc {info['nproc']} (affinity {info['affinity']}), {info['cpu']}{mem}, "
        f"Linux {info['kernel']}",
        f"# software: Python {info['python']}, torch {info['torch']}, comms {info['comms']}",
        f"# env: {env}",
        "# figure: per launch, the slowest rank's median time per op; time = median over launches, "
        "min/max = extremes over launches",
    ]


# -- aggregation -------------------------------------------------------------------------------
def aggregate(args, layouts: list[ops.Layout], launches: dict[str, list[Launch]]) -> list[dict]:
    """One row per (size, backend), in sweep order, backends in command-line order."""
    op, nranks = ops.OPS[args.op], args.np
    factor = op.bus_factor(nranks)
    rows = []
    for lay in layouts:
        by_backend = {}
        for b in args.backends:
            found = [(ln, r) for ln in launches.get(b, []) if ln.ok
                     for r in ln.doc["rows"] if r["nbytes"] == lay.nbytes]
            figs = [r["time_us"] for _, r in found]
            med = statistics.median(figs) if figs else None
            row = {
                "nbytes": lay.nbytes, "count": lay.count, "type": ops.nccl_name(args.dtype), "redop": op.redop,
                "root": op.root, "backend": b,
                "algorithm": "/".join(dict.fromkeys(r["algorithm"] for _, r in found)) or "-",
                "transport": "/".join(dict.fromkeys(ln.doc["transport"] for ln, _ in found)) or "-",
                "time_us": med, "min_us": min(figs) if figs else None, "max_us": max(figs) if figs else None,
                "algbw": lay.nbytes / med / 1e3 if med else None,
                "busbw": lay.nbytes / med / 1e3 * factor if med else None,
                "wrong": sum(r["wrong"] for _, r in found) if found and args.check else None,
                "launch_us": figs, "iters": [r["iters"] for _, r in found],
                "rank_median_us": [r["rank_median_us"] for _, r in found], "vs_gloo": None,
            }
            by_backend[b] = row
            rows.append(row)
        base = by_backend.get(BASELINE)
        for b, row in by_backend.items():
            if b != BASELINE and base and base["time_us"] and row["time_us"]:
                row["vs_gloo"] = base["time_us"] / row["time_us"]
    return rows


# -- table -------------------------------------------------------------------------------------
_COLS = [  # (title, unit, width)
    ("size", "(B)", 12), ("count", "(elements)", 12), ("type", "", 8), ("redop", "", 6), ("root", "", 5),
    ("backend", "", 8), ("algorithm", "", 10), ("transport", "", 9), ("time", "(us)", 10), ("min", "(us)", 10),
    ("max", "(us)", 10), ("algbw", "(GB/s)", 8), ("busbw", "(GB/s)", 8), ("#wrong", "", 7), ("vs_gloo", "(x)", 8),
]


def _us(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.2f}" if v < 1e5 else f"{v:.0f}"


def _bw(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def format_row(row: dict) -> str:
    cells = [str(row["nbytes"]), str(row["count"]), row["type"], row["redop"], str(row["root"]), row["backend"],
             row["algorithm"], row["transport"], _us(row["time_us"]), _us(row["min_us"]), _us(row["max_us"]),
             _bw(row["algbw"]), _bw(row["busbw"]), "N/A" if row["wrong"] is None else str(row["wrong"]),
             "-" if row["vs_gloo"] is None else f"{row['vs_gloo']:.2f}"]
    return " " + " ".join(c.rjust(w) for c, (_, _, w) in zip(cells, _COLS))


def table(rows: list[dict]) -> list[str]:
    titles = "#" + " ".join(t.rjust(w) for t, _, w in _COLS)
    units = "#" + " ".join(u.rjust(w) for _, u, w in _COLS)
    return [titles, units] + [format_row(r) for r in rows]


def footer(rows: list[dict], args, launches: dict[str, list[Launch]]) -> list[str]:
    """nccl-tests' closing lines plus the comparison with the baseline and failed launches."""
    wrong = sum(r["wrong"] or 0 for r in rows)
    unchecked = "" if args.check else " (not checked: -c 0)"
    lines = [f"# Out of bounds values : {wrong} {'OK' if wrong == 0 else 'FAILED'}{unchecked}"]
    for b in args.backends:
        bws = [r["busbw"] for r in rows if r["backend"] == b and r["busbw"] is not None]
        if bws:
            lines.append(f"# Avg bus bandwidth    : {statistics.mean(bws):.4f} GB/s  ({b})")
    for b in args.backends:
        pairs = [(r["vs_gloo"], r["nbytes"]) for r in rows if r["backend"] == b and r["vs_gloo"]]
        if pairs:
            geo = math.exp(statistics.mean(math.log(v) for v, _ in pairs))
            lo, hi = min(pairs), max(pairs)
            lines.append(f"# {b} vs {BASELINE}: geometric mean {geo:.2f}x (gloo time / {b} time), "
                         f"min {lo[0]:.2f}x at {human_size(lo[1])}, max {hi[0]:.2f}x at {human_size(hi[1])}")
    failed = [f"{ln.backend}#{ln.index + 1} ({ln.error})" for lns in launches.values() for ln in lns if not ln.ok]
    lines.append(f"# Failed launches      : {', '.join(failed) if failed else 'none'}")
    total = sum(ln.seconds for lns in launches.values() for ln in lns)
    lines.append(f"# Launch time          : {total:.1f} s over {sum(map(len, launches.values()))} launches")
    return lines


def json_doc(command: str, args, info: dict, rows: list[dict], launches: dict[str, list[Launch]]) -> dict:
    """Everything: the options, the machine, the rows, and each launch's raw document or error."""
    opts = {k: v for k, v in vars(args).items() if k != "sizes"}
    return {
        "command": command, "options": opts, "sizes": args.sizes, "machine": info, "rows": rows,
        "launches": {b: [{"index": ln.index, "seconds": ln.seconds, "error": ln.error, "doc": ln.doc}
                         for ln in lns] for b, lns in launches.items()},
    }
