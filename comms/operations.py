"""The operations of :class:`comms.communicator.Communicator`: every collective and the
point-to-point calls, as a mixin. Each checks its arguments before any byte moves (a bad call
raises InvalidUsage and leaves the communicator usable), keys its plan (collective, size, dtype,
op, root, ...) and runs it; the communicator supplies the plumbing: ``_plans`` (the plan cache),
``_plan`` (the selector, online timing), ``_remember``, ``_run`` (the engine, the deadline,
failures), ``_hosts``, ``_deterministic``, ``rank`` and ``size``.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from . import checks
from .algorithms.plan import IN, OUT, Args, Plan, Step, RECV, SEND
from .checks import fast as _fast
from .runtime import arrays, native
from .runtime.native import ffi
from .dtypes import DTYPE_SIZES, TORCH_FAST, ReduceOp, as_op, check_op, resolve
from .runtime.engine import Encoded
from .errors import InvalidUsage
from .work import Work

_from_buffer, _NDARRAY = ffi.from_buffer, np.ndarray
_CHARS = ffi.typeof("char[]")             # from_buffer given the type, not its name: 20 ns less a call
_RUN_PTR, _RUN_ADDR, _RUN_ARRAY = native.call_run, native.call_run_addr, native.call_run_array
_RUN_PAIR, _RUN_PAIR_ADDR = native.call_run_pair, native.call_run_pair_addr
_EBUSY, _ESLOW = native.EBUSY, native.ESLOW
_PEEK = arrays.ON                         # an ndarray's data pointer read from the array (or: from_buffer)

from .runtime.native import MSG_COLL, MSG_P2P  # noqa: E402,F401


def _short(buf: Any) -> bool:
    """Whether ``buf`` may take the short paths of broadcast and the two-buffer collectives: a numpy array (its
    fields read from its memory, comms.runtime.arrays) or a contiguous CPU tensor; C checks the rest per call."""
    t = type(buf)
    return t is _NDARRAY and _PEEK or t is TORCH_FAST[0] and buf.is_cpu and buf.layout is TORCH_FAST[1] \
        and buf.is_contiguous()


ANY_SOURCE = -1
COUNT_ANY = (1 << 64) - 1


class Operations:
    """The public collectives and point-to-point calls (see the module doc for what the host
    class provides)."""

    # -- collectives ---------------------------------------------------------------------------
    def all_reduce(self, buf: Any, op: Any = ReduceOp.SUM, *, async_op: bool = False,
                timeout: float | None = None) -> Work | None:
        """Reduce ``buf`` across all ranks, in place; every rank gets the same bits."""
        tb = type(buf)
        if not async_op and timeout is None:      # the fast path: a plan an earlier call of this shape built
            rc = None
            if tb is _NDARRAY:
                last = self._hot_last             # (dtype, count, op, plan) of the last fast call
                if buf.dtype is last[0] and buf.size == last[1] and op is last[2]:
                    enc = last[3]
                else:
                    enc = self._hot_find(buf.dtype, buf.size, op)
                if enc is not None and (call := enc.call) is not None:   # another thread may drop it (abort)
                    rc = _RUN_ARRAY(call, id(buf)) if _PEEK else _ESLOW
                    if rc == _ESLOW:              # not C-contiguous and writable (or no peek): from_buffer
                        try:
                            rc = _RUN_PTR(call, _from_buffer(_CHARS, buf, True))
                        except ValueError:        # not C-contiguous, or read-only: the checks below say which
                            rc = None
            elif tb is TORCH_FAST[0]:
                enc = self._hot.get((buf.dtype, buf.numel(), op))
                if enc is not None and (call := enc.call) is not None and buf.is_cpu \
                        and buf.layout is TORCH_FAST[1] and buf.is_contiguous():
                    rc = _RUN_ADDR(call, buf.data_ptr())
            if rc is not None:
                if rc == 0:
                    return None
                if rc != _EBUSY:                  # busy: another thread holds the context; the engine
                    raise self._hot_failed(enc, call, rc)   # lock's way below waits for it
        ptr, count, dtype = _fast(buf, "all_reduce", True)
        if type(op) is not ReduceOp:
            op = as_op(op)
        enc = self._plans.get(("all_reduce", count, dtype, op))
        if enc is None:
            check_op(op, dtype, "all_reduce")
            args = Args("all_reduce", self.rank, self.size, count, DTYPE_SIZES[dtype], avg=op is ReduceOp.AVG,
                        inplace=True, hosts=self._hosts(), deterministic=self._deterministic, board=self._board,
                        crowded=self.oversubscription() > 1)
            nb = count * DTYPE_SIZES[dtype]
            enc = self._plan(("all_reduce", count, dtype, op), args, nb, dtype, op, count, (nb, nb))
        if enc.trial is None and (tb is np.ndarray or tb is TORCH_FAST[0]):
            self._keep_hot((buf.dtype, count, op), enc)
        return self._run(enc, ptr, ptr, [buf], async_op, buf, timeout)

    def broadcast(self, buf: Any, root: int = 0, *, async_op: bool = False,
                timeout: float | None = None) -> Work | None:
        """Copy ``buf`` of rank ``root`` into ``buf`` of every rank."""
        hot = ("broadcast", buf.dtype, buf.shape, root) if not async_op and timeout is None and _short(buf) else None
        if hot is not None and (enc := self._hot.get(hot)) is not None and (call := enc.call) is not None:
            rc = _RUN_ARRAY(call, id(buf)) if type(buf) is _NDARRAY else _RUN_ADDR(call, buf.data_ptr())
            if self._hot_ran(enc, call, rc):
                return None
        ptr, count, dtype = _fast(buf, "broadcast", True)
        key = ("broadcast", count, dtype, root)
        enc = self._plans.get(key)
        if enc is None:
            root = checks.root(root, self.size, "broadcast")
            args = Args("broadcast", self.rank, self.size, count, DTYPE_SIZES[dtype], root=root, inplace=True, hosts=self._hosts(), deterministic=self._deterministic)
            nb = count * DTYPE_SIZES[dtype]
            enc = self._plan(key, args, nb, dtype, None, count, (nb, nb))
        if hot is not None and enc.trial is None:
            self._keep_hot(hot, enc)
        return self._run(enc, ptr, ptr, [buf], async_op, buf, timeout)

    def reduce(self, buf: Any, root: int = 0, op: Any = ReduceOp.SUM, *, async_op: bool = False,
                timeout: float | None = None) -> Work | None:
        """Reduce ``buf`` of every rank into ``buf`` of ``root``; other ranks' buffers are unchanged."""
        ptr, count, dtype = _fast(buf, "reduce", True)
        if type(op) is not ReduceOp:
            op = as_op(op)
        key = ("reduce", count, dtype, op, root)
        enc = self._plans.get(key)
        if enc is None:
            root = checks.root(root, self.size, "reduce")
            check_op(op, dtype, "reduce")
            args = Args("reduce", self.rank, self.size, count, DTYPE_SIZES[dtype], root=root,
                        avg=op is ReduceOp.AVG, inplace=True, hosts=self._hosts(), deterministic=self._deterministic)
            nb = count * DTYPE_SIZES[dtype]
            enc = self._plan(key, args, nb, dtype, op, count, (nb, nb))
        return self._run(enc, ptr, ptr, [buf], async_op, buf, timeout)

    def all_gather(self, out: Any, inp: Any, *, async_op: bool = False,
                timeout: float | None = None) -> Work | None:
        """``out`` (size x inp elements) receives every rank's ``inp``, in rank order."""
        hot = None if async_op or timeout is not None else self._pair_key("all_gather", inp, out)
        if hot is not None and self._pair_call(hot, inp, out):
            return None
        vi = resolve(inp, "all_gather input")
        vo = resolve(out, "all_gather output", writable=True)
        checks.same_dtype(vi, vo, "all_gather")
        if vo.count != self.size * vi.count:
            raise InvalidUsage(f"all_gather: output has {vo.count} elements, expected size x input = "
                               f"{self.size} x {vi.count} = {self.size * vi.count}")
        inplace = vi.ptr == vo.ptr + self.rank * vi.nbytes
        if not inplace and checks.overlap(vi, vo):
            raise InvalidUsage("all_gather: input overlaps the output other than at this rank's block")
        args = Args("all_gather", self.rank, self.size, vi.count, DTYPE_SIZES[vi.dtype], inplace=inplace, hosts=self._hosts(), deterministic=self._deterministic)
        enc = self._plan(("all_gather", vi.count, vi.dtype, inplace), args, vi.nbytes * (self.size - 1), vi.dtype,
                         None, vi.count, (vi.nbytes, vo.nbytes))
        if hot is not None and enc.trial is None:
            self._keep_pair(hot, enc, vi, vo)
        return self._run(enc, vi.ptr, vo.ptr, [out, inp], async_op, out, timeout)

    def reduce_scatter(self, out: Any, inp: Any, op: Any = ReduceOp.SUM, *, async_op: bool = False,
                timeout: float | None = None) -> Work | None:
        """Reduce ``inp`` (size x out elements) across ranks; rank r gets block r in ``out``."""
        hot = None if async_op or timeout is not None or type(op) is not ReduceOp else \
            self._pair_key("reduce_scatter", inp, out, op)
        if hot is not None and self._pair_call(hot, inp, out):
            return None
        vi = resolve(inp, "reduce_scatter input")
        vo = resolve(out, "reduce_scatter output", writable=True)
        checks.same_dtype(vi, vo, "reduce_scatter")
        op = as_op(op)
        check_op(op, vi.dtype, "reduce_scatter")
        if vi.count != self.size * vo.count:
            raise InvalidUsage(f"reduce_scatter: input has {vi.count} elements, expected size x output = "
                               f"{self.size} x {vo.count} = {self.size * vo.count}")
        args = Args("reduce_scatter", self.rank, self.size, vo.count, DTYPE_SIZES[vi.dtype], avg=op is ReduceOp.AVG, hosts=self._hosts(), deterministic=self._deterministic)
        enc = self._plan(("reduce_scatter", vo.count, vi.dtype, op), args, vo.nbytes * (self.size - 1), vi.dtype,
                         op, vi.count, (vi.nbytes, vo.nbytes))
        if hot is not None and enc.trial is None:
            self._keep_pair(hot, enc, vi, vo)
        return self._run(enc, vi.ptr, vo.ptr, [out, inp], async_op, out, timeout)

    def all_to_all(self, out: Any, inp: Any, out_splits: Sequence[int] | None = None,
                   in_splits: Sequence[int] | None = None, *, async_op: bool = False,
                timeout: float | None = None) -> Work | None:
        """Rank r sends rows ``in_splits[p]`` of ``inp`` (consecutive blocks along dim 0) to rank p
        and receives ``out_splits[p]`` rows from rank p into ``out``. None means equal splits."""
        hot = None if async_op or timeout is not None or out_splits is not None or in_splits is not None else \
            self._pair_key("all_to_all", inp, out)
        if hot is not None and self._pair_call(hot, inp, out):
            return None
        vi = resolve(inp, "all_to_all input")
        vo = resolve(out, "all_to_all output", writable=True)
        checks.same_dtype(vi, vo, "all_to_all")
        if checks.overlap(vi, vo):
            raise InvalidUsage("all_to_all: input and output must not overlap")
        rows_in, row_in = checks.rows(vi, "input")
        rows_out, row_out = checks.rows(vo, "output")
        if row_in != row_out and rows_in and rows_out:
            raise InvalidUsage(f"all_to_all: input rows have {row_in} elements but output rows have {row_out}")
        row = row_in if rows_in else row_out
        uneven = out_splits is not None or in_splits is not None
        ins = checks.splits(in_splits, rows_in, self.size, "in_splits")
        outs = checks.splits(out_splits, rows_out, self.size, "out_splits")
        if ins[self.rank] != outs[self.rank]:
            raise InvalidUsage(f"all_to_all: rank {self.rank} sends itself {ins[self.rank]} rows "
                               f"but expects {outs[self.rank]}")
        rb = row * DTYPE_SIZES[vi.dtype]
        send = tuple(s * rb for s in ins)
        recv = tuple(s * rb for s in outs)
        args = Args("all_to_all", self.rank, self.size, 0, DTYPE_SIZES[vi.dtype], send_splits=send, recv_splits=recv, hosts=self._hosts(), deterministic=self._deterministic)
        enc = self._plan(("all_to_all", vi.dtype, send, recv, uneven), args, sum(send) - send[self.rank], vi.dtype,
                         None, COUNT_ANY if uneven else vi.count, (vi.nbytes, vo.nbytes))
        if hot is not None and enc.trial is None:
            self._keep_pair(hot, enc, vi, vo)
        return self._run(enc, vi.ptr, vo.ptr, [out, inp], async_op, out, timeout)

    def _pair_key(self, name: str, inp: Any, out: Any, *extra: Any) -> tuple | None:
        """The fast-path key (Communicator._keep_hot) of a synchronous two-buffer call of ``name``: numpy arrays,
        or contiguous CPU tensors, of one dtype; None for anything else (the checked path takes it)."""
        if type(inp) is not type(out) or inp.dtype is not out.dtype or not (_short(inp) and _short(out)):
            return None
        return (name, inp.dtype, inp.shape, out.shape, *extra)

    def _pair_call(self, key: tuple, inp: Any, out: Any) -> bool:
        """Run ``key``'s fast-path plan on ``inp`` and ``out`` in one native call; True when it ran. False where
        there is none yet, another thread holds the context, or the buffers are not as the plan was built
        for (cm_call_run_pair: their aliasing, an array's layout), so that the checks run. A shape has a
        plan for buffers apart (``key``) and one for an input inside the output or the reverse (key + "in")."""
        for k in (key, key + ("in",)):
            enc = self._hot.get(k)
            if enc is None or (call := enc.call) is None:
                continue
            rc = _RUN_PAIR(call, id(inp), id(out)) if type(inp) is _NDARRAY else \
                _RUN_PAIR_ADDR(call, inp.data_ptr(), out.data_ptr())
            if rc != _ESLOW:
                return self._hot_ran(enc, call, rc)
        return False

    def _keep_pair(self, key: tuple, enc: Encoded, vi: Any, vo: Any) -> None:
        """Keep ``enc``, the plan just built for the buffers of views ``vi`` and ``vo``, as ``key``'s fast-path
        plan for buffers aliased as these are (apart, or one inside the other)."""
        if checks.overlap(vi, vo):
            self._keep_hot(key + ("in",), enc, (1, vi.ptr - vo.ptr, vi.nbytes, vo.nbytes))
        else:
            self._keep_hot(key, enc, (0, 0, vi.nbytes, vo.nbytes))

    def _hot_ran(self, enc: Encoded, call: Any, rc: int) -> bool:
        """A fast-path call's return code: True when it ran, False to take the checked path, else its error."""
        if rc == 0:
            return True
        if rc == _EBUSY or rc == _ESLOW:
            return False
        raise self._hot_failed(enc, call, rc)

    def gather(self, out: Any, inp: Any, root: int = 0, *, async_op: bool = False,
                timeout: float | None = None) -> Work | None:
        """``out`` of ``root`` (size x inp elements) receives every rank's ``inp``; ``out`` may be
        None on other ranks."""
        root = checks.root(root, self.size, "gather")
        vi = resolve(inp, "gather input")
        vo_ptr = vo_bytes = 0
        if self.rank == root:
            vo = resolve(out, "gather output", writable=True)
            checks.same_dtype(vi, vo, "gather")
            if vo.count != self.size * vi.count:
                raise InvalidUsage(f"gather: output has {vo.count} elements, expected size x input = "
                                   f"{self.size * vi.count}")
            vo_ptr, vo_bytes = vo.ptr, vo.nbytes
        inplace = self.rank == root and vi.ptr == vo_ptr + root * vi.nbytes
        args = Args("gather", self.rank, self.size, vi.count, DTYPE_SIZES[vi.dtype], root=root, inplace=inplace, hosts=self._hosts(), deterministic=self._deterministic)
        enc = self._plan(("gather", vi.count, vi.dtype, root, inplace), args, vi.nbytes, vi.dtype, None, vi.count,
                         (vi.nbytes, vo_bytes))
        return self._run(enc, vi.ptr, vo_ptr, [out, inp], async_op, out, timeout)

    def scatter(self, out: Any, inp: Any, root: int = 0, *, async_op: bool = False,
                timeout: float | None = None) -> Work | None:
        """Rank r receives block r of ``inp`` of ``root`` into ``out``; ``inp`` may be None off root."""
        root = checks.root(root, self.size, "scatter")
        vo = resolve(out, "scatter output", writable=True)
        vi_ptr = vi_bytes = 0
        if self.rank == root:
            vi = resolve(inp, "scatter input")
            checks.same_dtype(vi, vo, "scatter")
            if vi.count != self.size * vo.count:
                raise InvalidUsage(f"scatter: input has {vi.count} elements, expected size x output = "
                                   f"{self.size * vo.count}")
            vi_ptr, vi_bytes = vi.ptr, vi.nbytes
        inplace = self.rank == root and vo.ptr == vi_ptr + root * vo.nbytes
        args = Args("scatter", self.rank, self.size, vo.count, DTYPE_SIZES[vo.dtype], root=root, inplace=inplace, hosts=self._hosts(), deterministic=self._deterministic)
        enc = self._plan(("scatter", vo.count, vo.dtype, root, inplace), args, vo.nbytes, vo.dtype, None, vo.count,
                         (vi_bytes, vo.nbytes))
        return self._run(enc, vi_ptr, vo.ptr, [out, inp], async_op, out, timeout)

    def barrier(self, *, async_op: bool = False,
                timeout: float | None = None) -> Work | None:
        """Return once every rank has entered the barrier."""
        enc = self._plans.get(("barrier",))
        if enc is None:
            enc = self._plan(("barrier",), Args("barrier", self.rank, self.size, 0, 1, hosts=self._hosts(), deterministic=self._deterministic), 0, 4, None, 0,
                             (0, 0))
        return self._run(enc, 0, 0, [], async_op, None, timeout)

    # -- point to point ------------------------------------------------------------------------
    def _p2p(self, name: str, kind: int, buf: Any, peer: int | None, tag: int, async_op: bool,
             timeout: float | None) -> Work | int | None:
        ptr, count, dtype = _fast(buf, name, kind == RECV)
        key = (name, peer, count, dtype, tag)
        enc = self._plans.get(key)
        if enc is None:
            peer = ANY_SOURCE if peer is None and kind == RECV else checks.peer(peer, self.rank, self.size, name)
            if not isinstance(tag, (int, np.integer)) or tag < 0:
                raise InvalidUsage(f"{name}: tag must be a non-negative integer, got {tag!r}")
            nbytes = count * DTYPE_SIZES[dtype]
            b = IN if kind == SEND else OUT
            enc = Encoded(Plan(name, (Step(kind, peer, b, 0, nbytes),)), name, MSG_P2P, 0, dtype, 0, -1, count,
                          int(tag), lens=(nbytes, nbytes))
            self._remember(key, enc)
        return self._run(enc, ptr, ptr, [buf], async_op, buf, timeout)

    def send(self, buf: Any, dst: int, tag: int = 0, *, async_op: bool = False,
             timeout: float | None = None) -> Work | None:
        """Send ``buf`` to rank ``dst``; matched by the receiver's (source, tag) in order."""
        return self._p2p("send", SEND, buf, dst, tag, async_op, timeout)

    def recv(self, buf: Any, src: int | None = None, tag: int = 0, *, async_op: bool = False,
             timeout: float | None = None) -> Work | int:
        """Receive into ``buf`` the next message from rank ``src`` (None: from any rank) with ``tag``;
        sizes must match. Returns the source rank (or a Work whose ``source`` is set on completion)."""
        r = self._p2p("recv", RECV, buf, src, tag, async_op, timeout)
        if r is None:
            return int(src)
        return r
