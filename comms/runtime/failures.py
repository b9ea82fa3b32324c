"""Turning a native failure into one clear exception, and telling the other ranks why.

:func:`build` maps a native status to the exception tree (comms.errors) with a message naming the
operation, its sequence number, this rank and the peer; for a mismatch it names what both sides
called. :func:`plan_error` says which step of a plan does not fit the buffers of the call it was
encoded for (native/plan_check.c). :func:`publish` stores the reason under ``<prefix>abort/<rank>``
so that ranks which only see "peer aborted" or "peer closed" can say why; :func:`peer_reason`
reads it back, briefly.
"""
from __future__ import annotations

import json
import time
from datetime import timedelta

from .. import errors
from ..algorithms.plan import COLL_NAMES, STEP_NAMES
from ..dtypes import DTYPE_NAMES, DTYPE_SIZES, ReduceOp
from ..diag import log as clog
from ..errors import CommsError, MismatchError, TransportError, error_class
from . import native

log = clog.get("COLL")

REASON_WAIT = timedelta(seconds=1.0)
VERDICT_WAIT_S = 0.3     # a notice floods the survivors in milliseconds; a peer's abort may come first


def describe(h) -> str:
    """A message header as the call that produced it."""
    if h.kind == 2:
        return f"send(tag {h.tag}, {h.nbytes} B)"
    name = COLL_NAMES.get(h.coll, f"collective#{h.coll}")
    dtype = DTYPE_NAMES[h.dtype] if h.dtype < len(DTYPE_NAMES) else f"dtype#{h.dtype}"
    count = "uneven splits" if h.count == (1 << 64) - 1 else f"{h.count} elements"
    parts = [f"seq {h.seq}", f"{dtype}, {count}"]
    if name in ("all_reduce", "reduce", "reduce_scatter"):
        try:
            parts.append(f"op {ReduceOp(h.redop).name}")
        except ValueError:
            parts.append(f"op #{h.redop}")
    if h.root >= 0:
        parts.append(f"root {h.root}")
    return f"{name}({', '.join(parts)})"


def peer_reason(comm, peer: int) -> tuple[str, str] | None:
    """(exception class name, message) published by ``peer``, or None if it left none."""
    if peer is None or peer < 0:
        return None
    key = f"{comm.prefix}abort/{peer}"
    try:
        comm._store.wait([key], REASON_WAIT)
        kind, text = json.loads(comm._store.get(key))
    except TransportError as e:              # comms.security.store: the tag did not match
        log.warning("comms: rank %d ignored rank %d's abort reason: %s", comm.rank, peer, e)
        return None
    except Exception:
        return None
    if not isinstance(kind, str) or not isinstance(text, str):     # from the store: checked, never unpickled
        return None
    return kind, text[:2000]


def publish(comm, exc: CommsError) -> None:
    try:
        comm._store.set(f"{comm.prefix}abort/{comm.rank}", json.dumps([type(exc).__name__, str(exc)]))
    except Exception:
        pass


def _verdict(comm) -> bool:
    """Whether the control plane declared ranks of ``comm`` failed or revoked it. A peer that
    aborted or closed may have heard of it just before this rank did: wait briefly for the notice."""
    if comm.control is not None:
        until = time.monotonic() + VERDICT_WAIT_S
        while not comm._failed and comm._revoker is None and time.monotonic() < until:
            time.sleep(0.005)
    return bool(comm._failed) or comm._revoker is not None


def failed_error(comm, where: str, op: str, seq: int) -> errors.PeerError:
    """PeerError naming the ranks the control plane declared failed, and how each was detected."""
    failed = dict(comm._failed)
    names = ", ".join(str(r) for r in sorted(failed))
    msg = f"{where}: rank{'s' if len(failed) > 1 else ''} {names} failed: " + \
        "; ".join(f"rank {r}: {why}" for r, why in sorted(failed.items()))
    return errors.PeerError(msg, op=op, seq=seq, rank=comm.rank, peer=min(failed), failed=tuple(sorted(failed)))


_PLAN_FAULTS = {
    native.PLAN_BAD_KIND: "is of no known kind",
    native.PLAN_BAD_BUF: "names a buffer the call does not pass",
    native.PLAN_PAST_BUF: "touches bytes [{off}, {end}) of the {buf} buffer, which holds {len} B",
    native.PLAN_PAST_BUF2: "reads past the end of the {buf2} buffer, which holds {len2} B",
    native.PLAN_PART_ELEMENT: "reduces {n} B, not a whole number of {esz} B elements",
    native.PLAN_BAD_SLOTS: "reduces {slots} slots",
    native.PLAN_BAD_GATE: "is gated on no earlier receive of the same bytes in its batch",
}
_BUF_NAMES = ("input", "output", "scratch")


def plan_error(name: str, plan, fault, lens: tuple, dtype: int) -> CommsError:
    """The error of a plan of ``dtype`` that cm_plan_check refused (``fault``: its cm_plan_fault) for
    buffers of ``lens`` bytes (input, output, scratch): what its step would touch, and where."""
    cls = error_class(errors.E_INVALID)
    head = f"{name}: plan {plan.algorithm!r} refused before any byte moved"
    if not 0 <= fault.step < len(plan.steps):
        return cls(f"{head}: its buffer table is malformed", op=name)
    s = plan.steps[fault.step]

    def named(b: int) -> tuple[str, int]:
        return (_BUF_NAMES[b], lens[b]) if 0 <= b < len(lens) else (f"#{b}", 0)

    (buf, blen), (buf2, blen2) = named(s.buf), named(s.buf2)
    what = _PLAN_FAULTS.get(fault.reason, f"does not fit (reason {fault.reason})").format(
        off=s.off, end=s.off + s.nbytes, buf=buf, len=blen, buf2=buf2, len2=blen2, n=s.nbytes, slots=s.peer,
        esz=DTYPE_SIZES[dtype] if 0 <= dtype < len(DTYPE_SIZES) else 0)
    return cls(f"{head}: step {fault.step} ({s}) {what}", op=name)


def build(comm, rc: int, st, op: str, seq: int, plan, timeout: float) -> CommsError:
    rank, peer = comm.rank, int(st.peer) if st is not None else -1
    where = f"{op} (seq {seq}) on rank {rank}" if seq else f"{op} on rank {rank}"
    cls = error_class(rc)
    step = None
    if plan is not None and st is not None and 0 <= st.step < len(plan.steps):
        step = plan.steps[st.step]
    if rc == errors.E_TIMEOUT:
        what = ""
        if step is not None:
            what = f" ({STEP_NAMES[step.kind]} of {st.want_bytes} B, {st.done_bytes} B done)"
        who = f"rank {peer}" if peer >= 0 else "a message from any rank"
        msg = f"{where} timed out after {timeout:g} s waiting for {who}{what}"
    elif rc == errors.E_MISMATCH:
        msg = (f"{where}: ranks called different collectives: rank {rank} called {describe(st.local)} but rank "
               f"{peer} called {describe(st.remote)}")
    elif rc == errors.E_TRUNCATE:
        mine = st.want_bytes
        msg = (f"{where}: size mismatch with rank {peer}: rank {rank} expected {mine} B but rank {peer} sent "
               f"{st.remote.nbytes} B ({describe(st.remote)})")
    elif rc in (errors.E_PEER_DEAD, errors.E_PEER_CLOSED, errors.E_PEER_ABORTED) and _verdict(comm) \
            and comm._failed:
        return failed_error(comm, where, op, seq)
    elif rc == errors.E_REVOKED or (rc == errors.E_PEER_ABORTED and comm._revoker is not None):
        peer = comm._revoker if rc != errors.E_REVOKED else peer
        who = f"rank {peer}" if peer is not None and peer >= 0 else "a rank"
        return errors.Revoked(f"{where}: the communicator was revoked by {who} (comm.revoke()); the survivors may "
                              f"shrink() it", op=op, seq=seq, rank=rank, peer=peer if peer is not None and peer >= 0 else None,
                              failed=tuple(sorted(comm._failed)))
    elif rc == errors.E_PEER_DEAD:
        msg = f"{where}: rank {peer} died (its process is gone)"
    elif rc in (errors.E_PEER_CLOSED, errors.E_PEER_ABORTED):
        how = "closed its connection" if rc == errors.E_PEER_CLOSED else "aborted the communicator"
        reason = peer_reason(comm, peer)
        msg = f"{where}: rank {peer} {how}"
        if reason is not None:
            msg += f": {reason[1]}"
            if reason[0] == "MismatchError":
                cls = MismatchError
            elif reason[0] == "CommTimeout":
                cls = errors.PeerError
        elif rc == errors.E_PEER_CLOSED:
            msg += " (it exited or crashed)"
    elif rc == errors.E_ABORTED:
        msg = f"{where}: the communicator was aborted" + (f" ({comm._broken})" if comm._broken is not None else "")
    elif rc == errors.E_INVALID and peer >= 0:
        cls = errors.TransportError
        msg = (f"{where}: received a malformed message from rank {peer} (a header that is not comms', a payload "
               "that does not fit the size its header declares, or a broken frame)")
    elif rc == errors.E_LIMIT:
        n, queued, limit = st.remote.nbytes, st.done_bytes, st.want_bytes
        early = f"rank {peer} sent a {n} B message (tag {st.remote.tag}) before its receive was posted"
        if n > limit:
            msg = (f"{where}: {early}: more than the {limit} B an early message may hold "
                   "(COMMS_UNEXPECTED_MSG_BYTES, COMMS_UNEXPECTED_PEER_BYTES); post the receive earlier or raise them")
        else:
            msg = (f"{where}: {early} with {queued} B from it kept aside already: more than the {limit} B allowed "
                   "per peer (COMMS_UNEXPECTED_PEER_BYTES); post receives earlier or raise it")
    else:
        msg = f"{where}: {errors.code_name(rc)} (code {rc}, errno {st.sys_errno if st is not None else 0})"
    return cls(msg, op=op, seq=seq, rank=rank, peer=peer if peer >= 0 else None)
