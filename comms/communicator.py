"""Communicator: the public API. Validates arguments, picks a plan, runs it on the native engine.
The operations themselves (every collective, send and recv) are in comms.operations; this module
holds the communicator's state, plan selection and running, splitting and teardown.

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

from . import checks, config
from .runtime import failures
from .diag import flight
from .checks import fast as _fast
from .diag import log as clog
from .algorithms.plan import COLL_IDS, Args, NotSupported, Plan
from .runtime.native import ffi
from .dtypes import DTYPE_SIZES, ReduceOp
from .runtime.engine import Encoded
from .control import wire
from .errors import CommsError, InvalidUsage, PeerError
from .runtime.native import E_ABORTED, E_PEER_ABORTED, E_PEER_CLOSED, E_PEER_DEAD, E_REVOKED
from .selection import online
from .selection.calibrate import Calibration, calibrate
from .selection.model import cost
from .selection.rules import Selector, build, defaults as selector_defaults
from .transports.base import Endpoint
from .operations import MSG_COLL, Operations
from .work import Work

log = clog.get("COLL")
PLAN_CACHE = 4096
_NO_HOT = (None, -1, None, None)      # Communicator._hot_last before any fast call, and after a drop


# failures a rank learns from elsewhere (a peer's death, abort or close, a revoke) or that the user
# caused here (abort()): not told to the peers as this rank's own
_LEARNED = frozenset((E_PEER_DEAD, E_PEER_CLOSED, E_PEER_ABORTED, E_REVOKED, E_ABORTED))


class Communicator(Operations):
    """A group of ``size`` ranks. Create with :func:`comms.init` or :meth:`split`."""

    def __init__(self, boot, store, prefix: str, timeout: float, algo: str | None, members: Sequence[int] | None,
                 params=None, control=None):
        self._boot = boot
        hooks = [h for t in boot.transports if (h := t.buffer_hook()) is not None]
        self._track = hooks[0] if len(hooks) == 1 else (lambda keep: [h(keep) for h in hooks]) if hooks else None
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
        # the fast path: (numpy or torch dtype, count, op) -> the all_reduce plan an earlier call of
        # that shape built, with its prepared call (Encoded.call); emptied whenever _plans is, and
        # once the communicator breaks or closes. _hot_last: the last numpy hit's key and plan, which
        # a numpy call of the same shape takes with three identity checks instead of a lookup
        self._hot: dict[tuple, Encoded] = {}
        self._hot_last = _NO_HOT
        self._lock = boot.engine.lock
        self._ran: dict[tuple, str] = {}     # (collective, message bytes) -> algorithm of the last plan built
        self._contests = self._new_contests()
        self._scratch = np.empty(0, np.uint8)
        self._scratch_ptr: Any = 0
        self._splits = self._shrinks = self._grows = 0
        self._broken: CommsError | None = None
        self._closed = False
        self._topology = None
        self._failed: dict[int, str] = {}    # rank -> cause, as the control plane declared them
        self._revoker: int | None = None
        self._control_link: list = [None, wire.token(prefix)]     # the plane, this communicator's token
        self._finalizer = weakref.finalize(self, _release, boot, self._control_link)
        self._plane_ranks = self._attach_control(control)
        flight.register(self)
        self._deterministic = config.get("DETERMINISTIC")
        self._route = self._boot.route()     # the cost model's link classes, alike on every rank
        self._board = self._route.board      # the largest all_reduce the transport runs by itself
        self._calibration = Calibration(params, "", "") if params is not None \
            else calibrate(self, store, self._timer())
        self._params = self._calibration.params
        self._selector = Selector(algo, selector_defaults(self.size, self._hosts(), self._params, self._route,
                                                          self.oversubscription()), self._calibration.rules)
        self._plans.clear()                  # plans built during calibration used the provisional rules
        self._engine.seq = 0                 # and its probes' collectives were init's: the program's first is 1
        self._drop_hot()
        self._ran.clear()
        self._contests = self._new_contests()
        # the flight recorder and the counters start after init's own traffic (calibration)
        self._engine.set_flight_capacity(config.get("FLIGHT_RECORDER"))
        self._engine.zero_counters()
        self._timeline = None
        if config.get("TRACE"):
            from .diag.timeline import Timeline
            self._timeline = Timeline(config.get("TRACE") if prefix == "comms/0/" or not prefix.startswith("comms/")
                                      else f"{config.get('TRACE')}.{prefix.strip('/').replace('/', '_')}",
                                      self.rank, self.transports)
            self._engine.set_timeline(self._timeline)
            atexit.register(self._timeline.write)

    def _attach_control(self, control) -> list[int]:
        """Subscribe to a control plane: the parent's for a split (``control``: (plane, the plane's
        ranks of this communicator's)), else a new one (comms.control.plane), unless COMMS_CONTROL
        is off or the communicator has one rank. Returns the plane ranks of this communicator's."""
        if control is not None:
            plane, ranks = control
        elif config.get("CONTROL") and self.size > 1:
            from .control.plane import create as create_plane
            plane, ranks = create_plane(self._boot), list(range(self.size))
        else:
            plane, ranks = None, []
        if plane is not None:
            self._control_link[0] = plane
            plane.subscribe(self, self._control_link[1], ranks)
        return ranks

    def _peers_failed(self, failed: dict[int, str]) -> None:
        """The control plane's thread: ranks of this communicator failed (rank -> cause). Every
        pending and later operation fails with PeerError naming them."""
        self._failed.update(failed)
        self._engine.revoke(E_PEER_DEAD, min(failed))

    def _revoked_by(self, origin: int) -> None:
        """A rank (``origin``, -1: unknown) revoked this communicator (any thread)."""
        if self._revoker is None:
            self._revoker = origin
        self._engine.revoke(E_REVOKED, origin)

    def _aborted_by(self, origin: int) -> None:
        """Rank ``origin`` aborted this communicator on an error it found itself (control plane's
        thread): every pending and later call fails, with the reason that rank left in the store."""
        self._engine.revoke(E_PEER_ABORTED, origin)

    @property
    def control(self):
        """The control plane (comms.control.plane.Plane) this communicator is subscribed to, or None."""
        return self._control_link[0]

    def failed_ranks(self) -> dict[int, str]:
        """The ranks of this communicator declared failed so far, with their causes."""
        return dict(self._failed)

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
        """Hosts, leaders, cores, NUMA, NICs, RDMA devices and /dev/shm (comms.runtime.topology.Topology)."""
        if self._topology is None:
            from .runtime.topology import Topology
            self._topology = Topology.from_peers(self._boot.peers)
        return self._topology

    @property
    def route(self):
        """The link classes the cost model priced this communicator's traffic on (comms.selection.model.Route):
        the transport carrying pairs of ranks on one host, the one carrying pairs on two hosts, and
        whether the first's exchanges of one step wait as one. Every rank holds the same route."""
        return self._route

    @property
    def calibration(self) -> Calibration:
        """The cost model's figures, the tuned rules (comms.tune) and the host signature they are
        cached under (empty where calibration is off or inherited from a parent communicator)."""
        return self._calibration

    def price(self, coll: str, algo: str, nbytes: int, steps: bool = True) -> float:
        """The cost model's µs for ``algo`` running ``coll`` of ``nbytes`` (the selector's message
        size) on this communicator, with its figures and oversubscription; inf where not priced.
        ``steps=False``: the bytes' time alone, every step latency left out."""
        params = self._params.scaled(self.oversubscription(), 1.0 if steps else 0.0, {self._route.intra})
        return cost(coll, algo, nbytes, self.size, self._hosts(), params, self._route)

    def _timer(self):
        """Calibration's timer: ``all_reduce(algo, nbytes, reps)``, the mean seconds of ``reps`` float32 SUM
        all_reduces by ``algo`` back to back (None where it declines), its plan built once and run as the fast path
        runs one, in one native call a run. Through the general path (Python and cffi around each run, a plan
        encoded per run) a step on 4 ranks sharing 2 cores took 1.7-22 us from one init to the next (the least of 7
        runs of 50); in one native call 1.0-1.2 us, as an all_reduce's steps do."""
        from .runtime.native import EBUSY, call_run_addr
        prepared = {}

        def all_reduce(algo: str, nbytes: int, reps: int = 1) -> float | None:
            if (algo, nbytes) not in prepared:
                buf = np.zeros(max(1, nbytes // 4), np.float32)
                ptr, count, dtype = _fast(buf, "calibration", True)
                args = Args("all_reduce", self.rank, self.size, count, 4, inplace=True, hosts=self._hosts(),
                            deterministic=self._deterministic, board=self._board, crowded=self.oversubscription() > 1)
                try:
                    enc = Encoded(build(args, algo), "all_reduce", MSG_COLL, COLL_IDS["all_reduce"], dtype,
                                  int(ReduceOp.SUM), args.root, count, lens=(buf.nbytes, buf.nbytes))
                except NotSupported:
                    enc = None
                prepared[algo, nbytes] = buf, ptr, enc, enc and self._prepare_call(enc)
            buf, ptr, enc, call = prepared[algo, nbytes]
            if enc is None:
                return None
            call.scratch = self._scratch_addr(enc.scratch_bytes, False, [])      # it may have grown since
            t0 = time.perf_counter()
            for _ in range(reps):
                rc = call_run_addr(call, ptr)
                if rc == EBUSY:              # another thread holds the context: the engine lock's way
                    self._run(enc, ptr, ptr, [buf], False)
                elif rc:
                    raise self._hot_failed(enc, call, rc)
            return (time.perf_counter() - t0) / reps
        return all_reduce

    @property
    def transports(self) -> dict[int, str]:
        """The transport carrying traffic to each peer."""
        return dict(self._boot.chosen)

    def flight_record(self) -> list[dict]:
        """The last plans this communicator ran (see comms.diag.flight), oldest first."""
        return flight.records(self)

    def stats(self) -> dict:
        """Counters since init: payload bytes each registered transport carried
        (``<transport>_tx_bytes``, ``<transport>_rx_bytes``), plans run, times a wait went to sleep,
        busy nanoseconds, failed plans, and each transport's own (the rdma registration cache's)."""
        out = self._engine.counters()
        for t in self._boot.transports:
            out.update(t.stats())
        return out

    def endpoint(self, peer: int) -> Endpoint:
        """The point-to-point endpoint (isend/irecv -> Request) of the channel to ``peer``, as its
        transport's ``connect`` returned it."""
        checks.peer(peer, self.rank, self.size, "endpoint")
        if peer == self.rank:
            raise InvalidUsage(f"endpoint: rank {self.rank} has no channel to itself", op="endpoint", rank=self.rank)
        ep = self._boot.endpoints[peer]
        ep.comm = self
        return ep

    def algorithm_for(self, coll: str, nbytes: int) -> str:
        """The algorithm the selector would try first for ``coll`` of ``nbytes``."""
        return self._selector.candidates(coll, nbytes)[0]

    def algorithm_ran(self, coll: str, nbytes: int) -> str | None:
        """The algorithm of the last plan built for ``coll`` of ``nbytes`` (the selector's message
        size), after any candidate declined; None when no such call ran yet."""
        return self._ran.get((coll, nbytes))

    def online_choices(self) -> list[dict]:
        """What online timing (comms.selection.online) decided so far, per plan key: the alternatives of the
        rule, the algorithm kept and each alternative's median time relative to the first."""
        return self._contests.choices()

    def set_algo(self, rules: str | None) -> None:
        """Replace this communicator's user rules (the COMMS_ALGO grammar of comms.selection.rules, e.g.
        ``"all_reduce:ring"``; None: back to what init had, its ``algo`` argument or COMMS_ALGO).
        The default rules stay; plans built under the old rules are dropped, so the next call of
        each collective is planned afresh. Bad rules raise InvalidUsage and change nothing.
        Every rank must make the same change between the same two collectives (like init's
        ``algo``): ranks planning one collective with different algorithms would exchange
        messages the others do not expect, and fail at the deadline. Sub-communicators made
        earlier keep their own rules; later splits inherit these. Online timing's decisions
        (comms.selection.online) are kept: a rule naming the same alternatives again reuses them."""
        self._check_open()
        now = rules if rules is not None else self._algo
        self._selector = self._selector.with_user(now)      # parses first: bad rules change nothing
        self._algo_now = now
        self._plans.clear()
        self._drop_hot()
        self._ran.clear()

    # -- plumbing ------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise InvalidUsage(f"rank {self.rank}: the communicator is closed")
        if self._broken is not None:
            raise type(self._broken)(f"rank {self.rank}: the communicator was aborted by an earlier error: "
                                     f"{self._broken}", rank=self.rank)

    def _plan(self, key: tuple, args: Args, nbytes: int, dtype: int, op: ReduceOp | None, count: int,
              lens: tuple[int, int]) -> Encoded:
        """The cached, encoded plan for ``key``; built (and the selector consulted) on first use, and
        checked against ``lens``, the bytes of the call's input and output (``key`` must fix them)."""
        enc = self._plans.get(key)
        if enc is None:
            name = args.coll

            def encode(plan: Plan) -> Encoded:
                return Encoded(plan, name, MSG_COLL, COLL_IDS[name], dtype, int(op) if op is not None else 0,
                               args.root, count, lens=lens)

            def alternative(algo: str) -> Encoded | None:
                try:
                    return encode(build(args, algo))
                except NotSupported:
                    return None

            alts = self._selector.contest(name, nbytes)
            enc = self._contests.pick(key, alts, nbytes, (name, nbytes), alternative,
                                      lambda a: self.price(name, a, nbytes) / 1e6) if alts else None
            if enc is None:
                enc = encode(self._selector.plan(args, nbytes))
            self._remember(key, enc)
            if len(self._ran) >= PLAN_CACHE:
                self._ran.pop(next(iter(self._ran)))
            self._ran[(name, nbytes)] = enc.plan.algorithm
        return enc

    def _new_contests(self) -> online.Contests:
        """Online timing over this communicator's plan cache, as the knobs say."""
        return online.Contests(config.get("ONLINE_ROUNDS"), self._agree_max, self._plans, self._ran,
                               config.get("ONLINE_TURN_MS"))

    def online_decided(self) -> int:
        """How many online-timing decisions were made so far (cheap: what online_choices lists)."""
        return len(self._contests.decided)

    def _agree_max(self, values: np.ndarray) -> None:
        """MAX all_reduce of ``values`` (float64), in place, planned by the rules' first choice
        (never timed online: comms.selection.online calls it to agree on its figures)."""
        ptr, count, dtype = _fast(values, "all_reduce", True)
        key = ("online-agree", count)
        enc = self._plans.get(key)
        if enc is None:
            args = Args("all_reduce", self.rank, self.size, count, DTYPE_SIZES[dtype], inplace=True,
                        hosts=self._hosts(), deterministic=self._deterministic, board=self._board,
                        crowded=self.oversubscription() > 1)
            enc = Encoded(self._selector.plan(args, values.nbytes), "all_reduce", MSG_COLL, COLL_IDS["all_reduce"],
                          dtype, int(ReduceOp.MAX), 0, count, lens=(values.nbytes, values.nbytes))
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
            self._drop_hot()                 # their calls name the old scratch buffer
            self._scratch = np.empty(nbytes, np.uint8)
            self._scratch_ptr = checks.addr(self._scratch)
        return self._scratch_ptr

    def _keep_hot(self, key: tuple, enc: Encoded, pair: tuple = (0, 0, 0, 0)) -> None:
        """Let later synchronous calls of ``key`` (all_reduce: the buffer's numpy or torch dtype, count,
        op; other collectives: their name first) go straight to ``enc`` in one native call (the fast
        paths of comms.operations; ``pair``: a two-buffer plan's (aliased, where the input starts from
        the output's start, the input's and the output's bytes), which cm_call_run_pair checks every call),
        unless something must see every call: online timing (the caller checks enc.trial), a
        transport tracking buffers (rdma registrations), a timeline, or a failure."""
        if key in self._hot or self._track is not None or self._engine.timeline is not None or self._broken \
                or self._closed:
            return
        if len(self._hot) >= PLAN_CACHE:
            self._drop_hot()
        self._scratch_addr(enc.scratch_bytes, False, [])   # big enough now (a larger one empties _hot)
        call = self._prepare_call(enc)
        call.aliased, call.in_at, call.in_bytes, call.out_bytes = pair
        self._hot[key] = enc

    def _prepare_call(self, enc: Encoded) -> Any:
        """``enc``'s synchronous native call (a cm_call, kept as ``enc.call``): its plan on this context, with
        the scratch buffer as it is now and the communicator's deadline."""
        if enc.call is None:
            call = enc.call = ffi.new("cm_call *")
            call.ctx, call.steps, call.sig, call.nsteps = self._engine.ctx, enc.steps, enc.sig, enc.nsteps
            call.scratch, call.timeout_ns = self._scratch_ptr, self._timeout_ns
        return enc.call

    def _hot_find(self, dtype: Any, count: int, op: Any) -> Encoded | None:
        """The fast path's plan for (dtype, count, op), remembered as the last hit; None: none yet."""
        enc = self._hot.get((dtype, count, op))
        if enc is not None:
            self._hot_last = (dtype, count, op, enc)
        return enc

    def _drop_hot(self) -> None:
        for enc in self._hot.values():
            enc.call = None                   # it names this scratch buffer and context
        self._hot.clear()
        self._hot_last = _NO_HOT

    def _hot_failed(self, enc: Encoded, call, rc: int) -> CommsError:
        """The error of a failed fast-path call of ``enc`` (through ``call``, its cm_call)."""
        with self._lock:
            st = ffi.new("cm_status *", call.status)
        st.code = rc
        return self._fail(rc, st, enc.name, self._engine.seq, enc.plan)

    def _run(self, enc: Encoded, p_in: Any, p_out: Any, keep: list, async_op: bool, result: Any = None,
             timeout: float | None = None) -> Work | int | None:
        """Run ``enc`` on the engine now (or start it, with ``async_op``). ``timeout`` (seconds)
        replaces the communicator's deadline for this operation. A plan that is an alternative of
        an online trial (comms.selection.online) is counted by the trial, and timed when it says so."""
        if self._broken is not None or self._closed:
            self._check_open()
        trial = enc.trial
        if trial is not None:
            t0 = trial.begin(not async_op)
        scratch = self._scratch_addr(enc.scratch_bytes, async_op, keep)
        if self._track is not None:               # the transports' view of the buffers (rdma registrations)
            self._track(keep if async_op or not scratch else [*keep, self._scratch])
        deadline = time.monotonic_ns() + (self._timeout_ns if timeout is None else int(timeout * 1e9))
        if not async_op:
            failed, source, seq = self._engine.run(enc, p_in, p_out, scratch, deadline)
            if failed is not None:
                raise self._fail(failed[0], failed[1], enc.name, seq, enc.plan, timeout)
            if trial is not None:
                trial.end(t0)
            return source
        work = Work(enc.name, 0, self.rank, keepalive=keep, result=result)
        self._engine.start(enc, p_in, p_out, scratch, deadline, work,
                           lambda w, rc, st: w._finish(self._fail(rc, st, enc.name, w.seq, enc.plan, timeout) if rc else None))
        if trial is not None:
            trial.end(t0)
        return work

    def _fail(self, rc: int, st, op: str, seq: int, plan: Plan | None, timeout: float | None = None) -> CommsError:
        plane, peer = self._control_link[0], int(st.peer) if st is not None else -1
        if plane is not None and 0 <= peer < self.size and peer not in self._failed:
            # a transport saw it first, and every rank must know (shrink): a process that is gone, or
            # one that said goodbye and closed while this call needed it (not a closed connection
            # alone: an aborting peer closes its connections too)
            pr = self._plane_ranks[peer]
            if rc == E_PEER_DEAD or (rc == E_PEER_CLOSED and pr in plane.left):
                plane.declare(pr, plane.death_cause(pr) if rc == E_PEER_DEAD else wire.GONE)
        exc = failures.build(self, rc, st, op, seq, plan, self.timeout if timeout is None else timeout)
        if self._broken is None:
            self._broken = exc
            self._drop_hot()
            told = rc in (E_PEER_DEAD, E_REVOKED) and bool(self._failed or self._revoker is not None)
            if not told:                          # else the control plane told everyone (and the store may be gone)
                failures.publish(self, exc)
            if not (rc == E_REVOKED and self.control is not None):
                self._engine.abort()              # a revoke reaches the peers as Revoked, not as an abort
            if plane is not None and rc not in _LEARNED:
                # found here (a mismatch, a timeout, a malformed message): a peer that waits on a
                # third rank, or expects nothing from this one, hears of it now, not at its deadline
                plane.abort(self._control_link[1])
            try:
                flight.dump(self, str(exc))
            except OSError as e:
                log.warning("comms: cannot write the flight recorder: %s", e)
        return exc

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
        plane = self._control_link[0]
        return create(group.index(self.rank), len(group), self._store,
                      f"{self.prefix}split{self._splits}/{mine[0]}/", self.timeout, self._algo_now,
                      [self.members[r] for r in group], self._params,
                      control=(plane, [self._plane_ranks[r] for r in group]))

    def revoke(self) -> None:
        """Revoke the communicator: every pending and later operation on it, on every rank, fails
        with :class:`comms.errors.Revoked` (the control plane tells the others within milliseconds).
        Idempotent. The survivors may then :meth:`shrink` it (with no failure: to the same ranks)."""
        from .control import membership
        membership.revoke(self)

    def shrink(self) -> "Communicator":
        """Collective over the survivors, after a failure or a revoke: agree on the failed ranks
        (comms.control.membership) and return a new communicator of the others, ranks renumbered
        in order, with its own transports, topology and control plane. This one stays broken; close
        it. Raises PeerError on a rank the others declared failed."""
        from .control import membership
        return membership.shrink(self)

    def grow(self, count: int | None = None, name: str = "default") -> "Communicator":
        """Collective: bring in ``count`` newcomers that called ``comms.join(name)`` (None: as many
        as wait now, which may be none). Returns the larger communicator, where this one's ranks
        keep their numbers and the newcomers follow, or this communicator when none joined."""
        self._check_open()
        from .control import membership
        return membership.grow(self, count, name)

    def joiners_waiting(self, name: str = "default") -> int:
        """How many newcomers wait in ``comms.join(name)`` (a store read; not collective)."""
        from .control import membership
        return membership.waiting(self, name)

    def abort(self, reason: str = "aborted by the application") -> None:
        """Abort the communicator: every peer's pending and later operations fail with a PeerError
        carrying ``reason``, and so do this rank's. Idempotent; close() still releases resources."""
        if self._broken is None:
            self._broken = PeerError(f"rank {self.rank} aborted the communicator: {reason}", rank=self.rank)
            self._drop_hot()
            failures.publish(self, CommsError(reason))
            self._engine.abort()

    def close(self) -> None:
        """Finish pending asynchronous work (until the deadline), then release every resource."""
        if self._closed:
            return
        self._closed = True
        self._drop_hot()
        if config.get("FLIGHT_AT_EXIT"):
            flight.dump(self, "close")
        if self._timeline is not None:
            self._timeline.write()
        if not self._engine.drain(self.timeout):
            self._engine.abort()
            self._engine.drain(5.0)
        flight.unregister(self)                  # no SIGUSR1 dump of it from now on; then free
        self._finalizer()

    def __enter__(self) -> "Communicator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<comms.Communicator rank {self.rank} of {self.size}>"


def _release(boot, control_link: list) -> None:
    if control_link[0] is not None:
        control_link[0].unsubscribe(control_link[1])     # before the context goes: no revoke after it
    boot.engine.close()
    boot.close_transports()
