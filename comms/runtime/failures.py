"""Turning a native failure into one clear exception, and telling the other ranks why.

:func:`build` maps a native status to the exception tree (comms.errors) with a message naming the
operation, its sequence number, this rank and the peer; for a mismatch it names what both sides
called. :func:`publish` stores the reason under ``<prefix>abort/<rank>`` so that ranks which only
see "peer aborted" or "peer closed" can say why; :func:`peer_reason` reads it back, briefly.
"""
from __future__ import annotations

import json
from datetime import timedelta

from .. import errors
from ..algorithms.plan import COLL_NAMES, STEP_NAMES
from ..dtypes import DTYPE_NAMES, ReduceOp
from ..diag import log as clog
from ..errors import CommsError, MismatchError, TransportError, error_class

log = clog.get("COLL")

REASON_WAIT = timedelta(seconds=1.0)


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
        msg = f"{where}: the communicator was aborted"
    elif rc == errors.E_INVALID and peer >= 0:
        cls = errors.TransportError
        msg = f"{where}: received a malformed message from rank {peer}"
    else:
        msg = f"{where}: {errors.code_name(rc)} (code {rc}, errno {st.sys_errno if st is not None else 0})"
    return cls(msg, op=op, seq=seq, rank=rank, peer=peer if peer >= 0 else None)
