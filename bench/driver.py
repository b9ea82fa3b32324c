"""``python -m bench``: run every backend in fresh launches, then print the table.

Each launch is ``python -m comms.run -n NP --timeout T -m bench.worker --backend B ... --out FILE``
with the caller's environment plus OMP_NUM_THREADS=1 and GLOO_SOCKET_IFNAME=lo (unless already
set), so knobs such as COMMS_TRANSPORT=tcp reach every rank. Launches alternate between backends
(and the order flips every round), so slow drift of a noisy machine hits all of them alike.

stdout gets the ``#`` header, the table and the footer; progress goes to stderr (with ``-v`` also the
ranks' own output). The exit status is 0 when every launch succeeded and every check passed, 1
otherwise, 2 for a bad command line.
"""
from __future__ import annotations

import collections
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import cli, ops, report, worker

_ROOT = Path(__file__).resolve().parent.parent     # the directory holding the bench package
_TAIL_LINES = 30


def progress(msg: str) -> None:
    sys.stderr.write(f"bench: {msg}\n")
    sys.stderr.flush()


def launch_env() -> dict[str, str]:
    """The caller's environment, with the method's defaults and ``bench`` importable."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def worker_command(args, backend: str, out: Path) -> list[str]:
    """The launcher command line of one launch."""
    cmd = [sys.executable, "-m", "comms.run", "-n", str(args.np), "--timeout", f"{args.timeout:g}",
           "-m", "bench.worker", "--backend", backend, "--op", args.op, "--dtype", args.dtype,
           "--sizes", ",".join(map(str, args.sizes)), "--check", str(args.check),
           "--target-time", f"{args.target_time:g}", "--batch", str(args.batch), "--out", str(out)]
    if args.iters is not None:
        cmd += ["--iters", str(args.iters)]
    if args.warmup is not None:
        cmd += ["--warmup", str(args.warmup)]
    return cmd


def run_launch(args, backend: str, index: int, tmpdir: Path) -> report.Launch:
    """One fresh launch of ``backend``; never raises for a failing launch."""
    out = tmpdir / f"{backend}-{index}.json"
    cmd = worker_command(args, backend, out)
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(cmd, env=launch_env(), cwd=_ROOT, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    except OSError as e:
        return report.Launch(backend, index, 0.0, error=f"could not start: {e}")
    assert proc.stdout is not None
    for line in proc.stdout:
        tail.append(line.rstrip("\n"))
        if args.verbose:
            sys.stderr.write(line)
    rc = proc.wait()
    seconds = time.monotonic() - t0
    launch = report.Launch(backend, index, seconds, tail=list(tail))
    if rc != 0:
        launch.error = "timed out" if rc == 124 else f"exit status {rc}"
    elif not out.exists():
        launch.error = "no result file"
    else:
        try:
            launch.doc = json.loads(out.read_text())
        except (OSError, ValueError) as e:
            launch.error = f"unreadable result: {e}"
    return launch


def run_all(args) -> dict[str, list[report.Launch]]:
    """``args.launches`` rounds; each round runs every backend once, order flipped every round."""
    launches: dict[str, list[report.Launch]] = {b: [] for b in args.backends}
    total = args.launches * len(args.backends)
    done = 0
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for i in range(args.launches):
            order = args.backends if i % 2 == 0 else list(reversed(args.backends))
            for b in order:
                done += 1
                progress(f"launch {done}/{total}: {b} #{i + 1} ({args.np} ranks) ...")
                ln = run_launch(args, b, i, Path(tmp))
                launches[b].append(ln)
                if ln.ok:
                    progress(f"launch {done}/{total}: {b} #{i + 1} done in {ln.seconds:.1f} s")
                else:
                    progress(f"launch {done}/{total}: {b} #{i + 1} FAILED ({ln.error}) after {ln.seconds:.1f} s; "
                             f"last output:")
                    for line in ln.tail:
                        sys.stderr.write(f"    {line}\n")
    return launches


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = cli.parse_args(argv)
    command = "python -m bench " + " ".join(shlex.quote(a) for a in argv)
    op, es = ops.OPS[args.op], ops.elem_size(args.dtype)
    layouts = worker.plan(op, args.sizes, args.np, es)
    if not layouts:
        progress(f"no size in {args.sizes[0]}..{args.sizes[-1]} B holds one {args.dtype} per rank block")
        return 2
    info = report.machine_info(launch_env())
    print("\n".join(report.header(command, args, info)), flush=True)
    t0 = time.monotonic()
    launches = run_all(args)
    progress(f"all launches finished in {time.monotonic() - t0:.1f} s")
    rows = report.aggregate(args, layouts, launches)
    print("#")
    print("\n".join(report.table(rows)))
    print("\n".join(report.footer(rows, args, launches)), flush=True)
    if args.json:
        doc = report.json_doc(command, args, info, rows, launches)
        Path(args.json).write_text(json.dumps(doc, indent=1))
        progress(f"wrote {args.json}")
    failed = any(not ln.ok for lns in launches.values() for ln in lns)
    wrong = any(r["wrong"] for r in rows)
    return 1 if failed or wrong else 0
