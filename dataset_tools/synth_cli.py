"""``erasekit-synth``: build a removal triplet dataset by Syn4Removal paste synthesis.

Example::

    erasekit-synth --backgrounds photos/ --coco instances.json --coco-images coco/train2017 \
        --clip-model models/clip-vit-large-patch14 --output data/syn --workers 4 --shard 0/8

Sample ``i`` depends only on ``--seed`` and ``i``; shards (``i % N``), workers and resumed runs make the
same samples. A killed run is resumed by running the same command again.
"""
import argparse
import json
import os
import sys
from pathlib import Path

from . import instances as inst
from . import synth
from .triplets import manifest_name, parse_shard


def build_parser():
    parser = argparse.ArgumentParser(prog="erasekit-synth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backgrounds", required=True, help="folder of background photos (searched recursively)")
    parser.add_argument("--background-annotations", help="COCO file of the backgrounds: objects < 40%% of the image are obstacles")
    parser.add_argument("--coco", action="append", default=[], help="COCO instance annotation file (polygons or RLE); repeatable")
    parser.add_argument("--coco-images", action="append", default=[], help="image folder of each --coco file, in the same order")
    parser.add_argument("--instances", action="append", default=[], help="folder of image + mask pairs; repeatable")
    parser.add_argument("--sam-model", help="SAM / SAM 2 transformers folder: propose instance masks on --sam-images")
    parser.add_argument("--sam-images", action="append", default=[], help="folder of photos for SAM proposals; repeatable")
    parser.add_argument("--sam-points", type=int, default=16, help="SAM point grid per side")
    parser.add_argument("--sam-score", type=float, default=0.7, help="minimum predicted IoU of a SAM proposal")
    parser.add_argument("--class-name", default="object", help="class of instances in a folder without class sub-folders")
    parser.add_argument("--output", required=True, help="triplet dataset folder to create or resume")
    parser.add_argument("--num-samples", type=int, help="samples to make (default: one per background)")
    parser.add_argument("--size", type=int, default=512, help="crop size of the samples (official 512)")
    parser.add_argument("--min-side", type=int, help="skip backgrounds whose short side is smaller (default: --size)")
    parser.add_argument("--blend", choices=synth.BLEND_MODES, default="matting", help="alpha for pasting (official: matting)")
    parser.add_argument("--feather-px", type=float, default=3.0, help="width of the feathered edge for --blend feather")
    parser.add_argument("--clip-model", help="local transformers CLIP folder (clip-vit-large-patch14); without it the CLIP filter is off")
    parser.add_argument("--device", default="cpu", help="device for CLIP scoring and SAM")
    parser.add_argument("--no-clip-filter", action="store_true", help="do not filter by CLIP score")
    parser.add_argument("--no-area-filter", action="store_true", help="do not filter by instance area")
    parser.add_argument("--no-class-filter", action="store_true", help="keep classes with fewer than --min-class-instances")
    parser.add_argument("--min-class-instances", type=int, default=inst.MIN_CLASS_INSTANCES)
    parser.add_argument("--min-area", type=float, default=inst.MIN_AREA)
    parser.add_argument("--max-area", type=float, default=inst.MAX_AREA)
    parser.add_argument("--workers", type=int, default=1, help="processes making samples")
    parser.add_argument("--shard", help="i/N: make only samples with index %% N == i (independent jobs, one folder)")
    parser.add_argument("--resume", dest="resume", action="store_true", default=True, help="continue a folder (default)")
    parser.add_argument("--no-resume", dest="resume", action="store_false", help="refuse a folder that already has samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    return parser


def collect_instances(args, skips):
    if len(args.coco) != len(args.coco_images):
        raise ValueError(f"{len(args.coco)} --coco files but {len(args.coco_images)} --coco-images folders: give one folder per file")
    found = []
    for annotations, images in zip(args.coco, args.coco_images):
        found += inst.coco_instances(annotations, images, skips)
    for folder in args.instances:
        found += inst.folder_instances(folder, args.class_name, skips)
    if args.sam_images and not args.sam_model:
        raise ValueError("--sam-images needs --sam-model (a SAM or SAM 2 transformers folder)")
    if args.sam_images:
        from .segmenters import load_sam

        sam = load_sam(args.sam_model, args.device)
        for k, folder in enumerate(args.sam_images):
            found += inst.sam_instances(folder, sam, Path(args.output) / "sam_masks" / str(k), args.class_name,
                                        args.sam_points, args.sam_score, skips)
    if not args.coco and not args.instances and not args.sam_images:
        raise ValueError("no instance source: give --coco/--coco-images, --instances or --sam-model/--sam-images")
    return found


INSTANCE_CACHE = "instances.json"


def _instance_key(args, use_clip):
    """What the instance table depends on: its sources (with file sizes and times) and the scoring models."""
    def stamp(path, files=False):
        """Path, size and time; a folder's time changes when files come or go; ``files``: also its files'."""
        path = Path(path)
        if not path.exists():
            return [str(path)]
        found = [str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns]
        if files and path.is_dir():
            found += [stamp(p) for p in sorted(path.iterdir()) if p.is_file()]
        return found

    return {
        "coco": [stamp(p) for p in args.coco], "coco_images": [stamp(p) for p in args.coco_images],
        "instances": [stamp(p) for p in args.instances], "class_name": args.class_name,
        "sam": [stamp(args.sam_model, files=True) if args.sam_model else None, [stamp(p) for p in args.sam_images],
                args.sam_points, args.sam_score],
        "clip": stamp(args.clip_model, files=True) if use_clip else None,
    }


def cached_instances(args, use_clip):
    """Collect (and CLIP-score) the instances, or reuse ``<output>/instances.json`` from an earlier run
    with the same sources and models: a resumed or sharded run does not score a million instances again."""
    cache = Path(args.output) / INSTANCE_CACHE
    key = _instance_key(args, use_clip)
    if args.resume and cache.is_file():
        try:
            data = json.loads(cache.read_text(encoding="utf-8"))
            if data.get("key") == json.loads(json.dumps(key)):
                return [inst.Instance(**i) for i in data["instances"]], data["skips"]
        except (ValueError, TypeError, KeyError):
            pass  # a damaged cache is rebuilt
    skips = {}
    instances = collect_instances(args, skips)
    if use_clip and instances:
        from .clip_score import ClipScorer

        scorer = ClipScorer.from_folder(args.clip_model, args.device)
        update, close = _progress_bar(len(instances), not args.no_progress, "CLIP scores")
        instances = inst.score_instances(instances, scorer, skips=skips, progress=update)
        close()
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".tmp-{os.getpid()}-{INSTANCE_CACHE}")
    tmp.write_text(json.dumps({"key": key, "skips": skips, "instances": [i.to_json() for i in instances]}))
    os.replace(tmp, cache)
    return instances, skips


def _progress_bar(total_hint, enabled, desc):
    if not enabled:
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=total_hint, desc=desc, file=sys.stderr, dynamic_ncols=True)

    def update(done, total):
        bar.total = total
        bar.n = done
        bar.refresh()

    return update, bar.close


def run(args):
    if args.shard:
        parse_shard(args.shard)
    use_clip = bool(args.clip_model) and not args.no_clip_filter
    instances, skips = cached_instances(args, use_clip)
    backgrounds, obstacles, background_skips = synth.collect_backgrounds(args.backgrounds, args.background_annotations)
    for reason, count in background_skips.items():
        skips[reason] = skips.get(reason, 0) + count
    config = synth.SynthConfig(size=args.size, min_side=args.min_side, blend=args.blend, feather_px=args.feather_px)
    filters = {
        "use_clip": use_clip, "use_area": not args.no_area_filter, "use_class_count": not args.no_class_filter,
        "min_area": args.min_area, "max_area": args.max_area, "min_class_instances": args.min_class_instances,
    }
    plan = synth.build_plan(backgrounds, obstacles, instances, config, args.seed, args.num_samples, filters)
    update, close = _progress_bar(plan.num_samples, not args.no_progress, "samples")
    try:
        summary = synth.run_synthesis(plan, args.output, args.workers, args.shard, args.resume, update)
    finally:
        close()
    for reason, count in skips.items():
        summary["skipped"][reason] = summary["skipped"].get(reason, 0) + count
    summary.update(instances=len(plan.instances), classes=len(plan.class_stats), filters=plan.filters)
    name = manifest_name(parse_shard(args.shard) if args.shard else None).replace("manifest", "summary").replace(".jsonl", ".json")
    path = Path(args.output) / name
    tmp = path.with_name(f".tmp-{name}")
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, path)
    return summary


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        summary = run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"erasekit-synth: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
