"""All_reduce through the shm transport's board (algorithms/board.py, native/shm_board.c): slots in
the ranks' shared segments instead of messages, for small buffers on one host."""
from __future__ import annotations

import pytest

from comms.testing import spawn
from board_workers import across_a_sequence_reset, interleaved, mixed_kinds, same_bits_as_direct

ENV = {"COMMS_CALIBRATE": "0", "COMMS_ALGO": "all_reduce:0-4097:board"}


@pytest.mark.parametrize("how", ["broadcast", "count", "ring"])
def test_another_kind_of_collective_at_the_same_number_fails_every_rank_at_once(how):
    out = spawn(mixed_kinds, 3, timeout=60, args=(how,), env=ENV)
    for rank, o in enumerate(out):
        assert o["error"] in ("MismatchError", "PeerError"), (rank, o)
        assert o["seq"] == 4 and o["elapsed"] < 5, (rank, o)     # found by the board, not the 20 s deadline
    assert any(o["error"] == "MismatchError" for o in out), out


@pytest.mark.parametrize("size", [3])
def test_board_between_other_collectives_sync_and_async(size):
    out = spawn(interleaved, size, timeout=120, args=(150,), env=ENV)
    assert all(o["board"] for o in out)
    assert out[0]["stats"]["failed_plans"] == 0


def test_board_gives_the_bits_direct_gives():
    out = spawn(same_bits_as_direct, 3, timeout=60, env={"COMMS_CALIBRATE": "0"})
    for name in ("float32", "float16", "bfloat16"):
        assert out[0][name][:3] == ["board", "direct", True], (name, out[0][name][:3])
        assert len({o[name][3] for o in out}) == 1, f"{name}: ranks computed different bits"


def test_board_survives_the_sequence_reset_after_calibration():
    """The board counts collectives on its own clock: calibration's reset of the sequence numbers
    (to 0, after its probes) must neither stall a later board op (a slot waiting for a peer's
    `done` from before the reset) nor let it read a probe's stale slot."""
    out = spawn(across_a_sequence_reset, 3, timeout=60, env=ENV)
    want = [sum(r + k for r in range(3)) for k in range(20)] + \
        [sum(r * 10 + k for r in range(3)) for k, kind in enumerate("abbaaba") if kind == "a"]
    for o in out:
        assert o["sums"] == want and o["seq"] == 7, o
