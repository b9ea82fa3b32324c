"""Several hosts simulated on this machine (tests/multihost.py): collectives across hosts (over tcp,
and over rdma on libfabric's tcp provider), torchrun with c10d rendezvous running the DDP example,
MoE dispatch/combine over rdma, teardown and crash recovery, the link limiter, large point-to-point
messages over TCP, and the TCP point-to-point benchmark (bench.tcp_p2p) end to end.

Needs root (network, IPC, mount and UTS namespaces, tc); skipped otherwise. CI runs as root.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from hostns import parse_rate, why_unavailable
from multihost import SimulatedHosts
from netns import alive, cleanup_stale, netns_pids, ours

pytestmark = pytest.mark.skipif(why_unavailable() is not None, reason=str(why_unavailable()))

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCRIPTS = HERE / "multihost_scripts"
MiB = 1 << 20


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], stdout=subprocess.PIPE, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def _mine(sim: SimulatedHosts) -> list[str]:
    return [n for n in ours() if n in sim.namespaces]


def _wait_for(cond, timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < end, "timed out waiting for a process to enter its namespace"
        time.sleep(0.01)


# between the simulated hosts: tcp by default, or rdma on libfabric's tcp provider (shm stays inside a host)
ACROSS = {"tcp": {}, "rdma": {"COMMS_TRANSPORT": "shm,rdma", "FI_PROVIDER": "tcp"}}


@pytest.mark.parametrize("across", ["tcp", "rdma"])
def test_every_collective_across_two_hosts(across):
    """run_cases on 2 hosts x 2 ranks: shm inside a host, tcp or rdma across, same bits everywhere."""
    links = _root_links()
    with SimulatedHosts(hosts=2, ranks_per_host=2) as sim:
        results = sim.torchrun(str(SCRIPTS / "collectives.py"), "4242", "32", timeout=150,
                               env={**ACROSS[across], "MULTIHOST_ACROSS": across})
        report = sim.report(results)
        assert all(r.ok for r in results), report
    assert not _mine(sim), "namespaces left behind"
    assert _root_links() == links, "the root namespace's interfaces changed"
    seen, digests = {}, set()
    for r in results:
        for line in r.lines():
            if line.startswith("MULTIHOST-OK"):
                f = dict(kv.split("=", 1) for kv in line.split()[1:])
                seen[int(f["rank"])] = f
                assert f["host"] == f"host{r.host}", report        # static rendezvous: node rank = host index
                digests.add(f["digest"])
    assert sorted(seen) == [0, 1, 2, 3], report
    assert len(digests) == 1, report
    for rank, f in seen.items():
        mates = [rank - rank % 2, rank - rank % 2 + 1]
        assert f["local"] == f"{mates[0]},{mates[1]}", report
        want = ",".join(f"{p}:{'shm' if p in mates else across}" for p in range(4) if p != rank)
        assert f["transports"] == want, report
        assert f["topology_hosts"] in ("2", "n/a"), report      # n/a: this comms has no comm.topology


@pytest.mark.parametrize("across", ["tcp", "rdma"])
def test_torchrun_c10d_runs_ddp_example_across_hosts(across):
    """torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d, DDP over the "comms" backend."""
    example = ROOT / "examples" / "ddp_train.py"
    assert example.exists(), f"{example} is missing"
    with SimulatedHosts(hosts=2, ranks_per_host=2) as sim:
        results = sim.torchrun(str(example), "--epochs", "2", rdzv="c10d", timeout=150,
                               env={"COMMS_DEBUG": "INFO", "COMMS_DEBUG_SUBSYS": "INIT", **ACROSS[across]})
        report = sim.report(results)
        assert all(r.ok for r in results), report
    assert not _mine(sim)
    out = "\n".join(r.output for r in results)
    assert "parameters in sync on 4 ranks: True" in out, report
    # the process group really is comms, spread over both hosts: shm to the neighbour, tcp to the others
    for r in results:
        ranks = set()
        for m in re.finditer(r"host(\d):\d+ \[(\d)\] .*rank \d transports: (.*)", r.output):
            assert m.group(1) == str(r.host), report
            rank = int(m.group(2))
            ranks.add(rank)
            by = dict(re.fullmatch(r"(\w+) to ranks \[(.*)\]", part.strip()).groups() for part in m.group(3).split(";"))
            mate = rank ^ 1                                  # c10d numbers the ranks of a node consecutively
            assert by == {"shm": str(mate), across: ", ".join(str(p) for p in range(4) if p not in (rank, mate))}, report
        assert len(ranks) == 2, report


def test_moe_dispatch_combine_across_two_hosts_over_rdma():
    """Hierarchical and flat dispatch/combine (normal and low-latency) between 2 hosts x 2 ranks,
    rdma between the hosts: right rows and sums, and the tokens crossed over rdma."""
    with SimulatedHosts(hosts=2, ranks_per_host=2) as sim:
        results = sim.torchrun(str(SCRIPTS / "moe.py"), "rdma", timeout=180, env=ACROSS["rdma"])
        report = sim.report(results)
        assert all(r.ok for r in results), report
    assert not _mine(sim)
    oks = [ln for r in results for ln in r.lines() if ln.startswith("MULTIHOST-MOE-OK")]
    assert sorted(int(ln.split()[1].split("=")[1]) for ln in oks) == [0, 1, 2, 3], report


def test_three_hosts_on_a_bridge_are_separate_hosts():
    """More than two hosts: a bridge in a switch namespace; each host its own IPC ns, /dev/shm, name."""
    with SimulatedHosts(hosts=3, ranks_per_host=1) as sim:
        assert sim.switch in ours()
        results = sim.run([[sys.executable, str(SCRIPTS / "mesh.py")]] * 3, timeout=60)
        report = sim.report(results)
        assert all(r.ok for r in results), report
    lines = [next(ln for ln in r.lines() if ln.startswith("MESH")) for r in results]
    fields = [dict(kv.split("=", 1) for kv in ln.split()[1:]) for ln in lines]
    assert [f["host"] for f in fields] == ["host0", "host1", "host2"], report
    assert len({f["ipc"] for f in fields}) == 3 and len({f["shm"] for f in fields}) == 3, report
    for i, f in enumerate(fields):
        assert f["heard"] == ",".join(f"host{j}" for j in range(3) if j != i), report
    assert not _mine(sim)


def test_teardown_leaves_nothing_and_a_crashed_run_is_cleaned_up():
    # a crashed earlier run: its namespace (with a veth pair and a live process) and run directory
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"cmh{dead.pid}h0"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    subprocess.run(["ip", "-n", stale, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"], check=True)
    orphan = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "600"], start_new_session=True)
    stale_dir = Path(tempfile.mkdtemp(prefix=f"cmh{dead.pid}."))
    (stale_dir / "owner").write_text(f"{dead.pid}\n")
    _wait_for(lambda: orphan.pid in netns_pids(stale))
    links = _root_links()
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with SimulatedHosts(hosts=2, ranks_per_host=1) as sim:
                assert stale not in ours(), "the crashed run's namespace survived"
                assert orphan.wait(10) == -9
                assert not stale_dir.exists()
                assert sorted(_mine(sim)) == sorted(sim.netns)
                # a run past its deadline is killed, including a process that left the agent's session
                res = sim.run([["sh", "-c", "setsid sleep 600 & echo up; sleep 600"]] * 2, timeout=2)
                assert all(r.timed_out and r.killed and not r.ok for r in res), sim.report(res)
                assert all("up" in r.lines() for r in res), sim.report(res)
                # processes still running when the with-block fails are killed too
                live = [subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "600"], start_new_session=True)
                        for ns in sim.netns]
                _wait_for(lambda: all(p.pid in netns_pids(ns) for p, ns in zip(live, sim.netns)))
                inside = [p for ns in sim.netns for p in netns_pids(ns)]
                raise RuntimeError("boom")
        assert [p.wait(10) for p in live] == [-9, -9]
        assert not [p for p in inside if alive(p)], "processes of the simulated hosts survived the teardown"
        assert not _mine(sim), "namespaces left behind"
        assert sim.rundir is None
        assert not any(netns_pids(ns) for ns in sim.namespaces)
        assert _root_links() == links, "the root namespace's interfaces changed"
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()
        if stale in ours():
            cleanup_stale()


def test_rate_limit_slows_a_16mib_all_reduce_across_hosts():
    """At 200 Mbit/s an all_reduce of 16 MiB between two hosts must move >= 16 MiB each way."""
    rate = "200mbit"
    size = 16 * MiB
    floor = size * 8 / parse_rate(rate)            # 0.67 s: the least any algorithm needs on this link
    with SimulatedHosts(hosts=2, ranks_per_host=2, rate=rate) as sim:
        results = sim.torchrun(str(SCRIPTS / "hier_bench.py"), "--size", "16M", "--warmup", "1", "--iters", "3",
                               timeout=150, env={"COMMS_ALGO": "all_reduce:ring"})
        report = sim.report(results)
        assert all(r.ok for r in results), report
        sent = sim.link_bytes()
    assert len(sent) == 2 and all(b >= 4 * size for b in sent.values()), f"{sent}\n{report}"   # 4 reductions
    m = re.search(r"median ([0-9.]+) ms", results[0].output)
    assert m, report
    median = float(m.group(1)) / 1e3
    assert 0.8 * floor <= median <= 15 * floor, f"median {median:.3f} s, link floor {floor:.3f} s\n{report}"


def test_large_p2p_messages_over_tcp_in_every_arrival_order():
    """Large send/recv across hosts: receives posted before, after, long after and while the message
    arrives, a collective behind an early message, any source, and a deadline passing mid-transfer."""
    with SimulatedHosts(hosts=2, ranks_per_host=1, rate="1gbit") as sim:
        results = sim.torchrun(str(SCRIPTS / "p2p_edges.py"), timeout=180)
        report = sim.report(results)
        assert all(r.ok for r in results), report
    assert not _mine(sim)
    m = re.search(r"P2P-EDGES-OK timeout_after=([0-9.]+)", results[1].output)
    assert m and "P2P-EDGES-SENT" in results[0].output, report
    assert 0.45 <= float(m.group(1)) <= 2.0, report


@pytest.mark.skipif(shutil.which("iperf3") is None,
                    reason="iperf3 is not installed (.ci/setup.sh installs it when run as root)")
def test_tcp_p2p_bench_runs_end_to_end(tmp_path):
    """python -m bench.tcp_p2p, one short round: the table, the JSON, iperf3 and comms both measured
    over tcp (no timing assertion: the bar is checked by running the bench, see bench/README.md)."""
    out_json = tmp_path / "p2p.json"
    proc = subprocess.Popen([sys.executable, "-m", "bench.tcp_p2p", "--rounds", "1", "--time", "1", "--size", "4M",
                             "--json", str(out_json)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        out, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.terminate()                 # the bench tears its hosts down on SIGTERM
        out, _ = proc.communicate(timeout=30)
        pytest.fail(f"bench.tcp_p2p ran past 180 s:\n{out}")
    assert proc.returncode == 0, out
    assert re.search(r"^\s+0\s+[0-9.]+\s+[0-9.]+\s+[0-9.]+\s+\d+/\d+$", out, re.M), out
    assert re.search(r"^# median ratio [0-9.]+: (meets|misses) the bar", out, re.M), out
    doc = json.loads(out_json.read_text())
    assert doc["schema"] == "comms-tcp-p2p/1" and doc["bar"] == 0.9, doc
    assert doc["options"]["rounds"] == 1 and doc["options"]["size"] == 4 * MiB, doc
    (rnd,) = doc["rounds"]
    assert rnd["iperf3_gbps"] > 0 and rnd["comms_gbps"] > 0, rnd
    assert rnd["ratio"] == pytest.approx(rnd["comms_gbps"] / rnd["iperf3_gbps"]), rnd
    assert rnd["comms"]["transport"] == "tcp" and rnd["comms"]["message_bytes"] == 4 * MiB, rnd
    assert rnd["comms"]["bytes"] == (rnd["comms"]["messages"] - 1) * 4 * MiB > 0, rnd
    assert rnd["comms"]["retransmits"] >= 0 and rnd["iperf3"]["retransmits"] >= 0, rnd
    assert doc["median"]["ratio"] == pytest.approx(rnd["ratio"]) and doc["meets_bar"] == (rnd["ratio"] >= 0.9), doc
    assert not [n for n in ours() if n.startswith(f"cmh{proc.pid}")], "the bench left namespaces behind"


@pytest.mark.skipif(shutil.which("fi_pingpong") is None,
                    reason="fi_pingpong is not installed (.ci/setup.sh installs libfabric-bin when run as root)")
def test_rdma_p2p_bench_runs_end_to_end(tmp_path):
    """python -m bench.rdma_p2p, one short round: fi_pingpong and comms over rdma both measured at
    every size, the rows, the verdict lines and the JSON (no timing assertion: see bench/README.md)."""
    out_json = tmp_path / "rdma.json"
    proc = subprocess.run([sys.executable, "-m", "bench.rdma_p2p", "--rounds", "1", "--sizes", "8,2M",
                           "--iters-scale", "0.05", "--json", str(out_json)], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=240)
    out = proc.stdout
    assert proc.returncode == 0, out
    assert len(re.findall(r"^\s+0\s+(8|2097152)\s+[0-9.]+\s+[0-9.]+\s+[0-9.]+\s+[0-9.]+\s+[0-9.]+ (latency|bandwidth)",
                          out, re.M)) == 2, out
    assert re.search(r"^# 8 B: median latency ratio [0-9.]+ .*(meets|misses) the bar", out, re.M), out
    assert re.search(r"^# 2097152 B: median bandwidth ratio [0-9.]+ .*(meets|misses) the bar", out, re.M), out
    doc = json.loads(out_json.read_text())
    assert doc["schema"] == "comms-rdma-p2p/1" and doc["bars"] == {"bandwidth": 0.8, "latency": 1.5}, doc
    for r in doc["rounds"]:
        assert r["comms"]["transport"] == "rdma" and r["comms"]["usec"] > 0 and r["fi_pingpong"]["usec"] > 0, r
    assert doc["rounds"][-1]["stats"]["rdma_tx_bytes"] > 0, doc["rounds"][-1]
    assert not ours(), "the bench left namespaces behind"


def test_main_bench_across_simulated_hosts(tmp_path):
    """python -m bench --hosts 2 --ranks 1: comms over rdma, and Gloo, across the hosts (MPI is not
    run there, and says so)."""
    out_json = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--hosts", "2", "--ranks", "1", "--backends",
                           "comms@COMMS_TRANSPORT=rdma@FI_PROVIDER=tcp,gloo,mpi", "-b", "8", "-e", "64K",
                           "-f", "8192", "--launches", "1", "-n", "5", "-w", "1", "--json", str(out_json)],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240,
                          env={**os.environ, "COMMS_CALIBRATE": "0"})
    out = proc.stdout
    assert proc.returncode == 0, out
    assert "mpi: not run across simulated hosts" in out, out
    doc = json.loads(out_json.read_text())
    rows = [r for r in doc["rows"] if r["place"] == "in"]
    seen = {(r["backend"], r["bytes"]): r["transport"] for r in rows}
    assert seen == {("comms@COMMS_TRANSPORT=rdma@FI_PROVIDER=tcp", 8): "rdma",
                    ("comms@COMMS_TRANSPORT=rdma@FI_PROVIDER=tcp", 65536): "rdma",
                    ("gloo", 8): "tcp", ("gloo", 65536): "tcp"}, out
    assert all(r["wrong"] == 0 for r in rows), out


def test_a_cut_link_is_known_on_both_sides_within_seconds(tmp_path):
    """2 hosts x 2 ranks at COMMS_TIMEOUT=300: once the ranks work, the veth goes down. No process
    dies and no connection closes; the control plane's heartbeats stop, and every rank raises
    PeerError naming the two ranks on the other side, within seconds of the cut."""
    import threading
    with SimulatedHosts(hosts=2, ranks_per_host=2) as sim:
        box = {}
        job = threading.Thread(target=lambda: box.update(results=sim.torchrun(
            str(SCRIPTS / "link_cut.py"), timeout=150, env={"CUT_DIR": str(tmp_path), "COMMS_TIMEOUT": "300"})))
        job.start()
        _wait_for(lambda: len(list(tmp_path.glob("ready.*"))) == 4 or not job.is_alive(), timeout_s=120)
        assert job.is_alive(), sim.report(box.get("results", []))
        cut = time.time()
        subprocess.run(["ip", "-n", sim.netns[0], "link", "set", "eth0", "down"], check=True)
        _wait_for(lambda: len(list(tmp_path.glob("cut.*"))) == 4 or not job.is_alive(), timeout_s=60)
        subprocess.run(["ip", "-n", sim.netns[0], "link", "set", "eth0", "up"], check=True)   # the agents' exit
        job.join(200)
        results = box["results"]
        report = sim.report(results)
    lines = [ln for r in results for ln in r.lines() if "CUT rank=" in ln]
    seen = {}
    for ln in lines:
        f = dict(kv.split("=", 1) for kv in ln[ln.index("CUT ") + 4:].split(" msg=")[0].split())
        seen[int(f["rank"])] = (f, ln)
    assert sorted(seen) == [0, 1, 2, 3], report
    for rank, (f, ln) in seen.items():
        other = {"0": "2,3", "1": "2,3", "2": "0,1", "3": "0,1"}[str(rank)]
        # the failures known when the call raised: the other host's ranks (one may be declared a
        # moment after the other)
        assert f["name"] == "PeerError" and f["failed"] and set(f["failed"].split(",")) <= set(other.split(",")), ln
        assert "control connection was lost" in ln, ln
        assert float(f["at"]) - cut < 10, ln          # heartbeat timeout (1 s), not COMMS_TIMEOUT (300 s)
