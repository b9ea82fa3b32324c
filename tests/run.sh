#!/usr/bin/env bash
# The whole test suite, from a fresh machine: sets up .venv (torch CPU wheel, editable install that
# compiles the native core) and runs pytest. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/.ci/setup.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
