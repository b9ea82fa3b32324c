"""The bench's backends: one adapter per library, all with the surface of
:class:`bench.backend_base.Backend`, in a registry (:data:`BACKENDS`): comms and gloo here, MPI in
:mod:`bench.mpi_backend`; "torch" (torch.distributed on the comms backend) and "numpy" (comms on
numpy views) are variants of gloo's and comms' adapters.

:class:`Spec` is one entry of ``--backends``: a library plus environment overrides applied to that
backend's launches only (``comms@COMMS_FLIGHT_RECORDER=0``), labelled as given.

Adding a backend: subclass :class:`Backend`, register it in :data:`BACKENDS`, and teach the driver
how to launch it if ``comms.run`` cannot (see ``driver.worker_command``). Libraries are imported in
the constructor, so importing this module stays cheap (the driver only needs the names).
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field

from .backend_base import BOTH, Backend
from .mpi_backend import MPI_MISSING, MpiBackend, mpi_missing

__all__ = ["BACKENDS", "BOTH", "DEFAULT_BACKENDS", "MPI_MISSING", "Backend", "CommsBackend", "GlooBackend",
           "MpiBackend", "NumpyCommsBackend", "Spec", "make", "mpi_missing"]

_RACE = "sending and receiving one buffer at once races; the library has no send-recv-replace"


class CommsBackend(Backend):
    """comms: ``comms.init()`` from the launcher's environment."""
    name = "comms"
    UNSUPPORTED = {
        "all_reduce": {"out": "comms all_reduce(buf) works in place only (a copy would be timed)"},
        "broadcast": {"out": "comms broadcast(buf, root) has one buffer"},
        "reduce": {"out": "comms reduce(buf, root) works in place only"},
        "all_to_all": {"in": "comms all_to_all rejects overlapping input and output"},
        "sendrecv": {"in": _RACE},
        "moe": {"in": "comms.moe dispatch and combine return new tensors"},
    }
    OPS = Backend.OPS + ("moe",)
    MOE_DTYPES = ("float32", "float16", "bfloat16")

    @classmethod
    def native(cls, op, place, dtype):
        if op == "moe" and dtype not in cls.MOE_DTYPES:
            return f"comms.moe carries {', '.join(cls.MOE_DTYPES)} tokens"
        return super().native(op, place, dtype)

    def __init__(self, timeout: float | None = None):
        import comms
        self._comms = comms
        self.comm = comms.init(timeout=timeout)
        self.rank, self.size = self.comm.rank, self.comm.size
        self.barrier = self.comm.barrier
        self._moe: dict[tuple[int, int], object] = {}

    def dispatcher(self, op):
        """The launch's ``comms.moe.Dispatcher`` for the op's (experts, hidden); made once (collective)."""
        key = (op.num_experts(self.size), op.hidden)
        if key not in self._moe:
            from comms.moe import Dispatcher
            self._moe[key] = Dispatcher(self.comm, num_experts=key[0], hidden=key[1])
        return self._moe[key]

    def _moe_inputs(self, op, inp):
        return _moe_inputs(op, inp, self.rank, self.size)

    def bind_moe(self, op, inp):
        d = self.dispatcher(op)
        x, idx, w = self._moe_inputs(op, inp)
        dispatch, combine = d.dispatch, d.combine

        def moe():
            recv = dispatch(x, idx, w)
            combine(recv[0], recv[4])
        return moe

    def moe_round_trip(self, op, inp):
        """(recv_x, combine(recv_x)) of one dispatch of ``inp``: what the check compares."""
        d = self.dispatcher(op)
        recv_x, _, _, _, handle = d.dispatch(*self._moe_inputs(op, inp))
        return recv_x, d.combine(recv_x, handle)

    def bind(self, op, place, inp, out, root):
        c, p = self.comm, functools.partial
        if op in ("all_reduce",):
            return p(c.all_reduce, out)
        if op == "broadcast":
            return p(c.broadcast, out, root)
        if op == "reduce":
            return p(c.reduce, out, root)
        if op in ("all_gather", "reduce_scatter", "all_to_all"):
            return p(getattr(c, op), out, inp)
        if op == "gather":
            return p(c.gather, out if self.rank == root else None, inp, root)
        if op == "scatter":
            return p(c.scatter, out, inp if self.rank == root else None, root)
        if op == "sendrecv":
            send, recv, nxt, prv = c.send, c.recv, self._next, self._prev

            def sendrecv():
                w = send(inp, nxt, async_op=True)
                recv(out, prv)
                w.wait()
            return sendrecv
        raise ValueError(op)

    def _reduce_control(self, t, how: str) -> None:
        self.comm.all_reduce(t, op={"max": self._comms.MAX, "sum": self._comms.SUM}[how])

    def algorithm(self, op: str, msg_bytes: int) -> str:
        if op == "sendrecv":
            return "p2p"
        if op == "moe":
            hier = any(getattr(d, "hier", None) is not None for d in self._moe.values())
            return "hierarchical" if hier else "normal"
        # the algorithm that ran (a candidate may have declined the size); before any call, the first choice
        ran = getattr(self.comm, "algorithm_ran", None)
        return (ran(op, msg_bytes) if ran else None) or self.comm.algorithm_for(op, msg_bytes)

    def force(self, op: str, algo: str | None) -> None:
        # what COMMS_ALGO=<op>:<algo> does at init, in the running communicator (every rank calls it)
        self.comm.set_algo(None if algo is None else f"{op}:{algo}")

    def transport(self) -> str:
        kinds = sorted(set(self.comm.transports.values()))
        return "+".join(kinds) if kinds else "-"

    def versions(self) -> dict[str, str]:
        return {"comms": getattr(self._comms, "__version__", "?")}

    def close(self) -> None:
        for d in self._moe.values():
            getattr(d, "close", lambda: None)()
        self.comm.close()


def _moe_inputs(op, inp, rank: int, size: int):
    """(x [T, H] view of ``inp``, topk_idx, topk_weights) of this rank for a :class:`bench.moe_op.MoE`:
    the same routing on every backend."""
    tokens = inp.numel() // op.hidden
    return (inp.view(tokens, op.hidden), *op.routing_of(tokens, rank, size))


class GlooBackend(Backend):
    """torch.distributed with the gloo backend, ``init_method="env://"`` (GLOO_SOCKET_IFNAME=lo
    unless set). moe is the usual CPU way, :mod:`bench.moe_gloo` (count exchange, then
    ``all_to_all_single`` of the rows and the routing metadata with uneven splits, and back)."""
    name = "gloo"
    UNSUPPORTED = {
        "all_reduce": {"out": "torch.distributed.all_reduce works in place only"},
        "broadcast": {"out": "torch.distributed.broadcast has one buffer"},
        "reduce": {"out": "torch.distributed.reduce works in place only"},
        "all_to_all": {"in": "gloo all_to_all_single(buf, buf) gives wrong results (checked with torch 2.13)"},
        "sendrecv": {"in": _RACE},
        "moe": {"in": "dispatch and combine the all_to_all_single way return new tensors (as comms.moe's do)"},
    }
    OPS = Backend.OPS + ("moe",)
    MOE_DTYPES = ("float32", "float16", "bfloat16")

    @classmethod
    def native(cls, op, place, dtype):
        if op == "moe" and dtype not in cls.MOE_DTYPES:
            return f"moe tokens are {', '.join(cls.MOE_DTYPES)} (combine sums in float32), as in comms.moe"
        return super().native(op, place, dtype)

    GROUP_BACKEND = "gloo"           # the torch.distributed backend the group is made with

    def __init__(self, timeout: float | None = None):
        import datetime

        import torch
        import torch.distributed as dist
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        kw = {"timeout": datetime.timedelta(seconds=timeout)} if timeout else {}
        if self.GROUP_BACKEND == "comms":
            import comms  # noqa: F401 - registers the backend
        dist.init_process_group(self.GROUP_BACKEND, init_method="env://", **kw)
        self._dist, self._torch = dist, torch
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.barrier = dist.barrier
        # newer torch renames the *_tensor collectives to *_single and deprecates the old names
        self._all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self._reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

    def bind_moe(self, op, inp):
        from . import moe_gloo
        x, idx, w = _moe_inputs(op, inp, self.rank, self.size)
        dispatch, combine, dist, experts = moe_gloo.dispatch, moe_gloo.combine, self._dist, op.num_experts(self.size)

        def moe():
            recv = dispatch(dist, x, idx, w, experts)
            combine(dist, recv[0], recv[3])
        return moe

    def moe_round_trip(self, op, inp):
        """(recv_x, combine(recv_x)) of one dispatch of ``inp``: what the check compares."""
        from . import moe_gloo
        return moe_gloo.round_trip(self._dist, *_moe_inputs(op, inp, self.rank, self.size), op.num_experts(self.size))

    def bind(self, op, place, inp, out, root):
        d, p, n = self._dist, functools.partial, self.size
        if op == "all_reduce":
            return p(d.all_reduce, out)
        if op == "broadcast":
            return p(d.broadcast, out, root)
        if op == "reduce":
            return p(d.reduce, out, root)
        if op == "all_gather":
            return p(self._all_gather, out, inp)
        if op == "reduce_scatter":
            return p(self._reduce_scatter, out, inp)
        if op == "all_to_all":
            return p(d.all_to_all_single, out, inp)
        if op == "gather":   # the list of views is made here, outside the timed loop
            return p(d.gather, inp, list(out.chunk(n)) if self.rank == root else None, root)
        if op == "scatter":
            return p(d.scatter, out, list(inp.chunk(n)) if self.rank == root else None, root)
        if op == "sendrecv":
            isend, recv, nxt, prv = d.isend, d.recv, self._next, self._prev

            def sendrecv():
                w = isend(inp, nxt)
                recv(out, prv)
                w.wait()
            return sendrecv
        raise ValueError(op)

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


class TorchCommsBackend(GlooBackend):
    """torch.distributed with the "comms" backend (``import comms``; ``init_process_group("comms")``):
    the same calls as the gloo backend's, through c10d's dispatch into comms' process group. Set
    beside ``comms`` it shows what torch.distributed adds to comms' own call."""
    name = "torch"
    GROUP_BACKEND = "comms"

    def algorithm(self, op: str, msg_bytes: int) -> str:
        return "comms"

    def transport(self) -> str:
        return "shm"

    def versions(self) -> dict[str, str]:
        return {"torch": self._torch.__version__, "comms": __import__("comms").__version__}


class NumpyCommsBackend(CommsBackend):
    """comms' own calls on numpy views of the bench's buffers (``comm.all_reduce(ndarray)``, no torch
    in the call): the native figure the torch backend's per-call overhead is held against
    (``--backends numpy,torch,gloo --compare torch,numpy``). The views share the buffers' memory,
    so the checks read the results as for comms."""
    name = "numpy"
    OPS = Backend.OPS                        # moe takes torch tensors

    @classmethod
    def native(cls, op, place, dtype):
        if dtype == "bfloat16":
            return "numpy has no bfloat16"
        return super().native(op, place, dtype)

    def bind(self, op, place, inp, out, root):
        return super().bind(op, place, inp.numpy(), out.numpy(), root)


BACKENDS: dict[str, type[Backend]] = {"comms": CommsBackend, "gloo": GlooBackend, "mpi": MpiBackend,
                                      "torch": TorchCommsBackend, "numpy": NumpyCommsBackend}
DEFAULT_BACKENDS = ("comms", "gloo", "mpi")      # mpi is skipped with a note when it is not installed
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True)
class Spec:
    """One ``--backends`` entry: ``label`` as given, the library ``base``, and ``env`` overrides for
    that backend's launches (``comms@COMMS_FLIGHT_RECORDER=0@COMMS_SPIN=0``)."""
    label: str
    base: str
    env: dict[str, str] = field(default_factory=dict, hash=False)

    @classmethod
    def parse(cls, text: str) -> "Spec":
        parts = text.strip().split("@")
        base, env = parts[0].strip(), {}
        if base not in BACKENDS:
            raise ValueError(f"unknown backend {base!r} in {text!r}; known: {', '.join(BACKENDS)}")
        for item in parts[1:]:
            name, eq, value = item.partition("=")
            if not eq or not _ENV_NAME.match(name):
                raise ValueError(f"{text!r}: {item!r} is not NAME=VALUE (write backend@NAME=VALUE[@NAME=VALUE...])")
            env[name] = value
        return cls(text.strip(), base, env)


def make(name: str, timeout: float | None = None) -> Backend:
    """Create backend ``name`` in this rank (collective: every rank must call it)."""
    try:
        cls = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}") from None
    return cls(timeout=timeout)
