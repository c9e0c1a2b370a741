#!/usr/bin/env bash
# The test command: sets up everything a fresh machine needs (scripts/dev_setup.sh), then runs the unit
# tests and tests/comfy against COMFYUI_PATH, else ~/ComfyUI, else a cached writable copy of ../shared/comfyui (a
# failure under CI=true when none is found).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$(bash "$root/scripts/dev_setup.sh" | tail -n 1)"
cd "$root"
exec "$venv/bin/python" -m pytest -q -rs "$@"
