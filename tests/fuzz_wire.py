"""What a peer can put on an established data channel, and what the engine must make of it: the
wire side of the fuzz tests (tests/test_hardening.py runs ``python tests/fuzz_wire_cases.py tcp|shm``
in a subprocess, so that a crash fails one test instead of killing pytest).

One native context, rank 0 of 2, runs one operation against a fake rank 1 that this process plays:

* ``recv``: a p2p receive of N bytes with tag T from rank 1;
* ``coll``: the all_reduce step of a collective, SEND of N bytes to rank 1 and RECV_REDUCE (SUM) of
  N bytes from it (collective number 1, so seq 1).

Before the operation starts, the fake peer writes what hypothesis drew: comms messages, some of
them mutated (any header field, the size the header declares against the bytes that follow), cut
anywhere, with junk after them, then it closes the channel or leaves it open. On tcp that is a
byte stream on a socketpair whose other end is the context's channel (cm_ctx_add_tcp_peer); on shm
it is slots of the inbound ring in the context's segment (an anonymous mapping laid out by
cm_shm_init_segment), with any length and flags, and any head.

A model (``expect``) reads the same input as the engine does and says what must happen: the
operation completes with exactly the bytes of the message that matches it (CLEAN), it must fail
(FAIL), or either (a MATCH with more input behind it, which the engine may read in the same pass).
A failure must be a CommsError naming rank 1; the destination sits between guard bytes that must
come back untouched; every wait has a short deadline.
"""
from __future__ import annotations

import mmap
import socket
import struct
import time
from dataclasses import dataclass

import numpy as np

from comms.algorithms.plan import IN, OUT, RECV, RECV_REDUCE, SEND, Plan, Step
from comms.errors import CommsError
from comms.runtime import failures
from comms.runtime.engine import Encoded, Engine
from comms.runtime.native import ffi, lib

HDR = struct.Struct("<IBBBBiiQQQQ")          # cm_hdr (native/_cdefs.h)
MAGIC = 0x436F6D6D                            # CM_MAGIC
COLL, P2P = lib.CM_MSG_COLL, lib.CM_MSG_P2P
TAG, ROOT, COUNT_ANY = 7, -1, (1 << 64) - 1
# the fuzzed contexts' limit on one early message: on shm, less than the ring holds
MSG_MAX = {"tcp": 2048, "shm": 128}
PEER_MAX = 1 << 20                            # never reached by the drawn input (see expect_tcp)
DEADLINE_S = 0.15
GUARD = 64
SLOT_BYTES, NSLOTS = 64, 8                    # the shm ring: small, so that messages span slots
FIRST, LAST = 1, 2
assert HDR.size == ffi.sizeof("cm_hdr")


@dataclass(frozen=True)
class Op:
    kind: str          # "recv" or "coll"
    nbytes: int
    dtype: int         # CM_U8 or CM_I32 (SUM wraps alike in numpy and in C)

    @property
    def esz(self) -> int:
        return 1 if self.dtype == lib.CM_U8 else 4

    def header(self) -> dict:
        """The header of the message rank 1 would send for this operation."""
        coll = self.kind == "coll"
        return dict(magic=MAGIC, kind=COLL if coll else P2P, coll=1 if coll else 0, dtype=self.dtype,
                    redop=lib.CM_SUM if coll else 0, root=ROOT, src=1, seq=1 if coll else 0,
                    count=self.nbytes // self.esz, tag=0 if coll else TAG, nbytes=self.nbytes)


FIELDS = ("magic", "kind", "coll", "dtype", "redop", "root", "src", "seq", "count", "tag", "nbytes")


def pack(h: dict) -> bytes:
    return HDR.pack(*(h[f] for f in FIELDS))


# ---- the model ---------------------------------------------------------------------------------
FAIL, MATCH = "fail", "match"


def judge(op: Op, h: dict, msg_max: int) -> str:
    """What the engine makes of a message header while ``op`` waits: "op" (its receive takes it),
    "early" (kept aside), or FAIL (malformed, mismatched, over the limit, or parked forever)."""
    if h["magic"] != MAGIC or h["src"] != 1 or h["kind"] not in (COLL, P2P):
        return FAIL
    mine = op.header()
    if h["kind"] == COLL:
        if op.kind != "coll":
            return FAIL                       # no collective receive will ever take it: the deadline
        same = all(h[f] == mine[f] for f in ("seq", "coll", "dtype", "redop", "root"))
        same = same and h["count"] in (mine["count"], COUNT_ANY)
        return "op" if same and h["nbytes"] == op.nbytes else FAIL
    if op.kind == "recv" and h["tag"] == TAG:
        return "op" if h["nbytes"] == op.nbytes else FAIL
    return "early" if h["nbytes"] <= msg_max else FAIL


def expect_tcp(op: Op, stream: bytes) -> tuple[str, bytes, bool]:
    """(FAIL or MATCH, the matching payload, whether input follows it) for a tcp byte stream.
    Early messages never add up to PEER_MAX: at most 64 KiB are written."""
    pos = 0
    while len(stream) - pos >= HDR.size:
        h = dict(zip(FIELDS, HDR.unpack_from(stream, pos)))
        pos += HDR.size
        verdict = judge(op, h, MSG_MAX["tcp"])
        if verdict == FAIL or len(stream) - pos < h["nbytes"]:
            return FAIL, b"", False
        body = stream[pos:pos + h["nbytes"]]
        pos += h["nbytes"]
        if verdict == "op":
            return MATCH, body, pos < len(stream)
    return FAIL, b"", False                   # stalls (a partial header, or none): closed or the deadline


def expect_shm(op: Op, slots: list, head: int) -> tuple[str, bytes, bool]:
    """The same for the ring: ``slots`` are (len, flags, header bytes, payload) in ring order,
    ``head`` the count the fake peer published."""
    if head > NSLOTS:
        return FAIL, b"", False
    msg = None                                 # (verdict, declared bytes, payload so far)
    for i in range(head):         # slots the peer never wrote hold zeros
        ln, flags, hdr, payload = slots[i] if i < len(slots) else (0, 0, bytes(HDR.size), b"")
        if bool(flags & FIRST) == (msg is not None):
            return FAIL, b"", False
        if msg is None:
            h = dict(zip(FIELDS, HDR.unpack(hdr)))
            verdict = judge(op, h, MSG_MAX["shm"])
            if verdict == FAIL:
                return FAIL, b"", False
            msg = (verdict, h["nbytes"], b"")
        verdict, declared, got = msg
        if ln > SLOT_BYTES or ln > declared - len(got):
            return FAIL, b"", False
        if verdict == "op" and op.kind == "coll" and ln % op.esz:
            return FAIL, b"", False
        got += payload[:SLOT_BYTES].ljust(SLOT_BYTES, b"\0")[:ln]
        msg = (verdict, declared, got)
        if flags & LAST:
            if len(got) != declared:
                return FAIL, b"", False
            if verdict == "op":
                return MATCH, got, i + 1 < head
            msg = None
    return FAIL, b"", False


# ---- the harness -------------------------------------------------------------------------------
class _Comm:
    """What comms.runtime.failures.build reads of a communicator: no store, so no peer's reason; no
    control plane, so no failed ranks and no revoke."""
    rank, prefix, _store, control, _failed, _revoker, _broken = 0, "fuzz/", None, None, {}, None, None


def engine(transport: str) -> Engine:
    """Rank 0 of 2, no spinning, the transport's early-message limits."""
    return Engine(0, 2, 0, 0, 0, 0, (MSG_MAX[transport], PEER_MAX))


def run(eng: Engine, op: Op, src: np.ndarray, out: np.ndarray) -> CommsError | None:
    """Run ``op`` on rank 0 with input ``src`` and output ``out[GUARD:-GUARD]``; its error, or None."""
    n = op.nbytes
    if op.kind == "recv":
        plan = Plan("recv", (Step(RECV, 1, OUT, 0, n),))
        enc = Encoded(plan, "recv", P2P, 0, op.dtype, 0, -1, n // op.esz, TAG, lens=(n, n))
    else:
        plan = Plan("coll", (Step(SEND, 1, IN, 0, n), Step(RECV_REDUCE, 1, OUT, 0, n)))
        enc = Encoded(plan, "all_reduce", COLL, 1, op.dtype, lib.CM_SUM, ROOT, n // op.esz, lens=(n, n))
    dst = out.ctypes.data + GUARD
    failed, _, seq = eng.run(enc, src.ctypes.data, dst, 0, time.monotonic_ns() + int(DEADLINE_S * 1e9))
    if failed is None:
        return None
    return failures.build(_Comm(), failed[0], failed[1], enc.name, seq, plan, DEADLINE_S)


def check(op: Op, outcome: tuple, err: CommsError | None, src: np.ndarray, out: np.ndarray, before: np.ndarray,
          elapsed: float) -> None:
    """The assertions every case makes, whatever the transport."""
    verdict, body, more = outcome
    assert elapsed < DEADLINE_S + 2.0, f"the operation took {elapsed:.2f} s with a {DEADLINE_S} s deadline"
    assert (out[:GUARD] == 0xA5).all() and (out[-GUARD:] == 0x5A).all(), "a guard byte around the destination changed"
    if err is not None:
        assert isinstance(err, CommsError), type(err)
        assert err.peer == 1 and "rank 1" in str(err), f"the error does not name rank 1: {err!r}"
        assert not (verdict == MATCH and not more), f"a well-formed exchange failed: {err}"
        return
    assert verdict == MATCH, "the operation completed on input that cannot complete it"
    dt = np.uint8 if op.dtype == lib.CM_U8 else np.int32
    got = out[GUARD:-GUARD]
    if op.kind == "recv":
        assert got.tobytes() == body, "the receive completed with other bytes than the message's"
    else:
        want = (before[GUARD:-GUARD].view(dt) + np.frombuffer(body, dt)).astype(dt)
        assert got.view(dt).tobytes() == want.tobytes(), "the reduction completed with a wrong result"


def buffers(op: Op, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    src = rng.integers(0, 256, op.nbytes, dtype=np.uint8)
    out = np.concatenate([np.full(GUARD, 0xA5, np.uint8), rng.integers(0, 256, op.nbytes, dtype=np.uint8),
                          np.full(GUARD, 0x5A, np.uint8)])
    return src, out, out.copy()


def tcp_case(op: Op, stream: bytes, close: bool, seed: int) -> None:
    """Write ``stream`` into a channel of a fresh context (then close it, or not), run ``op``."""
    eng = engine("tcp")
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        assert lib.cm_ctx_add_tcp_peer(eng.ctx, 1, a.fileno(), 64) == 0
        a.detach()                                      # the context owns and closes it
        b.sendall(stream)
        if close:
            b.shutdown(socket.SHUT_WR)
        src, out, before = buffers(op, seed)
        t0 = time.monotonic()
        err = run(eng, op, src, out)
        check(op, expect_tcp(op, stream), err, src, out, before, time.monotonic() - t0)
    finally:
        eng.close()
        b.close()


def shm_case(op: Op, slots: list, head: int, seed: int) -> None:
    """Lay ``slots`` into the inbound ring of a fresh context's segment, publish ``head``, run ``op``."""
    eng = engine("shm")
    nbytes = lib.cm_shm_segment_bytes(2, NSLOTS, SLOT_BYTES, 0)
    mine, theirs = mmap.mmap(-1, nbytes), mmap.mmap(-1, nbytes)
    pm, pt = ffi.from_buffer(mine), ffi.from_buffer(theirs)
    try:
        lib.cm_shm_init_segment(pm, 2, NSLOTS, SLOT_BYTES, 0)
        lib.cm_shm_init_segment(pt, 2, NSLOTS, SLOT_BYTES, 0)
        assert lib.cm_ctx_set_shm(eng.ctx, pm, 0, 2, NSLOTS, SLOT_BYTES, 0) == 0
        assert lib.cm_ctx_add_shm_peer(eng.ctx, 1, pt, 1, 0) == 0
        ring = 4096 + (128 + NSLOTS * (64 + SLOT_BYTES))          # rank 1's ring in our segment
        for i, (ln, flags, hdr, payload) in enumerate(slots[:NSLOTS]):
            at = ring + 128 + i * (64 + SLOT_BYTES)
            mine[at:at + 8 + HDR.size] = struct.pack("<II", ln, flags) + hdr
            mine[at + 64:at + 64 + len(payload[:SLOT_BYTES])] = payload[:SLOT_BYTES]
        struct.pack_into("<Q", mine, ring, head)
        src, out, before = buffers(op, seed)
        t0 = time.monotonic()
        err = run(eng, op, src, out)
        check(op, expect_shm(op, slots, head), err, src, out, before, time.monotonic() - t0)
    finally:
        eng.close()
        del pm, pt
        mine.close()
        theirs.close()

