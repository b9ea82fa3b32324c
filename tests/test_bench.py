"""``python -m bench``: small sweeps as subprocesses (table, JSON against bench/schema.json, plot,
the corrupt-result hook, every op on 3 ranks, the MPI-absent path, MoE). The in-process checks (the
command line, variants, progress display, check data) are in test_bench_cli.py.

The subprocess sweeps are kept tiny (-n 10..20, -w 1..2, one launch) so the file runs in well under
a minute and a half on 2 busy cores.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import backends, cli, driver, moe_op, ops, worker  # noqa: E402

SCHEMA = json.loads((ROOT / "bench" / "schema.json").read_text())
COLUMNS = ["size", "count", "type", "redop", "root", "place", "backend", "algorithm", "transport", "time", "min",
           "max", "algbw", "busbw", "#wrong", "vs_gloo"]
ALL_OPS = ["all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "reduce", "gather", "scatter",
           "sendrecv"]
QUICK = ["--launches", "1", "-n", "20", "-w", "2"]
MPI_PRESENT = backends.mpi_missing() is None
MOE_PRESENT = driver.moe_missing() is None


def bench(*argv: str, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    full = dict(os.environ)
    full.pop(worker.CORRUPT_ENV, None)
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "bench", *argv], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=timeout)


def rows_of(stdout: str) -> list[dict[str, str]]:
    """The table rows (lines not starting with #), as dicts keyed by column."""
    out = []
    for line in stdout.splitlines():
        if line.strip() and not line.startswith("#"):
            cells = line.split()
            assert len(cells) == len(COLUMNS), line
            out.append(dict(zip(COLUMNS, cells)))
    return out


# -- a small JSON Schema validator for the keywords bench/schema.json uses -------------------------
_TYPES = {"object": dict, "array": list, "string": str, "null": type(None)}
_KNOWN = {"$schema", "$id", "$defs", "$ref", "title", "description", "type", "required", "properties",
          "additionalProperties", "items", "enum", "minimum"}


def _is(value, t: str) -> bool:
    if t == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if t == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t == "boolean":
        return isinstance(value, bool)
    return isinstance(value, _TYPES[t])


def validate(value, schema: dict, root: dict | None = None, path: str = "$") -> list[str]:
    """Errors of ``value`` against ``schema`` (draft 2020-12 subset); an unknown keyword is an error,
    so the schema cannot silently rely on something this validator ignores."""
    root = root or schema
    errors = [f"{path}: schema keyword {k!r} not supported by the test validator" for k in schema if k not in _KNOWN]
    if "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/$defs/"), ref
        return errors + validate(value, root["$defs"][ref.split("/")[-1]], root, path)
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is(value, t) for t in types):
            return errors + [f"{path}: {value!r:.60} is not {' or '.join(types)}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in {schema['enum']}")
    if "minimum" in schema and _is(value, "number") and value < schema["minimum"]:
        errors.append(f"{path}: {value} < {schema['minimum']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        errors += [f"{path}: missing {k!r}" for k in schema.get("required", []) if k not in value]
        for k, v in value.items():
            if k in props:
                errors += validate(v, props[k], root, f"{path}.{k}")
            else:
                extra = schema.get("additionalProperties", True)
                if extra is False:
                    errors.append(f"{path}: unexpected key {k!r}")
                elif isinstance(extra, dict):
                    errors += validate(v, extra, root, f"{path}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            errors += validate(v, schema["items"], root, f"{path}[{i}]")
    return errors


# -- one sweep shared by the table, JSON, plot and A/B tests ---------------------------------------
@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    js, png = d / "out.json", d / "plot.png"
    p = bench("-b", "8", "-e", "64K", "-f", "4", *QUICK, "--ops", "all_reduce,all_gather",
              "--backends", "comms,comms@COMMS_FLIGHT_RECORDER=0,gloo", "--json", str(js), "--plot", str(png))
    return p, js, png


def test_table_has_the_columns_and_passes(sweep):
    p, _, _ = sweep
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    heads = [line[1:].split() for line in p.stdout.splitlines() if line[1:].split()[:1] == ["size"]]
    assert len(heads) == 2 and all(h == COLUMNS for h in heads), heads     # one table per op
    rows = rows_of(p.stdout)
    assert {r["backend"] for r in rows} == {"comms", "comms@COMMS_FLIGHT_RECORDER=0", "gloo"}
    # all_reduce: only in place is native for comms and gloo, so its out-of-place rows are not shown
    assert {r["place"] for r in rows if r["redop"] == "sum"} == {"in"}
    assert {r["place"] for r in rows if r["redop"] == "none"} == {"out", "in"}
    assert all(r["#wrong"] == "0" for r in rows)
    assert all(r["vs_gloo"] != "-" for r in rows if r["backend"] != "gloo")
    assert "# Out of bounds values : 0 OK" in p.stdout
    assert re.search(r"# n/a all_reduce out-of-place \(rows not shown\): comms: .*in place only", p.stdout)
    # the A/B footer compares the two comms variants per size
    assert "# compare A = comms with B = comms@COMMS_FLIGHT_RECORDER=0" in p.stdout
    assert re.search(r"#   all_reduce +in-place +8 B: A +[\d.]+ us +B +[\d.]+ us +A/B [\d.]+", p.stdout)
    assert "launch 3/3" in p.stderr and "\r" not in p.stderr      # not a TTY: one line per launch


def test_json_validates_against_the_schema(sweep):
    p, js, _ = sweep
    assert p.returncode == 0
    doc = json.loads(js.read_text())
    assert validate(doc, SCHEMA) == []
    rows = doc["rows"]
    assert {(r["op"], r["place"]) for r in rows} == {(o, pl) for o in ("all_reduce", "all_gather") for pl in ("out", "in")}
    for r in rows:
        if r["na"]:
            assert r["time_us"]["median"] is None and r["busbw"] is None
        else:
            t = r["time_us"]
            assert t["min"] <= t["median"] <= t["max"]
            assert r["busbw"] == pytest.approx(r["algbw"] * r["bus_factor"])
            assert r["algbw"] == pytest.approx(r["bytes"] / t["median"] / 1e3)
            assert r["wrong"] == 0 and r["transport"] == ("tcp" if r["library"] == "gloo" else "shm")
    variant = [r for r in rows if r["backend"] == "comms@COMMS_FLIGHT_RECORDER=0"]
    assert variant and all(r["env"] == {"COMMS_FLIGHT_RECORDER": "0"} and r["library"] == "comms" for r in variant)
    assert doc["compare"]["a"] == "comms" and doc["compare"]["rows"]
    # a document that breaks the schema is caught
    broken = json.loads(js.read_text())
    del broken["rows"][0]["busbw"]
    broken["rows"][1]["place"] = "sideways"
    errs = validate(broken, SCHEMA)
    assert any("missing 'busbw'" in e for e in errs) and any("sideways" in e for e in errs)


def test_plot_is_a_png(sweep):
    p, _, png = sweep
    assert p.returncode == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert f"wrote {png}" in p.stderr


def test_corrupted_result_is_counted_and_fails(tmp_path):
    js = tmp_path / "c.json"
    p = bench("-b", "8", "-e", "64", "--launches", "1", "-n", "5", "-w", "1", "--backends", "comms",
              "--ops", "all_reduce,gather", "-r", "1", "--json", str(js), env={worker.CORRUPT_ENV: "1"})
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    rows = rows_of(p.stdout)
    assert rows and all(int(r["#wrong"]) == 1 for r in rows), rows    # one element, one rank, per check
    assert re.search(r"# Out of bounds values : \d+ FAILED", p.stdout)
    doc = json.loads(js.read_text())
    assert all(r["wrong"] == 1 for r in doc["rows"] if not r["na"])
    assert doc["launches"]["comms"][0]["doc"]["corrupt"] is True


def test_numpy_backend_runs_every_op_on_numpy_views(tmp_path):
    """"numpy": comms' own calls on numpy views of the buffers (the reference of the torch path's
    overhead): every op runs and checks exactly; bfloat16, which numpy lacks, is n/a."""
    js = tmp_path / "numpy.json"
    p = bench("--ops", ",".join(ALL_OPS), "-b", "64", "-e", "64", *QUICK, "--backends", "numpy", "--json", str(js))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    doc = json.loads(js.read_text())
    assert validate(doc, SCHEMA) == []
    ran = [r for r in doc["rows"] if not r["na"]]
    assert {r["op"] for r in ran} == set(ALL_OPS) and {r["library"] for r in ran} == {"numpy"}
    assert all(r["wrong"] == 0 for r in ran)
    assert backends.NumpyCommsBackend.native("all_reduce", "in", "bfloat16") == "numpy has no bfloat16"
    assert backends.NumpyCommsBackend.native("all_reduce", "in", "float16") is None


def test_every_op_on_three_ranks_and_mpi_absent(tmp_path):
    """All nine ops (and moe when comms.moe is there), both places, root 1, comms, torch.distributed
    on the comms backend ("torch") and gloo on 3 ranks: every check passes. mpirun is hidden from PATH, so the mpi backend is skipped with the
    clear message, which is no failure."""
    bindir = Path(sys.executable).parent
    assert shutil.which("mpirun", path=str(bindir)) is None
    js = tmp_path / "ops.json"
    moe = ["moe", "--moe-hidden", "16", "--moe-experts", "6", "--moe-topk", "2"] if MOE_PRESENT else []
    p = bench("-np", "3", "-r", "1", "--ops", ",".join(ALL_OPS + moe[:1]), *moe[1:], "-b", "64", "-e", "4K",
              "-f", "64", "--launches", "1", "-n", "10", "-w", "1", "--backends", "comms,torch,gloo,mpi",
              "--json", str(js), env={"PATH": str(bindir)})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "mpi: Open MPI / mpi4py not installed (run with --install-mpi as root)" in p.stderr
    assert "# Skipped backend      : mpi" in p.stdout
    doc = json.loads(js.read_text())
    assert validate(doc, SCHEMA) == []
    assert doc["skipped"][0]["label"] == "mpi" and {b["label"] for b in doc["backends"]} == {"comms", "torch", "gloo"}
    ran = [r for r in doc["rows"] if not r["na"]]
    assert {r["op"] for r in ran} == set(ALL_OPS + moe[:1])
    assert all(r["wrong"] == 0 and r["time_us"]["median"] > 0 for r in ran)
    if MOE_PRESENT:     # comms.moe and gloo's all_to_all_single way: dispatch + combine checked exactly
        assert {(r["backend"], r["place"]) for r in ran if r["op"] == "moe"} == \
            {("comms", "out"), ("torch", "out"), ("gloo", "out")}
    assert {r["root"] for r in ran if r["op"] in ("broadcast", "reduce", "gather", "scatter")} == {1}
    # nccl-tests bus factors at 3 ranks
    factor = {r["op"]: r["bus_factor"] for r in ran}
    assert factor["all_reduce"] == pytest.approx(4 / 3) and factor["sendrecv"] == 1.0
    assert factor["gather"] == factor["scatter"] == factor["all_to_all"] == pytest.approx(2 / 3)
    assert factor["broadcast"] == factor["reduce"] == 1.0
    # native modes: comms has in-place all_gather/reduce_scatter/gather/scatter; nobody has sendrecv in place
    native = {(r["backend"], r["op"], r["place"]) for r in ran}
    for op in ("all_gather", "reduce_scatter", "gather", "scatter"):
        assert ("comms", op, "in") in native and ("comms", op, "out") in native
    assert ("comms", "all_reduce", "out") not in native and ("gloo", "all_to_all", "in") not in native


@pytest.mark.skipif(not MPI_PRESENT, reason="Open MPI / mpi4py not installed (python -m bench --install-mpi)")
def test_mpi_backend(tmp_path):
    js = tmp_path / "mpi.json"
    p = bench("--backends", "mpi", "--ops", "all_reduce,reduce_scatter,sendrecv,gather", "-r", "1",
              "-b", "8", "-e", "4K", "-f", "8", "--launches", "1", "-n", "10", "-w", "1", "--json", str(js))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    doc = json.loads(js.read_text())
    ran = [r for r in doc["rows"] if not r["na"]]
    assert {(r["op"], r["place"]) for r in ran} >= {("all_reduce", "out"), ("all_reduce", "in"), ("sendrecv", "in")}
    assert all(r["wrong"] == 0 and r["transport"] == "shm" for r in ran)
    assert "Open MPI" in doc["launches"]["mpi"][0]["doc"]["versions"]["mpi"]



@pytest.mark.skipif(not MOE_PRESENT, reason="comms.moe is not importable")
@pytest.mark.parametrize("routing", ["consecutive", "random"])
def test_moe_comms_and_gloo(tmp_path, routing):
    """--ops moe on comms and on gloo (the all_to_all_single way of bench/moe_gloo.py), both routings,
    bfloat16, 2 ranks, one launch: every row of both backends ran and passed the exact check
    (recv_x and combine); mpi stays n/a with its reason; the routing is in the JSON options. No
    timing claim."""
    js = tmp_path / "moe.json"
    p = bench("-np", "2", "--ops", "moe", "--backends", "comms,gloo", "--moe-hidden", "32", "--moe-experts", "8",
              "--moe-topk", "3", "--moe-routing", routing, "-d", "bf16", "-b", "1K", "-e", "16K", "-f", "16",
              "--launches", "1", "-n", "5", "-w", "1", "--json", str(js))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    doc = json.loads(js.read_text())
    assert validate(doc, SCHEMA) == []
    assert doc["options"]["moe_routing"] == routing and doc["options"]["moe"]["routing"] == routing
    out = [r for r in doc["rows"] if r["place"] == "out"]
    assert {(r["backend"], r["bytes"]) for r in out} == {(b, n) for b in ("comms", "gloo") for n in (1024, 16384)}
    assert all(r["na"] is None and r["wrong"] == 0 and r["time_us"]["median"] > 0 and r["algbw"] > 0 for r in out)
    assert all(r["vs_gloo"] > 0 for r in out if r["backend"] == "comms")
    assert all(r["na"] for r in doc["rows"] if r["place"] == "in")
    table = [r for r in rows_of(p.stdout) if r["place"] == "out"]
    assert {r["backend"] for r in table} == {"comms", "gloo"} and all(r["#wrong"] == "0" for r in table)
    op = moe_op.MoE(experts=8, topk=3, hidden=32, routing=routing)
    raw = doc["launches"]["gloo"][0]["doc"]["results"][0]["rows"]
    assert [r["dispatched_rows"] for r in raw] == [op.dispatched_rows(op.layout(n, 2, 2), 2) for n in (1024, 16384)]


def test_moe_routing_and_backend_modes():
    """--moe-routing: default consecutive; random is examples/moe_bench.py's (a generator seeded
    per rank, uniform scores, top-K, weights = the scores), deterministic, distinct experts; gloo has
    moe out of place, mpi says why not."""
    assert cli.parse_args(["--ops", "moe"]).moe["routing"] == "consecutive"
    a = cli.parse_args(["--ops", "moe", "--moe-routing", "random", "-np", "4", "--moe-experts", "8"])
    assert a.moe == {"experts": 8, "topk": 4, "hidden": 1024, "routing": "random"}
    with pytest.raises(SystemExit):
        cli.parse_args(["--ops", "moe", "--moe-routing", "zipf"])
    import torch
    op = ops.lookup("moe", a.moe)
    idx, w = op.routing_of(100, 3, 4)
    scores = torch.rand(100, 8, generator=torch.Generator().manual_seed(moe_op.ROUTING_SEED + 3))
    want_w, want_idx = scores.topk(4, dim=-1)
    assert torch.equal(idx, want_idx) and torch.equal(w, want_w) and w.dtype == torch.float32
    assert torch.equal(op.routing_of(100, 3, 4)[0], idx) and not torch.equal(op.routing_of(100, 2, 4)[0], idx)
    assert bool((idx.sort(1).values.diff(dim=1) > 0).all())
    c_idx, c_w = ops.lookup("moe", {"experts": 8, "topk": 4}).routing_of(5, 1, 4)
    assert c_idx[0].tolist() == [3, 4, 5, 6] and bool((c_w == 0.25).all())
    assert backends.GlooBackend.native("moe", "out", "bfloat16") is None
    assert backends.GlooBackend.native("moe", "in", "bfloat16") and backends.GlooBackend.native("moe", "out", "int32")
    assert "MPI has no MoE layer" in backends.MpiBackend.native("moe", "out", "float32")


# -- in-process ------------------------------------------------------------------------------------
def test_moe_absent_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(driver, "moe_missing", lambda: "import comms.moe failed: ModuleNotFoundError")
    assert driver.main(["--ops", "all_reduce,moe"]) == 2
    assert "moe: comms.moe is not available" in capsys.readouterr().err


def test_only_mpi_and_absent_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(backends, "mpi_missing", lambda env=None: "mpirun is not on PATH")
    assert driver.main(["--backends", "mpi"]) == 2
    err = capsys.readouterr().err
    assert "mpi: Open MPI / mpi4py not installed (run with --install-mpi as root)" in err
    assert "no backend left to run" in err


def test_device_script_runs_its_table(tmp_path):
    """bench/device.sh, the one command for a lent GPU machine's CPUs, run here on its smallest
    setting: the plain numpy call against Gloo (and MPI where installed), checked results, one JSON
    per (size, ranks) and the log."""
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path), RANKS="2", LAUNCHES="1", SIZES="8")
    p = subprocess.run(["bash", str(ROOT / "bench" / "device.sh")], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    doc = json.loads((tmp_path / "8_np2.json").read_text())
    ran = {r["library"]: r for r in doc["rows"] if not r["na"]}
    assert {"numpy", "gloo"} <= set(ran) and all(r["wrong"] == 0 and r["bytes"] == 8 for r in ran.values())
    assert "# device.sh: " in (tmp_path / "device.log").read_text()
