#!/usr/bin/env bash
# The README's main command: prepare the environment, start ComfyUI with this pack, run the txt2img example
# end to end and print the path of the saved image.
#
#   bash scripts/run_example.sh                       # offline ComfyUI copy, private base directory
#   COMFYUI_PATH=~/ComfyUI bash scripts/run_example.sh  # your own ComfyUI (pack linked into its custom_nodes)
#   bash scripts/run_example.sh --workflow example_workflows/ella_regional_sd15.json --prompt "..."
#
# Without the real weights (models/ella/ella-sd1.5-tsc-t5xl.safetensors, models/text_encoders/flan-t5-xl,
# an SD1.5 checkpoint) it runs on offline stand-ins and says so: see docs/workflows.md for the downloads.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
USER_COMFYUI="${COMFYUI_PATH:-}"
eval "$(bash "$ROOT/scripts/setup_env.sh")"
# A COMFYUI_PATH that is setup_env.sh's own offline copy is not "the user's ComfyUI".
if [ -n "$USER_COMFYUI" ] && [ "$(cd "$USER_COMFYUI" && pwd -P)" = "$(cd "$ELLA_ENV/comfyui" 2>/dev/null && pwd -P)" ]; then
  USER_COMFYUI=""
fi
exec "$ELLA_PYTHON" "$ROOT/scripts/run_example.py" ${USER_COMFYUI:+--user-comfyui "$USER_COMFYUI"} "$@"
