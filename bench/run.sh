#!/usr/bin/env bash
# The main job, from a fresh machine: sets up .venv, then benchmarks all_reduce on 2 local ranks,
# comms against Gloo, 8 B to 64 MiB, median of 3 launches, in an nccl-tests style table.
# Extra arguments go to `python -m bench` (see bench/README.md).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/.ci/setup.sh" >&2
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m bench -np 2 -b 8 -e 64M --backends comms,gloo --launches 3 "$@"
