"""A hardened engine: no plan step and no message from the wire writes past a buffer.

* Plans are checked once, when encoded, against the lengths of the call's buffers
  (native/plan_check.c): hypothesis holds the checker to an independent model, and an encoded plan
  with a step past its buffer is refused with InvalidUsage. (tests/test_plans.py runs every
  algorithm's plans through the same check, comms.testing.simulate encodes them.)
* Early p2p messages are bounded before anything is allocated: per message and per peer, with an
  error naming the peer and the knob, end to end through COMMS_UNEXPECTED_MSG_BYTES.
* The wire fuzz tests (tests/fuzz_wire.py: malformed frames on a tcp channel, corrupted slots of a
  shm ring) run in a subprocess each, so that a crash fails the test, not the suite.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings, strategies as st

from comms.algorithms.plan import (BOARD, COPY, DIV, IN, OUT, PHASE, RECV, RECV_REDUCE, REDUCE, REDUCE_SLOTS, SCRATCH,
                                   SEND, Plan, Step)
from comms.errors import InvalidUsage, TransportError
from comms.runtime.native import E_INVALID, OK, PLAN_BAD_GATE, ffi, lib
from comms.runtime.engine import Encoded
from comms.testing import spawn
import fuzz_wire as fw
import hardening_workers as hw

HERE = os.path.dirname(os.path.abspath(__file__))
U64 = (1 << 64) - 1
KINDS = (SEND, RECV, RECV_REDUCE, COPY, REDUCE, REDUCE_SLOTS, DIV, PHASE, BOARD)


# ---- plan bounds -------------------------------------------------------------------------------
def fits(s: Step, lens: tuple, esz: int) -> bool:
    """The bounds rule of algorithms/plan.py, in Python's unbounded integers (no overflow to mind)."""
    if s.kind == PHASE or s.nbytes == 0:
        return True
    if not 0 <= s.buf < len(lens) or s.off + s.nbytes > lens[s.buf]:
        return False
    if s.kind in (RECV_REDUCE, REDUCE, REDUCE_SLOTS, DIV, BOARD) and s.nbytes % esz:
        return False
    if s.kind not in (COPY, REDUCE, REDUCE_SLOTS):
        return True
    if not 0 <= s.buf2 < len(lens):
        return False
    last = s.off2 + (s.peer - 1) * s.aux if s.kind == REDUCE_SLOTS else s.off2
    return (s.kind != REDUCE_SLOTS or s.peer >= 1) and s.off2 + s.nbytes <= lens[s.buf2] and \
        last + s.nbytes <= lens[s.buf2]


def gate_ok(plan: list[Step], i: int) -> bool:
    """The gate rule of algorithms/plan.py: a gated send names an earlier receive (from a named peer)
    of its very bytes, with only communication steps between the two."""
    s = plan[i]
    if s.kind != SEND or not s.aux:
        return True
    g = s.aux - 1
    if g >= i:
        return False
    gs = plan[g]
    return gs.kind in (RECV, RECV_REDUCE) and gs.peer >= 0 and (gs.buf, gs.off, gs.nbytes) == (s.buf, s.off, s.nbytes) \
        and all(p.kind in (SEND, RECV, RECV_REDUCE) for p in plan[g + 1:i])


def native_check(steps: list[Step], lens: tuple, dtype: int) -> tuple[int, int, int]:
    c = ffi.new("cm_step[]", max(1, len(steps)))
    for i, s in enumerate(steps):
        c[i].kind, c[i].peer, c[i].buf, c[i].buf2 = s.kind, s.peer, s.buf, s.buf2
        c[i].off, c[i].off2, c[i].nbytes, c[i].aux = s.off, s.off2, s.nbytes, s.aux
    fault = ffi.new("cm_plan_fault *")
    rc = lib.cm_plan_check(c, len(steps), ffi.new("uint64_t[3]", lens), 3, dtype, fault)
    return rc, fault.step, fault.reason


edge = st.one_of(st.integers(0, 96), st.sampled_from([U64, U64 - 3, 1 << 63, (1 << 32) + 8]))
steps = st.builds(Step, st.sampled_from(KINDS), st.integers(-1, 5), st.integers(-1, 3), edge, edge,
                  st.integers(-1, 3), edge, edge)


@settings(max_examples=400, deadline=None)
@given(st.lists(steps, min_size=1, max_size=4), st.tuples(*[st.integers(0, 96)] * 3), st.sampled_from([2, 4]))
def test_plan_check_agrees_with_the_bounds_rule(plan, lens, dtype):
    """The native checker refuses exactly the plans whose first bad step the model names."""
    esz = {2: 4, 4: 1}[dtype]                                    # CM_F32, CM_I8
    bad = next((i for i, s in enumerate(plan) if not (fits(s, lens, esz) and gate_ok(plan, i))), -1)
    rc, step, reason = native_check(plan, lens, dtype)
    assert (rc, step) == ((OK, -1) if bad < 0 else (E_INVALID, bad)), (plan, lens, reason)


def test_plan_check_edges():
    """Exactly at the end fits; one byte more, or offsets that wrap around 2^64, do not."""
    ok = native_check([Step(RECV, 1, OUT, 8, 8), Step(REDUCE_SLOTS, 3, OUT, 0, 8, SCRATCH, 4, 10)], (16, 16, 32), 2)
    assert ok[0] == OK
    assert native_check([Step(RECV, 1, OUT, 9, 8)], (16, 16, 0), 2)[:2] == (E_INVALID, 0)
    assert native_check([Step(SEND, 1, IN, U64 - 3, 8)], (16, 16, 0), 2)[:2] == (E_INVALID, 0)
    assert native_check([Step(REDUCE_SLOTS, 3, OUT, 0, 8, SCRATCH, 4, 11)], (16, 16, 32), 2)[0] == E_INVALID
    assert native_check([Step(REDUCE_SLOTS, 3, OUT, 0, 8, SCRATCH, 0, 1 << 63)], (16, 16, 32), 2)[0] == E_INVALID
    assert native_check([Step(RECV_REDUCE, 1, OUT, 0, 6)], (16, 16, 0), 2)[0] == E_INVALID   # 1.5 floats


def test_plan_check_gates():
    """A send may be gated only on an earlier receive of its very bytes in the same batch."""
    rr, rv = Step(RECV_REDUCE, 1, OUT, 0, 8), Step(RECV, 2, OUT, 8, 8)
    assert native_check([rr, Step(SEND, 1, IN, 8, 8), Step(SEND, 2, OUT, 0, 8, aux=1)], (16, 16, 0), 2)[0] == OK
    assert native_check([rv, Step(SEND, 1, OUT, 8, 8, aux=1)], (16, 16, 0), 2)[0] == OK
    bad = {"itself": [Step(SEND, 1, OUT, 0, 8, aux=1)],
           "a later step": [Step(SEND, 1, OUT, 0, 8, aux=2), rr],
           "a send": [Step(SEND, 1, OUT, 0, 8), Step(SEND, 2, OUT, 0, 8, aux=1)],
           "other bytes": [rr, Step(SEND, 1, OUT, 0, 4, aux=1)],
           "another buffer": [rr, Step(SEND, 1, SCRATCH, 0, 8, aux=1)],
           "any source": [Step(RECV, -1, OUT, 0, 8), Step(SEND, 1, OUT, 0, 8, aux=1)],
           "across a phase": [rr, Step(PHASE), Step(SEND, 1, OUT, 0, 8, aux=1)],
           "across a local step": [rr, Step(COPY, -1, SCRATCH, 0, 8, OUT, 0), Step(SEND, 1, OUT, 0, 8, aux=1)]}
    for why, plan in bad.items():
        rc, step, reason = native_check(plan, (16, 16, 16), 2)
        gated = next(i for i, s in enumerate(plan) if s.kind == SEND and s.aux)
        assert (rc, step, reason) == (E_INVALID, gated, PLAN_BAD_GATE), why
    with pytest.raises(InvalidUsage, match="step 2 .* is gated on no earlier receive of the same bytes"):
        Encoded(Plan("ring", tuple(bad["across a phase"])), "all_reduce", 1, 1, 2, 0, -1, 4, lens=(16, 16))


def test_encoded_plan_past_its_buffer_is_refused():
    plan = Plan("ring", (Step(SEND, 1, IN, 0, 16), Step(RECV, 1, OUT, 8, 16)))
    with pytest.raises(InvalidUsage) as e:
        Encoded(plan, "all_gather", 1, 4, 2, 0, -1, 4, lens=(16, 16))
    msg = str(e.value)
    assert "'ring'" in msg and "step 1" in msg and "[8, 24)" in msg and "output buffer, which holds 16 B" in msg, msg
    Encoded(plan, "all_gather", 1, 4, 2, 0, -1, 4, lens=(16, 24))       # long enough: accepted


# ---- early messages ----------------------------------------------------------------------------
def test_early_messages_are_bounded_per_peer():
    """Early messages of 1000 B from rank 1 under a 2500 B per-peer limit: the third fails the
    context before it is queued, with an error that names rank 1 and the knob."""
    eng = fw.Engine(0, 2, 0, 0, 0, 0, (1000, 2500))
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        assert lib.cm_ctx_add_tcp_peer(eng.ctx, 1, a.fileno(), 64) == 0
        a.detach()
        op = fw.Op("recv", 8, lib.CM_U8)
        early = dict(op.header(), tag=99, nbytes=1000)
        b.sendall((fw.pack(early) + bytes(1000)) * 3 + fw.pack(op.header()) + bytes(8))
        src, out, _ = fw.buffers(op, 0)
        err = fw.run(eng, op, src, out)
        assert isinstance(err, TransportError) and err.peer == 1, err
        assert "rank 1 sent a 1000 B message (tag 99)" in str(err) and "COMMS_UNEXPECTED_PEER_BYTES" in str(err), err
    finally:
        eng.close()
        b.close()


def test_early_messages_within_the_limits_are_kept():
    eng = fw.Engine(0, 2, 0, 0, 0, 0, (1000, 2500))
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        assert lib.cm_ctx_add_tcp_peer(eng.ctx, 1, a.fileno(), 64) == 0
        a.detach()
        op = fw.Op("recv", 8, lib.CM_U8)
        early = dict(op.header(), tag=99, nbytes=1000)
        b.sendall((fw.pack(early) + bytes(1000)) * 2 + fw.pack(op.header()) + b"12345678")
        src, out, _ = fw.buffers(op, 0)
        assert fw.run(eng, op, src, out) is None
        assert out[fw.GUARD:-fw.GUARD].tobytes() == b"12345678"
    finally:
        eng.close()
        b.close()


def test_unexpected_message_limit_reaches_the_native_context():
    """COMMS_UNEXPECTED_MSG_BYTES set for a job: a 4 KiB send that arrives before its receive fails
    the receiving rank with an error naming the sender and the knob."""
    out = spawn(hw.early_big_send, 2, timeout=60, env={"COMMS_UNEXPECTED_MSG_BYTES": "1K", "COMMS_CALIBRATE": "0"})
    name, msg, peer = out[0]
    assert name == "TransportError" and peer == 1, out
    assert "rank 1 sent a 4096 B message (tag 5)" in msg and "COMMS_UNEXPECTED_MSG_BYTES" in msg, msg


# ---- the wire, fuzzed (a subprocess each) ------------------------------------------------------
@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_fuzzed_channel_never_writes_past_a_buffer(transport):
    """Malformed frames (tcp) or corrupted slots (shm) end in a clear error naming the peer or in a
    correct completion: never a crash, a hang, or a write outside the destination."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, os.path.join(HERE, "fuzz_wire_cases.py"), transport],
                          capture_output=True, text=True, timeout=150)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"fuzz {transport} failed (exit {proc.returncode}):\n{out[-6000:]}"
    assert f"fuzz {transport}: " in out and "examples held" in out, out[-2000:]
    print(f"fuzz {transport}: {time.monotonic() - t0:.1f} s")
