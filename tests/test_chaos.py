"""Chaos, short: tests/chaos.py kills and stops ranks of a group running checked collectives, the
survivors shrink and go on, replacements join; and, across two simulated hosts (root only, as CI
runs), a host's link is cut. Every round must be survived, no result wrong, nothing leaked, and every
failure known within seconds (through the control plane, not at the ranks' COMMS_TIMEOUT of 120 s).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hostns import why_unavailable

CHAOS = Path(__file__).resolve().parent / "chaos.py"


def _chaos(tmp_path, *args: str) -> dict:
    out = tmp_path / "chaos.json"
    proc = subprocess.run([sys.executable, str(CHAOS), "--comms-timeout", "120", "--json", str(out), *args],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=220)
    assert out.exists(), proc.stdout[-4000:]
    summary = json.loads(out.read_text())
    assert summary["error"] is None, (summary["error"], proc.stdout[-4000:])
    return summary


def _check(s: dict, rounds: int) -> None:
    assert s["survived"] == rounds, s
    assert s["wrong"] == 0 and s["wrong_ops"] == [], s
    assert s["ops_checked"] >= 4 * rounds, s
    assert s["problems"] == [] and s["bad_exits"] == {}, s
    leaks = s["leaks"]
    assert leaks["shm_segments"] == [] and leaks["leftover_processes"] == [], leaks
    assert leaks["fds_end"] <= leaks["fds_start"], leaks
    assert s["detections"] >= rounds and s["detect_max_s"] < 20, s
    assert s["ok"], s


def test_chaos_kill_stop_and_grow_on_four_ranks(tmp_path):
    s = _chaos(tmp_path, "--ranks", "4", "--rounds", "6", "--seed", "7", "--kinds", "kill,stop")
    _check(s, 6)
    assert s["failures"] == {"kill": 3, "stop": 3}, s
    assert s["grows"] >= 2 and s["processes"] > 4, s      # replacements joined, and were hit in turn


@pytest.mark.skipif(why_unavailable() is not None, reason=str(why_unavailable()))
def test_chaos_across_two_simulated_hosts_with_a_link_cut(tmp_path):
    s = _chaos(tmp_path, "--hosts", "2", "--ranks-per-host", "2", "--rounds", "3", "--seed", "1",
               "--kinds", "cut,kill,stop")
    _check(s, 3)
    assert s["failures"] == {"cut": 1, "kill": 1, "stop": 1}, s
    assert s["grows"] >= 1, s
