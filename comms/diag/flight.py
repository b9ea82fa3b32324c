"""The flight recorder: what each communicator did last, for post-mortems of hangs and errors.

The native engine keeps a ring of the last COMMS_FLIGHT_RECORDER plans per communicator (sequence
number, collective, dtype, count, the plan, state, timestamps, failure code and peer), written in
C at plan start and end, so recording costs nanoseconds. This module turns the ring into records
(adding the algorithm and peers from the cached plan) and dumps them as JSON, one file per rank
and communicator, to COMMS_FLIGHT_DIR:

- on an error or timeout (from Communicator._fail),
- on SIGUSR1 (a watcher thread notices the signal even while the main thread is blocked in a
  collective, since native waits release the GIL),
- at close or exit when COMMS_FLIGHT_AT_EXIT=1.

``python -m comms.trace analyze DIR`` reads the dumps and names the ranks that diverged.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
import weakref

from .. import config
from . import log as clog
from ..runtime import native
from ..runtime.native import ffi
from ..algorithms.plan import COLL_NAMES, COMM_KINDS, SEND
from ..dtypes import DTYPE_NAMES

log = clog.get("FLIGHT")
STATES = {1: "started", 2: "done", 3: "failed"}
_live: "weakref.WeakSet" = weakref.WeakSet()
_watcher: threading.Thread | None = None
_lock = threading.Lock()


def records(comm) -> list[dict]:
    """The flight recorder of ``comm``, oldest first: a copy of whole entries, taken under the
    engine's handle lock (Engine.read_flight), so a dump racing close() never reads a freed context."""
    entries = comm._engine.read_flight()
    if not entries:
        return []
    plans = {int(ffi.cast("uintptr_t", enc.steps)): enc for enc in list(comm._plans.values())}
    out = []
    for e in entries:
        enc = plans.get(int(e.plan))
        steps = enc.plan.steps if enc is not None else ()
        peers = sorted({s.peer for s in steps if s.kind in COMM_KINDS and s.peer >= 0})
        out.append({
            "id": int(e.id), "seq": int(e.seq), "kind": "coll" if e.kind == 1 else "p2p",
            "op": COLL_NAMES.get(e.coll, enc.name if enc is not None else "?") if e.kind == 1 else
            (enc.name if enc is not None else "p2p"),
            "algorithm": enc.plan.algorithm if enc is not None else "?",
            "dtype": DTYPE_NAMES[e.dtype] if 0 <= e.dtype < len(DTYPE_NAMES) else str(e.dtype),
            "count": int(e.count) if e.count != (1 << 64) - 1 else -1,
            "bytes_sent": sum(s.nbytes for s in steps if s.kind == SEND),
            "root": int(e.root), "redop": int(e.redop), "tag": int(e.tag), "peers": peers,
            "transports": sorted({comm._boot.chosen.get(p, "?") for p in peers}),
            "state": STATES.get(e.state, str(e.state)), "code": int(e.code), "peer": int(e.peer),
            "t_start_ns": int(e.t_start_ns), "t_end_ns": int(e.t_end_ns),
            "duration_us": (e.t_end_ns - e.t_start_ns) / 1e3 if e.t_end_ns else None,
        })
    return out


def dump(comm, reason: str, directory: str | None = None) -> str | None:
    """Write ``comm``'s flight recorder to ``directory`` (default COMMS_FLIGHT_DIR); returns the path."""
    directory = directory or config.get("FLIGHT_DIR")
    if not directory:
        return None
    os.makedirs(directory, exist_ok=True)
    name = comm.prefix.strip("/").replace("/", "_") or "comms"
    path = os.path.join(directory, f"{name}.rank{comm.rank}.json")
    doc = {
        "comm": comm.prefix, "rank": comm.rank, "size": comm.size, "members": comm.members,
        "host": socket.gethostname(), "pid": os.getpid(), "reason": reason, "time": time.time(),
        "monotonic_ns": time.monotonic_ns(), "entries": records(comm),
    }
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)
    log.warning("comms: rank %d wrote its flight recorder to %s (%s)", comm.rank, path, reason)
    return path


def register(comm) -> None:
    """Track ``comm`` for SIGUSR1 and exit dumps (only when COMMS_FLIGHT_DIR is set)."""
    global _watcher
    if not config.get("FLIGHT_DIR"):
        return
    _live.add(comm)
    with _lock:
        if _watcher is None:
            native.sigusr1_install()
            _watcher = threading.Thread(target=_watch, name="comms-flight", daemon=True)
            _watcher.start()
            atexit.register(_at_exit)


def unregister(comm) -> None:
    """No more SIGUSR1 or exit dumps of ``comm`` (its close, before anything is freed). A dump the
    watcher already started finishes safely: it reads under the engine's handle lock, which close
    takes to free the context, and reads nothing after that."""
    _live.discard(comm)


def _watch() -> None:
    while True:
        time.sleep(0.1)
        if native.sigusr1_take():
            for comm in list(_live):
                if comm._closed:
                    continue
                try:
                    dump(comm, "SIGUSR1")
                except Exception as e:          # a dump must never take the process down
                    log.warning("comms: flight-recorder dump failed: %s", e)


def _at_exit() -> None:
    if config.get("FLIGHT_AT_EXIT"):
        for comm in list(_live):
            if not comm._closed:
                try:
                    dump(comm, "exit")
                except Exception:
                    pass
