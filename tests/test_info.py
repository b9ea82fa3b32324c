"""python -m comms.info and the topology detector."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from comms.runtime.topology import parse_cpulist

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
    assert set(info["selection"]["all_reduce"].values()) <= set(info["algorithms"]["all_reduce"])
    assert "hierarchical" in info["algorithms"]["all_reduce"]
    topo = info["topology"]
    assert topo["size"] == 1 and len(topo["hosts"]) == 1 and topo["hosts"][0]["cores"] >= 1
    # every registered transport, in init's order, with the cost model's default figures
    from comms.transports import ORDER
    assert [t["name"] for t in info["transports_available"]] == [cls.name for cls in ORDER]
    for t, cls in zip(info["transports_available"], ORDER):
        assert t["link"] == {"alpha_us": cls.link.alpha_us, "beta_gbps": cls.link.beta_gbps, "burst_gbps": 0.0,
                             "each_us": 0.0, "op_us": 0.0}
        assert t["waits_together"] == cls.waits_together and isinstance(t["describe"], dict)
    assert info["route"] is None                      # one rank routes no pair (the launcher test sees one)
    assert set(info["cost_model"]["links"]) >= {cls.name for cls in ORDER}


def test_info_under_the_launcher_sees_the_group():
    env = dict(os.environ, COMMS_ALGO="all_reduce:0-1K:ring")
    out = subprocess.run([sys.executable, "-m", "comms.run", "-n", "3", "-m", "comms.info"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "[rank 0] 3 ranks on 1 host" in text and "ranks [0, 1, 2] (leader 0)" in text, text
    assert "1.5 ranks per core" in text or "ranks per core" in text
    assert "all_reduce:0-1024:ring  (user)" in text
    assert "# transports (tried in this order)" in text and "route: shm inside a host, tcp between hosts" in text
    cost_model = next(ln for ln in text.splitlines() if "# cost model (" in ln)
    assert "shm Link(alpha_us=" in cost_model and "tcp Link(alpha_us=" in cost_model, cost_model
    assert "[rank 1] #" not in text        # only rank 0 prints


def test_topology_with_emulated_hosts():
    from comms.testing import spawn
    from workers import topology_of
    out = spawn(topology_of, 4, timeout=60)
    topo = out[0]
    assert [h["ranks"] for h in topo["hosts"]] == [[0, 1], [2, 3]]
    assert [h["leader"] for h in topo["hosts"]] == [0, 2]
    assert topo["host_of"] == [0, 0, 1, 1] and topo["local_index"] == [0, 1, 0, 1]


def test_calibration_is_cached_and_shared(tmp_path):
    """The first init on a host signature measures the links (rank 0's figures, alike on every
    rank) with point-to-point messages only, caches them, and the next init reads them back;
    COMMS_CALIBRATE=0 prices with the transports' defaults."""
    from comms.selection.model import AUTO, Route
    from comms.testing import spawn
    from workers import calibrated_params
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    first = spawn(calibrated_params, 2, timeout=120, env=env)
    assert first[0] == first[1], "ranks must price alike"
    p = first[0]["params"]
    assert p["source"].startswith("calibrated") and 0.05 <= p["links"]["shm"]["alpha_us"] <= 1000
    assert p["links"]["shm"] != {"alpha_us": 1.5, "beta_gbps": 6.0}          # measured, not the default
    route = Route(*first[0]["route"])
    assert route[:3] == AUTO[:3]                         # one host: shm between the ranks, tcp were there two
    assert route.board == 4096                           # and the board (COMMS_SHM_BOARD_BYTES) for every rank
    cache = json.loads((tmp_path / "comms" / "calibration.json").read_text())
    assert list(cache) == [first[0]["signature"]] and cache[first[0]["signature"]]["source"] == p["source"]
    assert "1x2" in first[0]["signature"] and first[0]["tuned"] == ""
    # the measurements took no sequence numbers from the program: its first collective is 1
    assert first[0]["seq"] == 1 and first[0]["sum"] == [3.0] * 4
    again = spawn(calibrated_params, 2, timeout=120, env=env)
    assert again[0]["params"] == p                      # read back, not measured again
    off = spawn(calibrated_params, 2, timeout=120, env=dict(env, COMMS_CALIBRATE="0"))
    assert off[0]["params"]["source"] == "defaults" and off[0]["signature"] == ""
    assert any(r.startswith("all_reduce:0-") for r in off[0]["rules"])   # defaults written as rules


def test_spin_policy_counts_the_cores_of_the_whole_host(monkeypatch):
    """Ranks bound one core each (comms.run --bind) see one CPU apiece but are not oversubscribed."""
    from types import SimpleNamespace

    from comms.runtime.bootstrap import OVERSUBSCRIBED_POLLS, _host_cores, _spin_policy
    peer = lambda cpus: SimpleNamespace(extra={"topology": {"cpus": cpus}})   # noqa: E731
    assert _host_cores([peer([0]), peer([1])], 1) == 2
    assert _host_cores([peer([0]), peer([0])], 1) == 1                        # both bound to one core
    assert _host_cores([peer([0, 1]), SimpleNamespace(extra={})], 2) == 2     # a peer without facts: fallback
    # (fixed polls, yields, longest spin, shortest): ranks with a core each may spin longer and yield more
    own, shared = _spin_policy(2, _host_cores([peer([0]), peer([1])], 1)), _spin_policy(2, 1)
    assert own[2] > shared[2] and own[1] > shared[1]
    assert own[0] == 0 and shared[0] == OVERSUBSCRIBED_POLLS       # adaptive; polls once where they share
    monkeypatch.setenv("COMMS_SPIN", "7")                            # the user's count wins in both
    monkeypatch.setenv("COMMS_YIELDS", "5")
    assert [p[:2] for p in (_spin_policy(2, 2), _spin_policy(2, 1))] == [(7, 5), (7, 5)]


def test_cached_link_figures_that_no_longer_hold_are_measured_again(tmp_path):
    """The calibration cache's key does not see a link's shaping: at init, rank 0 and its peer
    between hosts check the cached bandwidth with a few 4 MiB ping-pongs, and figures off by more
    than LINK_DRIFT (here: a cache entry edited to a tenth of the drift below what was measured, as if
    taken on a throttled link) are measured again; figures that hold are kept as they are (within
    three inits: a loaded machine can move a loopback figure past the drift now and then, and a
    figure measured again is then what the next init compares with)."""
    from comms.selection.calibrate import LINK_DRIFT
    from comms.testing import spawn
    from workers import two_host_params
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    path = tmp_path / "comms" / "calibration.json"
    first = spawn(two_host_params, 2, timeout=120, env=env)[0]
    inter = first["route"][1]
    measured = first["params"]["links"][inter]["beta_gbps"]
    assert first["params"]["source"].startswith("calibrated") and first["sum"] == [3.0] * 4
    sources = [first["params"]["source"]]
    for _ in range(3):                                                 # the link holds: kept
        sources.append(spawn(two_host_params, 2, timeout=120, env=env)[0]["params"]["source"])
        if sources[-1] == sources[-2]:
            break
    assert sources[-1] == sources[-2], sources
    cache = json.loads(path.read_text())
    (sig, entry), = cache.items()
    measured = entry["links"][inter]["beta_gbps"]
    stale = round(measured / (10 * LINK_DRIFT), 4)
    entry["links"][inter]["beta_gbps"] = stale
    entry["source"] = "calibrated long ago"
    path.write_text(json.dumps(cache))
    third = spawn(two_host_params, 2, timeout=120, env=env)[0]
    assert third["params"]["source"].startswith("calibrated 2"), third["params"]["source"]
    assert third["params"]["links"][inter]["beta_gbps"] > stale * LINK_DRIFT
    assert json.loads(path.read_text())[sig]["source"] == third["params"]["source"]
