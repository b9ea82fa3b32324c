"""Plumbing between c10d's calling conventions and comms buffers: reduction ops, timeouts, staging.

c10d hands a backend lists of tensors (one per device; on CPU always one), option structs and
torch ``ReduceOp`` objects; comms wants one contiguous buffer per argument. Everything that
bridges the two lives here, as small functions the process group composes:

* :func:`reduce_op` maps ``opts.reduceOp`` to a comms op plus the PREMUL_SUM factor (or None);
  :data:`FAST_OPS` does the same by ``RedOpType`` value on the hot path;
* :func:`seconds` turns an option's ``timeout`` into seconds, None when unset (negative or zero);
* :func:`staged` gives a contiguous buffer comms can use in place of a tensor, and the copy back
  to run after the operation when the tensor itself could not be used;
* :func:`joined` views a list of back-to-back tensors as one buffer without a copy
  (this is what ``all_gather_object`` and similar callers hand in), else allocates one;
* :func:`movable` reinterprets a tensor of a dtype comms does not reduce (int16, complex, ...) as
  bytes, for operations that only move data.

A "post" step is a zero-argument callable; :func:`chain` combines several (None means nothing to
do). Post steps copy staged results into the caller's tensors; they run once the communication
succeeded, and never after a failure.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist

from ..dtypes import ReduceOp, _torch_codes
from ..errors import InvalidUsage

Post = Callable[[], None] | None

_T = dist.ReduceOp.RedOpType
OPS = {_T.SUM: ReduceOp.SUM, _T.AVG: ReduceOp.AVG, _T.PRODUCT: ReduceOp.PROD, _T.MIN: ReduceOp.MIN,
        _T.MAX: ReduceOp.MAX, _T.BAND: ReduceOp.BAND, _T.BOR: ReduceOp.BOR, _T.BXOR: ReduceOp.BXOR}
PREMUL_SUM = _T.PREMUL_SUM


# The comms op by hash of a dist.ReduceOp (``hash(opts.reduceOp)``: about 0.1 us, where reading
# ``opts.reduceOp.op.value`` through pybind costs about 0.8 us). Built from torch's own objects, so
# it holds whatever torch's hash is; an op whose hash two ops share, and PREMUL_SUM (which needs
# its factor: :func:`reduce_op`), are left out and take the general path.
def _by_hash() -> dict:
    seen: dict = {}
    for t, op in OPS.items():
        seen.setdefault(hash(dist.ReduceOp(t)), []).append(op)
    for factor in (2.0, torch.ones(1)):       # PREMUL_SUM (with either kind of factor) must not pose as an op
        try:
            seen.setdefault(hash(dist._make_nccl_premul_sum(factor)), []).append(None)
        except (AttributeError, RuntimeError, TypeError):
            pass
    return {h: ops[0] for h, ops in seen.items() if len(ops) == 1 and ops[0] is not None}


FAST_OPS = _by_hash()


def reduce_op(rop) -> tuple[ReduceOp, float | torch.Tensor | None]:
    """(comms op, factor): PREMUL_SUM becomes SUM of the inputs multiplied by ``factor`` (a number
    or a one-element tensor); every other op has factor None. Accepts a ``dist.ReduceOp`` or its
    ``RedOpType``."""
    kind = getattr(rop, "op", rop)
    if kind == PREMUL_SUM:
        factor = getattr(rop, "factor", None)
        if factor is None:
            raise InvalidUsage("PREMUL_SUM: the reduce op carries no factor")
        return ReduceOp.SUM, factor
    op = OPS.get(kind)
    if op is None:
        raise InvalidUsage(f"unsupported reduction op {rop!r}")
    return op, None


def seconds(timeout) -> float | None:
    """An option's ``timeout`` (timedelta, or seconds) in seconds; None when unset (<= 0)."""
    if timeout is None:
        return None
    s = timeout.total_seconds() if hasattr(timeout, "total_seconds") else float(timeout)
    return s if s > 0 else None


def one(tensors, what: str) -> torch.Tensor:
    """The single tensor of a per-device list (CPU groups have one device)."""
    if isinstance(tensors, torch.Tensor):
        return tensors
    if len(tensors) != 1:
        raise InvalidUsage(f"{what}: expected one tensor per call (comms groups have one device), got {len(tensors)}")
    return tensors[0]


def real(t: torch.Tensor) -> torch.Tensor:
    """Complex tensors travel as their real view (two floats per element)."""
    return torch.view_as_real(t) if t.is_complex() else t


def staged(t: torch.Tensor, copy_back: bool = True) -> tuple[torch.Tensor, Post]:
    """A contiguous buffer standing for ``t`` and the post step that copies it back (None when
    ``t`` itself is contiguous, or when ``copy_back`` is False: ``t`` is an input only)."""
    t = real(t)
    if t.is_contiguous():
        return t, None
    buf = t.contiguous()
    return buf, ((lambda: t.copy_(buf)) if copy_back else None)


def movable(t: torch.Tensor) -> torch.Tensor:
    """``t`` as comms can move it: itself for dtypes comms knows, else its bytes, shaped (rows,
    bytes per row) so that all_to_all splits along dim 0 stay valid. ``t`` must be contiguous."""
    if t.dtype in _torch_codes():
        return t
    if t.dim() == 0:
        t = t.reshape(1)
    if t.dim() == 1:
        t = t.unsqueeze(1)
    return t.view(torch.uint8)


def adjacent(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """One 1-D tensor over the memory of ``tensors`` when they are contiguous, of one dtype, and
    lie back to back, in order, in one storage; else None. No copy."""
    t0 = real(tensors[0])
    es, end = t0.element_size(), t0.data_ptr()
    storage = t0.untyped_storage().data_ptr()
    total = 0
    for t in tensors:
        t = real(t)
        if (not t.is_contiguous() or t.dtype != t0.dtype or t.data_ptr() != end
                or t.untyped_storage().data_ptr() != storage):
            return None
        end += t.numel() * es
        total += t.numel()
    return t0.as_strided((total,), (1,), t0.storage_offset())


def joined(tensors: Sequence[torch.Tensor], what: str, fill: bool) -> tuple[torch.Tensor, Post, bool]:
    """(buffer, post step, owned): one contiguous 1-D buffer holding ``tensors`` back to back.
    ``fill`` copies the tensors in (an input); otherwise the operation fills the buffer and the
    post step copies it out into the tensors (an output). Zero-copy when :func:`adjacent`; then
    the buffer is the caller's memory and ``owned`` is False."""
    if not tensors:
        raise InvalidUsage(f"{what}: the tensor list is empty")
    flat = adjacent(tensors)
    if flat is not None:
        return flat, None, False
    reals = [real(t) for t in tensors]
    dtype = reals[0].dtype
    if any(t.dtype != dtype for t in reals):
        raise InvalidUsage(f"{what}: the tensors must all have the same dtype, got "
                           f"{sorted({str(t.dtype) for t in reals})}")
    if fill:
        return torch.cat([t.reshape(-1) for t in reals]), None, True
    flat = torch.empty(sum(t.numel() for t in reals), dtype=dtype)
    return flat, (lambda: split_into(reals, flat)), True


def split_into(tensors: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy ``flat`` (the tensors' elements back to back) into ``tensors``."""
    reals = [real(t) for t in tensors]
    for t, part in zip(reals, flat.split([t.numel() for t in reals])):
        t.copy_(part.view(t.shape))


def equal_sizes(tensors: Sequence[torch.Tensor], n: int, what: str) -> None:
    """Every tensor of ``tensors`` has ``n`` elements (comms gathers equal blocks)."""
    bad = [i for i, t in enumerate(tensors) if t.numel() != n]
    if bad:
        raise InvalidUsage(f"{what}: tensor {bad[0]} has {tensors[bad[0]].numel()} elements but the "
                           f"input has {n}; comms needs equal sizes")


def premultiplied(t: torch.Tensor, factor, in_place: bool) -> torch.Tensor:
    """``t * factor`` (PREMUL_SUM's local step), in place when allowed."""
    if isinstance(factor, torch.Tensor):
        factor = factor.to(device=t.device)
    return t.mul_(factor) if in_place else t.mul(factor)


def equal_splits(rows: int, size: int, what: str) -> list[int]:
    if rows % size:
        raise InvalidUsage(f"{what}: dimension 0 has {rows} rows, which {size} ranks cannot split "
                           "equally; pass split sizes")
    return [rows // size] * size


def per_rank(lists: list) -> list:
    """The value of a future over one output list per rank, as Gloo gives it: the lists themselves
    when there are several, the only one's tensors otherwise."""
    return lists if len(lists) > 1 else (list(lists[0]) if lists else [])


def chain(*posts: Post) -> Post:
    """One post step running ``posts`` in order (None if there is nothing to run)."""
    todo = [p for p in posts if p is not None]
    if not todo:
        return None
    if len(todo) == 1:
        return todo[0]

    def run() -> None:
        for p in todo:
            p()
    return run
