"""``erasekit-masks``: irregularise a folder of masks the SmartEraser way (offline, resumable).

    erasekit-masks MASKS_DIR OUT_DIR [--choice random|eval|1..6 | --ratio R] [--fixed-ratios]
                   [--variants N] [--seed S] [--metric chessboard|euclidean] [--overwrite]

Each output is a 0/255 PNG named after its input's stem (``stem.png``, or ``stem_vK.png`` with several
variants) so it still pairs with a triplet dataset's ``source/`` and ``target/``. The generator of every
(file, variant) derives from the seed and the file name, so adding files never changes other results.
Existing outputs are skipped (resume); unreadable files are reported and do not stop the run.
Exit codes (shared by every ``erasekit-*`` command, ``jobs.py``): 0 done, 1 some masks failed or an error stopped
the run, 2 bad arguments, 130 interrupted (finished masks are kept).
"""
from __future__ import annotations

import argparse
import os
import sys
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from ..dataset_tools.imageio import IMAGE_EXTENSIONS, read_mask
from ..jobs import EXIT_FAILED, EXIT_OK, CliHost, UsageError, check_input, check_output_folder, cli_main
from . import masks


def output_name(stem: str, variant: int, variants: int) -> str:
    return f"{stem}.png" if variants == 1 else f"{stem}_v{variant}.png"


def file_rng(seed: int, stem: str, variant: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(stem.encode("utf-8")), variant])


def process_mask(mask: np.ndarray, args, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """(new mask, what was done) for one mask under the command-line options."""
    if args.ratio is not None:
        return masks.resize_to_area(mask, args.ratio, args.metric), f"area x{args.ratio:g}"
    if args.choice == "eval":
        return masks.irregularize(mask, 3, rng, test_mode=True, metric=args.metric)[0], "eval 1.10"
    choice = "random" if args.choice == "random" else int(args.choice)
    result, used = masks.irregularize(mask, choice, rng, args.fixed_ratios, args.metric)
    return result, f"choice {used}"


def write_png_atomic(path: Path, mask: np.ndarray) -> None:
    partial = path.with_name(path.name + ".partial")
    Image.fromarray(mask.astype(np.uint8) * 255).save(partial, format="PNG")
    os.replace(partial, path)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="erasekit-masks", description="Irregularise a folder of object masks (SmartEraser 'ME').")
    parser.add_argument("masks_dir", type=Path, help="folder of mask images (white = object, thresholded at 50%%)")
    parser.add_argument("out_dir", type=Path, help="folder for the new masks (created)")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--choice", default="random", choices=["random", "eval", "1", "2", "3", "4", "5", "6"],
                     help="SmartEraser choice; 'random' follows the shape rule, 'eval' is the 1.10x dilation "
                     "SmartEraser uses at inference (default: random)")
    how.add_argument("--ratio", type=float, help="grow/shrink every mask to exactly this area ratio instead")
    parser.add_argument("--fixed-ratios", action="store_true",
                        help="use the paper's test-mode ratios (0.85, 1.10, 1.35, 2.25, 1.15) instead of "
                        "drawing from the training ranges")
    parser.add_argument("--variants", type=int, default=1, help="irregularised versions per mask (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    parser.add_argument("--metric", choices=masks.METRICS, default="chessboard",
                        help="grow/shrink geometry: chessboard = official square kernels (default)")
    parser.add_argument("--overwrite", action="store_true", help="redo outputs that already exist")
    args = parser.parse_args(argv)
    if args.ratio is not None and not args.ratio > 0:
        parser.error(f"--ratio must be positive, got {args.ratio}")
    if args.variants < 1:
        parser.error(f"--variants must be at least 1, got {args.variants}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    with CliHost("irregularising masks", unit="mask") as host:
        return cli_main("erasekit-masks", lambda: run(args, host))


def run(args, host=None) -> int:
    host = host or CliHost(enabled=False)
    check_input(args.masks_dir, "mask folder")
    files = sorted(p for p in args.masks_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UsageError(f"no mask images ({', '.join(IMAGE_EXTENSIONS)}) in {args.masks_dir}")
    stems = Counter(p.stem for p in files)
    clashing = sorted(s for s, n in stems.items() if n > 1)
    if clashing:
        raise UsageError(f"files in {args.masks_dir} share a stem, so their outputs would collide: {clashing}")
    check_output_folder(args.out_dir, "output folder")
    args.out_dir.mkdir(exist_ok=True)

    summary, failures = Counter(), []
    for done, path in enumerate(files):
        host.check_interrupt()
        host.progress(done, len(files))
        targets = [args.out_dir / output_name(path.stem, v, args.variants) for v in range(args.variants)]
        if not args.overwrite and all(t.exists() for t in targets):
            summary["skipped (exists)"] += len(targets)
            continue
        mask, reason = read_mask(path)
        if mask is None:
            failures.append(f"{path.name}: {reason}")
            continue
        for variant, target in enumerate(targets):
            if target.exists() and not args.overwrite:
                summary["skipped (exists)"] += 1
                continue
            result, what = process_mask(mask, args, file_rng(args.seed, path.stem, variant))
            write_png_atomic(target, result)
            summary[what if mask.any() else "empty (copied)"] += 1
    host.progress(len(files), len(files))

    for what, count in sorted(summary.items()):
        print(f"{count:6d}  {what}")
    for failure in failures:
        print(f"failed  {failure}", file=sys.stderr)
    print(f"wrote to {args.out_dir}")
    return EXIT_FAILED if failures else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
