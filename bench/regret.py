"""``python -m bench.regret``: how much the selector's default choice loses against the best forced algorithm.

    python -m bench.regret [--ops all_reduce,...] [-b 8 -e 64M -f 4] [-np N | --hosts H --ranks M [--rate R]]
                           [--launches K] [--separate] [--tune] [--json FILE] [--bar 0.10] [--strict]

Contract:

* For each op (a collective with more than one registered algorithm) and each size of the sweep it
  measures, in the same run, comms' default selection (``auto``: what a user gets) and every
  registered algorithm forced (what ``COMMS_ALGO=<op>:<algo>`` gives). Launches are fresh
  ``bench.worker`` runs (``python -m comms.run -n N`` for one host; one torchrun agent per
  simulated host through tests/multihost.py's SimulatedHosts for ``--hosts``, which needs root:
  otherwise it says so and exits 2), ``--launches`` of them.
  By default every launch measures all the variants side by side (``bench.worker --variants``:
  at every size, ``--rounds`` interleaved rounds, 12 by default, of every variant in turn, switched
  with ``Communicator.set_algo``), so the comparison between algorithms is paired: drift on a busy
  machine, and how a launch's ranks landed on the cores, hit every variant of that launch alike.
  With ``--separate`` every variant is its own series of launches instead (the plain ``comms``
  backend and ``comms@COMMS_ALGO=<op>:<algo>``), rounds alternating with the order flipped every
  round (as bench/driver.py does). Figures come from
  the bench's rows: per launch the slowest rank's mean time per op (``--stat median``: its median,
  the main bench's figure), then the median over launches. The mean is the default because a job's
  time is the sum of its collectives' times, stalls included: on a host with more ranks than cores
  a rank's per-op times are bimodal (a call that finds its peers done returns at once, one that
  waits for a descheduled peer takes milliseconds), and the median of such a distribution can rank
  an algorithm with rare long stalls ahead of one that is faster in total. The selector's timed
  online timing (comms.selection.online) measures means for the same reason.
* The algorithm a row ran is what the worker reports (``Communicator.algorithm_ran``): a forced
  algorithm that declines a size (NotSupported, the selector fell back) shows ``-`` there; one
  whose plan function declines every size of the sweep (checked in-process first) is not launched.
* Per row (bench.regret_table): every algorithm's time, ``auto``, ``choice``, ``best``, the
  choice's ``regret`` and ``auto_regret``, and the bench's own noise (``split``); a choice regret
  over ``--bar`` (default 10 %) is marked ``<<``. One summary line per config and op.
* COMMS_CALIBRATE and every other knob pass through from the caller's environment to every
  launch, unchanged. The calibration is pinned for the run: the caller's cache is copied to a
  private directory that every launch uses (another job rewriting the shared cache mid-run must not
  change the default between launches). Before measuring, ``comms.info`` runs once under the same
  launcher (which also calibrates, if on and not cached) and the header prints whether calibration
  was on, the cost-model parameters and the selection rules in use. A
  COMMS_ALGO set by the caller is reported, since then the default run is not the default.
  ``--tune`` runs ``python -m comms.tune`` once first, under the same launcher, over the run's ops
  and sizes; it writes its rules into the pinned cache, so ``auto`` is what a user gets after
  tuning (calibration must be on).
* Exit status: 0; 1 when a launch failed or a check found wrong elements; 2 for a bad command line
  or a missing prerequisite; 3 with ``--strict`` when a choice regret exceeds the bar.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from . import backends, cli, driver, ops, report
from .launch import Launcher, simulated_hosts
from .regret_table import analyse, label_of, split_paired, summary, table

SCHEMA = "comms-regret/1"


def regret_ops() -> list[str]:
    """Collectives with more than one registered algorithm that the bench can time."""
    from comms import algorithms
    return [c for c, a in algorithms.REGISTRY.items() if len(a) > 1 and c in ops.OPS]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.regret", allow_abbrev=False,
                                description="Selector regret: default selection vs every forced algorithm.")
    p.add_argument("--ops", default="all_reduce", help=f"comma-separated, of {', '.join(regret_ops())}")
    p.add_argument("-b", "--minbytes", type=cli.parse_size, default=8)
    p.add_argument("-e", "--maxbytes", type=cli.parse_size, default=64 << 20)
    p.add_argument("-f", "--stepfactor", type=float, default=4.0, help="size step factor (default 4)")
    p.add_argument("-np", "--nranks", dest="np", type=int, default=None, help="ranks on this host (default 2)")
    p.add_argument("--hosts", type=int, default=None, help="simulated hosts (tests/multihost.py; root)")
    p.add_argument("--ranks", type=int, default=2, help="ranks per simulated host (default 2)")
    cli.sim_options(p)
    p.add_argument("--launches", type=int, default=3, help="fresh launches per variant (default 3)")
    p.add_argument("-n", "--iters", type=int, default=None, help="timed ops per size (default adaptive)")
    p.add_argument("-w", "--warmup", type=int, default=None)
    p.add_argument("--target-time", type=float, default=cli.DEFAULT_TARGET_S)
    p.add_argument("-c", "--check", type=int, choices=(0, 1), default=1, help="check results (default 1)")
    p.add_argument("-d", "--dtype", default="float32", type=ops.canonical_dtype)
    p.add_argument("-r", "--root", type=int, default=0)
    p.add_argument("--place", choices=["auto", "out", "in"], default="auto",
                   help="auto: out-of-place where comms has it, else in place")
    p.add_argument("--timeout", type=float, default=cli.DEFAULT_TIMEOUT_S,
                   help="seconds per launch and variant (a paired launch gets this times the variants)")
    p.add_argument("--bar", type=float, default=0.10, help="regret bar (default 0.10)")
    p.add_argument("--stat", choices=["mean", "median"], default="mean",
                   help="a launch's figure per size: the slowest rank's mean (default) or median time per op")
    p.add_argument("--rounds", dest="variant_rounds", type=int, default=cli.VARIANT_ROUNDS,
                   help=f"paired: interleaved timed rounds of every variant per size (default {cli.VARIANT_ROUNDS})")
    p.add_argument("--pairing", choices=["round", "launch"], default="round",
                   help="paired design: compare two algorithms round by round (default) or launch by launch")
    p.add_argument("--separate", action="store_true",
                   help="one series of launches per variant (default: every launch measures all of them, paired)")
    p.add_argument("--strict", action="store_true", help="exit 3 when a choice regret exceeds the bar")
    p.add_argument("--tune", action="store_true",
                   help="run python -m comms.tune over the same ops and sizes first; auto then uses its rules")
    p.add_argument("--json", metavar="FILE", default=None)
    p.add_argument("-v", "--verbose", action="store_true", help="copy the ranks' output to stderr")
    a = p.parse_args(argv)
    a.ops = [o for o in a.ops.split(",") if o]
    bad = [o for o in a.ops if o not in regret_ops()]
    if not a.ops or bad:
        p.error(f"--ops: {', '.join(bad) or '(none)'}: choose from {', '.join(regret_ops())}")
    if a.hosts is not None and a.np is not None:
        p.error("give -np (one host) or --hosts/--ranks (simulated hosts), not both")
    if a.rate and a.hosts is None:
        p.error("--rate needs --hosts")
    if a.hosts is not None and (a.hosts < 1 or a.ranks < 1):
        p.error("--hosts and --ranks must be positive")
    a.np = a.hosts * a.ranks if a.hosts is not None else (a.np or 2)
    if a.np < 2 or a.launches < 1:
        p.error("need at least 2 ranks and 1 launch")
    if a.variant_rounds < 1:
        p.error("--rounds must be at least 1")
    if not 0 <= a.root < a.np:
        p.error(f"--root {a.root} is not a rank of {a.np}")
    try:
        a.sizes = cli.size_sweep(a.minbytes, a.maxbytes, a.stepfactor)
    except ValueError as e:
        p.error(str(e))
    a.config = (f"{a.hosts} hosts x {a.ranks} ranks, {cli.sim_label(a)}"
                if a.hosts is not None else f"1 host x {a.np} ranks")
    # what bench.driver's launch helpers read
    a.batch, a.moe_experts, a.moe_topk, a.moe_hidden = 1, 0, 4, 1024
    return a


def pin_calibration(tmp: Path) -> None:
    """Every launch of the run prices with the same cost-model parameters: the caller's calibration
    cache (``$XDG_CACHE_HOME`` or ``~/.cache``, ``comms/calibration.json``) is copied into ``tmp``
    and the launches read (and, when calibrating, write) that copy, so another job rewriting the
    shared cache in the middle of the run cannot change the default selection between launches."""
    import shutil
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    src, dst = Path(base) / "comms" / "calibration.json", tmp / "cache" / "comms" / "calibration.json"
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.exists():
        shutil.copyfile(src, dst)
    os.environ["XDG_CACHE_HOME"] = str(tmp / "cache")     # the launches inherit it


def place_of(args, op: str) -> str:
    if args.place != "auto":
        return args.place
    return "out" if backends.CommsBackend.native(op, "out", args.dtype) is None else "in"


def declines_everywhere(op: str, algo: str, layouts, args, place: str) -> bool:
    """True when ``algo``'s plan function declines every size on every rank (not worth launching). On one host
    the shm transport's board takes all_reduces up to COMMS_SHM_BOARD_BYTES (Args.board)."""
    from comms import algorithms, config
    from comms.algorithms.plan import Args
    n, es = args.np, ops.elem_size(args.dtype)
    hosts = tuple(tuple(range(h * args.ranks, (h + 1) * args.ranks)) for h in range(args.hosts)) \
        if args.hosts else (tuple(range(n)),)
    fn = algorithms.get(op, algo).fn
    for lay in layouts:
        for rank in range(n):
            kw = dict(root=args.root, hosts=hosts, inplace=place == "in",
                      board=0 if args.hosts and args.hosts > 1 else config.get("SHM_BOARD_BYTES"))
            if op == "all_to_all":
                a = Args(op, rank, n, 0, es, send_splits=(lay.block * es,) * n, recv_splits=(lay.block * es,) * n,
                         hosts=hosts)
            else:
                count = lay.count if op in ("all_reduce", "broadcast", "reduce") else lay.block
                a = Args(op, rank, n, count, es, **kw)
            try:
                fn(a)
            except algorithms.NotSupported:
                continue
            except Exception:        # noqa: BLE001 - unsure: measure it
                return False
            return False
    return True


def run_rounds(launcher: Launcher, ns, specs: list[backends.Spec], launches: int) -> dict[str, list[report.Launch]]:
    """Like bench.driver.run_all: every round runs every variant, the order flipped every round."""
    out: dict[str, list[report.Launch]] = {s.label: [] for s in specs}
    prog = driver.Progress(launches * len(specs))
    try:
        for i in range(launches):
            for s in (specs if i % 2 == 0 else list(reversed(specs))):
                prog.start(f"{s.label} #{i + 1}")
                ln = launcher.launch(ns, s, i, prog)
                out[s.label].append(ln)
                prog.finish(ln)
    finally:
        prog.close()
    return out


def _stop_on_signals() -> None:
    """SIGTERM, SIGHUP and SIGINT (ignored in background jobs) raise KeyboardInterrupt once, so the
    running launch, the simulated hosts and the temporary directory are cleaned up on the way out."""
    import signal
    fired = []

    def stop(signum, frame):
        if not fired:
            fired.append(signum)
            raise KeyboardInterrupt(f"signal {signum}")
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, stop)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = "python -m bench.regret " + " ".join(shlex.quote(a) for a in argv)
    sim_ctx = None
    if args.hosts is not None:
        sim_ctx, why = simulated_hosts(args)
        if why:
            driver.note(f"--hosts: {why}; run it as root (or use -np for one host)")
            return 2
    from comms import algorithms
    from comms.selection.model import describe
    load0 = os.getloadavg()
    t0 = time.monotonic()
    doc = {"schema": SCHEMA, "command": command, "config": args.config, "hosts": args.hosts or 1,
           "ranks_per_host": args.ranks if args.hosts else args.np, "nranks": args.np, "rate": args.rate,
           "bar": args.bar, "stat": args.stat,
           "design": "separate" if args.separate else "paired",
           "pairing": None if args.separate else args.pairing,
           "rounds": None if args.separate else args.variant_rounds, "sizes": args.sizes, "launches": args.launches,
           "machine": report.machine_info(driver.launch_env()), "ops": {}}
    failed = wrong = over = False
    saved_cache = os.environ.get("XDG_CACHE_HOME")
    with tempfile.TemporaryDirectory(prefix="regret-") as tmp:
        pin_calibration(Path(tmp))
        if sim_ctx is not None:
            sim_ctx.__enter__()
        try:
            launcher = Launcher(args, Path(tmp), sim_ctx)
            if args.tune:
                tune = ["-m", "comms.tune", "--ops", ",".join(args.ops), "-b", str(args.minbytes),
                        "-e", str(args.maxbytes), "-f", str(max(2, int(args.stepfactor)))]
                rc, secs, lines = launcher.command(None, tune, None, 3600)
                doc["tune"] = {"exit": rc, "seconds": round(secs, 1)}
                print(f"# comms.tune {' '.join(tune[2:])}: exit {rc} in {secs:.0f} s")
                if rc:
                    driver.note(f"comms.tune failed (exit {rc}): {' | '.join(lines[-5:])}")
                    return 1
            info = launcher.info() or {}
            knobs = {c["name"]: c for c in info.get("config", [])}
            cal = knobs.get("COMMS_CALIBRATE", {})
            doc.update(calibrate=cal.get("value"), cost_model=info.get("cost_model"), rules=info.get("rules"),
                       transports=info.get("transports"))
            print(f"# bench.regret: selector regret against the best forced algorithm -- {args.config}")
            print(f"# command: {command}")
            m = doc["machine"]
            print(f"# machine: nproc {m['nproc']} (affinity {m['affinity']}), {m['cpu']}; load average at start "
                  f"{load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} (shared machine: figures are noisy)")
            print(f"# sizes: {cli.human_size(args.sizes[0])} .. {cli.human_size(args.sizes[-1])} x{args.stepfactor:g}; "
                  + (f"launches {args.launches} per variant, interleaved; iters " if args.separate else
                     f"launches {args.launches}, each measuring every variant side by side (paired by "
                     f"{args.pairing}, {args.variant_rounds} rounds per size); iters ")
                  + f"{args.iters or f'adaptive (~{args.target_time:g} s per size)'}; check {args.check}; dtype {args.dtype}")
            cm = doc["cost_model"]
            print(f"# COMMS_CALIBRATE={cal.get('value', '?')} ({cal.get('source', '?')}); cost model: "
                  + (f"{cm['source']}: {describe(cm)}" if cm else "?"))
            if os.environ.get("COMMS_ALGO"):
                print(f"# WARNING: COMMS_ALGO={os.environ['COMMS_ALGO']} is set: the default run is not the default")
            for op in args.ops:
                place = place_of(args, op)
                ns = argparse.Namespace(**vars(args))
                ns.ops, ns.places = [op], [place]
                layouts = ops.plan(ops.OPS[op], args.sizes, args.np, ops.elem_size(args.dtype))
                if not layouts:
                    driver.note(f"{op}: no size of the sweep holds one element per rank block")
                    return 2
                algos = algorithms.names(op)
                skip = [a for a in algos if declines_everywhere(op, a, layouts, args, place)]
                run = [a for a in algos if a not in skip]
                if args.separate:
                    specs = [backends.Spec.parse(label_of(op, v)) for v in ["auto"] + run]
                else:
                    specs, ns.variants = [backends.Spec.parse("comms")], ["auto"] + run
                    ns.timeout = args.timeout * len(ns.variants)     # a launch does every variant's work
                print(f"# {op} ({ops.PLACE_NAMES[place]}): rules "
                      + " ".join(r for r in (info.get("rules") or []) if r.startswith(op + ":"))
                      + (f"; not launched (declines every size): {', '.join(skip)}" if skip else ""), flush=True)
                lns = run_rounds(launcher, ns, specs, args.launches)
                launched = [ln for series in lns.values() for ln in series]
                if not args.separate:
                    lns = split_paired(op, lns["comms"])
                rows = analyse(op, algos, layouts, lns, args.bar, args.stat, paired=not args.separate,
                               pairing=args.pairing)
                for line in table(op, algos, rows, args.bar, args.stat):
                    print(line)
                line = summary(args.config, op, rows, args.bar)
                print(line, flush=True)
                bad = [f"{ln.backend} #{ln.index + 1}: {ln.error}" for ln in launched if not ln.ok]
                for b in bad:
                    print(f"# FAILED launch {b}")
                failed |= bool(bad)
                wrong |= any(r["wrong"] for r in rows)
                over |= any(r["over"] for r in rows)
                doc["ops"][op] = {"place": place, "algorithms": algos, "not_launched": skip, "rows": rows,
                                  "summary": line, "failed_launches": bad}
        finally:
            if sim_ctx is not None:
                sim_ctx.__exit__(None, None, None)
            if saved_cache is None:
                os.environ.pop("XDG_CACHE_HOME", None)
            else:
                os.environ["XDG_CACHE_HOME"] = saved_cache
    load1 = os.getloadavg()
    doc.update(seconds=round(time.monotonic() - t0, 1), loadavg_start=load0, loadavg_end=load1)
    print(f"# load average at end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}; {doc['seconds']:.0f} s in all")
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))
        driver.note(f"wrote {args.json}")
    if failed or wrong:
        return 1
    return 3 if over and args.strict else 0


if __name__ == "__main__":
    _stop_on_signals()
    try:
        sys.exit(main())
    except KeyboardInterrupt as e:
        driver.note(f"interrupted ({e or 'SIGINT'}); the running launch was stopped and everything cleaned up")
        sys.exit(130)
