"""The one Python module that imports the C core (``comms._native``, cffi API mode) and makes its calls.

Everything else reaches the core through here: ``ffi`` for the C types, a named function for each
native call (bound once to the cffi function itself, so a call through it costs no Python frame: the
per-call fast path ``call_run`` is as direct as ``lib.cm_call_run``), and the codes the core and
Python share (return codes, dtypes, reduction ops, plan steps, buffers, message kinds, plan faults,
limits), which are declared once, in native/_cdefs.h, and read here from the compiled module, so no
Python file copies a value by hand. Every call returns what the C function returns; return codes
become exceptions in :func:`check` (classes from comms.errors.error_class), or at the caller where
its message says more (a transport naming its peer). tests/test_native.py checks, by parsing the
sources, that no other module imports ``comms._native`` or reaches its ``lib``.
"""
from __future__ import annotations

import os

from .._native import ffi, lib

# return codes
OK, EAGAIN, EBUSY, ESLOW = lib.CM_OK, lib.CM_EAGAIN, lib.CM_EBUSY, lib.CM_ESLOW
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

# what cm_plan_check found wrong with a plan (cm_plan_fault.code); the unexpected-message limits' defaults
PLAN_BAD_KIND, PLAN_BAD_BUF, PLAN_BAD_SLOTS = lib.CM_PLAN_BAD_KIND, lib.CM_PLAN_BAD_BUF, lib.CM_PLAN_BAD_SLOTS
PLAN_BAD_GATE = lib.CM_PLAN_BAD_GATE
PLAN_PAST_BUF, PLAN_PAST_BUF2, PLAN_PART_ELEMENT = lib.CM_PLAN_PAST_BUF, lib.CM_PLAN_PAST_BUF2, lib.CM_PLAN_PART_ELEMENT
UNEXP_MSG_MIB, UNEXP_PEER_MIB = lib.CM_UNEXP_MSG_MIB, lib.CM_UNEXP_PEER_MIB


def check(rc: int, what: str, *, rank: int | None = None, peer: int | None = None) -> None:
    """Raise for a native return code other than OK: comms.errors.error_class(rc) with ``what``, the
    code's name and, for E_SYS, the errno (read right after the call, so call this at once)."""
    if rc == OK:
        return
    err = ffi.errno
    from .. import errors          # late: comms.errors reads the codes above from this module
    detail = errors.code_name(rc) + (f", errno {err} ({os.strerror(err)})" if rc == E_SYS else "")
    raise errors.error_class(rc)(f"{what}: {detail}", op=what.split(":")[0], rank=rank, peer=peer)


# The calls, named after their C functions less ``cm_`` (see native/_cdefs.h for each contract).
# A context (one per communicator: comms.runtime.engine) and its plans' execution
ctx_new, ctx_free, ctx_abort, ctx_revoke, ctx_kick = \
    lib.cm_ctx_new, lib.cm_ctx_free, lib.cm_ctx_abort, lib.cm_ctx_revoke, lib.cm_ctx_kick
ctx_seq, ctx_set_seq, ctx_set_trace, ctx_set_unexp_limits = \
    lib.cm_ctx_seq, lib.cm_ctx_set_seq, lib.cm_ctx_set_trace, lib.cm_ctx_set_unexp_limits
ctx_counters, ctx_transport_bytes, ctx_chan_transport = \
    lib.cm_ctx_counters, lib.cm_ctx_transport_bytes, lib.cm_ctx_chan_transport
ctx_flight_capacity, ctx_flight = lib.cm_ctx_flight_capacity, lib.cm_ctx_flight
ctx_try_enter, ctx_enter, ctx_leave = lib.cm_ctx_try_enter, lib.cm_ctx_enter, lib.cm_ctx_leave
plan_check = lib.cm_plan_check
exec_run, exec_start, exec_wait, exec_peer, exec_free, exec_op_times = \
    lib.cm_exec_run, lib.cm_exec_start, lib.cm_exec_wait, lib.cm_exec_peer, lib.cm_exec_free, lib.cm_exec_op_times
# the per-call fast path: a prepared cm_call on a cffi buffer, an address (torch) or a numpy array
call_run, call_run_addr, call_run_array = lib.cm_call_run, lib.cm_call_run_addr, lib.cm_call_run_array
call_run_pair, call_run_pair_addr = lib.cm_call_run_pair, lib.cm_call_run_pair_addr     # two-buffer plans
# torch's AllreduceOptions read from memory (comms.torch_backend.peek)
opts_peek, opts_layout = lib.cm_opts_peek, lib.cm_opts_layout
# a numpy array's data pointer read from its memory (comms.runtime.arrays)
array_layout, array_data = lib.cm_array_layout, lib.cm_array_data
# the wait policy's spin budget now (native/wait.c), and the engine's clock
spin_budget, spin_gap, now_ns = lib.cm_spin_budget, lib.cm_spin_gap, lib.cm_now_ns
# kernels
reduce, sum_rows = lib.cm_reduce, lib.cm_sum_rows
# transports: tcp sockets, shared-memory segments, RDMA (libfabric)
ctx_add_tcp_peer, ctx_set_tcp_delay = lib.cm_ctx_add_tcp_peer, lib.cm_ctx_set_tcp_delay
shm_segment_bytes, shm_create, shm_init_segment, shm_attach, shm_unlink, shm_unmap = \
    lib.cm_shm_segment_bytes, lib.cm_shm_create, lib.cm_shm_init_segment, lib.cm_shm_attach, lib.cm_shm_unlink, \
    lib.cm_shm_unmap
ctx_set_shm, ctx_add_shm_peer, window_map = lib.cm_ctx_set_shm, lib.cm_ctx_add_shm_peer, lib.cm_window_map
rdma_library, rdma_probe, rdma_open, rdma_add_peer = \
    lib.cm_rdma_library, lib.cm_rdma_probe, lib.cm_rdma_open, lib.cm_rdma_add_peer
rdma_pin, rdma_forget, rdma_mr_stats = lib.cm_rdma_pin, lib.cm_rdma_forget, lib.cm_rdma_mr_stats
# the flight recorder's SIGUSR1 flag (comms.diag.flight)
sigusr1_install, sigusr1_take = lib.cm_sigusr1_install, lib.cm_sigusr1_take
