"""The control plane (pyzmq): failure detection and notices (plane), their wire format (wire), and
what a communicator does with them: revoke, shrink, grow and join (membership). Its knobs are
declared here, so that they are known (comms.info, overrides) before any plane starts."""
from __future__ import annotations

from .. import config

config.declare("CONTROL", bool, True, "Run the control plane (pyzmq): heartbeats between ranks, failure notices "
               "within seconds, revoke. Off: a dead peer is found by the transports (or at COMMS_TIMEOUT).")
config.declare("HEARTBEAT_MS", float, 200.0, "Period of the control plane's heartbeats (zmq's ZMTP PING).")
config.declare("HEARTBEAT_MISSES", int, 5, "Heartbeat periods without an answer before a peer is declared "
               "failed (with the defaults: 1 s, so every survivor knows within about 1.5 s).")
