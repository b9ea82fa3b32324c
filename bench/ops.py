"""The collectives the benchmark times, one class each, in a registry (:data:`OPS`).

An op knows:

* its buffer :class:`Layout` for a requested size (nccl-tests convention: ``size`` is the bytes of
  the larger buffer -- all_gather's output, reduce_scatter's input, all_to_all's whole send buffer
  -- rounded down so that every rank's block is whole; ``count`` is that buffer's elements);
* its nccl-tests bus-bandwidth factor and the message size the comms selector sees;
* how to call it on a backend (:meth:`Op.bind`, which returns a zero-argument callable for the
  timed loop), and exact check data (:meth:`Op.check_buffers`, :meth:`Op.expected`).

Check data are small integers, so sums are exact in every supported dtype: rank ``r`` holds
``((i + 3 r) mod m) + 1`` at global element ``i``, with ``m`` small enough that a sum over all ranks
is still exactly representable. A block landing at the wrong offset, a rank counted twice or missed
all change the result.

Adding an op: subclass :class:`Op`, fill in the five methods, add it to :data:`OPS`, and give each
backend in :mod:`bench.backends` a method of the same name.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

# canonical name -> (torch dtype, nccl-tests name, largest integer k such that 0..k are all exact)
DTYPES: dict[str, tuple[torch.dtype, str, int]] = {
    "float32": (torch.float32, "float", 1 << 24),
    "float64": (torch.float64, "double", 1 << 53),
    "float16": (torch.float16, "half", 2048),
    "bfloat16": (torch.bfloat16, "bfloat16", 256),
    "int32": (torch.int32, "int32", (1 << 31) - 1),
    "int64": (torch.int64, "int64", (1 << 63) - 1),
    "int8": (torch.int8, "int8", 127),
    "uint8": (torch.uint8, "uint8", 255),
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


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[canonical_dtype(name)][0]


def nccl_name(name: str) -> str:
    return DTYPES[canonical_dtype(name)][1]


def elem_size(name: str) -> int:
    return torch.empty((), dtype=torch_dtype(name)).element_size()


def _period(nranks: int, dtype: str) -> int:
    return max(1, min(_PERIOD, DTYPES[dtype][2] // max(nranks, 1) - 1))


def _tile(period: torch.Tensor, count: int) -> torch.Tensor:
    """``period`` repeated to ``count`` elements (a copy: cheap even at 64 MiB)."""
    reps = -(-count // max(period.numel(), 1))
    return period.repeat(reps)[:count]


def _period_i64(rank: int, nranks: int, dtype: str, start: int) -> torch.Tensor:
    m = _period(nranks, dtype)
    return (torch.arange(m, dtype=torch.int64) + start + 3 * rank) % m + 1


def pattern(count: int, rank: int, nranks: int, dtype: str, start: int = 0) -> torch.Tensor:
    """Rank ``rank``'s check data for global elements ``start .. start+count-1`` (see module doc)."""
    return _tile(_period_i64(rank, nranks, dtype, start).to(DTYPES[dtype][0]), count)


def pattern_sum(count: int, nranks: int, dtype: str, start: int = 0) -> torch.Tensor:
    """The exact SUM over all ranks of :func:`pattern`, in ``dtype``."""
    acc = sum(_period_i64(r, nranks, dtype, start) for r in range(nranks))
    return _tile(acc.to(DTYPES[dtype][0]), count)


@dataclass(frozen=True)
class Layout:
    """Buffers of one size. ``nbytes``/``count``: the reported size (see module doc);
    ``in_count``/``out_count``: elements of each rank's input and output; ``block``: elements per
    rank block (``count`` for all_reduce and broadcast)."""
    nbytes: int
    count: int
    in_count: int
    out_count: int
    block: int


class Op:
    """Base class: one collective. Subclasses set the class attributes and the methods."""
    name = ""
    redop = "sum"          # as printed in the table; "none" for data movement
    root = -1              # as printed in the table
    inplace = False        # True: input and output are the same buffer

    def layout(self, nbytes: int, nranks: int, es: int) -> Layout | None:
        """Buffers for a requested ``nbytes``; None when that is less than one element per block."""
        raise NotImplementedError

    def bus_factor(self, nranks: int) -> float:
        """busbw = algbw x this (nccl-tests' factors)."""
        raise NotImplementedError

    def msg_bytes(self, lay: Layout, nranks: int, es: int) -> int:
        """The size comms' selector keys on (comms.selector): the per-rank buffer for all_reduce and
        broadcast, the bytes a rank sends otherwise."""
        return lay.block * es * (nranks - 1)

    def bind(self, backend, inp: torch.Tensor, out: torch.Tensor) -> Callable[[], object]:
        """A zero-argument callable running this op once on these buffers."""
        raise NotImplementedError

    def check_buffers(self, lay: Layout, rank: int, nranks: int, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh (input, output) holding this rank's check data (the same tensor when in place)."""
        raise NotImplementedError

    def expected(self, lay: Layout, rank: int, nranks: int, dtype: str) -> torch.Tensor:
        """What this rank's output must hold after the op ran on :meth:`check_buffers`."""
        raise NotImplementedError

    def _blocked(self, nbytes: int, nranks: int, es: int, in_blocks: int, out_blocks: int) -> Layout | None:
        block = nbytes // es // nranks
        if block == 0:
            return None
        big = block * nranks
        return Layout(big * es, big, block * in_blocks, block * out_blocks, block)


class AllReduce(Op):
    name, inplace = "all_reduce", True

    def layout(self, nbytes, nranks, es):
        count = nbytes // es
        return Layout(count * es, count, count, count, count) if count else None

    def bus_factor(self, nranks):
        return 2.0 * (nranks - 1) / nranks

    def msg_bytes(self, lay, nranks, es):
        return lay.count * es

    def bind(self, backend, inp, out):
        return functools.partial(backend.all_reduce, out)

    def check_buffers(self, lay, rank, nranks, dtype):
        buf = pattern(lay.count, rank, nranks, dtype)
        return buf, buf

    def expected(self, lay, rank, nranks, dtype):
        return pattern_sum(lay.count, nranks, dtype)


class Broadcast(AllReduce):
    name, redop, root = "broadcast", "none", 0

    def bus_factor(self, nranks):
        return 1.0

    def bind(self, backend, inp, out):
        return functools.partial(backend.broadcast, out, self.root)

    def expected(self, lay, rank, nranks, dtype):
        return pattern(lay.count, self.root, nranks, dtype)


class AllGather(Op):
    name, redop = "all_gather", "none"

    def layout(self, nbytes, nranks, es):
        return self._blocked(nbytes, nranks, es, 1, nranks)

    def bus_factor(self, nranks):
        return (nranks - 1) / nranks

    def bind(self, backend, inp, out):
        return functools.partial(backend.all_gather, out, inp)

    def check_buffers(self, lay, rank, nranks, dtype):
        inp = pattern(lay.block, rank, nranks, dtype, start=rank * lay.block)
        return inp, torch.zeros(lay.out_count, dtype=torch_dtype(dtype))

    def expected(self, lay, rank, nranks, dtype):
        return torch.cat([pattern(lay.block, r, nranks, dtype, start=r * lay.block) for r in range(nranks)])


class ReduceScatter(Op):
    name = "reduce_scatter"

    def layout(self, nbytes, nranks, es):
        return self._blocked(nbytes, nranks, es, nranks, 1)

    def bus_factor(self, nranks):
        return (nranks - 1) / nranks

    def bind(self, backend, inp, out):
        return functools.partial(backend.reduce_scatter, out, inp)

    def check_buffers(self, lay, rank, nranks, dtype):
        inp = pattern(lay.in_count, rank, nranks, dtype)
        return inp, torch.zeros(lay.out_count, dtype=torch_dtype(dtype))

    def expected(self, lay, rank, nranks, dtype):
        return pattern_sum(lay.block, nranks, dtype, start=rank * lay.block)


class AllToAll(Op):
    name, redop = "all_to_all", "none"

    def layout(self, nbytes, nranks, es):
        return self._blocked(nbytes, nranks, es, nranks, nranks)

    def bus_factor(self, nranks):
        return (nranks - 1) / nranks

    def bind(self, backend, inp, out):
        return functools.partial(backend.all_to_all, out, inp)

    def check_buffers(self, lay, rank, nranks, dtype):
        inp = pattern(lay.in_count, rank, nranks, dtype)
        return inp, torch.zeros(lay.out_count, dtype=torch_dtype(dtype))

    def expected(self, lay, rank, nranks, dtype):
        # block p of rank q's output is block q of rank p's input
        return torch.cat([pattern(lay.block, p, nranks, dtype, start=rank * lay.block) for p in range(nranks)])


OPS: dict[str, Op] = {op.name: op for op in (AllReduce(), AllGather(), ReduceScatter(), AllToAll(), Broadcast())}
