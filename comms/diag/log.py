"""Logging: ``COMMS_DEBUG=WARN|INFO|TRACE`` and ``COMMS_DEBUG_SUBSYS=INIT,TRANSPORT,ALGO,...``.

Every subsystem logs through ``comms.diag.log.get(SUBSYS)`` (a logger named ``comms.<subsys>``). When
COMMS_DEBUG is set, comms attaches its own stderr handler, and each line is tagged like NCCL's:

    myhost:4242 [1] comms INFO INIT rank 1 of 4 on myhost: local ranks [0, 1], ...

(host:pid, [rank], level, subsystem). Without COMMS_DEBUG, warnings go through Python's logging
as usual and nothing else is printed. Subsystems: INIT (bootstrap, topology), TRANSPORT (each registered
transport's setup), ALGO (algorithm choices), TUNING (selection rules), COLL (failures of operations), CONTROL (the control plane: failures, revokes, refused strangers),
FLIGHT (flight-recorder dumps). TRACE is Python's DEBUG level.
"""
from __future__ import annotations

import logging
import os
import socket
import sys

from .. import config

SUBSYSTEMS = ("INIT", "TRANSPORT", "ALGO", "TUNING", "COLL", "FLIGHT", "CONTROL")
LEVELS = {"WARN": logging.WARNING, "WARNING": logging.WARNING, "INFO": logging.INFO, "TRACE": logging.DEBUG,
          "DEBUG": logging.DEBUG, "ERROR": logging.ERROR}
_rank = "-"
_handler: logging.Handler | None = None


def get(subsys: str) -> logging.Logger:
    if subsys not in SUBSYSTEMS:
        raise ValueError(f"unknown log subsystem {subsys!r}")
    return logging.getLogger(f"comms.{subsys.lower()}")


def set_rank(rank: int) -> None:
    """Tag later lines with this process's rank (the world rank of its first communicator)."""
    global _rank
    if _rank == "-":
        _rank = str(rank)


class _Format(logging.Formatter):
    host = socket.gethostname()

    def format(self, record: logging.LogRecord) -> str:
        subsys = record.name.split(".", 1)[1].upper() if "." in record.name else "-"
        level = {"WARNING": "WARN", "DEBUG": "TRACE"}.get(record.levelname, record.levelname)
        msg = record.getMessage()
        if msg.startswith("comms: "):
            msg = msg[len("comms: "):]
        return f"{self.host}:{os.getpid()} [{_rank}] comms {level} {subsys} {msg}"


class _Subsystems(logging.Filter):
    def __init__(self, wanted: set[str]):
        super().__init__()
        self.wanted = wanted

    def filter(self, record: logging.LogRecord) -> bool:
        subsys = record.name.split(".", 1)[1].upper() if "." in record.name else ""
        return "ALL" in self.wanted or subsys in self.wanted or record.levelno >= logging.WARNING


def setup() -> None:
    """Apply COMMS_DEBUG / COMMS_DEBUG_SUBSYS (called on import; idempotent)."""
    global _handler
    root = logging.getLogger("comms")
    level_name = str(config.get("DEBUG")).upper()
    if level_name not in LEVELS:
        raise ValueError(f"COMMS_DEBUG={level_name!r}: expected WARN, INFO or TRACE")
    root.setLevel(LEVELS[level_name])
    if config.PARAMS["DEBUG"].env not in os.environ or _handler is not None:
        return
    wanted = {s.strip().upper() for s in str(config.get("DEBUG_SUBSYS")).split(",") if s.strip()}
    unknown = wanted - set(SUBSYSTEMS) - {"ALL"}
    if unknown:
        raise ValueError(f"COMMS_DEBUG_SUBSYS: unknown subsystems {sorted(unknown)} (known: {', '.join(SUBSYSTEMS)})")
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(_Format())
    _handler.addFilter(_Subsystems(wanted))
    root.addHandler(_handler)
    root.propagate = False
