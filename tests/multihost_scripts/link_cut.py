"""A link cut between two simulated hosts (run by tests/test_multihost.py under torchrun).

Every rank runs all_reduces across the hosts, writes ``ready.<rank>`` into $CUT_DIR once they
work, and goes on until one fails. The test then takes the link down (and up again once every
rank wrote ``cut.<rank>``, so that the agents can finish). Each rank prints one line:
``CUT rank=R at=<wall clock of the error> name=<class> failed=<ranks> msg=<message>``.
"""
from __future__ import annotations

import os
import time

import numpy as np

import comms


def main() -> None:
    comm = comms.init()
    x = np.ones(256, np.float32)
    comm.all_reduce(x)
    open(os.path.join(os.environ["CUT_DIR"], f"ready.{comm.rank}"), "w").close()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            comm.all_reduce(x)
        except comms.CommsError as e:
            failed = ",".join(map(str, getattr(e, "failed", ())))
            line = (f"CUT rank={comm.rank} at={time.time():.3f} name={type(e).__name__} failed={failed} "
                    f"msg={str(e).replace(chr(10), ' ')}\n")
            os.write(1, line.encode())          # one write: the other ranks' lines share the pipe
            open(os.path.join(os.environ["CUT_DIR"], f"cut.{comm.rank}"), "w").close()
            break
        time.sleep(0.005)
    comm.close()


if __name__ == "__main__":
    main()
