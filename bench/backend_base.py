"""The surface every bench backend offers (:class:`Backend`); the adapters are in
:mod:`bench.backends` (comms, gloo) and :mod:`bench.mpi_backend` (MPI).

A backend is created inside a rank: comms and gloo under ``python -m comms.run`` (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT set), mpi under ``mpirun`` (mpi4py's COMM_WORLD). It offers:

* ``native(op, place, dtype)`` (a class method, so the driver can ask without a live library):
  None when the library runs that op in that place (``"out"`` or ``"in"``, aliased as nccl-tests
  does, see :mod:`bench.ops`) natively, else the reason it does not. The bench never times a copy
  in place of a missing mode: such rows say ``n/a``;
* ``bind(op, place, inp, out, root)``: a zero-argument callable running the op once on those
  buffers (SUM where it reduces). It binds the library's own function with ``functools.partial``
  wherever the signature allows, so the timed loop adds no wrapper layer that the library's users
  would not pay;
* ``barrier()``, ``reduce_values(values, how)`` -- a small float64 all_reduce ("max" or "sum") used
  for control (agreeing on iteration counts, collecting every rank's timings) outside the timed loops;
* ``algorithm(op, msg_bytes)``, ``transport()``, ``versions()`` -- what the table prints;
* ``close()``.
"""
from __future__ import annotations

from typing import Callable, Sequence

BOTH = ("out", "in")


class Backend:
    """Base class; see the module docstring for the surface."""
    name = ""
    rank = 0
    size = 1
    barrier: Callable
    #: op -> {place: reason it is not native}; an op missing here is not supported at all
    UNSUPPORTED: dict[str, dict[str, str]] = {}
    OPS: tuple[str, ...] = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "reduce",
                            "gather", "scatter", "sendrecv")

    @classmethod
    def native(cls, op: str, place: str, dtype: str) -> str | None:
        if op not in cls.OPS:
            return f"{cls.name} has no {op}"
        return cls.UNSUPPORTED.get(op, {}).get(place)

    def bind(self, op: str, place: str, inp, out, root: int) -> Callable[[], object]:
        raise NotImplementedError

    def bind_op(self, op, place: str, inp, out, root: int) -> Callable[[], object]:
        """:meth:`bind` for a :class:`bench.ops.Op` (moe needs the op's parameters)."""
        if op.name == "moe":
            return self.bind_moe(op, inp)
        return self.bind(op.name, place, inp, out, root)

    def bind_moe(self, op, inp) -> Callable[[], object]:
        raise NotImplementedError(f"{self.name} has no moe")

    def reduce_values(self, values: Sequence[float], how: str = "max") -> list[float]:
        """Element-wise max or sum of ``values`` over all ranks (every rank gets the result)."""
        import torch
        t = torch.tensor(list(values), dtype=torch.float64)
        self._reduce_control(t, how)
        return t.tolist()

    def _reduce_control(self, t, how: str) -> None:
        raise NotImplementedError

    def algorithm(self, op: str, msg_bytes: int) -> str:
        return self.name

    def force(self, op: str, algo: str | None) -> None:
        """Collective: from now on run ``op`` with algorithm ``algo`` (None: the default selection).
        Only a library with more than one algorithm per op can."""
        raise NotImplementedError(f"{self.name} cannot force an algorithm")

    def transport(self) -> str:
        return "-"

    def versions(self) -> dict[str, str]:
        return {}

    def close(self) -> None:
        pass

    @property
    def _next(self) -> int:
        return (self.rank + 1) % self.size

    @property
    def _prev(self) -> int:
        return (self.rank - 1) % self.size
