"""The collectives the benchmark times, one class each, in a registry (:data:`OPS`).

An op knows:

* its buffer :class:`Layout` for a requested size (nccl-tests convention: ``size`` is the bytes of
  the larger buffer -- all_gather's and gather's output, reduce_scatter's and scatter's input,
  all_to_all's whole send buffer, the buffer itself for all_reduce, broadcast, reduce and sendrecv
  -- rounded down so that every rank's block is whole; ``count`` is that buffer's elements);
* each rank's :class:`Buffers` out of place and in place (:meth:`Op.buffers`; in place aliases the
  buffers as nccl-tests does: one buffer for all_reduce, broadcast, reduce, all_to_all, sendrecv;
  the input is the rank's block of the output for all_gather and the gather root; the output is
  the rank's block of the input for reduce_scatter and the scatter root);
* its nccl-tests bus-bandwidth factor and the message size the comms selector sees;
* exact check data (:meth:`Op.check_input`, :meth:`Op.expected`).

How a library runs the op on those buffers is the backend's business (:meth:`bench.backend_base.Backend.bind`).

Check data are small integers, so sums are exact in every supported dtype: rank ``r`` holds
``((i + 3 r) mod m) + 1`` at global element ``i``, with ``m`` small enough that a sum over all ranks
is still exactly representable. A block landing at the wrong offset, a rank counted twice or missed
all change the result; every expected value is at least 1, so an element never written (left 0)
is wrong too.

Adding an op: subclass :class:`Op`, fill in its methods, add it to :data:`OPS`, and teach each
backend in :mod:`bench.backends` to bind it (or to say why it cannot).
"""
from __future__ import annotations

from dataclasses import dataclass


class _LazyTorch:
    """torch, imported on first use: the driver needs only sizes and names, and importing torch
    costs about 1.5 s of CPU per process."""

    def __getattr__(self, name):
        import torch as real
        globals()["torch"] = real
        return getattr(real, name)


torch = _LazyTorch()

# canonical name (also torch's attribute) -> (nccl-tests name, largest integer k such that 0..k are
# all exact, bytes per element)
DTYPES: dict[str, tuple[str, int, int]] = {
    "float32": ("float", 1 << 24, 4),
    "float64": ("double", 1 << 53, 8),
    "float16": ("half", 2048, 2),
    "bfloat16": ("bfloat16", 256, 2),
    "int32": ("int32", (1 << 31) - 1, 4),
    "int64": ("int64", (1 << 63) - 1, 8),
    "int8": ("int8", 127, 1),
    "uint8": ("uint8", 255, 1),
}
_ALIASES = {"float": "float32", "fp32": "float32", "double": "float64", "fp64": "float64", "half": "float16",
            "fp16": "float16", "bf16": "bfloat16", "int": "int32", "long": "int64", "char": "int8"}
_PERIOD = 1021      # largest period of the check pattern (prime, so misplaced blocks rarely line up)


def canonical_dtype(name: str) -> str:
    """'float32' for 'float32', 'float', 'fp32'; KeyError with the choices otherwise."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in DTYPES:
        raise KeyError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return key


def torch_dtype(name: str) -> "torch.dtype":
    return getattr(torch, canonical_dtype(name))


def nccl_name(name: str) -> str:
    return DTYPES[canonical_dtype(name)][0]


def elem_size(name: str) -> int:
    return DTYPES[canonical_dtype(name)][2]


def _period(nranks: int, dtype: str) -> int:
    return max(1, min(_PERIOD, DTYPES[dtype][1] // max(nranks, 1) - 1))


def _tile(period: torch.Tensor, count: int) -> torch.Tensor:
    """``period`` repeated to ``count`` elements (a copy: cheap even at 64 MiB)."""
    reps = -(-count // max(period.numel(), 1))
    return period.repeat(reps)[:count]


def _period_i64(rank: int, nranks: int, dtype: str, start: int) -> torch.Tensor:
    m = _period(nranks, dtype)
    return (torch.arange(m, dtype=torch.int64) + start + 3 * rank) % m + 1


def pattern(count: int, rank: int, nranks: int, dtype: str, start: int = 0) -> torch.Tensor:
    """Rank ``rank``'s check data for global elements ``start .. start+count-1`` (see module doc)."""
    return _tile(_period_i64(rank, nranks, dtype, start).to(torch_dtype(dtype)), count)


def pattern_sum(count: int, nranks: int, dtype: str, start: int = 0) -> torch.Tensor:
    """The exact SUM over all ranks of :func:`pattern`, in ``dtype``."""
    acc = sum(_period_i64(r, nranks, dtype, start) for r in range(nranks))
    return _tile(acc.to(torch_dtype(dtype)), count)


@dataclass(frozen=True)
class Layout:
    """Buffers of one size. ``nbytes``/``count``: the reported size (see module doc);
    ``in_count``/``out_count``: the largest input and output any rank has (the root's, for gather
    and scatter); ``block``: elements per rank block (``count`` for single-buffer ops)."""
    nbytes: int
    count: int
    in_count: int
    out_count: int
    block: int


@dataclass(frozen=True)
class Buffers:
    """One rank's buffers for one (size, place). ``view``: None when input and output are separate
    buffers; ``"in"`` when the input is a view of the output at element ``offset`` (in place:
    all_reduce-like ops with offset 0, all_gather, the gather root); ``"out"`` when the output is a
    view of the input (reduce_scatter, the scatter root)."""
    in_count: int
    out_count: int
    view: str | None = None
    offset: int = 0


MOE = "moe"                     # bench.moe_op.MoE: comms.moe.Dispatcher; gloo: bench.moe_gloo
PLACES = ("out", "in")          # nccl-tests order: out-of-place first, then in-place
PLACE_NAMES = {"out": "out-of-place", "in": "in-place"}


class Op:
    """Base class: one collective. Subclasses set the class attributes and the methods."""
    name = ""
    redop = "sum"          # as printed in the table; "none" for data movement
    rooted = False         # True: the table's root column shows -r/--root, else -1
    root_result = False    # True: only the root has a result (reduce, gather)
    min_ranks = 1

    def layout(self, nbytes: int, nranks: int, es: int) -> Layout | None:
        """Buffers for a requested ``nbytes``; None when that is less than one element per block."""
        raise NotImplementedError

    def bus_factor(self, nranks: int) -> float:
        """busbw = algbw x this (nccl-tests' factors)."""
        raise NotImplementedError

    def bus_factor_for(self, lay: Layout, nranks: int) -> float:
        """The factor for one size (the same for every size except for moe)."""
        return self.bus_factor(nranks)

    def msg_bytes(self, lay: Layout, nranks: int, es: int) -> int:
        """The size comms' selector keys on (comms.selection.rules): the per-rank buffer for all_reduce,
        broadcast and reduce, the bytes a rank sends for all_gather, reduce_scatter, all_to_all, one
        block for gather and scatter."""
        return lay.block * es * (nranks - 1)

    def buffers(self, lay: Layout, rank: int, nranks: int, root: int, place: str) -> Buffers:
        """This rank's buffers; in place (``place == "in"``) they alias as in nccl-tests."""
        raise NotImplementedError

    def check_input(self, lay: Layout, rank: int, nranks: int, root: int, dtype: str) -> torch.Tensor:
        """This rank's exact input (``buffers(...).in_count`` elements)."""
        raise NotImplementedError

    def expected(self, lay: Layout, rank: int, nranks: int, root: int, dtype: str) -> torch.Tensor | None:
        """What this rank's output must hold after the op ran on :meth:`check_input`; None when the
        rank has no result (gather and reduce off the root)."""
        raise NotImplementedError

    def _blocked(self, nbytes: int, nranks: int, es: int, in_blocks: int, out_blocks: int) -> Layout | None:
        block = nbytes // es // nranks
        if block == 0:
            return None
        big = block * nranks
        return Layout(big * es, big, block * in_blocks, block * out_blocks, block)

    def _single(self, nbytes: int, es: int) -> Layout | None:
        count = nbytes // es
        return Layout(count * es, count, count, count, count) if count else None


class AllReduce(Op):
    name = "all_reduce"

    def layout(self, nbytes, nranks, es):
        return self._single(nbytes, es)

    def bus_factor(self, nranks):
        return 2.0 * (nranks - 1) / nranks

    def msg_bytes(self, lay, nranks, es):
        return lay.count * es

    def buffers(self, lay, rank, nranks, root, place):
        return Buffers(lay.count, lay.count, "in" if place == "in" else None)

    def check_input(self, lay, rank, nranks, root, dtype):
        return pattern(lay.count, rank, nranks, dtype)

    def expected(self, lay, rank, nranks, root, dtype):
        return pattern_sum(lay.count, nranks, dtype)


class Broadcast(AllReduce):
    name, redop, rooted = "broadcast", "none", True

    def bus_factor(self, nranks):
        return 1.0

    def expected(self, lay, rank, nranks, root, dtype):
        return pattern(lay.count, root, nranks, dtype)


class Reduce(AllReduce):
    name, rooted, root_result = "reduce", True, True

    def bus_factor(self, nranks):
        return 1.0

    def expected(self, lay, rank, nranks, root, dtype):
        return pattern_sum(lay.count, nranks, dtype) if rank == root else None


class SendRecv(AllReduce):
    """Ring-neighbour exchange: rank r sends its buffer to r+1 and receives r-1's (nccl-tests'
    sendrecv)."""
    name, redop, min_ranks = "sendrecv", "none", 2

    def bus_factor(self, nranks):
        return 1.0

    def expected(self, lay, rank, nranks, root, dtype):
        return pattern(lay.count, (rank - 1) % nranks, nranks, dtype)


class AllGather(Op):
    name, redop = "all_gather", "none"

    def layout(self, nbytes, nranks, es):
        return self._blocked(nbytes, nranks, es, 1, nranks)

    def bus_factor(self, nranks):
        return (nranks - 1) / nranks

    def buffers(self, lay, rank, nranks, root, place):
        if place == "in":
            return Buffers(lay.block, lay.out_count, "in", rank * lay.block)
        return Buffers(lay.block, lay.out_count)

    def check_input(self, lay, rank, nranks, root, dtype):
        return pattern(lay.block, rank, nranks, dtype, start=rank * lay.block)

    def expected(self, lay, rank, nranks, root, dtype):
        return torch.cat([pattern(lay.block, r, nranks, dtype, start=r * lay.block) for r in range(nranks)])


class Gather(AllGather):
    name, rooted, root_result = "gather", True, True

    def msg_bytes(self, lay, nranks, es):
        return lay.block * es

    def buffers(self, lay, rank, nranks, root, place):
        if rank != root:
            return Buffers(lay.block, 0)
        if place == "in":
            return Buffers(lay.block, lay.out_count, "in", root * lay.block)
        return Buffers(lay.block, lay.out_count)

    def expected(self, lay, rank, nranks, root, dtype):
        return super().expected(lay, rank, nranks, root, dtype) if rank == root else None


class ReduceScatter(Op):
    name = "reduce_scatter"

    def layout(self, nbytes, nranks, es):
        return self._blocked(nbytes, nranks, es, nranks, 1)

    def bus_factor(self, nranks):
        return (nranks - 1) / nranks

    def buffers(self, lay, rank, nranks, root, place):
        if place == "in":
            return Buffers(lay.in_count, lay.block, "out", rank * lay.block)
        return Buffers(lay.in_count, lay.block)

    def check_input(self, lay, rank, nranks, root, dtype):
        return pattern(lay.in_count, rank, nranks, dtype)

    def expected(self, lay, rank, nranks, root, dtype):
        return pattern_sum(lay.block, nranks, dtype, start=rank * lay.block)


class Scatter(Op):
    name, redop, rooted = "scatter", "none", True

    def layout(self, nbytes, nranks, es):
        return self._blocked(nbytes, nranks, es, nranks, 1)

    def bus_factor(self, nranks):
        return (nranks - 1) / nranks

    def msg_bytes(self, lay, nranks, es):
        return lay.block * es

    def buffers(self, lay, rank, nranks, root, place):
        if rank != root:
            return Buffers(0, lay.block)
        if place == "in":
            return Buffers(lay.in_count, lay.block, "out", root * lay.block)
        return Buffers(lay.in_count, lay.block)

    def check_input(self, lay, rank, nranks, root, dtype):
        if rank != root:
            return torch.zeros(0, dtype=torch_dtype(dtype))
        return pattern(lay.in_count, root, nranks, dtype)

    def expected(self, lay, rank, nranks, root, dtype):
        return pattern(lay.block, root, nranks, dtype, start=rank * lay.block)


class AllToAll(Op):
    name, redop = "all_to_all", "none"

    def layout(self, nbytes, nranks, es):
        return self._blocked(nbytes, nranks, es, nranks, nranks)

    def bus_factor(self, nranks):
        return (nranks - 1) / nranks

    def buffers(self, lay, rank, nranks, root, place):
        return Buffers(lay.in_count, lay.out_count, "in" if place == "in" else None)

    def check_input(self, lay, rank, nranks, root, dtype):
        return pattern(lay.in_count, rank, nranks, dtype)

    def expected(self, lay, rank, nranks, root, dtype):
        # block p of rank q's output is block q of rank p's input
        return torch.cat([pattern(lay.block, p, nranks, dtype, start=rank * lay.block) for p in range(nranks)])


def make_buffers(spec: Buffers, dtype: "torch.dtype", fill: "torch.Tensor | None" = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) tensors for ``spec``, aliased as it says. Zeros, except that the input
    holds ``fill`` when given (written through the view when the input is part of the output)."""
    if spec.view == "in":
        out = torch.zeros(spec.out_count, dtype=dtype)
        inp = out[spec.offset: spec.offset + spec.in_count]
    elif spec.view == "out":
        inp = torch.zeros(spec.in_count, dtype=dtype)
        out = inp[spec.offset: spec.offset + spec.out_count]
    else:
        inp, out = torch.zeros(spec.in_count, dtype=dtype), torch.zeros(spec.out_count, dtype=dtype)
    if fill is not None:
        inp.copy_(fill)
    return inp, out


OPS: dict[str, Op] = {op.name: op for op in (
    AllReduce(), AllGather(), ReduceScatter(), AllToAll(), Broadcast(), Reduce(), Gather(), Scatter(), SendRecv())}


def plan(op: Op, sizes: list[int], nranks: int, es: int) -> list[Layout]:
    """Layouts for the requested sizes: sizes too small for one element per block are dropped and
    sizes that round to the same buffers are kept once."""
    seen, out = set(), []
    for s in sizes:
        lay = op.layout(s, nranks, es)
        if lay is not None and lay.nbytes not in seen:
            seen.add(lay.nbytes)
            out.append(lay)
    return out


def lookup(name: str, moe: dict | None = None) -> Op:
    """The op called ``name``; ``moe`` holds MoE's experts, topk, hidden and routing (bench.moe_op)."""
    if name == MOE:
        from .moe_op import MoE
        return MoE(**(moe or {}))
    return OPS[name]
