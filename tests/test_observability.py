"""Flight recorder, its dumps, and the hang analysis (python -m comms.trace analyze)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from comms.testing import spawn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SKIPPER = """
import sys, time, numpy as np, comms
comm = comms.init(timeout=3)
x = np.ones(4, np.float32)
t0 = time.monotonic()
try:
    for i in range(3):
        if comm.rank == 2 and i == 1:
            continue                      # rank 2 skips one all_reduce ...
        comm.all_reduce(x)
    if comm.rank == 2:
        time.sleep(5)                     # ... and stays away past everyone's deadline
    comm.barrier()
    print("no error")
except comms.CommsError as e:
    print(f"ERROR {type(e).__name__} after {time.monotonic() - t0:.1f}s: {e}")
"""


def test_skipped_all_reduce_is_diagnosed(tmp_path):
    script = tmp_path / "skip.py"
    script.write_text(SKIPPER)
    dumps = tmp_path / "dumps"
    # direct: every rank exchanges with rank 2 itself, so every rank's own timeout names rank 2 (with
    # recursive doubling rank 1 would wait for rank 3, which waits for rank 2)
    env = dict(os.environ, COMMS_FLIGHT_DIR=str(dumps), COMMS_ALGO="all_reduce:direct")
    proc = subprocess.run([sys.executable, "-m", "comms.run", "-n", "4", "--timeout", "60", str(script)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr
    for r in range(4):
        line = next(l for l in out.splitlines() if l.startswith(f"[rank {r}] ERROR"))
        secs = float(line.split(" after ")[1].split("s:")[0])
        assert secs < 12, line
        if r != 2:
            assert "all_reduce (seq 3)" in line and "rank 2" in line, line
    assert any("timed out after 3 s waiting for rank 2" in l for l in out.splitlines()), out
    files = sorted(os.listdir(dumps))
    assert files == [f"comms_0.rank{r}.json" for r in range(4)], files
    doc = json.loads((dumps / "comms_0.rank0.json").read_text())
    assert [e["state"] for e in doc["entries"]] == ["done", "done", "failed"]
    assert doc["entries"][2]["op"] == "all_reduce" and doc["entries"][2]["peer"] in (1, 2, 3)   # 2, or whoever told first
    ana = subprocess.run([sys.executable, "-m", "comms.trace", "analyze", str(dumps)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert ana.returncode == 0, ana.stderr
    assert "diverge at collective seq 3" in ana.stdout and "suspect: rank 2" in ana.stdout, ana.stdout
    js = subprocess.run([sys.executable, "-m", "comms.trace", "analyze", str(dumps), "--json"], cwd=ROOT,
                        capture_output=True, text=True, timeout=60)
    assert json.loads(js.stdout)["comms/0/"]["culprits"] == [2]


def _hang_then_signal(rank, size, directory):
    import threading
    import numpy as np
    import comms
    comm = comms.init(timeout=20)
    comm.all_reduce(np.ones(2))
    if rank == 1:
        time.sleep(5)                     # never joins the second all_reduce
        return "slept"
    path = os.path.join(directory, "comms_0.rank0.json")
    seen = []
    threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGUSR1)).start()
    threading.Timer(1.5, lambda: seen.append(json.load(open(path))["reason"] if os.path.exists(path) else None)).start()
    try:
        comm.all_reduce(np.ones(2), timeout=3)     # blocked in native code when the signal comes
    except comms.CommTimeout:
        pass
    return seen + [json.load(open(path))["reason"]]


def test_sigusr1_dumps_while_blocked(tmp_path):
    out = spawn(_hang_then_signal, 2, timeout=60, args=(str(tmp_path),), env={"COMMS_FLIGHT_DIR": str(tmp_path)})
    assert out[1] == "slept"
    assert out[0][0] == "SIGUSR1"
    assert "timed out after 3 s waiting for rank 1" in out[0][1]


def _traced(rank, size):
    import numpy as np
    import comms
    with comms.init(timeout=20) as comm:
        comm.all_reduce(np.ones(1 << 16, np.float32))
        comm.broadcast(np.ones(10), root=1)
        w = comm.all_reduce(np.ones(8), async_op=True)
        w.wait()
        stats = comm.stats()
    return stats


def test_timeline_and_counters(tmp_path):
    # the ring is forced: the timed calibration may pick rhd, which moves the same halves at 2 ranks
    out = spawn(_traced, 2, timeout=60, env={"COMMS_ALGO": "all_reduce:ring", "COMMS_TRACE": str(tmp_path / "trace.json"),
                                             "COMMS_FLIGHT_DIR": str(tmp_path / "fr"), "COMMS_FLIGHT_AT_EXIT": "1"})
    for rank in range(2):     # dumped at close, as asked
        doc = json.loads((tmp_path / "fr" / f"comms_0.rank{rank}.json").read_text())
        assert doc["reason"] == "close" and [e["op"] for e in doc["entries"]] == ["all_reduce", "broadcast", "all_reduce"]
    for rank in range(2):
        doc = json.loads((tmp_path / f"trace.rank{rank}.json").read_text())
        colls = [e for e in doc["traceEvents"] if e.get("tid") == 0 and e["ph"] == "X"]
        msgs = [e for e in doc["traceEvents"] if e.get("tid") == 1 and e["ph"] == "X"]
        assert [e["name"] for e in colls] == ["all_reduce", "broadcast", "all_reduce"]
        assert colls[0]["args"]["algorithm"] == "ring" and colls[0]["args"]["transports"] == ["shm"]
        assert colls[0]["args"]["seq"] == 1 and colls[2]["args"]["seq"] == 3
        assert any(m["name"] == f"recv_reduce r{1 - rank}" and m["args"]["bytes"] == 1 << 17 for m in msgs)
        assert all(m["args"]["transport"] == "shm" and m["dur"] >= 0 for m in msgs)
        st = out[rank]
        assert st["plans"] == 3 and st["failed_plans"] == 0 and st["busy_ns"] > 0
        assert st["shm_tx_bytes"] >= (1 << 17) + 8 * 8


def test_debug_logging_is_tagged_and_filtered(tmp_path):
    script = tmp_path / "job.py"
    script.write_text("import numpy as np, comms\nc = comms.init(timeout=20)\nc.all_reduce(np.ones(4))\nc.close()\n")
    def run(**env):
        e = dict(os.environ, **env)
        return subprocess.run([sys.executable, "-m", "comms.run", "-n", "2", str(script)], cwd=ROOT, env=e,
                              capture_output=True, text=True, timeout=120)
    info = run(COMMS_DEBUG="INFO", COMMS_DEBUG_SUBSYS="INIT")
    assert info.returncode == 0, info.stderr
    lines = [l for l in info.stderr.splitlines() if " comms INFO INIT " in l]
    assert any("[1] comms INFO INIT rank 1 of 2" in l and "local ranks [0, 1]" in l for l in lines), info.stderr
    assert any("transports: shm to ranks [0]" in l for l in lines), info.stderr
    other = run(COMMS_DEBUG="INFO", COMMS_DEBUG_SUBSYS="COLL")
    assert other.returncode == 0 and " INIT " not in other.stderr, other.stderr
    quiet = run()
    assert "comms INFO" not in quiet.stderr
    bad = run(COMMS_DEBUG="LOUD")
    assert bad.returncode != 0 and "COMMS_DEBUG='LOUD'" in bad.stderr
