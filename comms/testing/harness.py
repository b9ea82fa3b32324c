"""Run a function on several local ranks, for tests: :func:`spawn`.

``spawn(fn, world_size)`` runs ``fn(rank, world_size, *args, **kwargs)`` in ``world_size`` fresh
processes and returns their return values ordered by rank. The processes are forked from
multiprocessing's fork server, which has imported numpy and torch (:data:`PRELOAD`) and nothing
else: a fresh interpreter spent about 1 s of CPU a rank importing torch (a 4-rank no-op took 4.4 s
on 2 cores), which ``comms.init`` needs for torchrun's TCPStore. Each child takes this process's
environment at the call, as a spawned one would (multiprocessing itself passes the working
directory and ``sys.path``).

Contract:

* ``fn``, ``args``, ``kwargs`` and the return values must be picklable; ``fn`` must be a
  module-level function. They are pickled in the parent (a ``TypeError`` is raised at once if they
  cannot be) and unpickled in the child *after* its environment is set, so the module of ``fn`` is
  imported with the environment below already in place.
* Each rank sees RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK=0,
  MASTER_ADDR=127.0.0.1, MASTER_PORT and TORCHELASTIC_USE_AGENT_STORE=True, as under
  ``python -m comms.run``, then the ``env`` overrides (a value of None removes a variable). The
  parent hosts a ``torch.distributed.TCPStore`` at MASTER_ADDR:MASTER_PORT; ranks connect to it as
  clients.
* Each rank runs in its own session; killing a rank kills its process group (grandchildren too).
* A rank killed by a fatal signal (SIGABRT, SIGSEGV, ...) prints the Python stack of each of its
  threads to its stderr first (``faulthandler``).
* If a rank raises (any ``BaseException``, ``sys.exit`` included) or dies without reporting
  (``os._exit``, a signal), the others get a :data:`FAIL_GRACE_S` (5 s) grace to finish or fail
  on their own, then are killed, and :class:`RankFailed` is raised for the lowest failing rank;
  ``.failures`` records every failure. When ``timeout`` passes first, :class:`SpawnTimeout` names the ranks still
  running. A rank counts as finished once it has reported *and* exited.
* Always, before returning or raising: every rank is killed and joined, the store is closed and
  ``comms.runtime.cleanup.sweep_stale_segments`` is run for the ranks' pids.

Only the standard library is imported at module level (the children import this module first).
"""
from __future__ import annotations

import faulthandler
import os
import pickle
import signal
import sys
import time
import traceback
from typing import Any, Callable

FAIL_GRACE_S = 5.0
# 5 s, not 2: a survivor of a killed tcp peer first waits up to comms.runtime.failures.REASON_WAIT (1 s) for
# the reason the peer never published, then closes and exits; under the full suite on 2 cores that
# once took more than 2 s, and the survivors were killed before they reported their PeerError


class RankFailed(RuntimeError):
    """A rank raised or died. ``rank`` is the lowest failing rank, ``exc_type`` the name of its
    exception class (``"ProcessDied"`` if it died without reporting, ``"Timeout"`` for
    :class:`SpawnTimeout`), ``traceback`` its formatted traceback, ``failures`` maps every failing
    rank to ``(exc_type, traceback)``, ``results`` maps ranks that returned to their values, and
    ``killed`` lists the ranks that were still running and were killed."""

    def __init__(self, msg: str, *, rank: int, exc_type: str, traceback: str,
                 failures: dict[int, tuple[str, str]], results: dict[int, Any],
                 killed: list[int]):
        super().__init__(msg)
        self.rank, self.exc_type, self.traceback = rank, exc_type, traceback
        self.failures, self.results, self.killed = failures, results, killed


class SpawnTimeout(RankFailed, TimeoutError):
    """``timeout`` passed; ``rank`` is the lowest rank still running, ``killed`` lists them all."""


PRELOAD = ["numpy", "torch", "torch.distributed"]


def _trampoline(payload: bytes, rank: int, env: dict[str, str | None], conn) -> None:
    """Child entry point: take the environment, unpickle and call fn, send the outcome."""
    try:
        os.setsid()  # own process group, so the parent can kill grandchildren with it
    except OSError:
        pass
    faulthandler.enable(all_threads=True)  # a fatal signal prints every thread's Python stack
    os.environ.clear()                     # the fork server's environment is the one it started with
    os.environ.update({k: v for k, v in env.items() if v is not None})
    code = 0
    try:
        fn, args, kwargs = pickle.loads(payload)
        value = fn(rank, int(env["WORLD_SIZE"]), *args, **kwargs)
        try:
            conn.send(("ok", value))
        except Exception:  # noqa: BLE001 - an unpicklable result is this rank's failure
            raise TypeError(f"the value returned by rank {rank} cannot be sent back: "
                            f"{traceback.format_exc(limit=0).strip()}") from None
    except BaseException as e:  # noqa: BLE001 - sys.exit and KeyboardInterrupt are failures too
        code = 1
        try:
            conn.send(("err", type(e).__name__, traceback.format_exc()))
        except Exception:  # noqa: BLE001
            pass
    finally:
        conn.close()
        sys.stdout.flush()
        sys.stderr.flush()
    if code:
        sys.exit(code)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def _kill(proc) -> None:
    """SIGKILL the process group of ``proc`` (it called setsid first thing), and ``proc`` itself in
    case it had not got that far."""
    if proc.pid is None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.exitcode is None:
        try:
            proc.kill()
        except (ProcessLookupError, ValueError):
            pass


def spawn(fn: Callable[..., Any], world_size: int, timeout: float = 60.0, args: tuple = (),
          kwargs: dict | None = None, env: dict[str, str | None] | None = None) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` ranks; return the values by
    rank. Raises :class:`RankFailed` / :class:`SpawnTimeout` as described in the module docstring."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    if world_size < 1:
        raise ValueError("world_size must be at least 1")
    try:
        payload = pickle.dumps((fn, tuple(args), dict(kwargs or {})))
    except Exception as e:  # noqa: BLE001
        raise TypeError(f"spawn: fn, args and kwargs must be picklable (fn must be a module-level "
                        f"function): {e}") from e

    import torch.distributed as dist

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    procs, readers = [], []
    results: dict[int, Any] = {}
    failures: dict[int, tuple[str, str]] = {}
    reported: set[int] = set()
    exited: set[int] = set()
    try:
        base = dict(WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), GROUP_RANK="0",
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port),
                    TORCHELASTIC_USE_AGENT_STORE="True")
        for rank in range(world_size):
            child_env = dict(os.environ, **base, RANK=str(rank), LOCAL_RANK=str(rank))
            child_env.update(env or {})
            r, w = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_trampoline, args=(payload, rank, child_env, w),
                            name=f"comms-rank-{rank}", daemon=False)
            p.start()
            w.close()
            procs.append(p)
            readers.append(r)

        def receive(rank: int) -> None:
            if rank in reported:
                return
            try:
                msg = readers[rank].recv()
            except (EOFError, OSError):
                reported.add(rank)  # died without a word; judged by its exit code
                return
            reported.add(rank)
            if msg[0] == "ok":
                results[rank] = msg[1]
            else:
                failures[rank] = (msg[1], msg[2])

        deadline = time.monotonic() + timeout
        fail_deadline = None
        while len(exited) < world_size:
            end = deadline if fail_deadline is None else min(deadline, fail_deadline)
            remaining = end - time.monotonic()
            if remaining <= 0:
                break
            waitables = {readers[r]: ("msg", r) for r in range(world_size) if r not in reported}
            waitables.update({procs[r].sentinel: ("exit", r) for r in range(world_size) if r not in exited})
            for obj in wait(list(waitables), timeout=remaining):
                kind, rank = waitables[obj]
                if kind == "msg":
                    receive(rank)
                else:
                    procs[rank].join()
                    exited.add(rank)
                    if readers[rank].poll():  # the result may still be in the pipe
                        receive(rank)
                    reported.add(rank)
                    code = procs[rank].exitcode
                    if rank not in results and rank not in failures:
                        failures[rank] = ("ProcessDied", f"rank {rank} {_describe_exit(code)} "
                                                         f"without reporting a result\n")
            if failures and fail_deadline is None:
                fail_deadline = time.monotonic() + FAIL_GRACE_S

        still = [r for r in range(world_size) if r not in exited]
        if failures:
            first = min(failures)
            exc_type, tb = failures[first]
            lines = [f"rank {first} of {world_size} failed with {exc_type}"]
            others = sorted(set(failures) - {first})
            if others:
                lines.append("also failed: " + ", ".join(f"rank {r} ({failures[r][0]})" for r in others))
            if still:
                lines.append("killed ranks that were still running: " + ", ".join(map(str, still)))
            lines.append(f"--- traceback of rank {first} ---\n{tb.rstrip()}")
            raise RankFailed("\n".join(lines), rank=first, exc_type=exc_type, traceback=tb,
                             failures=failures, results=results, killed=still)
        if still:
            returned = [r for r in still if r in results]
            msg = (f"spawn: timeout of {timeout:.1f} s passed; killed "
                   f"{'rank' if len(still) == 1 else 'ranks'} {', '.join(map(str, still))} "
                   f"that {'was' if len(still) == 1 else 'were'} still running")
            if returned:
                msg += f" (ranks {', '.join(map(str, returned))} had returned but not exited)"
            raise SpawnTimeout(msg, rank=still[0], exc_type="Timeout", traceback="",
                               failures={}, results=results, killed=still)
        return [results[r] for r in range(world_size)]
    finally:
        for p in procs:
            _kill(p)
        for p in procs:
            p.join(timeout=5.0)
        for r in readers:
            r.close()
        del store
        try:
            from comms.runtime.cleanup import sweep_stale_segments
            sweep_stale_segments({p.pid for p in procs if p.pid is not None})
        except Exception:  # noqa: BLE001 - cleanup must not mask the real outcome
            pass
