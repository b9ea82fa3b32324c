"""One adapter per library, all with the same call surface, in a registry (:data:`BACKENDS`).

Every backend is created inside a rank started by ``python -m comms.run`` (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT set) and offers, on contiguous torch CPU tensors, with SUM where it reduces:

* ``all_reduce(buf)``, ``broadcast(buf, root)``, ``all_gather(out, inp)``,
  ``reduce_scatter(out, inp)``, ``all_to_all(out, inp)``, ``barrier()`` -- blocking;
* ``reduce_values(values, how)`` -- a small float64 all_reduce ("max" or "sum") used for control
  (agreeing on iteration counts, collecting every rank's timings) outside the timed loops;
* ``algorithm(op, msg_bytes)``, ``transport()``, ``versions()`` -- what the table prints;
* ``close()``.

The timed loop calls the collective attributes directly, so a backend binds them to the library's
own functions where the signatures already match: no wrapper layer is timed that the library's
users would not pay.

Adding a backend: subclass :class:`Backend`, register it in :data:`BACKENDS`. Libraries are imported
in the constructor, so importing this module stays cheap (the driver only needs the names).
"""
from __future__ import annotations

import os
from typing import Callable, Sequence


class Backend:
    """Base class; see the module docstring for the surface."""
    name = ""
    rank = 0
    size = 1
    all_reduce: Callable
    broadcast: Callable
    all_gather: Callable
    reduce_scatter: Callable
    all_to_all: Callable
    barrier: Callable

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

    def transport(self) -> str:
        return "-"

    def versions(self) -> dict[str, str]:
        return {}

    def close(self) -> None:
        pass


class CommsBackend(Backend):
    """comms: ``comms.init()`` from the launcher's environment."""
    name = "comms"

    def __init__(self, timeout: float | None = None):
        import comms
        self._comms = comms
        self.comm = comms.init(timeout=timeout)
        self.rank, self.size = self.comm.rank, self.comm.size
        c = self.comm
        # comms' signatures match the surface (SUM is the default op): bind them directly
        self.all_reduce = c.all_reduce
        self.broadcast = c.broadcast
        self.all_gather = c.all_gather
        self.reduce_scatter = c.reduce_scatter
        self.all_to_all = c.all_to_all
        self.barrier = c.barrier

    def _reduce_control(self, t, how: str) -> None:
        self.comm.all_reduce(t, op={"max": self._comms.MAX, "sum": self._comms.SUM}[how])

    def algorithm(self, op: str, msg_bytes: int) -> str:
        return self.comm.algorithm_for(op, msg_bytes)

    def transport(self) -> str:
        kinds = sorted(set(self.comm.transports.values()))
        return "+".join(kinds) if kinds else "-"

    def versions(self) -> dict[str, str]:
        return {"comms": getattr(self._comms, "__version__", "?")}

    def close(self) -> None:
        self.comm.close()


class GlooBackend(Backend):
    """torch.distributed with the gloo backend, ``init_method="env://"`` (GLOO_SOCKET_IFNAME=lo
    unless set)."""
    name = "gloo"

    def __init__(self, timeout: float | None = None):
        import datetime

        import torch
        import torch.distributed as dist
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        kw = {"timeout": datetime.timedelta(seconds=timeout)} if timeout else {}
        dist.init_process_group("gloo", init_method="env://", **kw)
        self._dist, self._torch = dist, torch
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.all_reduce = dist.all_reduce
        self.barrier = dist.barrier
        self.all_to_all = dist.all_to_all_single
        # newer torch renames the *_tensor collectives to *_single and deprecates the old names
        self.all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self.reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

    def broadcast(self, buf, root: int = 0) -> None:
        self._dist.broadcast(buf, src=root)

    def _reduce_control(self, t, how: str) -> None:
        op = {"max": self._dist.ReduceOp.MAX, "sum": self._dist.ReduceOp.SUM}[how]
        self._dist.all_reduce(t, op=op)

    def algorithm(self, op: str, msg_bytes: int) -> str:
        return "gloo"

    def transport(self) -> str:
        return "tcp"

    def versions(self) -> dict[str, str]:
        return {"torch": self._torch.__version__}

    def close(self) -> None:
        if self._dist.is_initialized():
            self._dist.destroy_process_group()


BACKENDS: dict[str, type[Backend]] = {"comms": CommsBackend, "gloo": GlooBackend}


def make(name: str, timeout: float | None = None) -> Backend:
    """Create backend ``name`` in this rank (collective: every rank must call it)."""
    try:
        cls = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}") from None
    return cls(timeout=timeout)
