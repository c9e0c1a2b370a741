#!/usr/bin/env bash
# Builds, once, the venv of a user's fresh ComfyUI install with EraseKit dropped into custom_nodes: torch and
# torchvision, ComfyUI's requirements.txt and EraseKit's requirements.txt, nothing else (no extras, no test
# packages). tests/test_install.py runs the pack in it. Prints the venv's path.
#   COMFYUI_PATH          the ComfyUI whose requirements are installed (default ~/ComfyUI, else the shared snapshot)
#   ERASEKIT_FRESH_VENV   where to build it (default ~/.cache/erasekit/fresh-venv-<hash of the requirement files>)
# The venv is kept: a later call with the same requirement files installs nothing. With --path it only prints
# where the venv is (or would be), building nothing; it exists when <path>/.erasekit-fresh-complete does.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/_env.sh
. "$root/scripts/_env.sh"  # comfy, torch_pins (the pair dev_setup.sh installs), comfy_requirements
if [ ! -f "$comfy/requirements.txt" ]; then
  echo "fresh_venv: no ComfyUI at $comfy (set COMFYUI_PATH)" >&2
  exit 2
fi
key="$( (echo "$torch_pins"; cat "$root/requirements.txt" "$comfy/requirements.txt") | sha1sum | cut -c1-12)"
venv="${ERASEKIT_FRESH_VENV:-$HOME/.cache/erasekit/fresh-venv-$key}"
if [ "${1:-}" = "--path" ]; then
  echo "$venv"
  exit 0
fi
if [ ! -f "$venv/.erasekit-fresh-complete" ]; then
  rm -rf "$venv"  # a half-built venv from an interrupted run
  python3 -m venv "$venv"
  py="$venv/bin/python"
  "$py" -m pip install -q --upgrade pip
  # shellcheck disable=SC2086
  "$py" -m pip install -q $torch_pins
  comfy_requirements "$venv/comfy-requirements.txt"
  "$py" -m pip install -q -r "$venv/comfy-requirements.txt"
  "$py" -m pip install -q -r "$root/requirements.txt"
  touch "$venv/.erasekit-fresh-complete"
fi
echo "$venv"
