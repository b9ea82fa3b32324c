"""``python -m bench`` in process: the command line, backend variants and the compared pair, the
progress display, the check data of every op, and the worker's interleaved variants (the
subprocess sweeps are in test_bench.py)."""
from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import backends, cli, driver, ops, report  # noqa: E402


def test_command_line():
    a = cli.parse_args(["--ops", "reduce,gather,sendrecv", "-r", "1", "--backends", "comms,comms@COMMS_SPIN=0@X=a=b"])
    assert a.ops == ["reduce", "gather", "sendrecv"] and a.root == 1 and a.places == ["out", "in"]
    assert [s.label for s in a.backends] == ["comms", "comms@COMMS_SPIN=0@X=a=b"]
    assert a.backends[1].base == "comms" and a.backends[1].env == {"COMMS_SPIN": "0", "X": "a=b"}
    b = cli.parse_args(["-o", "scatter", "--place", "in"])
    assert b.ops == ["scatter"] and b.places == ["in"] and [s.label for s in b.backends] == ["comms", "gloo", "mpi"]
    for bad in (["-r", "2"], ["--ops", "all_reduce,nope"], ["-o", "gather", "--ops", "scatter"],
                ["--backends", "comms@=1"], ["--backends", "nccl"], ["-np", "1", "-o", "sendrecv"],
                ["--compare", "comms,gloo2"], ["--ops", "moe", "--moe-experts", "3"]):
        with pytest.raises(SystemExit) as e:
            cli.parse_args(bad)
        assert e.value.code == 2, bad


def test_compare_pair_defaults_to_variants_of_one_library():
    specs = [backends.Spec.parse(s) for s in ("gloo", "comms", "mpi", "comms@COMMS_FLIGHT_RECORDER=0")]
    args = cli.parse_args(["--backends", ",".join(s.label for s in specs)])
    assert report.compare_pair(args, specs) == ("comms", "comms@COMMS_FLIGHT_RECORDER=0")
    args = cli.parse_args(["--backends", "comms,gloo", "--compare", "gloo,comms"])
    assert report.compare_pair(args, args.backends) == ("gloo", "comms")


def _launch(ok: bool) -> report.Launch:
    return report.Launch("comms", 0, 1.5, doc={} if ok else None, error=None if ok else "exit status 1",
                         tail=["boom"])


def test_progress_lines_when_not_a_tty():
    s = io.StringIO()
    prog = driver.Progress(2, stream=s)
    prog.start("comms #1")
    prog.update(1, 4, "comms all_reduce in 8 B")
    prog.finish(_launch(True))
    prog.start("gloo #1")
    prog.finish(_launch(False))
    prog.close()
    lines = s.getvalue().splitlines()
    assert lines[0] == "bench: launch 1/2: comms #1 done in 1.5 s"
    assert lines[1].startswith("bench: launch 2/2: gloo #1 FAILED (exit status 1)") and lines[2] == "    boom"
    assert "\r" not in s.getvalue()


def test_progress_bar_on_a_tty():
    class Tty(io.StringIO):
        def isatty(self):
            return True
    s = Tty()
    prog = driver.Progress(2, stream=s)
    prog.start("comms #1")
    prog._last = 0.0
    prog.update(2, 4, "comms all_reduce in 8 B")
    prog.finish(_launch(True))
    prog.close()
    text = s.getvalue()
    assert "\r" in text and "[" in text and "%" in text and "launch 1/2" in text
    assert text.endswith("bench: launch 1/2: comms #1 done in 1.5 s\n")


def test_check_data_are_exact_for_every_op():
    """The expected results follow from the inputs by each op's definition (a reference in numpy-free torch)."""
    import torch
    n, root, dtype = 3, 1, "bfloat16"
    for name in ops.OPS:
        op = ops.OPS[name]
        lay = op.layout(96, n, ops.elem_size(dtype))
        ins = [op.check_input(lay, r, n, root, dtype).double() for r in range(n)]
        b = lay.block
        for r in range(n):
            want = op.expected(lay, r, n, root, dtype)
            ref = {"all_reduce": lambda: sum(ins), "broadcast": lambda: ins[root],
                   "reduce": lambda: sum(ins) if r == root else None, "sendrecv": lambda: ins[(r - 1) % n],
                   "all_gather": lambda: torch.cat(ins), "gather": lambda: torch.cat(ins) if r == root else None,
                   "reduce_scatter": lambda: sum(ins)[r * b:(r + 1) * b],
                   "scatter": lambda: ins[root][r * b:(r + 1) * b],
                   "all_to_all": lambda: torch.cat([ins[p][r * b:(r + 1) * b] for p in range(n)])}[name]()
            if ref is None:
                assert want is None, name
            else:
                assert torch.equal(want.double(), ref), (name, r)
                assert bool((want.double() >= 1).all()), name     # 0 (never written) is always wrong


def test_worker_variants_need_comms_and_one_op():
    from bench import worker
    for bad in (["--backend", "gloo", "--variants", "auto,ring"], ["--ops", "all_reduce,broadcast", "--variants", "auto"]):
        with pytest.raises(SystemExit):
            worker.parse_args(["--sizes", "8"] + (["--backend", "comms"] if "--backend" not in bad else []) + bad)
    a = worker.parse_args(["--backend", "comms", "--sizes", "8", "--variants", "auto,ring"])
    assert a.variants == ["auto", "ring"] and a.variant_rounds == cli.VARIANT_ROUNDS
    with pytest.raises(SystemExit):
        worker.parse_args(["--backend", "comms", "--sizes", "8", "--variants", "auto", "--variant-rounds", "0"])


def test_worker_interleaves_the_variants_in_the_given_rounds(monkeypatch):
    """measure_variants with --variant-rounds 3 and -n 6: after one warm-up turn per variant, 3
    rounds run every variant in turn, the order flipped every round, each turn a barrier, one
    untimed op and 2 timed ops; a variant's figures pool its rounds' 6 samples."""
    from bench import measure, worker
    log: list = []

    class Fake:
        forced = None
        size = 2

        def force(self, op, algo):
            self.forced = algo or "auto"

        def barrier(self):
            log.append(("barrier", self.forced))

        def reduce_values(self, xs, how):
            return xs

        def algorithm(self, op, nbytes):
            return self.forced

    be = Fake()
    monkeypatch.setattr(measure, "_fns_and_batch", lambda *a: ([lambda: log.append(("op", be.forced))], 1, 1))
    args = worker.parse_args(["--backend", "comms", "--sizes", "64", "--iters", "6", "--variant-rounds", "3",
                              "--variants", "auto,ring,tree"])
    figs = measure.measure_variants(args, be, ops.OPS["all_reduce"], "in", ops.OPS["all_reduce"].layout(64, 2, 4),
                                    None, ["auto", "ring", "tree"])
    turns = [v for kind, v in log if kind == "barrier"]
    assert turns == ["auto", "ring", "tree"] + ["auto", "ring", "tree", "tree", "ring", "auto", "auto", "ring", "tree"]
    assert sum(1 for kind, v in log if kind == "op" and v == "ring") == 1 + 3 * (1 + 2)
    assert {v: (f["iters"], f["algorithm"]) for v, f in figs.items()} == {"auto": (6, "auto"), "ring": (6, "ring"),
                                                                          "tree": (6, "tree")}
    assert all(len(f["round_means_s"]) == 3 and min(f["round_means_s"]) >= 0 for f in figs.values())
