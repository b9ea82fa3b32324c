"""Command line of ``python -m bench``: nccl-tests flags plus the launch options.

nccl-tests flags kept with their meaning: ``-b/--minbytes``, ``-e/--maxbytes``, ``-f/--stepfactor``,
``-i/--stepbytes``, ``-n/--iters``, ``-w/--warmup_iters``, ``-c/--check``, ``-o/--op``, ``-d/--dtype``,
``-r/--root``. Added: ``--ops`` (several ops), ``--place``, ``-np`` (ranks), ``--launches``,
``--backends`` (with ``backend@NAME=VALUE`` variants), ``--compare``, ``--json``, ``--plot``,
``--install-mpi``, ``--timeout``, ``--target-time``, ``--batch``, ``-v``, and moe's ``--moe-experts``,
``--moe-topk``, ``--moe-hidden``, ``--moe-routing``.

Sizes take binary suffixes (``64K``, ``1M``, ``2G``). The sweep is nccl-tests': start at minbytes,
multiply by stepfactor (or add stepbytes when ``-i`` is given), stop after maxbytes.
"""
from __future__ import annotations

import argparse

from . import backends, moe_op, ops

DEFAULT_TARGET_S = 0.4       # adaptive iteration count: about this much timed work per size per launch
DEFAULT_TIMEOUT_S = 300.0    # per launch
VARIANT_ROUNDS = 12          # bench.worker --variants (bench.regret's paired design): interleaved
# timed rounds per size, every variant in each. 12, not 4: on 4 ranks sharing 2 cores (1-64 MiB,
# 5 launches, runs alternating) 4 rounds gave ring/rhd regrets of +14.8 % and +14.7 %, where a
# machine state lasting about a round hit one variant; 12 rounds of the same total time gave +5.9 %
# and +5.9 %, for about 20 % more launch time


def parse_size(text: str) -> int:
    """``4096``, ``64K``, ``1M``, ``2G``, ``1.5M`` (binary multiples; a trailing B/iB is ignored)."""
    t = str(text).strip().upper()
    for tail in ("IB", "B"):
        if t.endswith(tail) and len(t) > len(tail):
            t = t[: -len(tail)]
            break
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if mult > 1 else t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 8, 64K, 1M, 2G)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"size must not be negative: {text!r}")
    return int(value * mult)


def human_size(nbytes: int) -> str:
    """8 B, 64 KiB, 1 MiB, 1.5 GiB."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift:
            v = nbytes / (1 << shift)
            return f"{v:g} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{nbytes} B"


def size_sweep(minbytes: int, maxbytes: int, stepfactor: float = 2.0, stepbytes: int | None = None) -> list[int]:
    """The sizes nccl-tests would visit: geometric by ``stepfactor`` or arithmetic by ``stepbytes``."""
    if maxbytes < minbytes:
        raise ValueError(f"maxbytes ({maxbytes}) is below minbytes ({minbytes})")
    if stepbytes is None and stepfactor <= 1:
        raise ValueError("stepfactor must be > 1")
    if stepbytes is not None and stepbytes <= 0:
        raise ValueError("stepbytes must be positive")
    sizes, size = [], max(minbytes, 0)
    while size <= maxbytes:
        sizes.append(size)
        nxt = size + stepbytes if stepbytes is not None else int(size * stepfactor)
        if nxt <= size:            # minbytes 0 with a step factor: continue from 1
            nxt = size + 1
        size = nxt
    return sizes


def _check_flag(text: str) -> int:
    if text not in ("0", "1"):
        raise argparse.ArgumentTypeError("must be 0 or 1")
    return int(text)


def _backend_list(text: str) -> list[backends.Spec]:
    try:
        specs = [backends.Spec.parse(b) for b in text.split(",") if b.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not specs:
        raise argparse.ArgumentTypeError(f"no backend given; known: {', '.join(backends.BACKENDS)}")
    return list({s.label: s for s in specs}.values())


OP_CHOICES = list(ops.OPS) + [ops.MOE]


def _op_list(text: str) -> list[str]:
    names = [o.strip() for o in text.split(",") if o.strip()]
    unknown = [o for o in names if o not in OP_CHOICES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown op(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(OP_CHOICES)}")
    return list(dict.fromkeys(names))


def _label_pair(text: str) -> list[str]:
    names = [b.strip() for b in text.split(",")]
    if len(names) != 2 or not all(names):
        raise argparse.ArgumentTypeError("give two backend labels: A,B")
    return names


def _dtype(text: str) -> str:
    try:
        return ops.canonical_dtype(text)
    except KeyError as e:
        raise argparse.ArgumentTypeError(str(e.args[0])) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench", allow_abbrev=False,
        description="nccl-tests style collective benchmark: comms against its peers, median of fresh launches.",
        epilog="Environment knobs (COMMS_*, GLOO_*, OMP_NUM_THREADS) pass through to every rank. "
               "See bench/README.md.")
    p.add_argument("-b", "--minbytes", type=parse_size, default=8, help="smallest size (default 8)")
    p.add_argument("-e", "--maxbytes", type=parse_size, default=64 << 20, help="largest size (default 64M)")
    step = p.add_mutually_exclusive_group()
    step.add_argument("-f", "--stepfactor", type=float, default=2.0, help="multiply the size by this (default 2)")
    step.add_argument("-i", "--stepbytes", type=parse_size, default=None, help="add this to the size instead")
    p.add_argument("-n", "--iters", type=int, default=None,
                   help="timed ops per size (default: adaptive, about --target-time per size; 8 B: 2000)")
    p.add_argument("-w", "--warmup_iters", "--warmup", dest="warmup", type=int, default=None,
                   help="untimed ops per size before timing (default: 50 below 64 KiB, else 5)")
    p.add_argument("-c", "--check", type=_check_flag, default=1, help="check results exactly, 0 or 1 (default 1)")
    p.add_argument("-np", "--nranks", dest="np", type=int, default=2, help="number of ranks (default 2)")
    p.add_argument("--launches", type=int, default=3,
                   help="fresh launches per backend; the table shows their median, min, max (default 3)")
    p.add_argument("--backends", type=_backend_list, default=None,
                   help=f"comma-separated, each LIB or LIB@NAME=VALUE[@NAME=VALUE...] (environment for that "
                        f"backend's launches only); LIB is one of {', '.join(backends.BACKENDS)} (default "
                        f"{','.join(backends.DEFAULT_BACKENDS)}; mpi is skipped with a note when not installed)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("-o", "--op", dest="op", choices=OP_CHOICES, default=None, metavar="OP",
                       help="one op (default all_reduce); the same names as --ops")
    which.add_argument("--ops", dest="ops", type=_op_list, metavar="OP,OP,...",
                       help=f"several collectives, one table each: {', '.join(OP_CHOICES)}")
    p.add_argument("-r", "--root", type=int, default=0,
                   help="root rank of broadcast, reduce, gather, scatter (default 0)")
    p.add_argument("--moe-experts", type=int, default=0,
                   help="moe: experts over all ranks, a multiple of -np (default 4 per rank)")
    p.add_argument("--moe-topk", type=int, default=4, help="moe: experts per token (default 4)")
    p.add_argument("--moe-hidden", type=int, default=1024,
                   help="moe: elements per token (default 1024); moe sizes are one rank's tokens")
    p.add_argument("--moe-routing", choices=moe_op.MoE.ROUTINGS, default="consecutive",
                   help="moe: consecutive (default: token t of rank r takes the K experts from (5t+3r) mod E, "
                        "weights 1/K) or random (per-rank seeded uniform scores, top-K, weights = the scores)")
    p.add_argument("--place", choices=["both", "out", "in"], default="both",
                   help="out-of-place, in-place or both (default both; nccl-tests runs both)")
    p.add_argument("--compare", type=_label_pair, default=None, metavar="A,B",
                   help="footer comparing two --backends labels per size (default: the first two entries "
                        "that share a library, e.g. comms and comms@COMMS_FLIGHT_RECORDER=0)")
    p.add_argument("--plot", metavar="FILE.png", default=None, help="draw busbw against size (needs matplotlib)")
    p.add_argument("--install-mpi", action="store_true",
                   help="as root: apt-get install openmpi-bin libopenmpi-dev, pip install mpi4py into this "
                        "Python's environment, then run")
    p.add_argument("-d", "--dtype", type=_dtype, default="float32",
                   help=f"element type: {', '.join(ops.DTYPES)} (nccl names too; default float32)")
    p.add_argument("--json", metavar="FILE", default=None,
                   help="also write the options, machine, rows and launches to FILE (schema: bench/schema.json)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help=f"seconds before a launch is killed (default {DEFAULT_TIMEOUT_S:g})")
    p.add_argument("--target-time", type=float, default=DEFAULT_TARGET_S,
                   help=f"adaptive iters: timed seconds per size per launch (default {DEFAULT_TARGET_S:g})")
    p.add_argument("--batch", type=int, default=1,
                   help="below 64 KiB, time batches of this many ops (one sample each) instead of "
                        "single ops (default 1)")
    p.add_argument("--hosts", type=int, default=None,
                   help="simulated hosts (tests/multihost.py, root only): one torchrun agent per host; -np is "
                        "--hosts x --ranks")
    p.add_argument("--ranks", type=int, default=1, help="ranks per simulated host (default 1)")
    sim_options(p)
    p.add_argument("-v", "--verbose", action="store_true", help="copy the ranks' output to stderr")
    return p


def sim_options(p: argparse.ArgumentParser, rate_only: bool = False) -> None:
    """--rate, --shaper and --cpus: how the simulated hosts (tests/hostns.py) are built."""
    p.add_argument("--rate", default=None, help="simulated hosts: rate limit of every link, e.g. 2gbit")
    p.add_argument("--shaper", choices=["tbf", "htb"], default="tbf",
                   help="simulated hosts: the qdisc that enforces --rate (default tbf; htb: rate = ceil)")
    p.add_argument("--cpus", choices=["split", "shared"], default="split",
                   help="simulated hosts: each on its own share of the CPUs (split, default), or all on all")


def sim_label(ns) -> str:
    """How the simulated hosts were built, for headers: link and CPUs."""
    link = f"links limited to {ns.rate} ({ns.shaper})" if ns.rate else "unshaped links"
    return f"{link}, {ns.cpus} CPUs"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate; adds ``sizes`` (the sweep, in bytes)."""
    p = build_parser()
    ns = p.parse_args(argv)
    if ns.hosts is not None:
        if ns.hosts < 1 or ns.ranks < 1:
            p.error("--hosts and --ranks must be positive")
        ns.np = ns.hosts * ns.ranks
    elif ns.rate:
        p.error("--rate needs --hosts")
    if ns.np < 1:
        p.error("-np must be at least 1")
    if ns.launches < 1:
        p.error("--launches must be at least 1")
    if ns.iters is not None and ns.iters < 1:
        p.error("-n/--iters must be at least 1")
    if ns.batch < 1:
        p.error("--batch must be at least 1")
    if ns.warmup is not None and ns.warmup < 0:
        p.error("-w/--warmup must not be negative")
    if ns.timeout <= 0 or ns.target_time <= 0:
        p.error("--timeout and --target-time must be positive")
    ns.ops = ns.ops or [ns.op or "all_reduce"]
    ns.op = ns.ops[0]
    ns.backends = ns.backends or [backends.Spec.parse(b) for b in backends.DEFAULT_BACKENDS]
    ns.places = list(ops.PLACES) if ns.place == "both" else [ns.place]
    if not 0 <= ns.root < ns.np:
        p.error(f"-r/--root {ns.root} is not a rank of {ns.np}")
    small = [o for o in ns.ops if o in ops.OPS and ns.np < ops.OPS[o].min_ranks]
    if small:
        p.error(f"{', '.join(small)} needs at least {ops.OPS[small[0]].min_ranks} ranks (-np)")
    ns.moe = {"experts": ns.moe_experts, "topk": ns.moe_topk, "hidden": ns.moe_hidden, "routing": ns.moe_routing}
    if ops.MOE in ns.ops:
        experts = ns.moe_experts or 4 * ns.np
        if ns.moe_hidden < 1 or experts % ns.np or not 1 <= ns.moe_topk <= experts:
            p.error(f"moe needs --moe-hidden >= 1, --moe-experts a multiple of -np ({ns.np}) and "
                    f"1 <= --moe-topk <= experts ({experts})")
    labels = [b.label for b in ns.backends]
    if ns.compare and any(c not in labels for c in ns.compare):
        p.error(f"--compare {','.join(ns.compare)}: both must be --backends labels ({', '.join(labels)})")
    try:
        ns.sizes = size_sweep(ns.minbytes, ns.maxbytes, ns.stepfactor, ns.stepbytes)
    except ValueError as e:
        p.error(str(e))
    return ns
