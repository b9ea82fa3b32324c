"""Single-host launcher: ``python -m comms.run -n N [--timeout S] [--master-port P] script.py args...``.

Also ``python -m comms.run -n N -m module args...``, like ``python -m``.

Contract:

* The launcher hosts a ``torch.distributed.TCPStore`` on 127.0.0.1 (port ``--master-port``, default 0
  = a free port) and starts N processes of ``sys.executable`` running the script or module. Each gets
  RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK=0, MASTER_ADDR=127.0.0.1, MASTER_PORT
  and PYTHONUNBUFFERED=1 (and OMP_NUM_THREADS=1 when N > 1 and it is unset, as torchrun does), and
  can connect to the store with
  ``TCPStore(MASTER_ADDR, MASTER_PORT, is_master=False)`` as under torchrun. Like torchrun, it also
  sets TORCHELASTIC_USE_AGENT_STORE=True so that ``init_process_group(init_method="env://")`` in
  rank 0 connects to the launcher's store instead of trying to host its own on the same port.
* Every line a rank writes to stdout/stderr is copied to the launcher's stdout/stderr prefixed with
  ``[rank R] ``.
* Each rank runs in its own session/process group; ranks are always killed as a group, so
  grandchildren die with them. On exit every rank's group gets SIGKILL, so nothing outlives it.
  On Linux each rank also gets SIGKILL when the launcher dies without cleaning up (``kill -9`` of
  the launcher, or of a caller's ``subprocess.run`` that kills it on an exception): the kernel's
  parent-death signal, so no rank is left running for nobody.
* Exit status: 0 when every rank exits 0. When a rank exits non-zero or is killed by a signal, the
  others get SIGTERM, then SIGKILL after a 3 s grace; the launcher names the first failing rank on
  stderr and exits 1. When ``--timeout`` passes, every rank is killed and the exit status is 124.
  On SIGINT/SIGTERM/SIGHUP the ranks are killed and the status is 128 + the signal number (a
  second signal skips the grace). Bad command lines exit 2.
* ``--bind auto|core|none`` (default ``COMMS_BIND``, auto) binds each rank to a core of its own,
  as ``mpirun --bind-to core`` does (see comms.launch.binding): auto gives rank i CPU i of the
  launcher's affinity, wrapping when there are more ranks than CPUs. Each rank gets
  COMMS_BOUND_CPUS (its CPU list, empty when unbound).
* After every rank is gone, ``comms.runtime.cleanup.sweep_stale_segments`` removes shared-memory segments
  the ranks left behind.

Only the standard library is imported at module level; torch is imported when a launch starts.
"""
from __future__ import annotations

import argparse
import os
import queue
import signal
import subprocess
import sys
import threading
import time

GRACE_S = 3.0
TIMEOUT_EXIT = 124
_PROG = "comms.run"


def _say(msg: str) -> None:
    sys.stderr.write(f"{_PROG}: {msg}\n")
    sys.stderr.flush()


def _describe(code: int) -> str:
    """'exit code 3' or 'signal SIGKILL' for a Popen return code."""
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _ranks_text(ranks: list[int], verb_one: str, verb_many: str) -> str:
    ranks = sorted(ranks)
    if len(ranks) == 1:
        return f"rank {ranks[0]} {verb_one}"
    return f"ranks {', '.join(map(str, ranks))} {verb_many}"


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split ``argv`` into launcher options and the child command (what follows ``sys.executable``).

    Launcher options come first; the first word that is not an option (or the word after ``--``)
    is the script, ``-m MODULE`` names a module; everything after belongs to the child."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {_PROG}",
        usage=f"python -m {_PROG} -n N [--timeout S] [--master-port P] [--bind MODE] (script.py | -m module) [args ...]",
        description="Start N local ranks of a Python program with torchrun-style environment.")
    parser.add_argument("-n", "--nproc", type=int, required=True, help="number of ranks")
    parser.add_argument("--timeout", type=float, default=None,
                        help="kill every rank and exit 124 after this many seconds")
    parser.add_argument("--master-port", type=int, default=0,
                        help="port of the TCPStore the launcher hosts (default: a free one)")
    parser.add_argument("--bind", choices=("auto", "core", "none"), default=None,
                        help="CPU binding: auto (rank i on CPU i, wrapping; default, or COMMS_BIND), "
                             "core (the same), none")
    takes_value = {"-n", "--nproc", "--timeout", "--master-port", "--bind"}
    i, cmd = 0, None
    while i < len(argv):
        a = argv[i]
        if a == "-m":
            if i + 1 >= len(argv):
                parser.error("-m needs a module name")
            cmd = ["-m", argv[i + 1], *argv[i + 2:]]
            break
        if a == "--":
            if i + 1 >= len(argv):
                parser.error("no script after --")
            cmd = argv[i + 1:]
            break
        if a.startswith("-") and a != "-":
            i += 2 if a in takes_value else 1
            continue
        cmd = argv[i:]
        break
    ns = parser.parse_args(argv[:i])
    if cmd is None:
        parser.error("no script or -m module given")
    if ns.nproc < 1:
        parser.error("-n must be at least 1")
    if ns.timeout is not None and ns.timeout <= 0:
        parser.error("--timeout must be positive")
    return ns, cmd


def _pump(src, dst, prefix: bytes, lock: threading.Lock) -> None:
    """Copy lines from pipe ``src`` to binary stream ``dst``, each prefixed."""
    try:
        for line in iter(src.readline, b""):
            if not line.endswith(b"\n"):
                line += b"\n"
            with lock:
                try:
                    dst.write(prefix + line)
                    dst.flush()
                except (OSError, ValueError):
                    pass
    finally:
        src.close()


def _parent_death_guard():
    """A ``preexec_fn`` that has the kernel SIGKILL the child when this process dies
    (prctl PR_SET_PDEATHSIG; exec keeps it), or None off Linux. It runs between fork and exec, so it
    only calls prctl through a function looked up here, and exits at once if the launcher is already
    gone (the parent died before the prctl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent, pr_set_pdeathsig, sigkill = os.getpid(), 1, int(signal.SIGKILL)

    def guard() -> None:
        prctl(pr_set_pdeathsig, sigkill)
        if os.getppid() != parent:
            os._exit(128 + sigkill)
    return guard


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def launch(cmd: list[str], nproc: int, timeout: float | None = None, master_port: int = 0,
           env: dict[str, str] | None = None, bind: str | None = None) -> int:
    """Run ``[sys.executable, *cmd]`` as ``nproc`` ranks; return the launcher's exit status
    (see the module docstring). ``env`` adds variables to every rank's environment; ``bind`` is
    the CPU binding mode (None: COMMS_BIND)."""
    import torch.distributed as dist  # noqa: heavy, so only when launching

    from comms import config
    from comms.launch import binding
    try:
        bound = binding.plan(nproc, bind if bind is not None else config.get("BIND"))
    except ValueError as e:
        _say(f"COMMS_BIND: {e}")
        return 2

    try:
        store = dist.TCPStore("127.0.0.1", master_port, is_master=True, wait_for_workers=False)
    except Exception as e:  # noqa: BLE001 - report any bind failure plainly
        _say(f"could not host the TCPStore on 127.0.0.1:{master_port}: {e}")
        return 1
    port = store.port

    stop: list[int] = []  # signals received; appended by the handler

    def on_signal(signum, _frame):
        stop.append(signum)

    caught = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old_handlers = ({s: signal.signal(s, on_signal) for s in caught}
                    if threading.current_thread() is threading.main_thread() else {})

    exits: "queue.Queue[tuple[int, int]]" = queue.Queue()
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    out_lock, err_lock = threading.Lock(), threading.Lock()
    returncodes: dict[int, int] = {}
    status = 0
    guard = _parent_death_guard()
    try:
        for rank in range(nproc):
            child_env = dict(os.environ)
            child_env.update(env or {})
            child_env.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                             LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0",
                             MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                             TORCHELASTIC_USE_AGENT_STORE="True", PYTHONUNBUFFERED="1",
                             COMMS_BOUND_CPUS=",".join(map(str, sorted(bound[rank] or ()))))
            if nproc > 1:                     # as torchrun: one intra-op thread per rank unless told
                child_env.setdefault("OMP_NUM_THREADS", "1")
            p = subprocess.Popen([sys.executable, *cmd], env=child_env, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 start_new_session=True, preexec_fn=guard)
            binding.apply(p.pid, bound[rank])    # before the child can start a thread: they inherit it
            procs.append(p)
            prefix = f"[rank {rank}] ".encode()
            for src, dst, lock in ((p.stdout, sys.stdout.buffer, out_lock),
                                   (p.stderr, sys.stderr.buffer, err_lock)):
                t = threading.Thread(target=_pump, args=(src, dst, prefix, lock), daemon=True)
                t.start()
                pumps.append(t)
            threading.Thread(target=lambda r=rank, p=p: exits.put((r, p.wait())), daemon=True).start()

        deadline = None if timeout is None else time.monotonic() + timeout

        def drain(wait: float) -> None:
            try:
                r, code = exits.get(timeout=wait)
            except queue.Empty:
                return
            returncodes[r] = code
            while True:
                try:
                    r, code = exits.get_nowait()
                except queue.Empty:
                    return
                returncodes[r] = code

        def terminate(grace: float) -> None:
            for p in procs:
                _killpg(p.pid, signal.SIGTERM)
            end = time.monotonic() + grace
            n_signals = len(stop)
            while len(returncodes) < nproc and time.monotonic() < end and len(stop) == n_signals:
                drain(min(0.05, max(0.0, end - time.monotonic())))
            for p in procs:
                _killpg(p.pid, signal.SIGKILL)
            while len(returncodes) < nproc:
                drain(0.1)

        while len(returncodes) < nproc:
            if stop:
                alive = [r for r in range(nproc) if r not in returncodes]
                terminate(0.0 if len(stop) > 1 else GRACE_S)
                name = signal.Signals(stop[0]).name
                _say(f"received {name}; " + (f"terminated {_ranks_text(alive, 'that was', 'that were')} still running"
                                             if alive else "no rank was running"))
                status = 128 + stop[0]
                break
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                alive = [r for r in range(nproc) if r not in returncodes]
                terminate(GRACE_S)
                _say(f"deadline of {timeout:.1f} s passed; killed "
                     f"{_ranks_text(alive, 'that was', 'that were')} still running")
                status = TIMEOUT_EXIT
                break
            seen = set(returncodes)
            drain(0.2 if deadline is None else max(0.0, min(0.2, deadline - now)))
            failed = [r for r in returncodes if r not in seen and returncodes[r] != 0]
            if failed:
                first = failed[0]  # returncodes keeps the order in which the ranks exited
                others = [r for r in range(nproc) if r not in returncodes]
                terminate(GRACE_S)
                tail = "; terminated the other ranks" if others else ""
                _say(f"rank {first} failed with {_describe(returncodes[first])}{tail}")
                status = 1
                break
    finally:
        for p in procs:  # normal exit, exception or early break: no group outlives the launcher
            _killpg(p.pid, signal.SIGKILL)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for t in pumps:
            t.join(timeout=2.0)
        for s, h in old_handlers.items():
            signal.signal(s, h)
        del store
        try:
            from comms.runtime.cleanup import sweep_stale_segments
            sweep_stale_segments({p.pid for p in procs})
        except Exception as e:  # noqa: BLE001 - cleanup must not mask the real outcome
            _say(f"warning: sweeping shared-memory segments failed: {e}")
    return status


def main(argv: list[str] | None = None) -> int:
    ns, cmd = parse_args(sys.argv[1:] if argv is None else argv)
    return launch(cmd, ns.nproc, timeout=ns.timeout, master_port=ns.master_port, bind=ns.bind)


if __name__ == "__main__":
    sys.exit(main())
