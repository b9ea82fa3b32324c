"""The one Python module that imports the C core (``comms._native``, cffi API mode).

Everything else reaches the core through here: ``ffi`` and ``lib`` for the calls, and the codes
the core and Python share (return codes, dtypes, reduction ops, plan steps, buffers, message
kinds), which are declared once, in native/_cdefs.h, and read here from the compiled module, so
no Python file copies a value by hand. tests/test_native.py checks that no other module imports
``comms._native``. Return codes become exceptions in one function, comms.errors.error_class.
"""
from __future__ import annotations

from .._native import ffi, lib

# return codes
OK, EAGAIN = lib.CM_OK, lib.CM_EAGAIN
E_TIMEOUT, E_PEER_CLOSED, E_PEER_DEAD = lib.CM_E_TIMEOUT, lib.CM_E_PEER_CLOSED, lib.CM_E_PEER_DEAD
E_PEER_ABORTED, E_MISMATCH, E_TRUNCATE = lib.CM_E_PEER_ABORTED, lib.CM_E_MISMATCH, lib.CM_E_TRUNCATE
E_SYS, E_INVALID, E_NOMEM, E_ABORTED = lib.CM_E_SYS, lib.CM_E_INVALID, lib.CM_E_NOMEM, lib.CM_E_ABORTED
E_REVOKED, E_LIMIT = lib.CM_E_REVOKED, lib.CM_E_LIMIT

# dtypes, in code order, and the kernels' reduction ops
DTYPES = (lib.CM_F16, lib.CM_BF16, lib.CM_F32, lib.CM_F64, lib.CM_I8, lib.CM_U8, lib.CM_I32, lib.CM_I64,
          lib.CM_BOOL)
OPS = {"SUM": lib.CM_SUM, "PROD": lib.CM_PROD, "MIN": lib.CM_MIN, "MAX": lib.CM_MAX, "BAND": lib.CM_BAND,
       "BOR": lib.CM_BOR, "BXOR": lib.CM_BXOR}
assert DTYPES == tuple(range(lib.CM_NDTYPES)) and sorted(OPS.values()) == list(range(lib.CM_NOPS))

# plan steps, the buffers a step names, message kinds
STEPS = {"send": lib.CM_STEP_SEND, "recv": lib.CM_STEP_RECV, "recv_reduce": lib.CM_STEP_RECV_REDUCE,
         "copy": lib.CM_STEP_COPY, "reduce": lib.CM_STEP_REDUCE, "reduce_slots": lib.CM_STEP_REDUCE_SLOTS,
         "div": lib.CM_STEP_DIV, "phase": lib.CM_STEP_PHASE, "board": lib.CM_STEP_BOARD}
BUF_IN, BUF_OUT, BUF_SCRATCH = lib.CM_BUF_IN, lib.CM_BUF_OUT, lib.CM_BUF_SCRATCH
MSG_COLL, MSG_P2P = lib.CM_MSG_COLL, lib.CM_MSG_P2P

__all__ = ["ffi", "lib", "OK", "EAGAIN", "E_TIMEOUT", "E_PEER_CLOSED", "E_PEER_DEAD", "E_PEER_ABORTED",
           "E_MISMATCH", "E_TRUNCATE", "E_SYS", "E_INVALID", "E_NOMEM", "E_ABORTED", "E_REVOKED", "E_LIMIT", "DTYPES",
           "OPS", "STEPS",
           "BUF_IN", "BUF_OUT", "BUF_SCRATCH", "MSG_COLL", "MSG_P2P"]
