"""The synchronous all_reduce fast path: a numpy array or torch tensor whose (dtype, count, op) an
earlier call planned goes to the engine in one native call (comms.operations). These tests call
each shape repeatedly, so that every call after the first takes that path."""
from __future__ import annotations

import pytest

from comms.testing import spawn
from fast_workers import (another_thread_during_a_fast_call, fails_on_a_fast_shape, misuse_on_a_fast_shape,
                          other_collectives_repeated, repeated_calls, rules_change_between_fast_calls)

ENV = {"COMMS_CALIBRATE": "0"}     # the path does not depend on the cost model's figures


@pytest.mark.parametrize("size,count", [(2, 2), (4, 1000)])
def test_repeated_calls_match_the_reference_and_number_one_collective_each(size, count):
    out = spawn(repeated_calls, size, timeout=120, args=(count,), env=ENV)
    assert len({tuple(o["digests"]) for o in out}) == 1, "ranks computed different bits"
    for o in out:
        assert o["seq_steps"] == [1] * len(o["seq_steps"])
        assert o["fast_shapes"] > 0, "no shape reached the fast path"


@pytest.mark.parametrize("peek", [True, False])
def test_buffers_that_cannot_be_used_in_place_are_refused_on_a_fast_shape(peek):
    """With the array's fields read from its memory (comms.runtime.arrays) and with ffi.from_buffer."""
    out = spawn(misuse_on_a_fast_shape, 2, timeout=60, args=(peek,), env=ENV)
    for rank, o in enumerate(out):
        assert o["peek"] is peek
        assert "read-only" in o["errors"]["read-only"]
        assert "read-only" in o["errors"]["made read-only"]
        assert "not C-contiguous" in o["errors"]["strided"]
        assert "not contiguous" in o["errors"]["torch strided"]
        assert o["after"] == [3.0] * 4 and o["ro"] == [1.0] * 4 and o["late"] == [2.0] * 4


@pytest.mark.parametrize("size,use_torch", [(2, False), (3, False), (2, True)])
def test_other_collectives_take_the_fast_path_and_refuse_misuse(size, use_torch):
    """broadcast, all_gather, reduce_scatter and all_to_all of numpy arrays or torch tensors: repeated
    shapes go through one native call (cm_call_run_pair checks the buffers' aliasing) and give the
    expected results; on those shapes, arrays that do not fit the plan still get the checked path's errors."""
    out = spawn(other_collectives_repeated, size, timeout=120, args=(use_torch,), env=ENV)
    for rank, o in enumerate(out):
        assert o["seq_steps"] == [1] * len(o["seq_steps"])
        assert o["fast"] == sorted(["all_gather", "all_gather in place", "all_gather in place", "all_to_all",
                                    "broadcast", "broadcast", "reduce_scatter", "reduce_scatter in place"]), o["fast"]
        assert o["ro_input"] == [float(r) for r in range(size) for _ in range(3)]
        errors = o["errors"]
        assert "read-only" in errors["read-only output"]
        assert "overlaps the output" in errors["input elsewhere in the output"]
        assert "must not overlap" in errors["all_to_all in place"]
        assert "not C-contiguous" in errors["strided output"]
        assert "read-only" in errors["read-only broadcast"]
        assert o["after"] == [float(size)] * 3


def test_set_algo_between_calls_of_one_shape():
    out = spawn(rules_change_between_fast_calls, 3, timeout=60, env=ENV)
    for o in out:
        assert o == {"ring": ["ring", [6.0]], "direct": ["direct", [6.0]], "rhd": ["rhd", [6.0]]}


def test_mismatch_inside_a_fast_call_is_reported_on_every_rank():
    out = spawn(fails_on_a_fast_shape, 2, timeout=60, args=("mismatch",), env=ENV)
    for rank, o in enumerate(out):
        name, op, seq, who, peer = o["error"]
        assert name in ("MismatchError", "PeerError") and op == "all_reduce" and who == rank
        assert seq == o["expected_seq"], o
        assert o["next"] is not None


def test_timeout_inside_a_fast_call_names_the_operation_sequence_and_peer():
    out = spawn(fails_on_a_fast_shape, 2, timeout=60, args=("timeout",), env=ENV)
    name, op, seq, who, peer = out[0]["error"]
    assert (name, op, seq, who, peer) == ("CommTimeout", "all_reduce", out[0]["expected_seq"], 0, 1)
    assert out[0]["next"] is not None


def test_another_thread_waits_for_a_fast_call_to_leave_the_native_context():
    """The fast path takes the context's owner word in C, not the engine lock: a thread that takes
    the engine lock must still find the context busy until the call returns."""
    out = spawn(another_thread_during_a_fast_call, 2, timeout=60, args=("counters",), env=ENV)
    (t0, t1), (o0, o1) = out[0]["call"], out[0]["other"]
    assert out[0]["error"] is None and out[1]["error"] is None
    assert t1 - t0 > 0.4 and o0 < t1 <= o1, out[0]     # it asked during the call, got it after


def test_an_abort_from_another_thread_ends_a_fast_call_at_once():
    out = spawn(another_thread_during_a_fast_call, 2, timeout=60, args=("abort",), env=ENV)
    (t0, t1), (o0, o1) = out[0]["call"], out[0]["other"]
    name, msg = out[0]["error"]
    assert name == "TransportError" and "from another thread" in msg, out[0]   # (E_ABORTED's class)
    assert t1 - o0 < 0.3, out[0]                         # rank 1 arrives only 0.4 s after the abort
    assert out[1]["error"] == "PeerError", out[1]
