#!/usr/bin/env bash
# The test command: prepares the environment on a fresh machine (scripts/setup_env.sh), then runs pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/core -x`.
# The full run (no arguments, as CI calls it) then runs the text-encoder tests a second time on the oldest
# transformers the requirements admit (4.50.3, ComfyUI's own floor); ELLA_TEST_TF_FLOOR=1 adds that second
# run to a subset run too, ELLA_TEST_TF_FLOOR=0 skips it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
eval "$(bash "$ROOT/scripts/setup_env.sh")"
cd "$ROOT"
floor="${ELLA_TEST_TF_FLOOR:-$([ $# -eq 0 ] && echo 1 || echo 0)}"
"$ELLA_PYTHON" -m pytest "${@:-tests}" -q -rs --durations=30
if [ "$floor" = 1 ]; then
  [ -x "$ELLA_PYTHON_TF_FLOOR" ] || { echo "[test] no transformers-floor venv at $ELLA_PYTHON_TF_FLOOR (see setup log)" >&2; exit 1; }
  echo "[test] text encoders again on transformers $("$ELLA_PYTHON_TF_FLOOR" -c 'import transformers as t; print(t.__version__)')"
  exec "$ELLA_PYTHON_TF_FLOOR" -m pytest tests/encoders -q -rs
fi
