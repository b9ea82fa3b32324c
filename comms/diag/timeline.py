"""Timelines: COMMS_TRACE=FILE writes a Chrome/Perfetto trace (chrome://tracing, ui.perfetto.dev).

One file per rank (``.rank<R>`` goes before the extension), written when the communicator
closes or the process exits. Each plan is a slice on the "collectives" track (name, sequence
number, algorithm, bytes, peers, transports); each message of the plan is a slice on the
"messages" track, from the moment it was posted to the moment it completed, with its peer,
transport and bytes. Times come from the native engine (CLOCK_MONOTONIC), so the slices of all
ranks on one host line up. Recording per-message times costs two clock reads per message, which
is why it is off unless COMMS_TRACE is set.
"""
from __future__ import annotations

import json
import os

from ..algorithms.plan import COMM_KINDS, STEP_NAMES

TRACK_COLL, TRACK_MSG = 0, 1


def path_for(template: str, rank: int) -> str:
    root, ext = os.path.splitext(template)
    return f"{root}.rank{rank}{ext or '.json'}"


class Timeline:
    def __init__(self, template: str, rank: int, transports: dict):
        self.path = path_for(template, rank)
        self.rank = rank
        self.transports = transports
        self.events: list[dict] = []

    def record(self, enc, seq: int, t0: int, t1: int, times: list[int], ok: bool) -> None:
        """One finished plan: ``times`` holds (posted, done) ns for each message step, in order."""
        comm_steps = [s for s in enc.plan.steps if s.kind in COMM_KINDS]
        peers = sorted({s.peer for s in comm_steps if s.peer >= 0})
        self.events.append({
            "name": enc.name, "ph": "X", "pid": self.rank, "tid": TRACK_COLL, "ts": t0 / 1e3,
            "dur": max(t1 - t0, 0) / 1e3,
            "args": {"seq": seq, "algorithm": enc.plan.algorithm, "ok": ok, "peers": peers,
                     "transports": sorted({self.transports.get(p, "?") for p in peers}),
                     "bytes_sent": sum(s.nbytes for s in comm_steps if STEP_NAMES[s.kind] == "send")},
        })
        for i, s in enumerate(comm_steps):
            if 2 * i + 1 >= len(times) or not times[2 * i]:
                break
            posted, done = times[2 * i], times[2 * i + 1] or t1
            self.events.append({
                "name": f"{STEP_NAMES[s.kind]} r{s.peer}", "ph": "X", "pid": self.rank, "tid": TRACK_MSG,
                "ts": posted / 1e3, "dur": max(done - posted, 0) / 1e3,
                "args": {"peer": s.peer, "bytes": s.nbytes, "transport": self.transports.get(s.peer, "?"),
                         "seq": seq},
            })

    def write(self) -> str:
        meta = [{"name": "process_name", "ph": "M", "pid": self.rank, "args": {"name": f"rank {self.rank}"}},
                {"name": "thread_name", "ph": "M", "pid": self.rank, "tid": TRACK_COLL, "args": {"name": "collectives"}},
                {"name": "thread_name", "ph": "M", "pid": self.rank, "tid": TRACK_MSG, "args": {"name": "messages"}}]
        d = os.path.dirname(self.path)
        if d:
            os.makedirs(d, exist_ok=True)
        with open(self.path, "w") as f:
            json.dump({"traceEvents": meta + self.events, "displayTimeUnit": "ms"}, f)
        return self.path
