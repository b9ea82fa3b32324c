"""The MPI backend of the bench (:class:`MpiBackend`, through mpi4py under ``mpirun``) and the check
that MPI is installed (:func:`mpi_missing`). The surface is :class:`bench.backend_base.Backend`."""
from __future__ import annotations

import functools
import importlib.util
import os
import shutil

from .backend_base import BOTH, Backend

_HALF = ("float16", "bfloat16")


class MpiBackend(Backend):
    """MPI through mpi4py (``MPI.COMM_WORLD``), started by ``mpirun``; buffers are numpy views of
    the torch tensors (made outside the timed loop; float16 and bfloat16 travel as int16, since
    MPI has no such types). mpi4py initialises MPI with ``MPI_THREAD_SINGLE``: the bench is
    single-threaded, and a higher thread level only adds locking."""
    name = "mpi"
    UNSUPPORTED = {
        "broadcast": {"out": "MPI_Bcast has one buffer"},
        "reduce_scatter": {"in": "MPI's in-place reduce_scatter leaves the result at the start of the buffer, "
                                 "not at the rank's block as nccl-tests' in place does"},
        "moe": dict.fromkeys(BOTH, "MPI has no MoE layer, and the bench's CPU baseline for moe is the usual "
                                   "torch.distributed way (the gloo backend); an MPI_Alltoallv version is not written"),
    }
    OPS = Backend.OPS + ("moe",)
    REDUCING = ("all_reduce", "reduce", "reduce_scatter")

    @classmethod
    def native(cls, op, place, dtype):
        if op in cls.REDUCING and dtype in _HALF:
            return f"MPI has no {dtype} reduction"
        return super().native(op, place, dtype)

    def __init__(self, timeout: float | None = None):
        import mpi4py
        mpi4py.rc.thread_level = "single"
        from mpi4py import MPI
        self._mpi4py, self.MPI = mpi4py, MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.barrier = self.comm.Barrier

    @staticmethod
    def _np(t):
        import torch
        if t is None:
            return None
        if t.dtype in (torch.float16, torch.bfloat16):
            t = t.view(torch.int16)
        return t.numpy()

    def bind(self, op, place, inp, out, root):
        c, p, IN_PLACE = self.comm, functools.partial, self.MPI.IN_PLACE
        i, o = self._np(inp), self._np(out)
        inplace, at_root = place == "in", self.rank == root
        if op == "all_reduce":
            return p(c.Allreduce, IN_PLACE, o) if inplace else p(c.Allreduce, i, o)
        if op == "broadcast":
            return p(c.Bcast, o, root)
        if op == "reduce":
            if inplace:
                return p(c.Reduce, IN_PLACE if at_root else o, o if at_root else None, self.MPI.SUM, root)
            return p(c.Reduce, i, o if at_root else None, self.MPI.SUM, root)
        if op == "all_gather":
            return p(c.Allgather, IN_PLACE if inplace else i, o)
        if op == "reduce_scatter":
            return p(c.Reduce_scatter_block, i, o)
        if op == "all_to_all":
            return p(c.Alltoall, IN_PLACE if inplace else i, o)
        if op == "gather":
            if at_root:
                return p(c.Gather, IN_PLACE if inplace else i, o, root)
            return p(c.Gather, i, None, root)
        if op == "scatter":
            if at_root:
                return p(c.Scatter, i, IN_PLACE if inplace else o, root)
            return p(c.Scatter, None, o, root)
        if op == "sendrecv":
            if inplace:
                return p(c.Sendrecv_replace, o, self._next, 0, self._prev, 0)
            return p(c.Sendrecv, i, self._next, 0, o, self._prev, 0)
        raise ValueError(op)

    def _reduce_control(self, t, how: str) -> None:
        op = {"max": self.MPI.MAX, "sum": self.MPI.SUM}[how]
        self.comm.Allreduce(self.MPI.IN_PLACE, t.numpy(), op=op)

    def transport(self) -> str:
        """What the launch asked Open MPI for: the BTLs other than self, shared memory shown as shm."""
        pml, btl = os.environ.get("OMPI_MCA_pml", ""), os.environ.get("OMPI_MCA_btl", "")
        if pml in ("", "ob1") and btl and not btl.startswith("^"):
            kinds = [{"vader": "shm", "sm": "shm"}.get(b, b) for b in btl.split(",") if b != "self"]
            if kinds:
                return "+".join(dict.fromkeys(kinds))
        return f"pml:{pml}" if pml else "default"

    def versions(self) -> dict[str, str]:
        lib = self.MPI.Get_library_version().replace("\x00", "").strip()
        return {"mpi": lib.split(",")[0].strip(),
                "mpi4py": self._mpi4py.__version__}


MPI_MISSING = "mpi: Open MPI / mpi4py not installed (run with --install-mpi as root)"


def mpi_missing(env: dict[str, str] | None = None) -> str | None:
    """None when ``mpirun`` is on the PATH of ``env`` (default: this process's) and mpi4py is
    importable by this Python; else what is missing."""
    env = os.environ if env is None else env
    gone = []
    if shutil.which("mpirun", path=env.get("PATH", "")) is None:
        gone.append("mpirun is not on PATH")
    if importlib.util.find_spec("mpi4py") is None:
        gone.append("mpi4py is not importable")
    return "; ".join(gone) or None
