#!/usr/bin/env bash
# The test command: prepares the environment on a fresh machine (scripts/setup_env.sh), then runs pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/core -x`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
eval "$(bash "$ROOT/scripts/setup_env.sh")"
cd "$ROOT"
exec "$ELLA_PYTHON" -m pytest "${@:-tests}" -q -rs
