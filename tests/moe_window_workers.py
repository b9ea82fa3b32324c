"""Functions that run inside spawned ranks for tests/test_moe_windows.py: the single-copy exchange
of comms.moe (shared-memory receive windows) leaves the process's protections as they were, is
the path actually taken, matches the all_to_all path bit for bit, keeps the memory a caller holds,
and leaves no /dev/shm name behind, even when a rank is killed with SIGKILL."""
from __future__ import annotations

import ctypes
import errno
import os
import platform
import signal
import struct
import time

import numpy as np
import torch

import comms
from comms.moe import Dispatcher
from comms.runtime.cleanup import SHM_DIR, pid_alive
from moe_workers import _check, _init, owners, rank_inputs

PR_SET_PTRACER = 0x59616D61
_ARCH = {"x86_64": (0xC000003E, 157, 317), "aarch64": (0xC00000B7, 167, 277)}   # audit arch, prctl, seccomp
_libc = ctypes.CDLL(None, use_errno=True)


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def trap_ptracer_calls() -> list:
    """Install a seccomp filter on every thread of this process under which any
    ``prctl(PR_SET_PTRACER, ...)`` is not executed but raises SIGSYS; returns a list that gets one
    entry per such call (appended by the SIGSYS handler, in the main thread)."""
    if platform.machine() not in _ARCH:
        raise RuntimeError(f"no seccomp numbers for {platform.machine()}; add them to _ARCH")
    arch, nr_prctl, nr_seccomp = _ARCH[platform.machine()]
    ld, jeq, ret = 0x20, 0x15, 0x06                   # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
    allow, trap = 0x7FFF0000, 0x00030000              # SECCOMP_RET_ALLOW, SECCOMP_RET_TRAP
    prog = [(ld, 0, 0, 4), (jeq, 0, 5, arch),         # seccomp_data.arch; not ours: allow
            (ld, 0, 0, 0), (jeq, 0, 3, nr_prctl),     # .nr; not prctl: allow
            (ld, 0, 0, 16), (jeq, 0, 1, PR_SET_PTRACER),   # low word of .args[0]
            (ret, 0, 0, trap), (ret, 0, 0, allow)]
    code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *ins) for ins in prog))
    fprog = _Fprog(len(prog), ctypes.addressof(code))
    calls: list = []
    signal.signal(signal.SIGSYS, lambda *_: calls.append(1))
    if _libc.prctl(38, 1, 0, 0, 0) != 0:                                    # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if _libc.syscall(nr_seccomp, 1, 1, ctypes.byref(fprog)) != 0:          # SET_MODE_FILTER, TSYNC
        raise OSError(ctypes.get_errno(), "seccomp(SECCOMP_SET_MODE_FILTER)")
    return calls


def yama_restricts_siblings() -> bool:
    """Whether Yama (ptrace_scope 1) stops this process from attaching to a sibling: then only
    the sibling's own PR_SET_PTRACER could let it in (root, with CAP_SYS_PTRACE, is never stopped)."""
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            scope = int(f.read())
        with open("/proc/self/status") as f:
            caps = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        return False
    return scope == 1 and not caps >> 19 & 1                                # CAP_SYS_PTRACE


def _read_other(pid: int, addr: int) -> str:
    """process_vm_readv 8 bytes at ``addr`` of ``pid``: "ok" or the errno's name."""
    buf = ctypes.create_string_buffer(8)
    local = (ctypes.c_void_p * 2)(ctypes.addressof(buf), 8)
    remote = (ctypes.c_void_p * 2)(addr, 8)
    n = _libc.process_vm_readv(pid, local, 1, remote, 1, 0)
    return "ok" if n == 8 else errno.errorcode.get(ctypes.get_errno(), "short read")


def _case(world: int, hidden: int = 256, tokens: int = 40, seed: int = 3) -> dict:
    return dict(seed=seed, experts=2 * world, k=2, hidden=hidden, dtype="bf16", tokens=[tokens] * world,
                route="random", target=0)


def guarded_round_trip(rank: int, world: int) -> dict:
    """Single-copy dispatch and combine under the seccomp trap; then a control call of
    prctl(PR_SET_PTRACER, 0) that the trap must catch; then, where Yama applies, rank 0 tries
    to read rank 1's memory (a sibling, not an ancestor): it must be refused."""
    calls = trap_ptracer_calls()
    comm = _init()
    case = _case(world)
    ep = Dispatcher(comm, case["experts"], case["hidden"])
    x, idx, w = rank_inputs(case, world, rank)
    rx, _, _, _, h = ep.dispatch(x, idx, w)
    n = torch.tensor([len(owners(r, case["experts"] // world)) for r in idx], dtype=x.dtype)
    _check(torch.equal(ep.combine(rx, h), x * n.unsqueeze(1)), f"rank {rank}: round trip")
    out = {"enabled": ep.single.enabled, "reason": ep.single.reason, "calls": len(calls)}
    _libc.prctl(PR_SET_PTRACER, 0, 0, 0, 0)          # the control: clears, never widens
    out["control_calls"] = len(calls)
    word = np.array([0x5EC12E7], np.int64)
    mine = np.array([os.getpid(), word.ctypes.data], np.int64)
    every = np.empty(2 * world, np.int64)
    comm.all_gather(every, mine)
    out["yama"] = yama_restricts_siblings()
    out["sibling_read"] = _read_other(int(every[2]), int(every[3])) if rank == 0 else ""
    comm.barrier()                                    # rank 1 (and its word) outlive the read
    ep.close()
    comm.close()
    return out


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _results(ep: Dispatcher, case: dict, world: int, rank: int) -> tuple[list, dict]:
    """Every output of a dispatch, combine, cached dispatch and fp8 dispatch, as bytes; and the
    byte counters moved by the first dispatch."""
    x, idx, w = rank_inputs(case, world, rank)
    before = ep.link_stats()
    rx, ri, rw, tpe, h = ep.dispatch(x, idx, w)
    after = ep.link_stats()
    moved = {k: after[k] - before[k] for k in ("shm_tx_bytes", "window_tx_bytes")}
    me = rank
    moved["rows_to_peers"] = sum(c for p, c in enumerate(h.send_counts) if p != me)
    got = [_bits(rx), _bits(ri), _bits(rw), tpe, _bits(ep.combine(rx * (rank + 1), h))]
    got.append(_bits(ep.dispatch(x * 2 - 1, handle=h)[0]))
    (q, sc), *_ = ep.dispatch(x, idx, w, fp8=True)
    got += [_bits(q), _bits(sc)]
    return got, moved


def compare_paths(rank: int, world: int, cases: list[dict]) -> dict:
    """The same cases through a single-copy dispatcher and an all_to_all one, made by the same
    ranks on the same communicator: every output must be the same bytes."""
    comm = _init()
    out: dict = {"moved": [], "enabled": None}
    for i, case in enumerate(cases):
        os.environ["COMMS_MOE_SINGLE_COPY"] = "1"
        single = Dispatcher(comm, case["experts"], case["hidden"])
        os.environ["COMMS_MOE_SINGLE_COPY"] = "0"
        a2a = Dispatcher(comm, case["experts"], case["hidden"])
        out["enabled"] = (single.single.enabled, a2a.single.enabled)
        got, moved = _results(single, case, world, rank)
        want, _ = _results(a2a, case, world, rank)
        for j, (g, e) in enumerate(zip(got, want)):
            _check(g == e, f"rank {rank} case {i}: output {j} differs between single copy and all_to_all")
        moved["row_bytes"] = case["hidden"] * 2 + 2 * case["k"] * 4           # bf16 row + int32 ids and weights
        out["moved"].append(moved)
        single.close()
        a2a.close()
    comm.close()
    return out


def _my_segments() -> list[str]:
    mine = f"comms.{os.getuid()}.{os.getpid()}."
    return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(mine))


def held_views_and_names(rank: int, world: int) -> dict:
    """recv_x views that a caller keeps are never written again; windows are reused once dropped;
    every peer maps exactly the windows each rank owns; no name of this rank's is left in
    /dev/shm after construction, after every exchange and after close."""
    comm = _init()
    out: dict = {"names": []}
    ep = Dispatcher(comm, 2 * world, 512)
    out["names"] += _my_segments()
    held = []
    for i in range(7):                        # more than windows.KEEP_IDLE held at once
        case = _case(world, hidden=512, tokens=60 + 10 * i, seed=10 + i)
        x, idx, w = rank_inputs(case, world, rank)
        rx, _, _, _, h = ep.dispatch(x, idx, w)
        held.append((rx, rx.clone()))
        ep.combine(rx, h)
        out["names"] += _my_segments()
    out["held_intact"] = all(torch.equal(a, b) for a, b in held)
    del held, rx
    gens = ep.single.windows.gen
    case = _case(world, hidden=512, tokens=60, seed=99)
    x, idx, w = rank_inputs(case, world, rank)
    for _ in range(10):                       # dropped windows are reused, none is made
        rx, _, _, _, h = ep.dispatch(x, idx, w)
        ep.combine(rx, h)
    out["new_windows"] = ep.single.windows.gen - gens
    out["owned"] = sorted(win.gen for win in ep.single.windows.windows)
    out["mapped"] = [sorted(m) for m in ep.single.peers.maps]
    out["names"] += _my_segments()
    ep.close()
    out["names"] += _my_segments()
    comm.close()
    return out


def killed_while_named(rank: int, world: int) -> dict:
    """Rank 1 waits until rank 0's first window is in /dev/shm (rank 0 is then inside the
    exchange that announces it), kills rank 0 with SIGKILL, then makes its own window and fails
    in that exchange; it must leave no name of its own behind."""
    comm = _init(20)
    case = _case(world)
    ep = Dispatcher(comm, case["experts"], case["hidden"])
    x, idx, w = rank_inputs(case, world, rank)
    out: dict = {}
    if rank == 1:
        uid, pid0, token = ep.single.peers.ident[0]
        take = ep.single.windows.take

        def kill_first(nbytes):
            prefix, deadline = f"comms.{uid}.{pid0}.{token:012x}g1", time.monotonic() + 30
            while prefix not in os.listdir(SHM_DIR):
                _check(time.monotonic() < deadline, "rank 0's window never appeared")
                time.sleep(0.005)
            out["victim"] = (pid0, prefix)
            os.kill(pid0, signal.SIGKILL)
            while pid_alive(pid0):
                _check(time.monotonic() < deadline, "rank 0 survived SIGKILL")
                time.sleep(0.005)
            return take(nbytes)
        ep.single.windows.take = kill_first
    try:
        ep.dispatch(x, idx, w)
        out["error"] = "none"
    except comms.CommsError as e:
        out["error"] = type(e).__name__
    out["left"] = _my_segments()
    return out
