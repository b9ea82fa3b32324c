"""The inputs hypothesis draws for the wire fuzz tests (tests/fuzz_wire.py has the harness and the
model), and the entry point the subprocess runs (``python tests/fuzz_wire_cases.py tcp shm``): ``main`` returns 0
when every example held, 1 (after hypothesis printed the shrunk falsifying example) otherwise.

Messages start from the one rank 1 would send for the operation and change up to three header
fields to values near the edges (other magic, kinds, ranks, sequence numbers, counts, tags; sizes
of 0, one off, over the early-message limit, 2^63, 2^64 - 1) or are early p2p messages of other
tags; the bytes after a header are its declared size, or a few more or fewer. On tcp the stream is
then cut anywhere and junk may follow; on shm up to three slots get another length or flags, and
the published head may lie.
"""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hypothesis import HealthCheck, given, settings, strategies as st

from comms.runtime.native import lib
from fuzz_wire import (FIELDS, LAST, FIRST, MSG_MAX, NSLOTS, SLOT_BYTES, TAG, COUNT_ANY, MAGIC, Op, HDR, pack,
                       shm_case, tcp_case)

EXAMPLES = int(os.environ.get("COMMS_FUZZ_EXAMPLES", "120"))

ops = st.builds(lambda kind, dtype, count: Op(kind, count * (1 if dtype == lib.CM_U8 else 4), dtype),
                st.sampled_from(["recv", "coll"]), st.sampled_from([lib.CM_U8, lib.CM_I32]), st.integers(0, 48))


def values(field: str, now: int, op: Op, limit: int):
    """Values of a header field worth trying: near the edges of its type and of the operation."""
    if field == "magic":
        return st.sampled_from([0, MAGIC ^ 1, MAGIC << 1 & 0xFFFFFFFF, 0xFFFFFFFF])
    if field in ("kind", "coll", "dtype", "redop"):
        return st.one_of(st.sampled_from([0, 1, 2, 3, 255]), st.integers(0, 255))
    if field in ("root", "src"):
        return st.sampled_from([-1, 0, 2, -(1 << 31), (1 << 31) - 1])
    if field == "nbytes":
        n = op.nbytes
        return st.one_of(st.sampled_from([0, max(0, n - 1), n + 1, 2 * n + 4, limit, limit + 1, 1 << 16, 1 << 63,
                                          (1 << 64) - 1]), st.integers(0, 4096))
    return st.one_of(st.sampled_from([0, 1, 2, now + 1, COUNT_ANY]), st.integers(0, (1 << 64) - 1))


@st.composite
def exchanges(draw, op: Op, limit: int):
    """What rank 1 sends: a quarter of the time a well-formed exchange (early messages of other tags,
    some just over the limit, then the operation's own), otherwise up to four messages of any kind."""
    if draw(st.integers(0, 3)) == 0:
        return draw(st.lists(messages(op, limit, early=True), max_size=2)) + [draw(messages(op, limit, mutate=False))]
    return draw(st.lists(messages(op, limit), max_size=4))


@st.composite
def messages(draw, op: Op, limit: int, early: bool = False, mutate: bool = True):
    """(header bytes, payload): the operation's own message, mutated, or an early p2p message
    (``limit``: the context's limit on early messages)."""
    h = op.header()
    if early or mutate and draw(st.integers(0, 3)) == 0:
        h.update(kind=lib.CM_MSG_P2P, coll=0, seq=0, tag=TAG + 1 + draw(st.integers(0, 3)),
                 nbytes=draw(st.one_of(st.integers(0, limit // 2), st.sampled_from([limit, limit + 1]))))
    elif mutate:
        for f in draw(st.lists(st.sampled_from(FIELDS), max_size=draw(st.sampled_from([0, 0, 1, 3])), unique=True)):
            h[f] = draw(values(f, h[f], op, limit))
    declared = h["nbytes"]
    size = declared if declared <= 4096 else draw(st.integers(0, 64))
    if mutate and not early and draw(st.integers(0, 3)) == 0:
        size = max(0, size + draw(st.sampled_from([-1, 1, -4, 4])))
    if size <= 64:
        return pack(h), draw(st.binary(min_size=size, max_size=size))
    # larger payloads from a seed: hypothesis discards examples that draw kilobytes of data
    return pack(h), np.random.default_rng(draw(st.integers(0, 2**32 - 1))).bytes(size)


@st.composite
def tcp_inputs(draw):
    op = draw(ops)
    stream = b"".join(hdr + body for hdr, body in draw(exchanges(op, MSG_MAX["tcp"])))
    if draw(st.integers(0, 3)) == 0:
        stream = stream[:draw(st.integers(0, len(stream)))]
    if draw(st.integers(0, 3)) == 0:
        stream += draw(st.binary(min_size=1, max_size=64))
    return op, stream, draw(st.booleans()), draw(st.integers(0, 2**31))


def to_slots(hdr: bytes, body: bytes) -> list:
    """A message as the sender lays it into slots: FIRST on the first (with the header), LAST on the last."""
    chunks = [body[i:i + SLOT_BYTES] for i in range(0, len(body), SLOT_BYTES)] or [b""]
    out = []
    for i, c in enumerate(chunks):
        flags = (FIRST if i == 0 else 0) | (LAST if i == len(chunks) - 1 else 0)
        out.append((len(c), flags, hdr if i == 0 else bytes(HDR.size), c))
    return out


@st.composite
def shm_inputs(draw):
    op = draw(ops)
    slots = [s for hdr, body in draw(exchanges(op, MSG_MAX["shm"])) for s in to_slots(hdr, body)]
    slots = slots[:NSLOTS]
    for _ in range(draw(st.sampled_from([0, 0, 1, 3])) if slots else 0):
        i = draw(st.integers(0, len(slots) - 1))
        ln, flags, hdr, body = slots[i]
        if draw(st.booleans()):
            ln = draw(st.one_of(st.integers(0, 2 * SLOT_BYTES), st.sampled_from([0xFFFFFFFF, SLOT_BYTES + 1])))
        else:
            flags = draw(st.integers(0, 3))
        slots[i] = (ln, flags, hdr, body)
    head = len(slots)
    if draw(st.integers(0, 4)) == 0:
        head = draw(st.one_of(st.integers(0, NSLOTS + 1), st.sampled_from([(1 << 64) - 1, 1 << 63])))
    return op, slots, head, draw(st.integers(0, 2**31))


SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@SETTINGS
@given(tcp_inputs())
def fuzz_tcp(case):
    tcp_case(*case)


@SETTINGS
@given(shm_inputs())
def fuzz_shm(case):
    shm_case(*case)


def main(which: list[str]) -> int:
    tests = {"tcp": fuzz_tcp, "shm": fuzz_shm}
    failed = 0
    for name in which:
        try:
            tests[name]()
            print(f"fuzz {name}: {EXAMPLES} examples held", flush=True)
        except Exception:
            import traceback
            traceback.print_exc()
            failed = 1
    return failed


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
