#!/usr/bin/env bash
# A real EraseKit job, offline, on a fresh machine: mine removal pairs (frame with a car, its mask, the
# same road empty) from a static-camera video with the Video4Removal recipe, then irregularise the mined
# masks the SmartEraser way. Arguments: [VIDEO_OR_FOLDER ...] (default: ../shared/data/video/road_cars.avi).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$(bash "$root/scripts/dev_setup.sh" | tail -n 1)"
out="${ERASEKIT_DEMO_OUT:-$root/out/demo}"
inputs=("$@")
[ ${#inputs[@]} -gt 0 ] || inputs=("$root/../shared/data/video/road_cars.avi")
for f in "${inputs[@]}"; do
  [ -e "$f" ] || { echo "demo: input not found: $f (pass a video or a folder of videos)" >&2; exit 2; }
done
mkdir -p "$out"
# Cars cover 4-14 % of road_cars.avi's frame, so the paper's foreground ratio of 0.15 keeps one frame; 0.04 mines ~10.
"$venv/bin/erasekit-video" "${inputs[@]}" -o "$out/video_pairs" --resume --foreground-ratio "${ERASEKIT_DEMO_FG_RATIO:-0.04}"
"$venv/bin/erasekit-masks" "$out/video_pairs/mask" "$out/irregular_masks" --choice random --seed 0
echo "demo: triplets in $out/video_pairs (source/ mask/ target/ manifest.jsonl), irregularised masks in $out/irregular_masks"
