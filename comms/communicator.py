"""Communicator: the public API. Validates arguments, picks a plan, runs it on the native engine.

Every operation checks its arguments before any byte moves (a bad call raises InvalidUsage and
leaves the communicator usable), takes ``async_op=True`` to return a :class:`Work` instead of
blocking, and has the communicator's deadline. Collectives carry a sequence number; a failure
names the operation, that number, this rank and the peer involved, is published for the other
ranks, and aborts the communicator (every later call raises).

Buffers are numpy arrays or contiguous torch CPU tensors (see :mod:`comms.dtypes`).
"""
from __future__ import annotations

import atexit
import time
import weakref
from typing import Any, Sequence

import numpy as np

from . import checks, config, failures, flight
from .checks import fast as _fast
from . import log as clog
from .algorithms.plan import COLL_IDS, IN, OUT, Args, NotSupported, Plan, Step, RECV, SEND
from .dtypes import DTYPE_SIZES, ReduceOp, as_op, check_op, resolve
from .engine import Encoded
from .errors import CommsError, InvalidUsage, PeerError
from . import calibration, online
from .selector import Selector, build, defaults as selector_defaults
from .transports.base import Endpoint
from .work import Work

log = clog.get("COLL")
MSG_COLL, MSG_P2P = 1, 2
ANY_SOURCE = -1
PLAN_CACHE = 4096
COUNT_ANY = (1 << 64) - 1


class Communicator:
    """A group of ``size`` ranks. Create with :func:`comms.init` or :meth:`split`."""

    def __init__(self, boot, store, prefix: str, timeout: float, algo: str | None, members: Sequence[int] | None,
                 params=None):
        self._boot = boot
        self._engine = boot.engine
        self._store = store
        self.prefix = prefix
        self.rank, self.size = boot.rank, boot.size
        self.members = list(members) if members is not None else list(range(self.size))
        self.timeout = timeout
        self._timeout_ns = int(timeout * 1e9)
        self._algo = algo                    # init's rules (None: COMMS_ALGO)
        self._algo_now = algo                # the rules in force (set_algo)
        self._selector = Selector(algo)      # provisional: replaced once the cost model is calibrated
        self._plans: dict[tuple, Encoded] = {}
        self._ran: dict[tuple, str] = {}     # (collective, message bytes) -> algorithm of the last plan built
        self._contests = online.Contests(config.get("ONLINE_ROUNDS"), self._agree_max)
        self._timing = None                  # a scheduled call of an online trial: takes the call's seconds
        self._scratch = np.empty(0, np.uint8)
        self._scratch_ptr: Any = 0
        self._splits = 0
        self._broken: CommsError | None = None
        self._closed = False
        self._topology = None
        self._finalizer = weakref.finalize(self, _release, boot)
        flight.register(self)
        self._deterministic = config.get("DETERMINISTIC")
        self._params = params if params is not None else calibration.calibrate(self)
        self._selector = Selector(algo, selector_defaults(self.size, self._hosts(), self._params,
                                                          config.get("TRANSPORT").lower() == "tcp",
                                                          self.oversubscription()))
        self._plans.clear()                  # plans built during calibration used the provisional rules
        self._ran.clear()
        self._contests = online.Contests(config.get("ONLINE_ROUNDS"), self._agree_max)
        # the flight recorder and the counters start after init's own traffic (calibration)
        self._engine.set_flight_capacity(config.get("FLIGHT_RECORDER"))
        self._engine.zero_counters()
        self._timeline = None
        if config.get("TRACE"):
            from .timeline import Timeline
            self._timeline = Timeline(config.get("TRACE") if prefix == "comms/0/" or not prefix.startswith("comms/")
                                      else f"{config.get('TRACE')}.{prefix.strip('/').replace('/', '_')}",
                                      self.rank, self.transports)
            self._engine.set_timeline(self._timeline)
            atexit.register(self._timeline.write)

    # -- properties ----------------------------------------------------------------------------
    @property
    def local_ranks(self) -> list[int]:
        """Ranks of this communicator on this host (by host identity)."""
        return list(self._boot.local_ranks)

    def _hosts(self) -> tuple:
        return self.topology.host_groups()

    def oversubscription(self) -> float:
        """The most ranks per usable core of any host of this communicator (1.0: a core each)."""
        return max([h.oversubscription for h in self.topology.hosts] or [1.0])

    @property
    def topology(self):
        """Hosts, leaders, cores, NUMA, NICs, RDMA devices and /dev/shm (comms.topology.Topology)."""
        if self._topology is None:
            from .topology import Topology
            self._topology = Topology.from_peers(self._boot.peers)
        return self._topology

    @property
    def transports(self) -> dict[int, str]:
        """The transport carrying traffic to each peer."""
        return dict(self._boot.chosen)

    def flight_record(self) -> list[dict]:
        """The last plans this communicator ran (see comms.flight), oldest first."""
        return flight.records(self)

    def stats(self) -> dict:
        """Counters: bytes per transport, plans run, times a wait went to sleep."""
        return self._engine.counters()

    def endpoint(self, peer: int) -> Endpoint:
        """The point-to-point endpoint (isend/irecv -> Request) for ``peer``."""
        checks.peer(peer, self.rank, self.size, "endpoint")
        name = self._boot.chosen[peer]
        t = next(t for t in self._boot.transports if t.name == name)
        return Endpoint(self, peer, t)

    def algorithm_for(self, coll: str, nbytes: int) -> str:
        """The algorithm the selector would try first for ``coll`` of ``nbytes``."""
        return self._selector.candidates(coll, nbytes)[0]

    def algorithm_ran(self, coll: str, nbytes: int) -> str | None:
        """The algorithm of the last plan built for ``coll`` of ``nbytes`` (the selector's message
        size), after any candidate declined; None when no such call ran yet."""
        return self._ran.get((coll, nbytes))

    def online_choices(self) -> list[dict]:
        """What online timing (comms.online) decided so far, per plan key: the alternatives of the
        rule, the algorithm kept and each alternative's median time relative to the first."""
        return self._contests.choices()

    def set_algo(self, rules: str | None) -> None:
        """Replace this communicator's user rules (the COMMS_ALGO grammar of comms.selector, e.g.
        ``"all_reduce:ring"``; None: back to what init had, its ``algo`` argument or COMMS_ALGO).
        The default rules stay; plans built under the old rules are dropped, so the next call of
        each collective is planned afresh. Bad rules raise InvalidUsage and change nothing.
        Every rank must make the same change between the same two collectives (like init's
        ``algo``): ranks planning one collective with different algorithms would exchange
        messages the others do not expect, and fail at the deadline. Sub-communicators made
        earlier keep their own rules; later splits inherit these. Online timing's decisions
        (comms.online) are kept: a rule naming the same alternatives again reuses them."""
        self._check_open()
        now = rules if rules is not None else self._algo
        self._selector = self._selector.with_user(now)      # parses first: bad rules change nothing
        self._algo_now = now
        self._plans.clear()
        self._ran.clear()

    # -- plumbing ------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise InvalidUsage(f"rank {self.rank}: the communicator is closed")
        if self._broken is not None:
            raise type(self._broken)(f"rank {self.rank}: the communicator was aborted by an earlier error: "
                                     f"{self._broken}", rank=self.rank)

    def _plan(self, key: tuple, args: Args, nbytes: int, dtype: int, op: ReduceOp | None, count: int) -> Encoded:
        """The cached, encoded plan for ``key``; built (and the selector consulted) on first use."""
        enc = self._plans.get(key)
        if enc is None:
            name = args.coll

            def encode(plan: Plan) -> Encoded:
                return Encoded(plan, name, MSG_COLL, COLL_IDS[name], dtype, int(op) if op is not None else 0,
                               args.root, count)

            def alternative(algo: str) -> Encoded | None:
                try:
                    return encode(build(args, algo))
                except NotSupported:
                    return None

            alts = self._selector.contest(name, nbytes)
            enc, self._timing = self._contests.pick(key, alts, nbytes, alternative) if alts else (None, None)
            if enc is None:
                enc = encode(self._selector.plan(args, nbytes))
            if self._timing is None:
                self._remember(key, enc)
            if len(self._ran) >= PLAN_CACHE:
                self._ran.pop(next(iter(self._ran)))
            self._ran[(name, nbytes)] = enc.plan.algorithm
        return enc

    def _agree_max(self, values: np.ndarray) -> None:
        """MAX all_reduce of ``values`` (float64), in place, planned by the rules' first choice
        (never timed online: comms.online calls it to agree on its figures)."""
        ptr, count, dtype = _fast(values, "all_reduce", True)
        key = ("online-agree", count)
        enc = self._plans.get(key)
        if enc is None:
            args = Args("all_reduce", self.rank, self.size, count, DTYPE_SIZES[dtype], inplace=True,
                        hosts=self._hosts(), deterministic=self._deterministic)
            enc = Encoded(self._selector.plan(args, values.nbytes), "all_reduce", MSG_COLL, COLL_IDS["all_reduce"],
                          dtype, int(ReduceOp.MAX), 0, count)
            self._remember(key, enc)
        self._run(enc, ptr, ptr, [values], False)

    def _remember(self, key: tuple, enc: Encoded) -> None:
        """Cache a plan; the oldest goes once PLAN_CACHE plans are held (uneven all_to_all splits
        and p2p sizes can vary without bound)."""
        if len(self._plans) >= PLAN_CACHE:
            self._plans.pop(next(iter(self._plans)))
        self._plans[key] = enc

    def _scratch_addr(self, nbytes: int, async_op: bool, keep: list) -> Any:
        if not nbytes:
            return 0
        if async_op:
            buf = np.empty(nbytes, np.uint8)
            keep.append(buf)
            return checks.addr(buf)
        if self._scratch.nbytes < nbytes:
            self._scratch = np.empty(nbytes, np.uint8)
            self._scratch_ptr = checks.addr(self._scratch)
        return self._scratch_ptr

    def _run(self, enc: Encoded, p_in: Any, p_out: Any, keep: list, async_op: bool, result: Any = None,
             timeout: float | None = None) -> Work | int | None:
        """Run ``enc`` on the engine now (or start it, with ``async_op``). ``timeout`` (seconds)
        replaces the communicator's deadline for this operation."""
        if self._broken is not None or self._closed:
            self._check_open()
        if self._timing is not None:                 # a call of an online trial (comms.online)
            record, self._timing = self._timing, None
            if not async_op:
                t0 = time.perf_counter()
                out = self._run(enc, p_in, p_out, keep, False, result, timeout)
                record(time.perf_counter() - t0)
                return out
        scratch = self._scratch_addr(enc.scratch_bytes, async_op, keep)
        deadline = time.monotonic_ns() + (self._timeout_ns if timeout is None else int(timeout * 1e9))
        if not async_op:
            failed, source, seq = self._engine.run(enc, p_in, p_out, scratch, deadline)
            if failed is not None:
                raise self._fail(failed[0], failed[1], enc.name, seq, enc.plan, timeout)
            return source
        work = Work(enc.name, 0, self.rank, keepalive=keep, result=result)
        self._engine.start(enc, p_in, p_out, scratch, deadline, work,
                           lambda w, rc, st: w._finish(self._fail(rc, st, enc.name, w.seq, enc.plan, timeout) if rc else None))
        return work

    def _fail(self, rc: int, st, op: str, seq: int, plan: Plan | None, timeout: float | None = None) -> CommsError:
        exc = failures.build(self, rc, st, op, seq, plan, self.timeout if timeout is None else timeout)
        if self._broken is None:
            self._broken = exc
            failures.publish(self, exc)
            self._engine.abort()
            try:
                flight.dump(self, str(exc))
            except OSError as e:
                log.warning("comms: cannot write the flight recorder: %s", e)
        return exc

    # -- collectives ---------------------------------------------------------------------------
    def all_reduce(self, buf: Any, op: Any = ReduceOp.SUM, *, async_op: bool = False,
                timeout: float | None = None) -> Work | None:
        """Reduce ``buf`` across all ranks, in place; every rank gets the same bits."""
        ptr, count, dtype = _fast(buf, "all_reduce", True)
        if type(op) is not ReduceOp:
            op = as_op(op)
        enc = self._plans.get(("all_reduce", count, dtype, op))
        if enc is None:
            check_op(op, dtype, "all_reduce")
            args = Args("all_reduce", self.rank, self.size, count, DTYPE_SIZES[dtype], avg=op is ReduceOp.AVG,
                        inplace=True, hosts=self._hosts(), deterministic=self._deterministic)
            enc = self._plan(("all_reduce", count, dtype, op), args, count * DTYPE_SIZES[dtype], dtype, op, count)
        return self._run(enc, ptr, ptr, [buf], async_op, buf, timeout)

    def broadcast(self, buf: Any, root: int = 0, *, async_op: bool = False,
                timeout: float | None = None) -> Work | None:
        """Copy ``buf`` of rank ``root`` into ``buf`` of every rank."""
        ptr, count, dtype = _fast(buf, "broadcast", True)
        key = ("broadcast", count, dtype, root)
        enc = self._plans.get(key)
        if enc is None:
            root = checks.root(root, self.size, "broadcast")
            args = Args("broadcast", self.rank, self.size, count, DTYPE_SIZES[dtype], root=root, inplace=True, hosts=self._hosts(), deterministic=self._deterministic)
            enc = self._plan(key, args, count * DTYPE_SIZES[dtype], dtype, None, count)
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
            enc = self._plan(key, args, count * DTYPE_SIZES[dtype], dtype, op, count)
        return self._run(enc, ptr, ptr, [buf], async_op, buf, timeout)

    def all_gather(self, out: Any, inp: Any, *, async_op: bool = False,
                timeout: float | None = None) -> Work | None:
        """``out`` (size x inp elements) receives every rank's ``inp``, in rank order."""
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
                         None, vi.count)
        return self._run(enc, vi.ptr, vo.ptr, [out, inp], async_op, out, timeout)

    def reduce_scatter(self, out: Any, inp: Any, op: Any = ReduceOp.SUM, *, async_op: bool = False,
                timeout: float | None = None) -> Work | None:
        """Reduce ``inp`` (size x out elements) across ranks; rank r gets block r in ``out``."""
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
                         op, vi.count)
        return self._run(enc, vi.ptr, vo.ptr, [out, inp], async_op, out, timeout)

    def all_to_all(self, out: Any, inp: Any, out_splits: Sequence[int] | None = None,
                   in_splits: Sequence[int] | None = None, *, async_op: bool = False,
                timeout: float | None = None) -> Work | None:
        """Rank r sends rows ``in_splits[p]`` of ``inp`` (consecutive blocks along dim 0) to rank p
        and receives ``out_splits[p]`` rows from rank p into ``out``. None means equal splits."""
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
                         None, COUNT_ANY if uneven else vi.count)
        return self._run(enc, vi.ptr, vo.ptr, [out, inp], async_op, out, timeout)

    def gather(self, out: Any, inp: Any, root: int = 0, *, async_op: bool = False,
                timeout: float | None = None) -> Work | None:
        """``out`` of ``root`` (size x inp elements) receives every rank's ``inp``; ``out`` may be
        None on other ranks."""
        root = checks.root(root, self.size, "gather")
        vi = resolve(inp, "gather input")
        vo_ptr = 0
        if self.rank == root:
            vo = resolve(out, "gather output", writable=True)
            checks.same_dtype(vi, vo, "gather")
            if vo.count != self.size * vi.count:
                raise InvalidUsage(f"gather: output has {vo.count} elements, expected size x input = "
                                   f"{self.size * vi.count}")
            vo_ptr = vo.ptr
        inplace = self.rank == root and vi.ptr == vo_ptr + root * vi.nbytes
        args = Args("gather", self.rank, self.size, vi.count, DTYPE_SIZES[vi.dtype], root=root, inplace=inplace, hosts=self._hosts(), deterministic=self._deterministic)
        enc = self._plan(("gather", vi.count, vi.dtype, root, inplace), args, vi.nbytes, vi.dtype, None, vi.count)
        return self._run(enc, vi.ptr, vo_ptr, [out, inp], async_op, out, timeout)

    def scatter(self, out: Any, inp: Any, root: int = 0, *, async_op: bool = False,
                timeout: float | None = None) -> Work | None:
        """Rank r receives block r of ``inp`` of ``root`` into ``out``; ``inp`` may be None off root."""
        root = checks.root(root, self.size, "scatter")
        vo = resolve(out, "scatter output", writable=True)
        vi_ptr = 0
        if self.rank == root:
            vi = resolve(inp, "scatter input")
            checks.same_dtype(vi, vo, "scatter")
            if vi.count != self.size * vo.count:
                raise InvalidUsage(f"scatter: input has {vi.count} elements, expected size x output = "
                                   f"{self.size * vo.count}")
            vi_ptr = vi.ptr
        inplace = self.rank == root and vo.ptr == vi_ptr + root * vo.nbytes
        args = Args("scatter", self.rank, self.size, vo.count, DTYPE_SIZES[vo.dtype], root=root, inplace=inplace, hosts=self._hosts(), deterministic=self._deterministic)
        enc = self._plan(("scatter", vo.count, vo.dtype, root, inplace), args, vo.nbytes, vo.dtype, None, vo.count)
        return self._run(enc, vi_ptr, vo.ptr, [out, inp], async_op, out, timeout)

    def barrier(self, *, async_op: bool = False,
                timeout: float | None = None) -> Work | None:
        """Return once every rank has entered the barrier."""
        enc = self._plans.get(("barrier",))
        if enc is None:
            enc = self._plan(("barrier",), Args("barrier", self.rank, self.size, 0, 1, hosts=self._hosts(), deterministic=self._deterministic), 0, 4, None, 0)
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
                          int(tag))
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

    # -- sub-communicators and teardown ----------------------------------------------------------
    def split(self, color: int | None, key: int = 0) -> "Communicator | None":
        """Collective: ranks with the same ``color`` form a new communicator, ordered by
        (``key``, old rank). A ``color`` of None or < 0 joins none and gets None."""
        self._check_open()
        mine = np.array([-1 if color is None or color < 0 else int(color), int(key)], np.int64)
        everyone = np.empty(2 * self.size, np.int64)
        self.all_gather(everyone, mine)
        self._splits += 1
        if mine[0] < 0:
            return None
        pairs = everyone.reshape(self.size, 2)
        group = sorted((r for r in range(self.size) if pairs[r, 0] == mine[0]), key=lambda r: (pairs[r, 1], r))
        from .api import create
        return create(group.index(self.rank), len(group), self._store,
                      f"{self.prefix}split{self._splits}/{mine[0]}/", self.timeout, self._algo_now,
                      [self.members[r] for r in group], self._params)

    def abort(self, reason: str = "aborted by the application") -> None:
        """Abort the communicator: every peer's pending and later operations fail with a PeerError
        carrying ``reason``, and so do this rank's. Idempotent; close() still releases resources."""
        if self._broken is None:
            self._broken = PeerError(f"rank {self.rank} aborted the communicator: {reason}", rank=self.rank)
            failures.publish(self, CommsError(reason))
            self._engine.abort()

    def close(self) -> None:
        """Finish pending asynchronous work (until the deadline), then release every resource."""
        if self._closed:
            return
        self._closed = True
        if config.get("FLIGHT_AT_EXIT"):
            flight.dump(self, "close")
        if self._timeline is not None:
            self._timeline.write()
        if not self._engine.drain(self.timeout):
            self._engine.abort()
            self._engine.drain(5.0)
        self._finalizer()

    def __enter__(self) -> "Communicator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<comms.Communicator rank {self.rank} of {self.size}>"


def _release(boot) -> None:
    boot.engine.close()
    boot.close_transports()
