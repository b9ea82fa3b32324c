#!/usr/bin/env bash
# The CPU-side figures to take on a lent GPU machine (16 cores; issue #27): float32 SUM all_reduce of
# 8 B and 64 MiB at 2, 4 and 8 ranks, comms against Gloo (and MPI where mpirun and mpi4py are there),
# each the median of LAUNCHES fresh launches, in one command of about 6 minutes.
#
# That machine has python3 with torch, numpy, setuptools and a C compiler, but no network, no pyzmq and
# no cffi: carry them as wheels in .whl (bench/README.md, "On a lent GPU machine"). Run from the
# repository root:
#
#   bash bench/device.sh --wheels                 # here, with network: downloads them into .whl (git-ignored)
#   OUT=/some/dir bash bench/device.sh            # there (carry .whl): RANKS="2 4 8" LAUNCHES=3 SIZES="8 64M"
#
# Each run's table goes to stdout and $OUT/device.log, its JSON to $OUT/<size>_np<N>.json. The plain
# numpy call is comms' column, as in the bars (numpy arrays through comm.all_reduce).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
if [ "${1:-}" = "--wheels" ]; then          # that machine's Python is 3.12 (KINDS.md); pyzmq is abi3
    exec "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl pyzmq==27.1.0 cffi==2.0.0 pycparser==2.23
fi
OUT="${OUT:-/tmp/comms-device}"
RANKS="${RANKS:-2 4 8}"
LAUNCHES="${LAUNCHES:-3}"
SIZES="${SIZES:-8 64M}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/device.log") 2>&1

if ! "$PY" -c "import zmq, cffi" 2>/dev/null; then
    [ -d .whl ] || { echo "device.sh: pyzmq and cffi are missing and there is no .whl to install them from" >&2; exit 2; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/comms-site .whl/*.whl
    export PYTHONPATH="/tmp/comms-site${PYTHONPATH:+:$PYTHONPATH}"
fi
# comms itself, editable (compiles native/ into comms._native), with what is already installed
if ! "$PY" -c "import comms._native, comms.algorithms" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null
fi
backends=numpy,gloo
if command -v mpirun >/dev/null 2>&1 && "$PY" -c "import mpi4py" 2>/dev/null; then backends="$backends,mpi"; fi
echo "# device.sh: $(nproc) CPUs, $("$PY" -c 'import torch; print("torch", torch.__version__)'), backends $backends"

failed=0
for size in $SIZES; do
    for n in $RANKS; do                 # a run that fails is reported, and the others still run
        timeout 170 "$PY" -m bench -np "$n" -b "$size" -e "$size" --backends "$backends" --launches "$LAUNCHES" \
            --place in --timeout 60 --json "$OUT/${size}_np${n}.json" \
            || { echo "device.sh: $size at $n ranks failed or ran out of time (exit $?)"; failed=1; }
    done
done
exit $failed
