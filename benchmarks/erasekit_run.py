"""erasekit-run's per-image overhead over executing the same prompt in-process (target ≤ 5 %).

Both sides run the OmniEraser example workflow on the tiny test models (tests/comfy/tiny, built on first use into
a temporary folder) over the same photos, each on its own ComfyUI PromptExecutor whose cache keeps the loaders'
outputs, so only the first image loads models; that image is left out. Photo by photo, in alternating order (so a
busy machine's drift falls on both sides alike):
- in-process: the same API prompt erasekit-run executes, photo and mask bound by hand (files in ComfyUI's input
  folder), executed with ``Runtime.run``;
- erasekit-run: its per-item path (``FolderRunner.process``: checks, staging, rebinding, execution, atomic
  renames, clean-up, the item log).
Two figures: the median ratio of the two per photo (end to end; on a shared, busy machine its noise is larger
than the effect), and erasekit-run's own work per photo (its item time minus the time inside ComfyUI's
execution, measured in the same call) as a share of the execution: that is the overhead, free of that noise.

Usage: python benchmarks/erasekit_run.py [--images 6] [--side 128] [--steps 3]
Needs a ComfyUI checkout (COMFYUI_PATH, else ~/ComfyUI, else the shared snapshot the tests use).
"""
import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "comfy"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _pack import import_checkout  # noqa: E402

import_checkout()  # this checkout as ``erasekit`` (the harness and erasekit-run's code), whatever else is installed


def photos(folder, count, side):
    """``count`` photo/mask pairs at ``side`` px: the shared real images when present, else seeded noise."""
    images, masks = folder / "images", folder / "masks"
    images.mkdir()
    masks.mkdir()
    shared = ROOT.parent / "shared" / "data" / "images" / "syn_triplets"
    stems = sorted(p.stem for p in (shared / "paste").glob("*.jpg")) if shared.is_dir() else []
    rng = np.random.default_rng(0)
    for index in range(count):
        if stems:
            stem = stems[index % len(stems)]
            photo = Image.open(shared / "paste" / f"{stem}.jpg").convert("RGB").resize((side, side))
            mask = Image.open(shared / "mask" / f"{stem}.jpg").convert("L").resize((side, side), Image.NEAREST)
        else:
            photo = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
            mask = np.zeros((side, side), np.uint8)
            mask[side // 4: side // 2, side // 4: side // 2] = 255
            mask = Image.fromarray(mask)
        photo.save(images / f"photo{index:02d}.png")
        mask.point(lambda v: 255 if v >= 128 else 0).save(masks / f"photo{index:02d}.png")
    return images, masks


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--side", type=int, default=128, help="photo side and Crop Around Mask's target_side")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    if args.images < 3:
        parser.error("--images must be at least 3 (the first one loads the models)")

    from harness import ComfyHarness, find_comfyui

    comfy_path, reason = find_comfyui()
    if comfy_path is None:
        sys.exit(reason)
    work = Path(tempfile.mkdtemp(prefix="erasekit-run-bench-"))
    try:
        harness = ComfyHarness(comfy_path, work / "comfyui").start()
        from erasekit.headless import binding as B
        from erasekit.headless.run import RunJob, open_run

        workflow_path = ROOT / "workflows" / "omnieraser.json"
        overrides = [f"steps={args.steps}", f"target_side={args.side}"]
        harness.workflow_prompt(json.loads(workflow_path.read_text()))  # builds the tiny models
        images, masks = photos(work, args.images, args.side)

        job = RunJob(workflow=workflow_path, out=work / "out", images=images, masks=masks, overrides=overrides)
        direct, headless, executing = [], [], []
        with open_run(harness.runtime, job) as runner:
            executor = harness.runtime.new_executor()

            def in_process(index, sample):
                """The prompt erasekit-run executes, with this photo and mask bound by hand."""
                shutil.copyfile(sample.image, harness.input_dir / f"bench_{sample.image.name}")
                shutil.copyfile(sample.mask, harness.input_dir / f"bench_mask_{sample.mask.name}")
                bound = B.bind(runner.prompt, runner.binding, f"bench_{sample.image.name} [input]",
                               f"bench_mask_{sample.mask.name} [input]", f"bench/{index}")
                started = time.perf_counter()
                harness.runtime.run(bound, executor)
                direct.append(time.perf_counter() - started)

            run = harness.runtime.run

            def timed_run(*args, **kwargs):
                started = time.perf_counter()
                try:
                    return run(*args, **kwargs)
                finally:
                    executing.append(time.perf_counter() - started)

            def through_erasekit_run(index, sample):
                harness.runtime.run = timed_run  # erasekit-run's own work = its item time minus ComfyUI's execution
                started = time.perf_counter()
                try:
                    result = runner.process(sample, index)
                finally:
                    headless.append(time.perf_counter() - started)
                    del harness.runtime.run
                assert result.status == "done", result.reason

            for index, sample in enumerate(runner.samples):  # interleaved, order alternating: drift cancels
                first, second = (in_process, through_erasekit_run) if index % 2 == 0 else \
                    (through_erasekit_run, in_process)
                first(index, sample)
                second(index, sample)

        base, ours = statistics.median(direct[1:]), statistics.median(headless[1:])
        ratios = [h / d for h, d in zip(headless[1:], direct[1:])]
        print(f"OmniEraser workflow, tiny models, {args.images} photos at {args.side} px, {args.steps} steps "
              f"(first photo left out: it loads the models)")
        print(f"in-process prompt : {base:.3f} s/image (median; all: {', '.join(f'{t:.2f}' for t in direct)})")
        print(f"erasekit-run      : {ours:.3f} s/image (median; all: {', '.join(f'{t:.2f}' for t in headless)})")
        own = [h - e for h, e in zip(headless[1:], executing[1:])]
        print(f"overhead          : {100 * (statistics.median(ratios) - 1):+.1f} % (median of per-photo ratios of the two; "
              f"target <= 5 %)")
        print(f"erasekit-run's own work per photo (outside ComfyUI's execution): {1000 * statistics.median(own):.1f} ms "
              f"= {100 * statistics.median(o / e for o, e in zip(own, executing[1:])):.2f} % of the execution (median)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
