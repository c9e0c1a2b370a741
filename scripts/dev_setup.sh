#!/usr/bin/env bash
# Builds (or refreshes) the development/test environment on a fresh machine, offline from
# PyPI only. Idempotent: a second run installs nothing new.
#   ERASEKIT_VENV   where the venv lives (default ~/.cache/erasekit/venv, reused between runs)
#   COMFYUI_PATH    the ComfyUI whose requirements are installed too: COMFYUI_PATH, else ~/ComfyUI, else the
#                   shared ComfyUI 0.3.64 snapshot (../shared/comfyui/ComfyUI), the order tests/comfy uses
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${ERASEKIT_VENV:-$HOME/.cache/erasekit/venv}"
# shellcheck source=scripts/_env.sh
. "$root/scripts/_env.sh"  # comfy, torch_pins, comfy_requirements

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
fi
py="$venv/bin/python"
stamp="$venv/.erasekit-setup"
# Re-install when a requirement changes. Tests import the checkout they live in (tests/conftest.py), so the
# editable install (for the erasekit-* commands) need not follow every checkout.
want="$( (cat "$root/requirements.txt" "$root/tests/requirements.txt" "$comfy/requirements.txt" 2>/dev/null) | sha1sum | cut -c1-12)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # shellcheck disable=SC2086
  "$py" -m pip install -q $torch_pins
  if [ -f "$comfy/requirements.txt" ]; then
    comfy_requirements "$venv/comfy-reqs.txt"
    "$py" -m pip install -q -r "$venv/comfy-reqs.txt" requests
  fi
  SAM2_BUILD_CUDA=0 "$py" -m pip install -q -r "$root/tests/requirements.txt"
  echo "$want" > "$stamp"
fi
# The erasekit-* commands in the venv run this checkout (a few seconds when another checkout was installed last).
if [ "$(cat "$venv/.erasekit-editable" 2>/dev/null)" != "$root" ]; then
  "$py" -m pip install -q --no-deps -e "$root" 2>/dev/null
  echo "$root" > "$venv/.erasekit-editable"
fi
# The fresh-install check (tests/comfy/test_fresh_install.py) runs the pack in a venv holding only what a user's
# ComfyUI install has: ComfyUI's requirements + requirements.txt. Built once (minutes), then reused.
COMFYUI_PATH="$comfy" bash "$root/scripts/fresh_venv.sh" >/dev/null
# The frontend check (tests/comfy/test_frontend.py) drives ComfyUI's real UI in headless Chromium.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) >/dev/null 2>&1 \
    || echo "dev_setup: could not install chromium; the frontend test will skip" >&2
fi
node_dir="${ERASEKIT_NODE_MODULES:-$HOME/.cache/erasekit/node/node_modules}"
if command -v npm >/dev/null 2>&1 && [ ! -d "$node_dir/playwright-core" ]; then
  mkdir -p "$(dirname "$node_dir")"
  (cd "$(dirname "$node_dir")" && npm install --silent --no-audit --no-fund playwright-core@1.65.1) >/dev/null 2>&1 \
    || echo "dev_setup: could not install playwright-core; the frontend test will skip" >&2
fi
echo "$venv"
