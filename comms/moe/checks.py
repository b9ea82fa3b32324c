"""Input checks that every rank agrees on, and the small header that carries them.

Rule: a bad argument on any rank makes *every* rank raise, and no token moves. Each dispatch
starts with one fixed-size exchange (an ``all_to_all`` of one int64 header row per peer, see
:data:`FIELDS`) that carries this rank's verdict on its own input (an error code and three detail
integers), the facts ranks must agree on (K, hidden, dtype, number of experts, flags) and the
counts the receivers need. :func:`verdict` reads the rows every rank received and raises the same
exception everywhere: :class:`InvalidUsage` naming the lowest rank with bad input, else
:class:`MismatchError` when ranks disagree. The low-latency mode puts the same header in the first
slot of each fixed-size block instead, so it needs no separate exchange.

Calls that carry no header (``combine``, and ``dispatch`` with a cached handle) check their input
locally and, on error, :func:`poison` the exchange the other ranks are waiting in: the offending
rank raises the InvalidUsage that explains it, every other rank fails promptly in whichever comms
call it is in (a MismatchError, or a PeerError naming the aborting rank), and the communicator is
aborted, as after any mismatch.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ..errors import CommsError, InvalidUsage, MismatchError
from .layout import check_topk

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FP8_BLOCK = 128

# header fields (int64), then (normal mode) the per-expert counts for the receiver's experts.
# COUNT: rows for the receiver; EXTRA: the hierarchical mode's rows for the receiver's host, or the
# low-latency capacity.
ERR, D0, D1, D2, K, HIDDEN, DTYPE, EXPERTS, FLAGS, COUNT, EXTRA = range(11)
FIELDS = 11
FLAG_FP8 = 1

# error codes -> message (details d0..d2; ``hidden`` and ``experts`` are the dispatcher's)
X_TYPE, X_SHAPE, IDX_TYPE, IDX_SHAPE, IDX_RANGE, IDX_DUP, W_BAD, FP8_HIDDEN, CAPACITY, Y_SHAPE, \
    HANDLE, IDX_CHANGED = range(1, 13)
_TEXT = {
    X_TYPE: "x must be a torch CPU tensor of bfloat16, float16 or float32",
    X_SHAPE: "x must be [T, hidden={hidden}] but has {d0} dims, sizes [{d1}, {d2}, ...]",
    IDX_TYPE: "topk_idx must be a 2-D torch tensor of integers",
    IDX_SHAPE: "topk_idx is [{d0}, {d1}] but x has {d2} rows (and K must be at least 1)",
    IDX_RANGE: "topk_idx[{d0}, {d1}] = {d2} is neither -1 nor an expert id in [0, {experts})",
    IDX_DUP: "token {d0} selects expert {d1} twice",
    W_BAD: "topk_weights must be a float32 tensor shaped like topk_idx [{d0}, {d1}]",
    FP8_HIDDEN: "fp8 needs hidden to be a multiple of 128, got {hidden}",
    CAPACITY: "{d0} tokens exceed max_tokens_per_rank = {d1} (which must be at least 1)",
    Y_SHAPE: "y must be a floating CPU tensor [experts per rank, {d0}, hidden={hidden}] (got {d1} dims, "
             "first size {d2})",
    HANDLE: "the handle does not fit this call: {d0} rows expected, got {d1}",
    IDX_CHANGED: "topk_idx differs from the one given to low_latency_dispatch",
}


class Problem(NamedTuple):
    code: int
    details: tuple[int, int, int] = (0, 0, 0)


def problem(code: int, *details: int) -> Problem:
    d = tuple(int(v) for v in details) + (0, 0, 0)
    return Problem(code, d[:3])


def describe(p: Problem, hidden: int, experts: int) -> str:
    d0, d1, d2 = p.details
    return _TEXT.get(p.code, f"error {p.code}").format(d0=d0, d1=d1, d2=d2, hidden=hidden, experts=experts)


def dtype_code(t: torch.Tensor) -> int:
    return FLOAT_DTYPES.index(t.dtype) if t.dtype in FLOAT_DTYPES else -1


def _is_cpu_tensor(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "cpu"


def check_x(x, hidden: int) -> Problem | None:
    if not _is_cpu_tensor(x) or x.dtype not in FLOAT_DTYPES:
        return problem(X_TYPE)
    if x.dim() != 2 or x.shape[1] != hidden:
        sizes = list(x.shape) + [0, 0]
        return problem(X_SHAPE, x.dim(), sizes[0], sizes[1])
    return None


def check_dispatch(x, topk_idx, topk_weights, hidden: int, experts: int, fp8: bool,
                   need_weights: bool = True) -> Problem | None:
    """The first problem with the arguments of a dispatch, or None."""
    p = check_x(x, hidden)
    if p is not None:
        return p
    if fp8 and hidden % FP8_BLOCK:
        return problem(FP8_HIDDEN)
    if not _is_cpu_tensor(topk_idx) or topk_idx.dim() != 2 or topk_idx.is_floating_point() \
            or topk_idx.is_complex() or topk_idx.dtype == torch.bool:
        return problem(IDX_TYPE)
    if topk_idx.shape[0] != x.shape[0] or topk_idx.shape[1] < 1:
        return problem(IDX_SHAPE, topk_idx.shape[0], topk_idx.shape[1], x.shape[0])
    if need_weights or topk_weights is not None:
        if not _is_cpu_tensor(topk_weights) or topk_weights.dtype != torch.float32 \
                or tuple(topk_weights.shape) != tuple(topk_idx.shape):
            return problem(W_BAD, *topk_idx.shape)
    bad = check_topk(topk_idx, experts)
    if bad is not None:
        return problem(IDX_RANGE if bad[0] == "range" else IDX_DUP, *bad[1])
    return None


def header(p: Problem | None, k: int, hidden: int, dtype: int, experts: int, flags: int) -> np.ndarray:
    """The agreed part of a header row (counts are filled in by the caller)."""
    h = np.zeros(FIELDS, np.int64)
    if p is not None:
        h[ERR], (h[D0], h[D1], h[D2]) = p.code, p.details
    h[K], h[HIDDEN], h[DTYPE], h[EXPERTS], h[FLAGS] = k, hidden, dtype, experts, flags
    return h


def _facts(row) -> str:
    dt = FLOAT_DTYPES[int(row[DTYPE])] if 0 <= int(row[DTYPE]) < len(FLOAT_DTYPES) else "?"
    return (f"K={int(row[K])}, hidden={int(row[HIDDEN])}, {str(dt).replace('torch.', '')}, "
            f"{int(row[EXPERTS])} experts, fp8={bool(int(row[FLAGS]) & FLAG_FP8)}")


def verdict(rows: np.ndarray, op: str, rank: int, hidden: int, experts: int,
            agree: tuple[int, ...] = (K, HIDDEN, DTYPE, EXPERTS, FLAGS)) -> None:
    """Raise on every rank alike: ``rows[s]`` is the header rank s sent. Bad input of the lowest
    such rank first (InvalidUsage), then any disagreement in the ``agree`` fields (MismatchError)."""
    errs = np.nonzero(rows[:, ERR])[0]
    if errs.size:
        s = int(errs[0])
        p = Problem(int(rows[s, ERR]), tuple(int(v) for v in rows[s, D0:D2 + 1]))
        note = "" if s == rank else " (reported on every rank)"
        raise InvalidUsage(f"{op}: invalid input on rank {s}: {describe(p, hidden, experts)}{note}",
                           op=op, rank=rank, peer=None if s == rank else s)
    cols = list(agree)
    diff = np.nonzero((rows[:, cols] != rows[0, cols]).any(axis=1))[0]
    if diff.size:
        s = int(diff[0])
        raise MismatchError(f"{op}: ranks called it differently: rank 0 has {_facts(rows[0])} but rank {s} "
                            f"has {_facts(rows[s])}", op=op, rank=rank, peer=s)


def poison(comm) -> None:
    """Make the exchange the other ranks are waiting in on ``comm`` fail (see the module docstring).
    When every rank poisons, the poison calls match and simply complete."""
    z = np.zeros((comm.size, 1), np.bool_)
    try:
        comm.all_to_all(np.zeros_like(z), z)
    except CommsError:
        pass


class Stages:
    """The communicators of a multi-stage exchange, in order. If stage ``i`` fails (or the caller's
    own input is bad), every later stage is poisoned so that ranks waiting there fail too."""

    def __init__(self, *comms):
        self.comms = comms

    def run(self, i: int, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CommsError:
            for c in self.comms[i + 1:]:
                poison(c)
            raise

    def fail(self, exc: BaseException) -> None:
        for c in self.comms:
            poison(c)
        raise exc
