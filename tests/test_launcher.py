"""Tests of the single-host launcher (``python -m comms.run``) and ``comms.testing.spawn``.

Neither needs the native extension. If ``import comms`` fails (``comms/__init__.py`` imports the
native extension and it is not built), the launcher is run through a stub ``comms`` package so
that only ``comms/launch/run.py`` and ``comms/runtime/cleanup.py`` are loaded, and the spawn tests are skipped
(the spawned ranks must import ``comms.testing``). Child programs live in ``launcher_scripts/``.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "launcher_scripts"

_STUB_RUNNER = (
    "import sys, types; pkg = types.ModuleType('comms'); pkg.__path__ = [sys.argv.pop(1)]; "
    "sys.modules['comms'] = pkg; import runpy; runpy.run_module('comms.run', run_name='__main__', "
    "alter_sys=True)")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


@lru_cache(maxsize=None)
def _comms_importable() -> str | None:
    """None if ``import comms`` works in a fresh interpreter, else its error text."""
    probe = subprocess.run([sys.executable, "-c", "import comms"], env=_env(), cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    return None if probe.returncode == 0 else (probe.stderr.strip().splitlines() or ["?"])[-1]


def _launcher() -> list[str]:
    if _comms_importable() is None:
        return [sys.executable, "-m", "comms.run"]
    return [sys.executable, "-c", _STUB_RUNNER, str(ROOT / "comms")]


def launch(args: list[str], timeout: float = 60, cwd: Path = ROOT) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = subprocess.run([*_launcher(), *args], env=_env(), cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    return proc, time.monotonic() - t0


def _alive(pid: int) -> bool:
    """True if ``pid`` runs (zombies, which may linger in containers, count as dead)."""
    from comms.runtime.cleanup import pid_alive
    return pid_alive(pid)


def _pids(d: Path) -> dict[str, int]:
    return {p.name: int(p.read_text()) for p in d.glob("*.pid")}


def _assert_all_dead(pids: dict[str, int]) -> None:
    end = time.monotonic() + 2.0  # a killed grandchild is reaped asynchronously
    while time.monotonic() < end and any(_alive(p) for p in pids.values()):
        time.sleep(0.05)
    assert not {n: p for n, p in pids.items() if _alive(p)}, "processes left alive"


# ------------------------------------------------------------------------------------- launcher

def _run_module():
    """``comms.launch.run``, or (when ``import comms`` fails) comms/launch/run.py loaded as a standalone
    module."""
    if _comms_importable() is None:
        import comms.launch.run
        return comms.launch.run
    import importlib.util
    spec = importlib.util.spec_from_file_location("_comms_run_standalone", ROOT / "comms" / "launch" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parse_args_splits_launcher_options_from_program():
    parse_args = _run_module().parse_args
    ns, cmd = parse_args(["-n", "4", "--timeout", "2.5", "prog.py", "-n", "x", "--timeout"])
    assert (ns.nproc, ns.timeout, ns.master_port, cmd) == (4, 2.5, 0, ["prog.py", "-n", "x", "--timeout"])
    ns, cmd = parse_args(["--nproc=2", "--master-port", "1234", "-m", "bench", "--size", "1M"])
    assert (ns.nproc, ns.master_port, cmd) == (2, 1234, ["-m", "bench", "--size", "1M"])
    for bad in (["-n", "2"], ["prog.py"], ["-n", "0", "prog.py"], ["-n", "2", "-m"]):
        with pytest.raises(SystemExit) as e:
            parse_args(bad)
        assert e.value.code == 2


def test_launcher_success_prefixes_env_and_store():
    proc, _ = launch(["-n", "2", str(SCRIPTS / "store_ok.py"), "a b", "--pg"])
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    for r in range(2):
        assert (f"[rank {r}] env RANK={r} WORLD_SIZE=2 LOCAL_RANK={r} LOCAL_WORLD_SIZE=2 "
                f"GROUP_RANK=0 args=['a b', '--pg']") in out
        assert f"[rank {r}] store value0,value1" in out
        assert f"[rank {r}] allreduce 3" in out  # init_process_group(env://) uses the launcher's store
        assert f"[rank {r}] no newline at end" in out
        assert f"[rank {r}] to stderr from {r}" in proc.stderr.splitlines()
    assert all(line.startswith(("[rank 0] ", "[rank 1] ")) for line in out)


def _affinities(out: str) -> dict[int, tuple[str, str, str]]:
    rows = {}
    for line in out.splitlines():
        if "affinity rank=" in line:
            f = dict(kv.split("=", 1) for kv in line.split("affinity ", 1)[1].split())
            rows[int(f["rank"])] = (f["cpus"], f["thread"], f["bound"])
    return rows


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs at least 2 usable CPUs")
def test_launcher_binds_one_core_per_rank_when_they_fit():
    cpus = sorted(os.sched_getaffinity(0))
    proc, _ = launch(["-n", "2", str(SCRIPTS / "affinity.py")])
    assert proc.returncode == 0, proc.stderr
    rows = _affinities(proc.stdout)
    assert sorted(rows) == [0, 1], proc.stdout
    mine = [rows[r][0] for r in (0, 1)]
    assert len(set(mine)) == 2 and all(m.isdigit() and int(m) in cpus for m in mine), rows   # one CPU each, distinct
    for r, (main, thread, bound) in rows.items():
        assert thread == main and bound == main, rows            # later threads inherit; the env says so


def test_launcher_bind_none_leaves_ranks_unbound_and_oversubscribed_ranks_are_spread():
    cpus = sorted(os.sched_getaffinity(0))
    every = ",".join(map(str, cpus))
    proc, _ = launch(["-n", "2", "--bind", "none", str(SCRIPTS / "affinity.py")])
    assert proc.returncode == 0, proc.stderr
    assert {v for v in _affinities(proc.stdout).values()} == {(every, every, "")}, proc.stdout
    n = 2 * len(cpus)                              # auto: more ranks than CPUs, spread evenly
    proc, _ = launch(["-n", str(n), str(SCRIPTS / "affinity.py")])
    assert proc.returncode == 0, proc.stderr
    rows = _affinities(proc.stdout)
    assert sorted(rows) == list(range(n)), proc.stdout
    per_cpu = {}
    for main, thread, bound in rows.values():
        assert main.isdigit() and thread == main == bound, rows
        per_cpu[int(main)] = per_cpu.get(int(main), 0) + 1
    assert per_cpu == {c: 2 for c in cpus}, per_cpu
    proc, _ = launch(["-n", "2", "--bind", "socket", str(SCRIPTS / "affinity.py")])
    assert proc.returncode == 2 and "--bind" in proc.stderr, proc.stderr


def test_binding_plan_orders_physical_cores_first(monkeypatch):
    from comms.launch import binding
    topo = {0: (0, 0, 0), 1: (0, 1, 0), 2: (0, 0, 1), 3: (0, 1, 1)}      # cpu -> (package, core, SMT index)
    monkeypatch.setattr(binding, "_topology", lambda c: topo[c])
    assert binding.order([3, 2, 1, 0]) == [0, 1, 2, 3]
    topo = {0: (0, 0, 0), 1: (0, 0, 1), 2: (0, 1, 0), 3: (0, 1, 1)}      # siblings numbered next to each other
    assert binding.order([0, 1, 2, 3]) == [0, 2, 1, 3]
    assert binding.plan(2, "auto", [0, 1, 2, 3]) == [{0}, {2}]
    assert binding.plan(5, "auto", [0, 1, 2, 3]) == [{0}, {2}, {1}, {3}, {0}]
    assert binding.plan(5, "core", [0, 1, 2, 3]) == [{0}, {2}, {1}, {3}, {0}]
    assert binding.plan(2, "none", [0, 1, 2, 3]) == [None, None]
    with pytest.raises(ValueError, match="must be one of"):
        binding.plan(2, "socket", [0, 1])
    monkeypatch.setattr(binding, "_topology", lambda c: None)           # no sysfs: numeric order
    assert binding.order([2, 0, 1]) == [0, 1, 2]
    assert binding._parse_list("0-2,5,7-8\n") == {0, 1, 2, 5, 7, 8}
    assert binding.describe([{0}, None]) == "rank 0: cpu 0, rank 1: unbound"


def test_launcher_module_form():
    proc, _ = launch(["-n", "2", "-m", "store_ok", "--no-store"], cwd=SCRIPTS)
    assert proc.returncode == 0, proc.stderr
    for r in range(2):
        assert f"[rank {r}] env RANK={r} WORLD_SIZE=2" in proc.stdout


def test_launcher_failing_rank_kills_the_others(tmp_path):
    proc, elapsed = launch(["-n", "3", str(SCRIPTS / "fail_one.py"), str(tmp_path)])
    assert proc.returncode != 0
    assert elapsed < 20, f"took {elapsed:.1f} s"
    assert "comms.run: rank 1 failed with exit code 3" in proc.stderr, proc.stderr
    assert "[rank 1] rank 1 giving up" in proc.stderr
    pids = _pids(tmp_path)
    assert set(pids) == {"rank0.pid", "rank1.pid", "rank2.pid", "grandchild.pid"}
    _assert_all_dead(pids)


def test_launcher_timeout_names_the_hung_rank(tmp_path):
    proc, elapsed = launch(["-n", "3", "--timeout", "3", str(SCRIPTS / "hang.py"), str(tmp_path)])
    assert proc.returncode == 124, proc.stderr
    assert elapsed < 12, f"took {elapsed:.1f} s"
    assert "deadline of 3.0 s passed; killed rank 1 that was still running" in proc.stderr
    assert "[rank 0] rank 0 done" in proc.stdout and "[rank 1] rank 1 hanging" in proc.stdout
    pids = _pids(tmp_path)
    assert len(pids) == 3
    _assert_all_dead(pids)


def test_launcher_sigint_kills_ranks(tmp_path):
    p = subprocess.Popen([*_launcher(), "-n", "2", str(SCRIPTS / "hang.py"), str(tmp_path)],
                         env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        end = time.monotonic() + 30
        while len(_pids(tmp_path)) < 2 and time.monotonic() < end:
            time.sleep(0.05)
        pids = _pids(tmp_path)
        while _alive(pids["rank0.pid"]) and time.monotonic() < end:     # rank 0 exits; rank 1 hangs on
            time.sleep(0.05)
        assert not _alive(pids["rank0.pid"]) and _alive(pids["rank1.pid"])
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=10)
    finally:
        p.kill()
    assert p.returncode == 128 + signal.SIGINT, err
    assert "received SIGINT" in err
    _assert_all_dead(_pids(tmp_path))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_launcher_killed_with_sigkill_takes_its_ranks_with_it(tmp_path):
    # a launcher cannot clean up after kill -9 (nor when a caller's subprocess.run kills it on an
    # exception): the kernel kills its ranks, so none runs on for nobody
    p = subprocess.Popen([*_launcher(), "-n", "2", str(SCRIPTS / "hang.py"), str(tmp_path)],
                         env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 30
        while len(_pids(tmp_path)) < 2 and time.monotonic() < end:
            time.sleep(0.05)
        pids = _pids(tmp_path)
        assert len(pids) == 2
        assert _alive(pids["rank1.pid"])
    finally:
        p.kill()
        p.wait(timeout=10)
    _assert_all_dead(pids)


# ---------------------------------------------------------------------------------------- spawn

@pytest.fixture
def testing(monkeypatch):
    """comms.testing, with launcher_scripts/ on sys.path (for spawn_fns; spawned ranks inherit it)."""
    err = _comms_importable()
    if err is not None:
        pytest.skip(f"`import comms` fails, so spawned ranks cannot import comms.testing: {err}")
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import comms.testing
    return comms.testing


def test_spawn_returns_values_by_rank_with_env(testing):
    import spawn_fns
    out = testing.spawn(spawn_fns.report, 3, args=(10,), kwargs={"scale": 2},
                        env={"EXTRA_VAR": "yes"}, timeout=30)
    assert [o["rank"] for o in out] == [0, 1, 2]
    assert [o["value"] for o in out] == [20, 22, 24]
    for r, o in enumerate(out):
        assert o["world"] == 3
        env = o["env"]
        assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == (str(r), str(r), "3", "3")
        assert env["MASTER_ADDR"] == "127.0.0.1" and env["EXTRA_VAR"] == "yes"
    assert len({o["env"]["MASTER_PORT"] for o in out}) == 1
    assert not any(_alive(o["pid"]) for o in out)


def test_spawn_ranks_reach_the_store(testing):
    import spawn_fns
    assert testing.spawn(spawn_fns.store_roundtrip, 2, timeout=30) == [[0, 10], [0, 10]]


def test_spawn_raising_rank_reports_traceback(testing):
    import spawn_fns
    with pytest.raises(testing.RankFailed) as info:
        testing.spawn(spawn_fns.explode_here, 3, args=(1,), timeout=30)
    e = info.value
    assert e.rank == 1 and e.exc_type == "ValueError"
    assert "boom from rank 1" in e.traceback and "explode_here" in e.traceback
    assert "rank 1 of 3 failed with ValueError" in str(e)
    assert "boom from rank 1" in str(e) and "explode_here" in str(e)
    assert e.results == {0: 0, 2: 2} and set(e.failures) == {1}


def test_spawn_several_failures_names_lowest(testing):
    import spawn_fns
    with pytest.raises(testing.RankFailed) as info:
        testing.spawn(spawn_fns.all_but_zero_fail, 3, timeout=30)
    e = info.value
    assert e.rank == 1 and e.exc_type == "KeyError"
    assert set(e.failures) == {1, 2} and "failure 2" in e.failures[2][1]
    assert e.results == {0: "fine"} and "rank 2 (KeyError)" in str(e)


def test_spawn_rank_dying_without_report(testing):
    import spawn_fns
    t0 = time.monotonic()
    with pytest.raises(testing.RankFailed) as info:
        testing.spawn(spawn_fns.exit_hard, 2, timeout=30)
    assert time.monotonic() - t0 < 15
    e = info.value
    assert e.rank == 1 and e.exc_type == "ProcessDied" and "exited with code 7" in str(e)
    assert e.killed == [0]


def test_spawn_timeout_names_hung_rank(testing, tmp_path):
    import spawn_fns
    t0 = time.monotonic()
    with pytest.raises(testing.SpawnTimeout) as info:
        testing.spawn(spawn_fns.hang, 3, args=(str(tmp_path),), timeout=8)   # room for slow starts on a busy machine
    assert time.monotonic() - t0 < 20
    e = info.value
    assert isinstance(e, testing.RankFailed) and isinstance(e, TimeoutError)
    assert e.rank == 1 and e.killed == [1] and e.results == {0: 0, 2: 2}
    assert "killed rank 1 that was still running" in str(e)
    pids = _pids(tmp_path)
    assert len(pids) == 3
    _assert_all_dead(pids)


def test_spawn_unpicklable(testing):
    import spawn_fns
    with pytest.raises(TypeError, match="picklable"):
        testing.spawn(lambda rank, ws: rank, 2)
    with pytest.raises(testing.RankFailed) as info:
        testing.spawn(spawn_fns.unpicklable_result, 1, timeout=30)
    assert info.value.exc_type == "TypeError" and "cannot be sent back" in str(info.value)
