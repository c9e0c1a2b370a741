# Sourced by dev_setup.sh and fresh_venv.sh (with $root set to the checkout): what both venvs are built from.
# comfy: the ComfyUI whose requirements are installed: COMFYUI_PATH, else ~/ComfyUI, else the shared ComfyUI 0.3.64
# snapshot (../shared/comfyui/ComfyUI), the order tests/comfy uses.
comfy="${COMFYUI_PATH:-}"
if [ -z "$comfy" ]; then
  comfy="$HOME/ComfyUI"
  [ -f "$comfy/main.py" ] || comfy="${ERASEKIT_SHARED_COMFYUI:-$root/../shared/comfyui/ComfyUI}"
fi
# torch is ComfyUI's to own at run time (a GPU user's ComfyUI brings its own); for tests we pin the pair that imports
# with torchvision.
torch_pins="torch==2.14.1 torchvision==0.29.1"

# comfy_requirements FILE: ComfyUI's requirements.txt without torch, torchvision and torchaudio (torch_pins install them).
comfy_requirements() {
  grep -vE '^\s*(torch|torchvision|torchaudio)\s*$' "$comfy/requirements.txt" > "$1"
}
