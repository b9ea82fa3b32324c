"""python -m comms.info and the topology detector."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from comms.topology import parse_cpulist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_cpulist():
    assert parse_cpulist("0-3,8,10-11") == [0, 1, 2, 3, 8, 10, 11]
    assert parse_cpulist("") == []


def test_info_single_process_json():
    env = dict(os.environ, COMMS_TIMEOUT="42")
    env.pop("RANK", None)
    out = subprocess.run([sys.executable, "-m", "comms.info", "--json"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    knobs = {c["name"]: c for c in info["config"]}
    assert knobs["COMMS_TIMEOUT"]["value"] == 42.0 and knobs["COMMS_TIMEOUT"]["source"] == "env"
    assert knobs["COMMS_TRANSPORT"]["source"] == "default"
    assert info["selection"]["all_reduce"]["8"] == "direct" and info["selection"]["all_reduce"]["8M"] == "ring"
    topo = info["topology"]
    assert topo["size"] == 1 and len(topo["hosts"]) == 1 and topo["hosts"][0]["cores"] >= 1


def test_info_under_the_launcher_sees_the_group():
    env = dict(os.environ, COMMS_ALGO="all_reduce:0-1K:ring")
    out = subprocess.run([sys.executable, "-m", "comms.run", "-n", "3", "-m", "comms.info"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "[rank 0] 3 ranks on 1 host" in text and "ranks [0, 1, 2] (leader 0)" in text, text
    assert "1.5 ranks per core" in text or "ranks per core" in text
    assert "all_reduce:0-1024:ring  (user)" in text
    assert "[rank 1] #" not in text        # only rank 0 prints


def test_topology_with_emulated_hosts():
    from comms.testing import spawn
    from workers import topology_of
    out = spawn(topology_of, 4, timeout=60)
    topo = out[0]
    assert [h["ranks"] for h in topo["hosts"]] == [[0, 1], [2, 3]]
    assert [h["leader"] for h in topo["hosts"]] == [0, 2]
    assert topo["host_of"] == [0, 0, 1, 1] and topo["local_index"] == [0, 1, 0, 1]
