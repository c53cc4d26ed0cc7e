#!/usr/bin/env bash
# The test command: prepares the environment on a fresh machine (scripts/setup_env.sh), then runs pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/core -x`.
# The full run (no arguments, as CI calls it) runs tests/, then the text-encoder tests a second time on the
# oldest transformers the requirements admit (4.50.3, ComfyUI's own floor). ELLA_TEST_TF_FLOOR=1 adds the
# floor run to a subset run too, ELLA_TEST_TF_FLOOR=0 skips it. ELLA_TEST_SHARDS=2 runs the full suite as two
# pytest processes at once, one per core (tests/training then the floor run; everything else), lines
# prefixed [training] / [rest], failing if either fails (not the default: the wall-clock ratio tests of
# tests/robustness failed once under it on a loaded machine).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
eval "$(bash "$ROOT/scripts/setup_env.sh")"
cd "$ROOT"
floor="${ELLA_TEST_TF_FLOOR:-$([ $# -eq 0 ] && echo 1 || echo 0)}"

floor_run() {
  [ -x "$ELLA_PYTHON_TF_FLOOR" ] || { echo "[test] no transformers-floor venv at $ELLA_PYTHON_TF_FLOOR (see setup log)" >&2; return 1; }
  echo "[test] text encoders again on transformers $("$ELLA_PYTHON_TF_FLOOR" -c 'import transformers as t; print(t.__version__)')"
  "$ELLA_PYTHON_TF_FLOOR" -m pytest tests/encoders -q -rs -p no:cacheprovider "$@"
}

if [ $# -gt 0 ] || [ "${ELLA_TEST_SHARDS:-1}" != 2 ]; then
  "$ELLA_PYTHON" -m pytest "${@:-tests}" -q -rs --durations=30
  if [ "$floor" = 1 ]; then floor_run; fi
  exit 0
fi

# Two shards, each with its own temporary folder; a shard's status is the first failure in it.
work="$(mktemp -d "${TMPDIR:-/tmp}/ella-test.XXXXXX")"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
shard() {  # name, then the commands' arguments: runs pytest (and the floor run for "training")
  local name="$1" status=0
  shift
  { "$ELLA_PYTHON" -m pytest "$@" -q -rs --durations=30 --basetemp "$work/$name" -p no:cacheprovider || status=$?
    if [ "$name" = training ] && [ "$floor" = 1 ]; then
      floor_run --basetemp "$work/floor" || { [ "$status" != 0 ] || status=$?; }
    fi
    echo "[test] $name: exit status $status"; exit "$status"; } 2>&1 | sed -u "s/^/[$name] /"
  return "${PIPESTATUS[0]}"
}
started=$(date +%s)
shard training tests/training & training=$!
shard rest tests --ignore=tests/training & rest=$!
status=0
wait "$training" || status=1
wait "$rest" || status=1
echo "[test] both shards done in $(( $(date +%s) - started )) s: $([ "$status" = 0 ] && echo passed || echo FAILED)"
exit "$status"
