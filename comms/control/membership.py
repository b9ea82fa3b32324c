"""Revoke, shrink, grow and join: going on after a failure, and bringing replacements in.

* :func:`revoke`: every pending and later operation of the communicator, on every rank, fails with
  ``Revoked`` (the control plane floods the notice; without a plane only this rank's operations
  fail at once, and its peers' when their data channels see the abort).
* :func:`shrink`, collective over the survivors: they agree on the failed set, then bootstrap a
  new communicator of the others, ranks renumbered in order, with the usual transports, algorithms
  and a rebuilt topology (the cost model's figures are inherited, as in a split).
* :func:`grow` (collective over the group) and :func:`join` (in each newcomer): the newcomers take
  numbered tickets from the store, rank 0 of the group grants them, and all bootstrap a group of
  the old size plus theirs; old ranks keep their numbers, newcomers follow in ticket order.

Agreement (as MPIX_Comm_agree does for a set): each survivor publishes the failed set it knows in
the store, adds every set the others publish to its own, and republishes until the sets of every
rank not in it are equal to its own. Failures only ever join the set, so this ends once notices
stop arriving. The first rank to get there writes its set as the decision, with the store's
compare-and-set; every other rank adopts the decision as soon as it sees it, so exactly one set
stands per shrink. A failure that happens after the decision is found by the new communicator's
control plane; its init then fails at the deadline, and the survivors shrink again.

Partitions: when the hosts lose each other but every side still reaches the store, each side
converges on the other's failure. The side that decides first goes on; the other side's ranks
find themselves in the decided set and raise PeerError from shrink. A side that cannot reach the
store raises TransportError. Either way one communicator goes on, never two under one prefix.

The store must outlive the failed ranks: under torchrun or comms.run the agent hosts it; a store
hosted by rank 0's process dies with rank 0, and shrink then raises TransportError saying so.
Values read from the store are parsed strictly (JSON lists of rank numbers, checked).
"""
from __future__ import annotations

import hashlib
import json
import time
from datetime import timedelta

import numpy as np

from ..diag import log as clog
from ..errors import CommTimeout, InvalidUsage, PeerError, TransportError
from ..security.store import claim

log = clog.get("CONTROL")
POLL_S = 0.005        # how often an agreement looks at the store again (they last milliseconds)
GRANT_FIELDS = {"prefix": str, "rank": int, "size": int}


def child_prefix(comm, what: str) -> str:
    """The store prefix of what ``comm`` makes next (``what``: "shrink1", "grow2", ...): of fixed
    length, hashed from comm's, so that a job that recovers many times does not nest its prefixes."""
    digest = hashlib.blake2b(f"{comm.prefix}{what}".encode(), digest_size=12).hexdigest()
    return f"comms/m/{digest}/"


def revoke(comm) -> None:
    plane = comm.control
    comm._revoked_by(comm.rank)
    if plane is not None:
        plane.revoke(comm._control_link[1])
    else:
        comm._engine.abort()          # no plane: the peers hear of it on their data channels


def _store_call(comm, what: str, fn, *args):
    try:
        return fn(*args)
    except Exception as e:          # torch raises DistStoreError / RuntimeError for a store that is gone
        raise TransportError(f"{what}: rank {comm.rank} cannot reach the store ({type(e).__name__}: {e}); a store "
                             "hosted by a rank that failed is gone with it (run under torchrun or comms.run, whose "
                             "agent hosts it)", op=what, rank=comm.rank) from None


def _ranks(comm, raw: bytes, who: int | None) -> set[int]:
    try:
        value = json.loads(raw)
        if isinstance(value, list) and all(isinstance(r, int) and 0 <= r < comm.size for r in value):
            return set(value)
    except ValueError:
        pass
    whose = "the decided failed set" if who is None else f"rank {who}'s failed set"
    raise TransportError(f"shrink: {whose} in the store is malformed", op="shrink", rank=comm.rank, peer=who)


def agree(comm, epoch: int) -> list[int]:
    """The failed ranks every survivor of ``comm`` agrees on (see the module docstring)."""
    store, base = comm._store, f"{child_prefix(comm, f'shrink{epoch}')}agree/"
    deadline = time.monotonic() + comm.timeout
    failed: set[int] = set(comm.failed_ranks())
    published = None
    while True:
        failed |= set(comm.failed_ranks())
        if comm.rank in failed:
            raise PeerError(f"shrink: rank {comm.rank} was declared failed by the other ranks; it cannot join the "
                            "shrunk communicator", op="shrink", rank=comm.rank, failed=tuple(sorted(failed)))
        mine = sorted(failed)
        if mine != published:
            _store_call(comm, "shrink", store.set, f"{base}{comm.rank}", json.dumps(mine))
            published = mine
        live = [r for r in range(comm.size) if r not in failed]
        views = {}
        for r in live:
            key = f"{base}{r}"
            if _store_call(comm, "shrink", store.check, [key]):
                views[r] = _ranks(comm, _store_call(comm, "shrink", store.get, key), r)
        union = failed.union(*views.values())
        if union != failed:
            failed = union
            continue
        decided = _decision(comm, base, mine if len(views) == len(live) and all(v == failed for v in views.values())
                            else None)
        if decided is not None:
            if comm.rank in decided:
                raise PeerError(f"shrink: rank {comm.rank} is in the failed set {sorted(decided)} that the other "
                                f"side decided first (a partition: the side that reaches the store first goes on; "
                                f"this rank saw {mine} fail)", op="shrink", rank=comm.rank,
                                failed=tuple(sorted(set(decided) | failed)))
            return sorted(decided)
        if time.monotonic() > deadline:
            missing = [r for r in live if r not in views or views[r] != failed]
            raise CommTimeout(f"shrink (agreement) on rank {comm.rank} timed out after {comm.timeout:g} s: ranks "
                              f"{missing} did not agree on the failed set {mine}", op="shrink", rank=comm.rank,
                              peer=missing[0] if missing else None)
        time.sleep(POLL_S)


def _decision(comm, base: str, mine: list[int] | None) -> set[int] | None:
    """The failed set decided for this shrink: the first rank to converge writes its set (a
    compare-and-set on the store, so one decision stands even if a partition left two sides that
    each converged on the other's failure); later ranks adopt it. ``mine`` is None while this rank
    has not converged: it then only reads a decision, if there is one yet."""
    key = f"{base}decided"
    store = comm._store
    if mine is None:
        if not _store_call(comm, "shrink", store.check, [key]):
            return None
        return _ranks(comm, _store_call(comm, "shrink", store.get, key), None)
    return _ranks(comm, _store_call(comm, "shrink", claim, store, key, json.dumps(mine)), None)


def shrink(comm):
    comm._shrinks += 1
    epoch = comm._shrinks
    failed = agree(comm, epoch)
    survivors = [r for r in range(comm.size) if r not in failed]
    from ..api import create
    return create(survivors.index(comm.rank), len(survivors), comm._store, f"{child_prefix(comm, f'shrink{epoch}')}comm/",
                  comm.timeout, comm._algo_now, [comm.members[r] for r in survivors], comm._params)


def _join_base(name: str) -> str:
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise InvalidUsage(f"join/grow: name {name!r} must be letters, digits, '-' or '_'")
    return f"comms/join/{name}/"


def waiting(comm, name: str = "default") -> int:
    """How many newcomers wait to join under ``name`` (read from the store; not collective)."""
    base = _join_base(name)
    tickets = _store_call(comm, "grow", comm._store.add, base + "tickets", 0)
    granted = _store_call(comm, "grow", comm._store.add, base + "granted", 0)
    return max(0, tickets - granted)


def grow(comm, count: int | None, name: str):
    base = _join_base(name)
    if count is not None and count < 0:
        raise InvalidUsage(f"grow: count must be >= 0, got {count}", op="grow", rank=comm.rank)
    info = np.zeros(2, np.int64)
    if comm.rank == 0:
        granted = _store_call(comm, "grow", comm._store.add, base + "granted", 0)
        info[:] = [waiting(comm, name) if count is None else count, granted]
    comm.broadcast(info, root=0)                 # every rank grows by the same count, or none does
    n, first = int(info[0]), int(info[1])
    if n == 0:
        return comm
    comm._grows += 1
    prefix, size = child_prefix(comm, f"grow{comm._grows}"), comm.size + n
    if comm.rank == 0:
        log.info("comms: grow(%r): rank 0 of %s grants tickets %d-%d (ranks %d-%d of %d)", name, comm.prefix, first,
                 first + n - 1, comm.size, size - 1, size)
        _store_call(comm, "grow", comm._store.add, base + "granted", n)
        for i in range(n):
            _store_call(comm, "grow", comm._store.set, f"{base}ticket/{first + i}",
                        json.dumps({"prefix": prefix, "rank": comm.size + i, "size": size}))
    from ..api import create
    return create(comm.rank, size, comm._store, prefix, comm.timeout, comm._algo_now, None)


def join(store, name: str, timeout: float, algo: str | None):
    """A newcomer's side of grow: take a ticket, wait until a group grants it, bootstrap with them."""
    base = _join_base(name)
    ticket = store.add(base + "tickets", 1) - 1
    key = f"{base}ticket/{ticket}"
    log.info("comms: join(%r): waiting with ticket %d", name, ticket)
    try:
        store.wait([key], timedelta(seconds=timeout))
    except Exception as e:
        raise CommTimeout(f"join({name!r}): ticket {ticket} was not granted within {timeout:g} s: no group called "
                          f"grow() ({type(e).__name__})", op="join") from None
    try:
        grant = json.loads(store.get(key))
        ok = isinstance(grant, dict) and all(isinstance(grant.get(k), t) for k, t in GRANT_FIELDS.items()) \
            and 0 <= grant["rank"] < grant["size"] and grant["prefix"].startswith("comms/")
    except ValueError:
        ok = False
    if not ok:
        raise TransportError(f"join({name!r}): the grant of ticket {ticket} in the store is malformed", op="join")
    from ..api import create
    return create(grant["rank"], grant["size"], store, grant["prefix"], timeout, algo, None)
