"""Area-targeted grow/shrink: EraseKit's one-pass ``resize_to_area`` vs SmartEraser's iterative loop.

    python benchmarks/masks.py [--size 1024] [--repeats 5]

Inputs are the real masks of ../shared/data upscaled to size x size; the targets are exactly the grow/shrink
steps of SmartEraser's test-mode choices 2-6 (mask x0.85, mask x1.10, hull x1.35, mask x2.25, box x1.15).
Baselines, re-implemented here from the official ``MaskAugmentor.dilate_by_area`` / ``erode_by_area``:
- "official loop": square kernel of side max(3, sqrt(area_diff / 10)), repeated until the area reaches the
  target; it stops after the first step that passes it, so it overshoots.
- "official loop, 3x3 steps": the same loop with the kernel held at 3, the only setting of that loop that
  cannot overshoot by more than one pixel ring; the fair baseline at (nearly) equal area accuracy.
Area error is |area / target - 1|; EraseKit hits the target pixel count exactly. All in one run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT.parent))
    try:
        from erasekit.erasers import masks
    except ImportError:  # not pip-installed: load the checkout under the package name
        import importlib.util
        spec = importlib.util.spec_from_file_location("erasekit", ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        sys.modules["erasekit"] = importlib.util.module_from_spec(spec)
        from erasekit.erasers import masks
else:
    from ..erasers import masks

SHARED_IMAGES = Path(os.environ.get("ERASEKIT_SHARED_DATA", ROOT.parent / "shared" / "data")) / "images"


def official_loop(mask_u8: np.ndarray, ratio: float, fixed_kernel: int | None = None, max_iter: int = 100):
    """SmartEraser's dilate_by_area / erode_by_area (0/255 uint8 in and out)."""
    initial = int(np.sum(mask_u8 > 128))
    target = int(initial * ratio)
    grow = ratio > 1
    current, area = mask_u8.copy(), initial
    for _ in range(max_iter):
        if area == target:
            break
        side = fixed_kernel or max(3, int(np.sqrt(abs(area - target) / 10)))
        kernel = np.ones((side, side), np.uint8)
        current = cv2.dilate(current, kernel) if grow else cv2.erode(current, kernel)
        area = int(np.sum(current > 128))
        if (grow and area >= target) or (not grow and area <= target):
            break
    return current


def load_cases(size: int):
    files = sorted(SHARED_IMAGES.glob("masked/*_mask.png")) + sorted(SHARED_IMAGES.glob("syn_triplets/mask/*.jpg"))
    if not files:
        sys.exit(f"no masks under {SHARED_IMAGES}: the benchmark needs ../shared/data")
    cases = []
    for path in files:
        gray = np.asarray(Image.open(path).convert("L"))
        mask = cv2.resize(gray, (size, size), interpolation=cv2.INTER_LINEAR) > 127
        box = np.zeros_like(mask)
        x, y, w, h = cv2.boundingRect(mask.astype(np.uint8))
        box[y:y + h, x:x + w] = True
        steps = (("erode", mask, 0.85), ("dilate", mask, 1.10), ("hull", masks.convex_hull(mask), 1.35),
                 ("ellipse", mask, 2.25), ("blob box", box, 1.15))
        for name, source, ratio in steps:
            cases.append((f"{path.stem[:14]} {name}", source, ratio))
    return cases


def timed_interleaved(methods: dict, source: np.ndarray, ratio: float, repeats: int):
    """{name: (result, median seconds)}; the methods take turns so machine load hits them alike."""
    results = {name: method(source, ratio) for name, method in methods.items()}  # warm-up
    times = {name: [] for name in methods}
    for _ in range(repeats):
        for name, method in methods.items():
            start = time.perf_counter()
            method(source, ratio)
            times[name].append(time.perf_counter() - start)
    return {name: (results[name], statistics.median(times[name])) for name in methods}


def area_error(result: np.ndarray, source: np.ndarray, ratio: float) -> float:
    target = round(np.count_nonzero(source) * ratio)
    return abs(np.count_nonzero(result) / target - 1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)  # single-threaded for both sides: a fair, quiet comparison on a shared machine

    methods = {
        "erasekit chessboard": lambda m, r: masks.resize_to_area(m, r, "chessboard"),
        "erasekit euclidean": lambda m, r: masks.resize_to_area(m, r, "euclidean"),
        "official loop": lambda m, r: official_loop(m.astype(np.uint8) * 255, r) > 128,
        "official loop, 3x3 steps": lambda m, r: official_loop(m.astype(np.uint8) * 255, r, fixed_kernel=3) > 128,
    }
    totals = {name: 0.0 for name in methods}
    errors = {name: [] for name in methods}
    print(f"{args.size}x{args.size} masks, median of {args.repeats} interleaved runs, OpenCV on 1 thread; "
          "time ms / area error %")
    print(f"{'case':28s}" + "".join(f"{name:>28s}" for name in methods))
    for label, source, ratio in load_cases(args.size):
        row = f"{label + f' x{ratio:.2f}':28s}"
        for name, (result, seconds) in timed_interleaved(methods, source, ratio, args.repeats).items():
            error = area_error(result, source, ratio)
            totals[name] += seconds
            errors[name].append(error)
            row += f"{seconds * 1e3:18.2f} / {error * 100:5.2f}"
        print(row)

    print("\ntotal time (ms), mean and max area error (%):")
    for name in methods:
        print(f"  {name:26s} {totals[name] * 1e3:9.1f}   mean {np.mean(errors[name]) * 100:6.2f}   "
              f"max {np.max(errors[name]) * 100:6.2f}")
    ours = totals["erasekit chessboard"]
    print("\nspeed of erasekit chessboard (exact area):")
    for name in ("official loop, 3x3 steps", "official loop"):
        print(f"  vs {name:26s} {totals[name] / ours:6.2f}x faster")


if __name__ == "__main__":
    main()
