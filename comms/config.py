"""The one registry of configuration knobs.

Each knob is declared once, with its name, type, default and doc, and is read from the environment
variable ``COMMS_<NAME>``. Values that differ from the default are logged once at INFO level.
``python -m comms.info`` prints every knob with its value and where the value came from.

A knob declared ``secret=True`` (the job's auth token) never has its value logged, printed or put
in an error message: the override log says only that it is set, and :func:`snapshot` shows
:data:`HIDDEN` in its place (an unset secret shows its empty default).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

from .runtime import native

log = logging.getLogger("comms.tuning")


def _size(text: str) -> int:
    """Parse a byte size: ``4096``, ``64K``, ``1M``, ``2G`` (binary multiples)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    return int(float(t[:-1] if mult > 1 else t) * mult)


def _bool(text: str) -> bool:
    v = text.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


_PARSERS: dict[type, Callable[[str], Any]] = {int: int, float: float, str: str, bool: _bool, "size": _size}


@dataclass(frozen=True)
class Param:
    name: str
    type: Any
    default: Any
    doc: str
    secret: bool = False

    @property
    def env(self) -> str:
        return f"COMMS_{self.name}"


PARAMS: dict[str, Param] = {}
# Knobs are declared here, except a transport's own, which its module in comms.transports declares
# (a transport is its own files; comms imports every registered transport, so all are declared
# before a communicator exists).


HIDDEN = "<hidden>"


def declare(name: str, type_: Any, default: Any, doc: str, secret: bool = False) -> Param:
    """Declare knob ``name`` (read from ``COMMS_<name>``); ``secret``: its value is never logged or shown."""
    if name in PARAMS:
        raise RuntimeError(f"config knob COMMS_{name} declared twice")
    p = Param(name, type_, default, doc, secret)
    PARAMS[name] = p
    return p


declare("TIMEOUT", float, 300.0, "Deadline in seconds of every blocking wait, unless init(timeout=) says otherwise.")
declare("TRANSPORT", str, "auto",
        "Transport between peers: auto (shm on the same host; across hosts rdma where both ranks have an RDMA "
        "provider other than libfabric's software ones, else tcp), or the name of one registered transport (shm, "
        "rdma, tcp) to force it for every peer.")
declare("HOST_ID", str, "", "Overrides the host identity (boot id, IPC namespace, /dev/shm probe); ranks with "
        "equal ids share memory.")
declare("ALGO", str, "", "Algorithm selection overrides, e.g. 'all_reduce:0-64K:direct#all_reduce:64K-inf:ring'.")
declare("SPIN", int, 0, "Polls before a waiting rank yields, fixed; 0: automatic (1 poll where the local ranks "
        "outnumber the cores; else adaptive: a wait spins as long as this rank's "
        "own waits show that spinning pays, less once its CPU is seen contended, never on tcp-only waits).")
declare("YIELDS", int, 0, "sched_yield() calls before a waiting rank that has stopped spinning sleeps; 0: "
        "automatic (200 where every local rank has a core, 32 where they outnumber the cores).")
declare("SOCKET_ADDR", str, "", "Address the TCP transport listens on; default: the interface that reaches "
        "MASTER_ADDR.")
declare("CALIBRATE", bool, True, "Measure link latency/bandwidth for the cost model the first time a host signature "
        "is seen (under 2 s; cached in ~/.cache/comms with the rules `python -m comms.tune` writes); 0 uses the "
        "built-in defaults and no tuned rules.")
declare("ONLINE_ROUNDS", int, 0, "Opt-in online timing: where a selection rule names alternatives "
        "(all_reduce:16K-64K:direct|rhd), the first calls of each size run them in this many rounds, timed, and "
        "every rank keeps the fastest (comms.selection.online; python -m comms.tune runs the same trials). 0 (default): the first alternative runs, and no call of the job is spent on trials "
        "(the bench's 2000 calls of 8 B ran 3x slower while 6 rounds went on: 5.4 us against 1.75 us).")
declare("ONLINE_TURN_MS", float, 10.0, "How long one turn of an alternative lasts in online timing, about (60 % "
        "untimed, 40 % timed; the calls of a turn are capped alike). python -m comms.tune uses 100: on 2 simulated "
        "hosts at 2 Gbit/s (tbf), 10 ms turns timed recursive doubling at 0.81x hierarchical at 32 KiB, where the "
        "bench's 0.4 s per size measured 1.14x.")
declare("DETERMINISTIC", bool, False, "Bitwise-identical reductions whatever algorithm or size is chosen: every "
        "element is reduced in rank order with float32 accumulation.")
declare("MOE_SINGLE_COPY", bool, True, "Expert-parallel dispatch/combine between ranks of one host writes token rows "
        "straight into the peers' shared-memory receive windows (/dev/shm, one copy; no ptrace permission) when "
        "every rank can map its peers' (probed at Dispatcher creation); 0 moves them through the communicator's "
        "all_to_all.")
declare("BIND", str, "auto", "CPU binding of the ranks comms.run starts (its --bind): auto or core (rank i on the i-th "
        "core, wrapping: one core per rank where they fit, else spread evenly), none.")
declare("DEBUG", str, "WARN", "Log level: WARN, INFO or TRACE. Lines are tagged with rank, host and subsystem.")
declare("DEBUG_SUBSYS", str, "ALL", "Subsystems to log, comma-separated: INIT, TRANSPORT, ALGO, TUNING, COLL, FLIGHT "
        "(ALL for every one).")
declare("FLIGHT_RECORDER", int, 1024, "Entries in each communicator's flight recorder (the last N plans); 0 disables.")
declare("FLIGHT_DIR", str, "", "Directory for flight-recorder dumps, written on error or timeout, on SIGUSR1, and "
        "at exit with COMMS_FLIGHT_AT_EXIT=1; empty disables dumps.")
declare("FLIGHT_AT_EXIT", bool, False, "Also dump the flight recorder when a communicator closes or the process exits.")
declare("UNEXPECTED_MSG_BYTES", "size", native.UNEXP_MSG_MIB << 20, "The largest point-to-point message a rank "
        "accepts before its receive is posted (it is kept aside until then); a larger one fails the communicator "
        "with an error naming the sender, before anything is allocated for it.")
declare("UNEXPECTED_PEER_BYTES", "size", native.UNEXP_PEER_MIB << 20, "The most bytes of such early messages kept "
        "aside from one peer at a time (payload and bookkeeping); one more fails the communicator with an error "
        "naming the sender.")
declare("TORCH_PEEK", bool, True, "The torch backend's all_reduce reads its options (op, timeout, async_op) from "
        "the C++ object's memory, at offsets probed and checked against pybind at import (comms/torch_backend/peek.py; "
        "about 0.7 us less per call); 0 reads them through pybind.")
declare("NUMPY_PEEK", bool, True, "comm.all_reduce(ndarray)'s fast path reads the array's data pointer and flags from "
        "its memory, at offsets probed and checked against numpy at import (comms/runtime/arrays.py; about 0.1 us "
        "less per call); 0 takes ffi.from_buffer.")
declare("TRACE", str, "", "Write a Chrome/Perfetto timeline of the collectives to this file (one per rank: "
        "'.rank<R>' is inserted before the extension).")

_logged: set[str] = set()


def source(name: str) -> str:
    """Where a knob's value comes from: 'env' or 'default'."""
    return "env" if PARAMS[name].env in os.environ else "default"


def get(name: str) -> Any:
    """The value of knob ``name`` (without the COMMS_ prefix), read from the environment now."""
    p = PARAMS[name]
    raw = os.environ.get(p.env)
    if raw is None:
        return p.default
    parse = _PARSERS[p.type]
    try:
        value = parse(raw)
    except ValueError as e:
        from .errors import InvalidUsage
        shown = HIDDEN if p.secret else repr(raw)
        raise InvalidUsage(f"{p.env}={shown} is not a valid {getattr(p.type, '__name__', p.type)}"
                           f"{'' if p.secret else f': {e}'}") from None
    if value != p.default and p.env not in _logged:
        _logged.add(p.env)
        if p.secret:
            log.info("%s set by environment (value hidden)", p.env)
        else:
            log.info("%s set by environment to %r (default %r)", p.env, value, p.default)
    return value


def snapshot() -> list[tuple[str, Any, str, str]]:
    """(env name, value, source, doc) for every knob, in declaration order; a secret knob that is
    set shows :data:`HIDDEN` instead of its value."""
    return [(p.env, HIDDEN if p.secret and source(p.name) == "env" else get(p.name), source(p.name), p.doc)
            for p in PARAMS.values()]
