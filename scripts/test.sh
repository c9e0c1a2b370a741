#!/usr/bin/env bash
# The test command: sets up everything a fresh machine needs (scripts/dev_setup.sh), then runs the unit
# tests and tests/comfy against the ComfyUI at COMFYUI_PATH (default ~/ComfyUI; skipped when absent).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$(bash "$root/scripts/dev_setup.sh" | tail -n 1)"
cd "$root"
exec "$venv/bin/python" -m pytest -q -rs "$@"
