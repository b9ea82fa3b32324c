"""Measuring one (op, place) of a launch on this rank, for :mod:`bench.worker` (which runs the launch,
checks the results and gathers the figures): the buffer pool, the warm-up and each size's timing.

For an (op, place) the backend runs natively, :class:`Pool` allocates up to :data:`MAX_BUFFERS`
buffer sets (bounded by :data:`POOL_BYTES` over all ranks, aliased as the place says) and touches
them; :func:`warm_launch` warms up (:data:`LAUNCH_WARM_ROUNDS` rounds over the sets at the smallest
size for the launch's first mode, :data:`NEXT_WARM_ROUNDS` for later ones, then one op per set at
the largest size); then :func:`measure` runs, for every size:

1. barrier;
2. warm-up ops (untimed for the figure, but timed individually to estimate the cost of one op);
3. iteration count: ``-n`` when given; 2000 ops at 8 B and below; otherwise enough ops for about
   ``--target-time`` seconds (from the warm-up ops' mean), clamped to [:data:`MIN_SAMPLES` samples,
   :data:`MAX_ITERS`]. Ranks agree on the slowest rank's estimate, so all run the same count;
4. timed loop: ops rotate over the buffer sets; each op is timed with ``time.perf_counter``; the
   rank's figure is the median per-op time. With ``--batch N`` (N > 1), sizes below
   :data:`BATCH_BELOW` are timed in batches of N ops instead, each batch giving one sample (its
   mean). Per-op timing is the default: it costs about 0.1 us per op, and batch means of an op with
   a bimodal time (one that sleeps in the kernel on a busy machine) sit well above its median,
   which would put a step into the curve at BATCH_BELOW.

With ``--variants auto,ring,...`` (comms only; one op per launch: what bench.regret runs)
:func:`measure_variants` measures each variant of a size side by side in the same launch: ``auto``
is the default selection, any other name that algorithm forced (:meth:`bench.backend_base.Backend.force`,
what COMMS_ALGO=op:name does at init; :func:`forced_algorithm`). Each variant gets its warm-up and
its iteration count as in steps 2-3; the timed ops are then split into ``--variant-rounds`` rounds
(default :data:`bench.cli.VARIANT_ROUNDS`), and every round runs every variant in turn (the order
flipped every round), each turn started by a barrier and one untimed op (the forced plan is rebuilt
at each switch). So drift on a busy machine, and a launch's placement of ranks on cores, hit every
variant alike. The variants' figures pool their rounds' samples, and each keeps the algorithm that
ran and this rank's mean time per op in each round, in round order.
"""
from __future__ import annotations

import statistics
import time

import torch

from . import ops

TINY_BYTES, TINY_ITERS = 8, 2000     # the anchors' method: 8 B uses 2000 timed ops
BATCH_BELOW = 64 << 10               # --batch applies below this size
SMALL_WARMUP = 50                    # default warm-up ops below BATCH_BELOW
MIN_SAMPLES = 5                      # at least this many timed samples (ops or batches) per size
MAX_ITERS = 5000                     # bounds the loop when rare stalls make the mean far above the median
MAX_BUFFERS = 4                      # buffer sets rotated through in the timed loop
POOL_BYTES = 1 << 30                 # bound on all ranks' pools together
LARGE_WARMUP = 5                     # default warm-up ops from BATCH_BELOW up
LAUNCH_WARM_ROUNDS = 25              # launch warm-up: rounds over the buffer sets at the smallest size...
NEXT_WARM_ROUNDS = 2                 # ...and for every later (op, place) of the launch


class Pool:
    """Buffer sets of the largest layout for one (op, place) on this rank, aliased as
    :meth:`bench.ops.Op.buffers` says; :meth:`views` hands out per-size (input, output) views."""

    def __init__(self, op: ops.Op, layouts: list[ops.Layout], rank: int, nranks: int, root: int, place: str,
                 dtype: str):
        self.op, self.rank, self.nranks, self.root, self.place = op, rank, nranks, root, place
        tdt, es = ops.torch_dtype(dtype), ops.elem_size(dtype)
        big = op.buffers(layouts[-1], rank, nranks, root, place)
        # sizes are ascending, so the last layout has the largest buffers; the aliased one is the base
        n_in = 0 if big.view == "in" else big.in_count
        n_out = 0 if big.view == "out" else big.out_count
        set_bytes = (n_in + n_out) * es
        self.nsets = max(1, min(MAX_BUFFERS, POOL_BYTES // nranks // max(set_bytes, 1)))
        self.sets = []
        for _ in range(self.nsets):
            # zeros, touched: a SUM in place stays finite and exact, and no page fault is timed
            self.sets.append((torch.zeros(n_in, dtype=tdt), torch.zeros(n_out, dtype=tdt)))

    def views(self, lay: ops.Layout) -> list[tuple[torch.Tensor, torch.Tensor]]:
        spec = self.op.buffers(lay, self.rank, self.nranks, self.root, self.place)
        out = []
        for base_in, base_out in self.sets:
            if spec.view == "in":
                o = base_out[: spec.out_count]
                i = o[spec.offset: spec.offset + spec.in_count]
            elif spec.view == "out":
                i = base_in[: spec.in_count]
                o = i[spec.offset: spec.offset + spec.out_count]
            else:
                i, o = base_in[: spec.in_count], base_out[: spec.out_count]
            out.append((i, o))
        return out


def _time_each(fns, n: int) -> list[float]:
    """Run ``n`` ops rotating over ``fns``; return each op's seconds."""
    k, nb, out, clock = 0, len(fns), [], time.perf_counter
    for _ in range(n):
        t0 = clock()
        fns[k % nb]()
        out.append(clock() - t0)
        k += 1
    return out


def _time_batches(fns, nbatches: int, batch: int) -> list[float]:
    """Run ``nbatches`` batches of ``batch`` ops rotating over ``fns``; return seconds per op of each batch."""
    k, nb, out, clock = 0, len(fns), [], time.perf_counter
    for _ in range(nbatches):
        t0 = clock()
        for _ in range(batch):
            fns[k % nb]()
            k += 1
        out.append((clock() - t0) / batch)
    return out


def choose_iters(args, lay: ops.Layout, batch: int, estimate_s: float) -> int:
    """Timed ops for this size: a whole number of batches, the same on every rank."""
    if args.iters is not None:
        iters = args.iters
    elif lay.nbytes <= TINY_BYTES:
        iters = TINY_ITERS
    else:
        iters = int(args.target_time / max(estimate_s, 1e-7))
        iters = max(MIN_SAMPLES * batch, min(MAX_ITERS, iters))
    return -(-iters // batch) * batch


def _fns_and_batch(args, backend, op: ops.Op, place: str, lay: ops.Layout, pool: Pool):
    fns = [backend.bind_op(op, place, inp, out, args.root) for inp, out in pool.views(lay)]
    small = lay.nbytes < BATCH_BELOW
    batch = max(1, args.batch) if small else 1
    if args.iters is not None:
        batch = max(1, min(batch, args.iters))
    nwarm = args.warmup if args.warmup is not None else (max(SMALL_WARMUP, batch) if small else LARGE_WARMUP)
    return fns, batch, nwarm


def _estimate(warm: list[float]) -> float:
    return statistics.fmean(warm[1:] or warm) if warm else 1e-3   # mean: the loop's wall time follows it


def _figures(samples: list[float], iters: int, batch: int) -> dict:
    return {"median_s": statistics.median(samples), "min_s": min(samples), "mean_s": statistics.fmean(samples),
            "iters": iters, "batch": batch}


def _timed(fns, iters: int, batch: int) -> list[float]:
    return _time_batches(fns, iters // batch, batch) if batch > 1 else _time_each(fns, iters)


def measure(args, backend, op: ops.Op, place: str, lay: ops.Layout, pool: Pool) -> dict:
    """Steps 1-4 of the module doc for one size; returns this rank's figures."""
    fns, batch, nwarm = _fns_and_batch(args, backend, op, place, lay, pool)
    backend.barrier()
    est = _estimate(_time_each(fns, nwarm))
    if args.iters is None:
        est = backend.reduce_values([est], "max")[0]       # all ranks must run the same count
    iters = choose_iters(args, lay, batch, est)
    return _figures(_timed(fns, iters, batch), iters, batch)


def forced_algorithm(variant: str) -> str | None:
    """The algorithm a ``--variants`` name forces (None for ``auto``, the default selection)."""
    return None if variant == "auto" else variant


def measure_variants(args, backend, op: ops.Op, place: str, lay: ops.Layout, pool: Pool,
                     variants: list[str]) -> dict[str, dict]:
    """``--variants``: every variant's figures for one size, measured in interleaved rounds (the
    module doc); each also carries the algorithm that ran (``"algorithm"``) and this rank's mean
    time per op in each round, in round order (``"round_means_s"``)."""
    fns, batch, nwarm = _fns_and_batch(args, backend, op, place, lay, pool)
    msg_bytes = op.msg_bytes(lay, backend.size, ops.elem_size(args.dtype))
    est = []
    for v in variants:
        backend.force(op.name, forced_algorithm(v))
        backend.barrier()
        est.append(_estimate(_time_each(fns, nwarm)))
    if args.iters is None:
        est = backend.reduce_values(est, "max")             # all ranks must run the same counts
    # a round's share of each variant's ops, in whole batches (at least one per round)
    rounds = args.variant_rounds
    per_round = {v: max(1, -(-choose_iters(args, lay, batch, e) // (batch * rounds))) * batch
                 for v, e in zip(variants, est)}
    samples: dict[str, list[float]] = {v: [] for v in variants}
    round_means: dict[str, list[float]] = {v: [] for v in variants}   # per round: the mean of its samples
    ran: dict[str, str] = {}
    for rnd in range(rounds):
        for v in (variants if rnd % 2 == 0 else variants[::-1]):
            backend.force(op.name, forced_algorithm(v))
            backend.barrier()
            fns[0]()                                         # the rebuilt plan's first call, untimed
            got = _timed(fns, per_round[v], batch)
            samples[v] += got
            round_means[v].append(statistics.fmean(got))
            ran[v] = backend.algorithm(op.name, msg_bytes)
    return {v: dict(_figures(samples[v], per_round[v] * rounds, batch), algorithm=ran[v], round_means_s=round_means[v])
            for v in variants}


def warm_launch(args, backend, op: ops.Op, place: str, layouts: list[ops.Layout], pool: Pool,
                rounds: int = LAUNCH_WARM_ROUNDS) -> None:
    """Warm-up for one (op, place): connections, first-call setup, every pool set at the largest size."""
    backend.barrier()
    for inp, out in pool.views(layouts[0]) * rounds:
        backend.bind_op(op, place, inp, out, args.root)()
    for inp, out in pool.views(layouts[-1]):
        backend.bind_op(op, place, inp, out, args.root)()
    backend.barrier()
