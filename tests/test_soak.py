"""Soak, short (bench.soak): 2,000 mixed collectives with checksums on 4 ranks, no result wrong and
no fd more at the end than after the warm-up; and the checksums do catch a wrong result."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.mixed import OPS, run_op, shape  # noqa: E402
from bench.soak import soak  # noqa: E402


def test_soak_2000_mixed_collectives_on_4_ranks():
    s = soak(4, 2000, 500, timeout=200)
    assert s["wrong"] == 0, [r["first_wrong"] for r in s["per_rank"]]
    assert set(s["per_op"]) == set(OPS) and sum(s["per_op"].values()) == 2000, s["per_op"]
    for r in s["per_rank"]:
        assert r["fds"][1] <= r["fds"][0], r
        assert len(r["samples"]) == 11, r


class _Lazy:
    """Two ranks, of which this one moves nothing: every output keeps what it held before."""
    rank, size = 0, 2

    def all_reduce(self, buf, op="sum"):
        pass

    def broadcast(self, buf, root=0):
        pass

    def all_gather(self, out, inp):
        out[:] = np.tile(inp, 2)

    def reduce_scatter(self, out, inp):
        out[:] = inp[:out.size]

    def all_to_all(self, out, inp):
        out[:] = inp


@pytest.mark.parametrize("op", OPS)
def test_a_collective_that_ignores_the_other_rank_is_caught(op):
    k = next(k for k in range(1000) if shape(k)[0] == op and (op != "broadcast" or k % 2 == 1))
    ok, ran = run_op(_Lazy(), k)
    assert ran == op and not ok
