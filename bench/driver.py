"""``python -m bench``: run every backend in fresh launches, then print the tables.

Each launch runs every requested op, out of place and in place, over the whole size sweep:

* comms and gloo: ``python -m comms.run -n NP --timeout T -m bench.worker --backend B ... --out FILE``;
* mpi: ``mpirun --allow-run-as-root --oversubscribe -np NP python -m bench.worker --backend mpi ...``,
  with Open MPI's shared-memory transport and no TCP (``OMPI_MCA_pml=ob1``,
  ``OMPI_MCA_btl=self,vader``) unless the caller set those variables.

Every launch gets the caller's environment plus OMP_NUM_THREADS=1 and GLOO_SOCKET_IFNAME=lo (unless
already set), so knobs such as COMMS_TRANSPORT=tcp reach every rank; a ``--backends`` entry
``LIB@NAME=VALUE`` adds its own variables to its launches only. Launches alternate between backends
(and the order flips every round), so slow drift of a noisy machine hits all of them alike.

stdout gets the ``#`` header, the tables and the footer; progress goes to stderr (a bar on a
terminal, one line per launch otherwise; with ``-v`` also the ranks' own output). The exit status
is 0 when every launch succeeded and every check passed, 1 otherwise, 2 for a bad command line or
something missing (``moe`` without comms.moe, ``--plot`` without matplotlib, no backend to run).
"""
from __future__ import annotations

import collections
import importlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import backends, cli, ops, plot, report

_ROOT = Path(__file__).resolve().parent.parent     # the directory holding the bench package
_TAIL_LINES = 30
_KILL_GRACE_S = 30.0        # a launch still alive this long after --timeout is killed by the driver
_PROGRESS = re.compile(r"bench\.worker: \[(\d+)/(\d+)\] (.*)")
MPI_DEFAULTS = {"OMPI_MCA_pml": "ob1", "OMPI_MCA_btl": "self,vader"}   # shared memory only, no TCP


def note(msg: str) -> None:
    sys.stderr.write(f"bench: {msg}\n")
    sys.stderr.flush()


class Progress:
    """Progress of the sweep on stderr: on a terminal a ``\\r``-updated bar that follows each
    launch size by size (from the ranks' ``[k/N]`` lines); otherwise one line per finished launch."""

    def __init__(self, total: int, stream=None):
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.total, self.done, self.t0 = total, 0, time.monotonic()
        self.current, self.frac, self.detail, self._last = "", 0.0, "", 0.0

    def start(self, what: str) -> None:
        self.current, self.frac, self.detail = what, 0.0, ""
        self._draw(force=True)

    def update(self, k: int, n: int, detail: str) -> None:
        self.frac, self.detail = (k / n if n else 0.0), detail
        self._draw()

    def finish(self, launch: report.Launch) -> None:
        self.done += 1
        if self.tty:
            self.stream.write("\r\x1b[K")
        status = f"done in {launch.seconds:.1f} s" if launch.ok else \
            f"FAILED ({launch.error}) after {launch.seconds:.1f} s; last output:"
        self.stream.write(f"bench: launch {self.done}/{self.total}: {self.current} {status}\n")
        if not launch.ok:
            for line in launch.tail:
                self.stream.write(f"    {line}\n")
        self.stream.flush()
        self.current = ""

    def _draw(self, force: bool = False) -> None:
        if not self.tty or not self.current:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        frac = (self.done + self.frac) / max(self.total, 1)
        width = 24
        fill = int(frac * width)
        elapsed = now - self.t0
        eta = f", ~{elapsed / frac - elapsed:.0f} s left" if frac > 0.02 else ""
        line = (f"bench [{'#' * fill}{'.' * (width - fill)}] {frac * 100:3.0f}%  launch {self.done + 1}/{self.total}: "
                f"{self.current}  {self.detail}  ({elapsed:.0f} s{eta})")
        cols = shutil.get_terminal_size((120, 20)).columns
        self.stream.write("\r\x1b[K" + line[: max(cols - 1, 20)])
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.current:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def launch_env(spec: backends.Spec | None = None) -> dict[str, str]:
    """The caller's environment, with the method's defaults, ``bench`` importable, and the
    variant's overrides (``spec.env``) last."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH", "")) if p)
    if spec is not None and spec.base == "mpi":
        for k, v in MPI_DEFAULTS.items():
            env.setdefault(k, v)
    if spec is not None:
        env.update(spec.env)
    return env


def worker_args(args, spec: backends.Spec, out: Path) -> list[str]:
    """``bench.worker``'s arguments for one launch."""
    cmd = ["-m", "bench.worker", "--backend", spec.base, "--label", spec.label, "--ops", ",".join(args.ops),
           "--places", ",".join(args.places), "--root", str(args.root), "--dtype", args.dtype,
           "--sizes", ",".join(map(str, args.sizes)), "--check", str(args.check),
           "--target-time", f"{args.target_time:g}", "--batch", str(args.batch), "--out", str(out)]
    if args.iters is not None:
        cmd += ["--iters", str(args.iters)]
    if args.warmup is not None:
        cmd += ["--warmup", str(args.warmup)]
    if getattr(args, "variants", None):
        cmd += ["--variants", ",".join(args.variants)]
        if getattr(args, "variant_rounds", None):
            cmd += ["--variant-rounds", str(args.variant_rounds)]
    if ops.MOE in args.ops:
        cmd += ["--moe-experts", str(args.moe_experts), "--moe-topk", str(args.moe_topk),
                "--moe-hidden", str(args.moe_hidden), "--moe-routing", getattr(args, "moe_routing", "consecutive")]
    return cmd


def worker_command(args, spec: backends.Spec, out: Path, env: dict[str, str] | None = None) -> list[str]:
    """The command line of one launch: ``comms.run`` for comms and gloo, ``mpirun`` for mpi."""
    if spec.base == "mpi":
        mpirun = shutil.which("mpirun", path=(env or os.environ).get("PATH", "")) or "mpirun"
        return [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", str(args.np),
                sys.executable] + worker_args(args, spec, out)
    return [sys.executable, "-m", "comms.run", "-n", str(args.np), "--timeout", f"{args.timeout:g}"] + \
        worker_args(args, spec, out)


def stop(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """Stop a launch started in its own session (``start_new_session=True``): SIGTERM to its group,
    so that comms.run (or mpirun) kills its ranks and sweeps their segments, then SIGKILL after
    ``grace`` seconds (comms.run's ranks die with it: their parent-death signal)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            pass


def run_launch(args, spec: backends.Spec, index: int, tmpdir: Path, prog: Progress | None = None) -> report.Launch:
    """One fresh launch of ``spec``; never raises for a failing launch."""
    out = tmpdir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', spec.label)}-{index}.json"
    env = launch_env(spec)
    cmd = worker_command(args, spec, out, env)
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(cmd, env=env, cwd=_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
    except OSError as e:
        return report.Launch(spec.label, index, 0.0, error=f"could not start: {e}")
    expired = threading.Event()
    # comms.run enforces --timeout itself; mpirun does not, so the driver does (and backs comms.run up)
    limit = args.timeout + (0.0 if spec.base == "mpi" else _KILL_GRACE_S)

    def kill():
        expired.set()
        stop(proc)
    timer = threading.Timer(limit, kill)
    timer.daemon = True
    timer.start()
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            if args.verbose:
                sys.stderr.write(line)
            elif prog is not None:
                m = _PROGRESS.search(line)
                if m:
                    prog.update(int(m.group(1)), int(m.group(2)), m.group(3).split(":")[0])
        rc = proc.wait()
    except BaseException:
        # Ctrl-C or an error here: the launch runs in its own session, so take it down too
        timer.cancel()
        kill()
        raise
    finally:
        timer.cancel()
    seconds = time.monotonic() - t0
    launch = report.Launch(spec.label, index, seconds, tail=list(tail))
    if expired.is_set() or rc == 124:
        launch.error = f"timed out after {args.timeout:g} s"
    elif rc != 0:
        launch.error = f"exit status {rc}"
    elif not out.exists():
        launch.error = "no result file"
    else:
        try:
            launch.doc = json.loads(out.read_text())
        except (OSError, ValueError) as e:
            launch.error = f"unreadable result: {e}"
    return launch


def run_all(args, specs: list[backends.Spec], sim=None) -> dict[str, list[report.Launch]]:
    """``args.launches`` rounds; each round runs every backend once, order flipped every round; on
    the simulated hosts ``sim`` (entered) when given."""
    from .launch import Launcher
    launches: dict[str, list[report.Launch]] = {s.label: [] for s in specs}
    prog = Progress(args.launches * len(specs))
    try:
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            launcher = Launcher(args, Path(tmp), sim)
            for i in range(args.launches):
                order = specs if i % 2 == 0 else list(reversed(specs))
                for s in order:
                    prog.start(f"{s.label} #{i + 1}")
                    ln = launcher.launch(args, s, i, prog)
                    launches[s.label].append(ln)
                    prog.finish(ln)
    finally:
        prog.close()
    return launches


# -- things that may be missing ----------------------------------------------------------------
def install_mpi() -> str | None:
    """``--install-mpi``: Open MPI from apt, mpi4py from pip into this Python; None or the error."""
    if os.geteuid() != 0:
        return "--install-mpi needs root (it runs apt-get install openmpi-bin libopenmpi-dev)"
    if shutil.which("apt-get") is None:
        return "--install-mpi needs apt-get (Debian or Ubuntu); install Open MPI and mpi4py yourself"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    apt = ["apt-get", "install", "-y", "-q", "openmpi-bin", "libopenmpi-dev"]
    note("installing Open MPI: " + " ".join(apt))
    if subprocess.call(apt, stdout=sys.stderr, env=env) != 0:
        note("apt-get install failed; running apt-get update and trying again")
        subprocess.call(["apt-get", "update", "-q"], stdout=sys.stderr, env=env)
        if subprocess.call(apt, stdout=sys.stderr, env=env) != 0:
            return "apt-get install openmpi-bin libopenmpi-dev failed"
    pip = [sys.executable, "-m", "pip", "install", "mpi4py"]
    note("installing mpi4py: " + " ".join(pip))
    if subprocess.call(pip, stdout=sys.stderr) != 0:
        return "pip install mpi4py failed"
    importlib.invalidate_caches()
    return None


def moe_missing() -> str | None:
    """None when ``comms.moe.Dispatcher`` can be imported, else why not."""
    try:
        mod = importlib.import_module("comms.moe")
    except Exception as e:  # noqa: BLE001 - any failure means "not available"
        return f"import comms.moe failed: {type(e).__name__}: {e}"
    if not hasattr(mod, "Dispatcher"):
        return "comms.moe has no Dispatcher"
    return None


def resolve_backends(args) -> tuple[list[backends.Spec], list[tuple[str, str]]]:
    """The backends to run and the (label, reason) of those skipped (mpi when not installed)."""
    run, skipped = [], []
    for s in args.backends:
        why = backends.mpi_missing(launch_env(s)) if s.base == "mpi" else None
        if s.base == "mpi" and getattr(args, "hosts", None):
            why = "mpi: not run across simulated hosts (mpirun would need its own launch in every namespace)"
        if why:
            skipped.append((s.label, why))
        else:
            run.append(s)
    return run, skipped


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = cli.parse_args(argv)
    command = "python -m bench " + " ".join(shlex.quote(a) for a in argv)
    if ops.MOE in args.ops:
        why = moe_missing()
        if why:
            note(f"moe: comms.moe is not available ({why})")
            return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            note("--plot needs matplotlib: pip install matplotlib (or the test extra: pip install -e '.[test]')")
            return 2
    if args.install_mpi:
        err = install_mpi()
        if err:
            note(err)
            return 2
    specs, skipped = resolve_backends(args)
    for label, why in skipped:
        if not args.hosts:
            note(f"{label}: {backends.MPI_MISSING.split(': ', 1)[1]}")
        note(f"{label}: {why}; skipping it")
    if not specs:
        note("no backend left to run")
        return 2
    es = ops.elem_size(args.dtype)
    layouts = {o: ops.plan(ops.lookup(o, args.moe), args.sizes, args.np, es) for o in args.ops}
    empty = [o for o, lays in layouts.items() if not lays]
    if empty:
        note(f"no size in {args.sizes[0]}..{args.sizes[-1]} B holds one {args.dtype} per rank block for "
             f"{', '.join(empty)}")
        return 2
    info = report.machine_info(launch_env(), specs)
    print("\n".join(report.header(command, args, info, specs, skipped)), flush=True)
    t0 = time.monotonic()
    sim = None
    if args.hosts is not None:
        from .launch import simulated_hosts
        sim, why = simulated_hosts(args)
        if why:
            note(f"--hosts: {why}; run it as root (or use -np for one host)")
            return 2
    try:
        if sim is not None:
            with sim:
                launches = run_all(args, specs, sim)
        else:
            launches = run_all(args, specs)
    except KeyboardInterrupt:
        note("interrupted; the running launch was stopped")
        return 130
    note(f"all launches finished in {time.monotonic() - t0:.1f} s")
    rows = report.aggregate(args, specs, layouts, launches)
    compare = report.compare_pair(args, specs)
    for line in report.tables(rows, args, specs):
        print(line)
    print("\n".join(report.footer(rows, args, specs, launches, skipped, compare)), flush=True)
    if args.json:
        doc = report.json_doc(command, args, info, specs, rows, launches, skipped, compare)
        Path(args.json).write_text(json.dumps(doc, indent=1))
        note(f"wrote {args.json}")
    if args.plot:
        plot.plot(rows, args, args.plot, command)
        note(f"wrote {args.plot}")
    failed = any(not ln.ok for lns in launches.values() for ln in lns)
    wrong = any(r["wrong"] for r in rows)
    return 1 if failed or wrong else 0
