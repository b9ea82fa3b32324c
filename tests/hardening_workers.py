"""Rank functions for tests/test_hardening.py (the end-to-end check of the early-message limit)."""
from __future__ import annotations

import numpy as np

import comms


def early_big_send(rank: int, size: int) -> tuple:
    """Rank 1 sends 4 KiB with tag 5 that rank 0 never posts a receive for; rank 0 waits for a
    message with tag 6 and must fail as the 4 KiB arrive (COMMS_UNEXPECTED_MSG_BYTES is 1K).
    Rank 1 then waits for a message rank 0 never sends, until rank 0's abort ends it."""
    comm = comms.init(timeout=20)
    try:
        if rank == 1:
            comm.send(np.ones(1024, np.float32), 0, tag=5)
        comm.recv(np.empty(2, np.float32), 1 - rank, tag=6)
        return ("completed", "", None)
    except comms.CommsError as e:
        return (type(e).__name__, str(e), e.peer)
    finally:
        comm.close()
