"""Pair cleanliness of Video4Removal mining: how many pairs a clip gives, and how many differ outside their mask.

    python benchmarks/pair_cleanliness.py [VIDEO ...] [--foreground-ratio R] [--lighting-mse M] [--before CHECKOUT]
                                          [--out DIR]

Each video (default: ../shared/data/video/road_cars.avi and highway_busy.avi, and tests/data/video03.avi, a
held-out static-camera clip, bgslibrary, MIT) is mined whole, three ways in one run:

- ``unchecked``: changes outside the mask measured, never acted on (the limit set past any frame's size): what a
  miner without the check keeps;
- ``reject`` and ``mask``: the two ``--outside-changes`` modes;
- with ``--before CHECKOUT``, also another checkout's miner at its defaults (e.g. the code before the check).

For each it prints pairs per minute of video, and the share of pairs whose largest changed region outside the
mask (the object's own shadow excepted; ``video_mining.largest_outside_change`` of this checkout, measured the same
way for every row) is at least 40 px: the goal is 0 % for ``reject`` and ``mask``, and for ``mask`` every changed
region inside the mask. It writes one montage per video, 4 pairs of the default mode (``mask``; a clip without a
clean pair shows the pairs ``unchecked`` keeps, marked refused): source | mask | target | difference, the
difference amplified 3x and red where the frames differ outside the mask, to ``--out``
(default benchmarks/results/pair_cleanliness_<video>.png).
"""
import argparse
import importlib
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED_VIDEOS = ROOT.parent / "shared" / "data" / "video"
DEFAULT_VIDEOS = [SHARED_VIDEOS / "road_cars.avi", SHARED_VIDEOS / "highway_busy.avi", ROOT / "tests" / "data" / "video03.avi"]
# cars cover 4-14 % of road_cars' and highway_busy's frames, 2-5 % of video03's: the paper's 0.15 pairs few of them
FOREGROUND_RATIOS = {"road_cars.avi": 0.04, "highway_busy.avi": 0.04, "video03.avi": 0.02}
LIMIT = 40  # px: a changed region outside the mask this large is one (the measure)
PANEL_WIDTH = 320
sys.path.insert(0, str(ROOT / "benchmarks"))
from _pack import import_checkout  # noqa: E402


def import_mining(root, name):
    """``dataset_tools.video_mining`` of the pack at ``root``, imported under the private package ``name``."""
    import_checkout(root, name)
    return importlib.import_module(f"{name}.dataset_tools.video_mining")


def measure(mining, pairs, report):
    """(pairs per minute, share of pairs with an outside change >= LIMIT, largest outside change of each pair)."""
    minutes = report.frames / report.fps / 60 if report.fps else 0
    largest = [mining.largest_outside_change(p.source, p.target, p.mask, 25.0) for p in pairs]
    dirty = sum(size >= LIMIT for size in largest)
    return (len(pairs) / minutes if minutes else 0.0), (dirty / len(pairs) if pairs else 0.0), largest


def difference_panel(mining, pair):
    """|source - target| amplified 3x, red where the frames differ outside the mask and the object's shadow."""
    diff = cv2.absdiff(pair.source, pair.target).max(axis=2)
    panel = np.repeat(np.clip(diff.astype(np.int32) * 3, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    changed = mining.changed_pixels(pair.source, pair.target, 25.0)
    panel[changed & ~mining.object_zone(pair.source, pair.target, pair.mask, changed)] = (255, 0, 0)
    return panel


def montage_row(mining, pair, label):
    mask = np.repeat((pair.mask.astype(np.uint8) * 255)[..., None], 3, axis=2)
    panels = [pair.source, mask, pair.target, difference_panel(mining, pair)]
    height = round(pair.source.shape[0] * PANEL_WIDTH / pair.source.shape[1])
    row = np.concatenate([cv2.resize(p, (PANEL_WIDTH, height), interpolation=cv2.INTER_AREA) for p in panels], axis=1)
    banner = np.full((18, row.shape[1], 3), 255, np.uint8)
    cv2.putText(banner, label, (4, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([banner, row], axis=0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("videos", nargs="*", default=[str(v) for v in DEFAULT_VIDEOS])
    parser.add_argument("--foreground-ratio", type=float, default=None,
                        help="one ratio for every video (default: per clip, see FOREGROUND_RATIOS)")
    parser.add_argument("--lighting-mse", type=float, default=20.0,
                        help="the lighting limit of every miner (default 20, the miners' default; the issue's "
                             "held-out measurement used a lenient 60, at which the old miner kept pairs on video03)")
    parser.add_argument("--before", default=None, help="another checkout of the pack whose miner to measure too")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder of the montages")
    args = parser.parse_args(argv)
    mining = import_mining(ROOT, "_erasekit_cleanliness")
    before = import_mining(Path(args.before).resolve(), "_erasekit_cleanliness_before") if args.before else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{'video':18s} {'miner':10s} {'pairs':>5s} {'pairs/min':>9s} {'>= 40 px':>8s} {'grown':>5s}  largest outside change per pair (px)")
    for video in map(Path, args.videos):
        if not video.is_file():
            print(f"{video.name}: missing, skipped")
            continue
        ratio = args.foreground_ratio or FOREGROUND_RATIOS.get(video.name, 0.04)
        runs = {}
        if before is not None:
            runs["before"] = before.run_mining(video, before.PairingConfig(foreground_ratio=ratio,
                                                                           lighting_mse=args.lighting_mse))
        common = {"foreground_ratio": ratio, "lighting_mse": args.lighting_mse}
        for mode, config in (("unchecked", mining.PairingConfig(**common, outside_changes="reject",
                                                                outside_change_pixels=10 ** 9)),
                             ("reject", mining.PairingConfig(**common, outside_changes="reject")),
                             ("mask", mining.PairingConfig(**common, outside_changes="mask"))):
            runs[mode] = mining.run_mining(video, config)
        for mode, (pairs, report) in runs.items():
            per_minute, dirty, largest = measure(mining, pairs, report)
            grown = sum(p.stats.get("mask_grown_px", 0) > 0 for p in pairs)
            print(f"{video.name:18s} {mode:10s} {len(pairs):5d} {per_minute:9.1f} {dirty:8.0%} {grown:5d}  {largest}")
        shown, refused = runs["mask"][0], False
        if not shown:
            shown, refused = runs["unchecked"][0], True
        rows = []
        for pair in shown[:: max(1, len(shown) // 4)][:4]:
            size = mining.largest_outside_change(pair.source, pair.target, pair.mask, 25.0)
            label = (f"{video.name} frame {pair.frame} / empty frame {pair.background_frame}: largest change outside "
                     f"the mask {size} px" + (", REFUSED (no clean pair in this clip)" if refused else
                                             f", mask grown {pair.stats.get('mask_grown_px', 0)} px"))
            rows.append(montage_row(mining, pair, label))
        if rows:
            suffix = "" if args.lighting_mse == 20.0 else f"_lighting{args.lighting_mse:g}"
            path = out / f"pair_cleanliness_{video.stem}{suffix}.png"
            cv2.imwrite(str(path), np.concatenate(rows, axis=0)[..., ::-1])
            print(f"{'':18s} montage: {path}")
        else:
            print(f"{'':18s} no pair at all: no montage")


if __name__ == "__main__":
    main()
