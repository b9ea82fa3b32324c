"""Reading ``AllreduceOptions`` without pybind, for the hot path of ``dist.all_reduce``.

Reading ``opts.reduceOp``, ``opts.timeout`` and ``opts.asyncOp`` through pybind took about 0.8 us
of the torch backend's call (reduceOp and its hash about 0.5 us: pybind builds a ReduceOp wrapper
tied to its parent options each time). The hot path reads the three fields in one native call
(``cm_opts_peek``, native/peek.c) instead, about 0.1 us.

The offsets are found here, never assumed. :func:`probe` fills options objects with known values
through pybind (every reduce op but PREMUL_SUM, both asyncOp values, timeouts of both signs), finds
where each value lies in the C++ object (reached through the word after the Python object header,
pybind's value pointer, which must equal the holder word after it), keeps a layout only when exactly
one offset explains every probe, then checks ``cm_opts_peek`` against pybind on fresh objects,
a default-constructed one included. Anything unexpected (another torch or pybind layout, a Python
build with another object header) leaves the peek off, and the hot path reads through pybind as
before. ``COMMS_TORCH_PEEK=0`` turns it off too.

The hot path (``Collectives.allreduce``) asks ``SYNC_OPS.get(cm_opts_peek(id(opts)))`` when
:data:`ON`, else :func:`read_sync_op(opts)`: for an object whose type is exactly ``AllreduceOptions``
(the caller checks), the comms op when the call is synchronous (asyncOp False), its timeout unset
(negative) and its op not PREMUL_SUM; None otherwise, and then the caller takes the general path.
"""
from __future__ import annotations

import ctypes
import datetime
import logging

import torch.distributed as dist
from torch._C._distributed_c10d import AllreduceOptions

from .. import config
from ..runtime import native
from . import ops

log = logging.getLogger("comms")

_T = dist.ReduceOp.RedOpType
_PEEK = native.opts_peek
_ASYNC, _SET = 1 << 8, 1 << 9      # cm_opts_peek's word: op | asyncOp << 8 | (timeout < 0) << 9
_SCAN = 48                         # bytes of the C++ object searched (the fields lie in its first 41)
_PTR = ctypes.sizeof(ctypes.c_void_p)

def _word(opts) -> int:
    """What cm_opts_peek should answer for ``opts``, read through pybind."""
    return int(opts.reduceOp.op.value) | (_ASYNC if opts.asyncOp else 0) | (_SET if opts.timeout.days < 0 else 0)


def _value_pointer(opts, header: int) -> int:
    """The C++ object of a pybind instance made here (owned: its holder word repeats the pointer), else 0."""
    value = ctypes.c_void_p.from_address(id(opts) + header).value or 0
    holder = ctypes.c_void_p.from_address(id(opts) + header + _PTR).value or 0
    return value if value and value == holder and value % _PTR == 0 else 0


def _samples() -> list:
    ms = (1234567, -1, 0, 7, 987654321, -5, 86400000, 3)
    out = []
    for i, kind in enumerate(k for k in _T.__members__.values() if k != _T.PREMUL_SUM):
        o = AllreduceOptions()
        o.reduceOp = dist.ReduceOp(kind)
        o.asyncOp = bool(i % 3 == 1)
        o.timeout = datetime.timedelta(milliseconds=ms[i % len(ms)])
        out.append(o)
    return out


def _only(offsets) -> int | None:
    found = list(offsets)
    return found[0] if len(found) == 1 else None


def probe() -> tuple[int, int, int, int] | None:
    """(value pointer offset, op, timeout, asyncOp offsets), or None when no layout explains every probe."""
    header = object.__basicsize__
    samples = _samples()
    mem = []
    for o in samples:
        p = _value_pointer(o, header)
        if not p:
            return None
        mem.append(ctypes.string_at(p, _SCAN))
    fields = [(int(o.reduceOp.op.value), o.asyncOp, int(o.timeout / datetime.timedelta(milliseconds=1)))
              for o in samples]
    op = _only(k for k in range(_SCAN) if all(m[k] == f[0] for m, f in zip(mem, fields)))
    async_op = _only(k for k in range(_SCAN) if all(m[k] == int(f[1]) for m, f in zip(mem, fields)))
    timeout = _only(k for k in range(0, _SCAN - 7, 8)
                    if all(int.from_bytes(m[k:k + 8], "little", signed=True) == f[2] for m, f in zip(mem, fields)))
    if op is None or async_op is None or timeout is None:
        return None
    return header, op, timeout, async_op


def _enable() -> bool:
    if not config.get("TORCH_PEEK"):
        return False
    try:
        where = probe()
    except Exception:  # noqa: BLE001 - any surprise means: read through pybind
        log.debug("comms: the AllreduceOptions probe failed", exc_info=True)
        where = None
    if where is None:
        log.debug("comms: no AllreduceOptions layout found; reading options through pybind")
        return False
    native.opts_layout(1, *where)
    checks = _samples() + [AllreduceOptions()]
    for o in list(checks):                  # and each with the other asyncOp and timeout sign
        flipped = AllreduceOptions()
        flipped.reduceOp, flipped.asyncOp, flipped.timeout = o.reduceOp, not o.asyncOp, -o.timeout
        checks.append(flipped)
    if all(_PEEK(id(o)) == _word(o) for o in checks):
        return True
    native.opts_layout(0, 0, 0, 0, 0)
    log.debug("comms: the probed AllreduceOptions layout disagreed with pybind; reading through pybind")
    return False


ON = _enable()
# cm_opts_peek's word of a synchronous call with an unset timeout -> the comms op (PREMUL_SUM: none)
SYNC_OPS = {int(kind.value) | _SET: op for kind, op in ops.OPS.items()}
_FAST_OPS_GET = ops.FAST_OPS.get


def read_sync_op(opts):
    """:data:`SYNC_OPS`' answer for ``opts``, read through pybind (the hot path's way when ``ON`` is False)."""
    if opts.timeout.days < 0 and not opts.asyncOp:
        return _FAST_OPS_GET(hash(opts.reduceOp))
    return None
