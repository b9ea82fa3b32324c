#!/usr/bin/env bash
# Sets up everything comms needs on a fresh machine, idempotently, and leaves the venv in .venv:
#   - Debian packages (iproute2 for the multi-host harness, iperf3 for bench.tcp_p2p, libfabric for the
#     rdma transport: its headers to build it, its library and fi_pingpong to run it) when run as root,
#   - a virtual environment with the torch 2.13.0 CPU wheel installed FIRST (otherwise pip would
#     pull a multi-GB CUDA build to satisfy the torch range),
#   - comms itself, editable, with its test extras; this compiles native/ into comms._native.
# Source it (`. .ci/setup.sh`) or run it; VENV overrides the venv location.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    # iproute2 (ip, tc) for the multi-host harness; Open MPI for the MPI column of the benchmark;
    # iperf3, the reference of bench.tcp_p2p (noninteractive: its debconf question about starting a
    # daemon must not block; the answer "no" is the default)
    need=""
    command -v ip >/dev/null 2>&1 || need="$need iproute2"
    command -v tc >/dev/null 2>&1 || need="$need iproute2"
    command -v gcc >/dev/null 2>&1 || need="$need gcc"
    command -v mpirun >/dev/null 2>&1 || need="$need openmpi-bin libopenmpi-dev"
    command -v iperf3 >/dev/null 2>&1 || need="$need iperf3"
    # libfabric: the rdma transport builds against its headers and dlopens libfabric.so.1 at run time;
    # the tests run it on the tcp and shm software providers, the benchmark holds it against fi_pingpong
    [ -e /usr/include/rdma/fabric.h ] || need="$need libfabric-dev"
    command -v fi_pingpong >/dev/null 2>&1 || need="$need libfabric-bin"
    if [ -n "$need" ]; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null) \
            || echo "setup: could not install$need; the tests that need them will say so" >&2
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
    "$VENV/bin/python" -m pip install -q "torch==2.13.0"
fi
# mpi4py (built against the system Open MPI) for the benchmark's MPI backend, when Open MPI is there.
if command -v mpicc >/dev/null 2>&1 && ! "$VENV/bin/python" -c "import mpi4py" 2>/dev/null; then
    "$VENV/bin/python" -m pip install -q mpi4py >/dev/null 2>&1 || echo "setup: mpi4py did not install" >&2
fi
# The editable install (re)compiles native/ into comms._native; its log is shown only on failure.
log="$(mktemp)"
if ! "$VENV/bin/python" -m pip install -q -e "$ROOT[test]" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    exit 1
fi
rm -f "$log"
export PATH="$VENV/bin:$PATH"
