"""Every c10d operation of :class:`ProcessGroupComms`, mapped onto one comms communicator.

Each method takes c10d's arguments (tensor lists, an options struct) and builds *calls* (comms
operations with their buffers bound, see :meth:`Collectives._issue`) plus an optional post step
(:mod:`.ops`). ``_issue`` then either runs them before returning a completed work
(``opts.asyncOp`` False) or starts them and returns a :class:`CommsWork`. Staging rules:

* Tensors that are contiguous, of a comms dtype, are used in place (no copy).
* Non-contiguous tensors are copied to a contiguous buffer (and back, for outputs).
* Lists of tensors (all_gather, gather, scatter, reduce_scatter, all_to_all) are used in place
  when they lie back to back in one storage, else joined into one buffer.
* PREMUL_SUM multiplies the input by its factor (in place only where the input is also the output,
  as for all_reduce), then sums.
* Operations that only move data accept any dtype, moved as bytes.

Two-name methods (old and new c10d spellings) are aliases at the end of the class.
"""
from __future__ import annotations

import sys
from functools import partial

import torch
from torch._C._distributed_c10d import (AllgatherOptions, AllreduceCoalescedOptions, AllreduceOptions,
                                        AllToAllOptions, BarrierOptions, BroadcastOptions, GatherOptions,
                                        ReduceOptions, ReduceScatterOptions, ScatterOptions)

from ..errors import InvalidUsage
from ..runtime import native
from . import ops, peek
from .ops import joined, movable, one, staged
from .work import CommsWork, RecvWork

_FAST_OPS_GET = ops.FAST_OPS.get
_TENSOR, _STRIDED = torch.Tensor, torch.strided
_RUN_ADDR, _EBUSY = native.call_run_addr, native.EBUSY
_refs = sys.getrefcount
_PEEK_ON, _PEEK, _PEEK_OP, _read_op = peek.ON, native.opts_peek, peek.SYNC_OPS.get, peek.read_sync_op


def _options(cls, value, **fields):
    """c10d's Python API also passes a bare op or root instead of an options struct."""
    if type(value) is cls:
        return value
    opts = cls()
    if value is not None:
        for name, convert in fields.items():
            setattr(opts, name, convert(value))
    return opts


class Collectives:
    """Mixin of :class:`ProcessGroupComms`: needs ``self._comm``, ``self._done`` (with
    ``_done_work`` and ``_last_outputs``), and ``_hot_get``: the communicator's ``_hot.get``, which
    never changes, kept here to save a lookup a call."""

    # -- issuing ------------------------------------------------------------------------------
    def _issue(self, opts, calls: list, outputs: list, post=None):
        """Run ``calls`` (each takes ``async_op`` and ``timeout``) in order, synchronously or not."""
        timeout = ops.seconds(opts.timeout)
        if opts.asyncOp:
            return CommsWork(tuple(c(async_op=True, timeout=timeout) for c in calls), outputs, post)
        for c in calls:
            c(timeout=timeout)
        if post is not None:
            post()
        return self._done(outputs)

    # -- reductions ---------------------------------------------------------------------------
    def allreduce(self, tensors, opts=None):
        if type(opts) is AllreduceOptions and type(tensors) is list and len(tensors) == 1 \
                and type(t := tensors[0]) is _TENSOR \
                and (op := _PEEK_OP(_PEEK(id(opts))) if _PEEK_ON else _read_op(opts)) is not None:
            # (op: synchronous, the timeout unset, not PREMUL_SUM; read from the options' memory, see .peek)
            # The hot path (dist.all_reduce(t) of a shape an earlier call planned): what
            # Communicator.all_reduce's own fast path does, without a second call, its argument
            # checks or a dict lookup more; one native call of the prepared plan.
            enc = self._hot_get((t.dtype, t.numel(), op))
            if enc is not None and (call := enc.call) is not None and t.is_cpu and t.layout is _STRIDED \
                    and t.is_contiguous():      # (call: another thread may drop it, as abort does)
                rc = _RUN_ADDR(call, t.data_ptr())   # (it takes the context itself, in C)
                if rc == 0:
                    w = self._done_work                  # _done, inlined: the shared instance, unless
                    if _refs(w) > 3:                     # someone kept it (this attribute, w, the argument)
                        return self._done(tensors)
                    self._last_outputs = tensors
                    return w
                if rc != _EBUSY:                         # busy: another thread holds the context, and the
                    raise self._comm._hot_failed(enc, call, rc)   # way below waits for it
        if type(opts) is not AllreduceOptions:
            opts = _options(AllreduceOptions, opts, reduceOp=lambda v: v)
        if type(tensors) is not list:
            tensors = [tensors]
        if len(tensors) == 1:                   # comms takes the tensor as it is
            op = _FAST_OPS_GET(hash(opts.reduceOp))
            if op is not None:
                t = tensors[0]
                timeout = ops.seconds(opts.timeout)
                try:
                    if opts.asyncOp:
                        return CommsWork((self._comm.all_reduce(t, op, async_op=True, timeout=timeout),), tensors)
                    self._comm.all_reduce(t, op, timeout=timeout)
                    return self._done(tensors)
                except InvalidUsage:            # raised before anything moved; staging may help
                    if t.is_contiguous() and not t.is_complex():
                        raise
        t = one(tensors, "allreduce")
        op, factor = ops.reduce_op(opts.reduceOp)
        buf, post = staged(t)
        if factor is not None:
            ops.premultiplied(buf, factor, in_place=True)
        return self._issue(opts, [partial(self._comm.all_reduce, buf, op)], tensors, post)

    def allreduce_coalesced(self, tensors, opts=None):
        if type(opts) is not AllreduceCoalescedOptions:
            opts = _options(AllreduceCoalescedOptions, opts, reduceOp=lambda v: v)
        op, factor = ops.reduce_op(opts.reduceOp)
        flat, _, owned = joined(tensors, "allreduce_coalesced", fill=True)
        if factor is not None:
            ops.premultiplied(flat, factor, in_place=True)
        post = partial(ops.split_into, tensors, flat) if owned else None
        return self._issue(opts, [partial(self._comm.all_reduce, flat, op)], tensors, post)

    def reduce(self, tensors, opts=None):
        if type(opts) is not ReduceOptions:
            opts = _options(ReduceOptions, opts, rootRank=int)
        t = one(tensors, "reduce")
        op, factor = ops.reduce_op(opts.reduceOp)
        buf, post = staged(t)
        if factor is not None:              # off-root buffers stay untouched: scale a copy
            buf = ops.premultiplied(buf, factor, in_place=False)
            post = partial(ops.real(t).copy_, buf) if self._comm.rank == opts.rootRank else None
        return self._issue(opts, [partial(self._comm.reduce, buf, opts.rootRank, op)], tensors, post)

    def reduce_scatter(self, outputs, input_lists, opts=None):
        opts = opts if opts is not None else ReduceScatterOptions()
        out = one(outputs, "reduce_scatter")
        ins = one(input_lists, "reduce_scatter")
        self._check_list(ins, "reduce_scatter input")
        ops.equal_sizes(ins, out.numel(), "reduce_scatter")
        flat, _, owned = joined(ins, "reduce_scatter", fill=True)
        call, post = self._reduce_scatter_call(out, flat, owned, opts)
        return self._issue(opts, [call], outputs, post)

    def reduce_scatter_single(self, output, input, opts=None):
        opts = opts if opts is not None else ReduceScatterOptions()
        call, post = self._reduce_scatter_call(output, *self._input(input), opts)
        return self._issue(opts, [call], [output], post)

    def reduce_scatter_single_coalesced(self, outputs, inputs, opts=None):
        opts = opts if opts is not None else ReduceScatterOptions()
        pairs = [self._reduce_scatter_call(o, *self._input(i), opts) for o, i in zip(outputs, inputs, strict=True)]
        return self._issue(opts, [c for c, _ in pairs], list(outputs), ops.chain(*(p for _, p in pairs)))

    def _reduce_scatter_call(self, out, ibuf, owned: bool, opts):
        """``ibuf`` is contiguous; ``owned``: it is a copy, which PREMUL_SUM may scale in place."""
        op, factor = ops.reduce_op(opts.reduceOp)
        if factor is not None:
            ibuf = ops.premultiplied(ibuf, factor, in_place=owned)
        obuf, post = staged(out)
        return partial(self._comm.reduce_scatter, obuf, ibuf, op), post

    # -- data movement ------------------------------------------------------------------------
    def broadcast(self, tensors, opts=None):
        if type(opts) is not BroadcastOptions:
            opts = _options(BroadcastOptions, opts, rootRank=int)
        t = one(tensors, "broadcast")
        buf, post = staged(t)
        return self._issue(opts, [partial(self._comm.broadcast, movable(buf), opts.rootRank)], tensors, post)

    def allgather(self, output_lists, inputs, opts=None):
        opts = opts if opts is not None else AllgatherOptions()
        outs = one(output_lists, "allgather")
        inp = one(inputs, "allgather")
        call, post = self._allgather_call(outs, inp)
        return self._issue(opts, [call], outs, post)      # the future holds the output tensors, as Gloo's

    def allgather_coalesced(self, output_lists, inputs, opts=None):
        """``output_lists[r][i]`` receives rank r's ``inputs[i]`` (c10d's layout: one list per rank)."""
        opts = opts if opts is not None else AllgatherOptions()
        self._check_list(output_lists, "allgather_coalesced output")
        for r, outs in enumerate(output_lists):
            if len(outs) != len(inputs):
                raise InvalidUsage(f"allgather_coalesced: output list {r} holds {len(outs)} tensors for "
                                   f"{len(inputs)} inputs")
        calls, posts = [], []
        for i, inp in enumerate(inputs):
            c, p = self._allgather_call([outs[i] for outs in output_lists], inp)
            calls.append(c)
            posts.append(p)
        return self._issue(opts, calls, ops.per_rank(output_lists), ops.chain(*posts))

    def _allgather_call(self, outs, inp):
        self._check_list(outs, "allgather output")
        ops.equal_sizes(outs, inp.numel(), "allgather")
        ibuf, _ = staged(inp, copy_back=False)
        flat, post, _ = joined(outs, "allgather", fill=False)
        return partial(self._comm.all_gather, movable(flat), movable(ibuf)), post

    def all_gather_single(self, output, input, opts=None):
        opts = opts if opts is not None else AllgatherOptions()
        c, post = self._all_gather_single_call(output, input)
        # the future holds the output's blocks, one per rank (empty ones too), as Gloo's (it gathers into them)
        return self._issue(opts, [c], list(output.tensor_split(self._comm.size)), post)

    def all_gather_single_coalesced(self, outputs, inputs, opts=None):
        opts = opts if opts is not None else AllgatherOptions()
        pairs = [self._all_gather_single_call(o, i) for o, i in zip(outputs, inputs, strict=True)]
        # the future holds, per rank, that rank's block of every output, as Gloo's (which runs
        # allgather_coalesced on the outputs' chunks)
        blocks = [o.tensor_split(self._comm.size) for o in outputs]
        return self._issue(opts, [c for c, _ in pairs], ops.per_rank([list(b) for b in zip(*blocks)]),
                           ops.chain(*(p for _, p in pairs)))

    def _all_gather_single_call(self, output, input):
        obuf, post = staged(output)
        ibuf, _ = staged(input, copy_back=False)
        return partial(self._comm.all_gather, movable(obuf).reshape(-1), movable(ibuf).reshape(-1)), post

    def gather(self, output_lists, inputs, opts=None):
        opts = opts if opts is not None else GatherOptions()
        inp = one(inputs, "gather")
        ibuf, _ = staged(inp, copy_back=False)
        flat, post = None, None
        if self._comm.rank == opts.rootRank:
            outs = one(output_lists, "gather")
            self._check_list(outs, "gather output")
            ops.equal_sizes(outs, inp.numel(), "gather")
            flat, post, _ = joined(outs, "gather", fill=False)
            flat = movable(flat)
        call = partial(self._comm.gather, flat, movable(ibuf).reshape(-1), opts.rootRank)
        return self._issue(opts, [call], output_lists[0] if output_lists else [], post)   # as Gloo's

    def scatter(self, outputs, input_lists, opts=None):
        opts = opts if opts is not None else ScatterOptions()
        out = one(outputs, "scatter")
        obuf, post = staged(out)
        flat = None
        if self._comm.rank == opts.rootRank:
            ins = one(input_lists, "scatter")
            self._check_list(ins, "scatter input")
            ops.equal_sizes(ins, out.numel(), "scatter")
            flat, _, _ = joined(ins, "scatter", fill=True)
            flat = movable(flat)
        call = partial(self._comm.scatter, movable(obuf).reshape(-1), flat, opts.rootRank)
        return self._issue(opts, [call], outputs, post)

    def all_to_all_single(self, output, input, output_splits, input_splits, opts=None):
        opts = opts if opts is not None else AllToAllOptions()
        size = self._comm.size
        obuf, post = staged(output)
        ibuf, _ = staged(input, copy_back=False)
        if obuf.dim() == 0 or ibuf.dim() == 0:
            raise InvalidUsage("all_to_all_single: tensors must have at least one dimension")
        # Always explicit splits, so ranks that pass them and ranks that do not agree on the call.
        outs = list(output_splits) or ops.equal_splits(obuf.shape[0], size, "all_to_all_single output")
        ins = list(input_splits) or ops.equal_splits(ibuf.shape[0], size, "all_to_all_single input")
        call = partial(self._comm.all_to_all, movable(obuf), movable(ibuf), outs, ins)
        return self._issue(opts, [call], [output], post)

    def alltoall(self, output_tensors, input_tensors, opts=None):
        opts = opts if opts is not None else AllToAllOptions()
        self._check_list(output_tensors, "alltoall output")
        self._check_list(input_tensors, "alltoall input")
        oflat, post, _ = joined(output_tensors, "alltoall", fill=False)
        iflat, _, _ = joined(input_tensors, "alltoall", fill=True)
        call = partial(self._comm.all_to_all, movable(oflat), movable(iflat),
                       [ops.real(t).numel() for t in output_tensors],
                       [ops.real(t).numel() for t in input_tensors])
        return self._issue(opts, [call], output_tensors, post)

    def barrier(self, opts=None):
        opts = opts if opts is not None else BarrierOptions()
        return self._issue(opts, [self._comm.barrier], [])

    # -- point to point (always asynchronous, as c10d expects) ------------------------------------
    def send(self, tensors, dstRank, tag=0):
        buf, _ = staged(one(tensors, "send"), copy_back=False)
        return CommsWork((self._comm.send(movable(buf), dstRank, tag, async_op=True),), tensors)

    def recv(self, tensors, srcRank, tag=0):
        return self._recv(tensors, srcRank, tag)

    def recv_anysource(self, tensors, tag=0):
        return self._recv(tensors, None, tag)

    def _recv(self, tensors, src, tag):
        buf, post = staged(one(tensors, "recv"))
        return RecvWork(self._comm.recv(movable(buf), src, tag, async_op=True), tensors, post)

    # -- helpers --------------------------------------------------------------------------------
    @staticmethod
    def _input(t) -> tuple:
        """(contiguous buffer, owned): ``t`` itself, or a contiguous copy of it."""
        buf, _ = staged(t, copy_back=False)
        return buf, buf.data_ptr() != ops.real(t).data_ptr() or buf.numel() == 0

    def _check_list(self, tensors, what: str) -> None:
        if len(tensors) != self._comm.size:
            raise InvalidUsage(f"{what}: expected {self._comm.size} tensors (one per rank), got {len(tensors)}")

    # -- the other spellings c10d uses for the same operations ------------------------------------
    _allgather_base = all_gather_single
    allgather_into_tensor_coalesced = all_gather_single_coalesced
    _reduce_scatter_base = reduce_scatter_single
    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced
    alltoall_base = all_to_all_single
