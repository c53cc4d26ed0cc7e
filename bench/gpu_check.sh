#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): sampling figures in fp16 and bf16, peak VRAM, the training bench, all
# written to one file (default bench/gpu_check_results.txt). About 5 minutes on a CUDA machine, set-up
# included; `--smoke` runs it on the CPU with tiny shapes. Extra arguments go to gpu_check.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${ELLA_PYTHON:-}" ] || [ -z "${COMFYUI_PATH:-}" ]; then
  eval "$(bash "$ROOT/scripts/setup_env.sh")"
fi
exec timeout 470 "$ELLA_PYTHON" "$ROOT/bench/gpu_check.py" "$@"
