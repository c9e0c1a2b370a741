"""``erasekit-video``: mine removal pairs from static-camera videos into a triplet dataset.

    erasekit-video VIDEOS_OR_FOLDERS... -o DATASET [--workers N] [--shard i/N] [--resume]
                   [--grounding-dino DIR --sam PATH --prompt "car"]

Each video is mined in a spawned child process (a file that crashes the decoder loses only itself).
The run summary (every video with its status, reason and counts) is printed and stored next to the
manifest as ``video-summary.json`` (``video-summary-shard-i-of-N.json`` for a shard); ``--resume`` skips
the videos a previous summary lists as finished with the same settings and the samples already written.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, fields
from pathlib import Path

from .triplets import TripletWriter, parse_shard
from .video import PairingConfig, VideoJobRunner, find_videos

SUMMARY = "video-summary"


def summary_path(root, shard):
    if shard is None:
        return Path(root) / f"{SUMMARY}.json"
    index, count = shard
    return Path(root) / f"{SUMMARY}-shard-{index}-of-{count}.json"


def write_summary(path, summary):
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def finished_videos(path, params):
    """Videos a previous run with the same settings finished (ok or skipped for a reason); crashed ones retry."""
    if not path.is_file():
        return {}
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    if previous.get("params") != params:
        return {}
    return {v["video"]: v for v in previous.get("videos", []) if v.get("status") in ("ok", "skipped")}


def build_parser():
    parser = argparse.ArgumentParser(
        prog="erasekit-video",
        description="Mine real removal pairs (frame with object, object mask, same view empty) from "
                    "static-camera videos (OmniEraser's Video4Removal recipe).",
    )
    parser.add_argument("inputs", nargs="+", help="video files or folders of videos (searched recursively)")
    parser.add_argument("-o", "--output", required=True, help="triplet dataset folder to write")
    parser.add_argument("--workers", type=int, default=1, help="videos mined at once, each in its own process")
    parser.add_argument("--shard", default=None, help="i/N: mine every N-th video starting at i, into its own manifest in the shared folder")
    parser.add_argument("--resume", action="store_true", help="continue a run in a folder that holds samples")
    parser.add_argument("--max-frames", type=int, default=None, help="mine only the first N frames of each video")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds without progress before a decoder counts as hung")
    defaults = PairingConfig()
    for item in fields(PairingConfig):
        flag = "--" + item.name.replace("_", "-")
        kind = type(getattr(defaults, item.name))
        parser.add_argument(flag, type=kind, default=getattr(defaults, item.name),
                            help=f"pairing setting (default {getattr(defaults, item.name)})")
    group = parser.add_argument_group("object masks from GroundingDINO + SAM / SAM 2 (else the MOG foreground)")
    group.add_argument("--grounding-dino", default=None, help="transformers GroundingDINO folder")
    group.add_argument("--sam", default=None, help="SAM / SAM 2 weights: transformers folder or checkpoint file")
    group.add_argument("--prompt", default=None, help='object class to segment, e.g. "car" or "person. bicycle."')
    group.add_argument("--device", default="cpu", help="torch device for the segmenters")
    return parser


def segmenter_spec(args):
    given = [args.grounding_dino, args.sam, args.prompt]
    if not any(given):
        return None
    if not all(given):
        raise ValueError("--grounding-dino, --sam and --prompt go together (the text prompt picks the objects SAM cuts out)")
    for path in (args.grounding_dino, args.sam):
        if not Path(path).exists():
            raise FileNotFoundError(f"{path} does not exist")
    return {"grounding_dino": args.grounding_dino, "sam": args.sam, "text": args.prompt, "device": args.device}


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        config = PairingConfig.from_dict({f.name: getattr(args, f.name) for f in fields(PairingConfig)})
        shard = parse_shard(args.shard) if args.shard else None
        spec = segmenter_spec(args)
        videos = find_videos(args.inputs)
        if args.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {args.workers}")
    except (ValueError, FileNotFoundError) as error:
        print(f"erasekit-video: {error}", file=sys.stderr)
        return 2
    if shard is not None:
        videos = videos[shard[0]::shard[1]]
    try:
        # shards of one run share the folder, so a shard never refuses samples written by the others
        writer = TripletWriter(args.output, resume=args.resume or shard is not None, shard=shard)
    except ValueError as error:
        print(f"erasekit-video: {error}", file=sys.stderr)
        return 2
    return run(videos, writer, config, spec, args, shard)


def run(videos, writer, config, spec, args, shard):
    from tqdm import tqdm

    params = {**asdict(config), "segmenter": spec and {k: v for k, v in spec.items() if k != "device"},
              "max_frames": args.max_frames}
    path = summary_path(args.output, shard)
    done_before = finished_videos(path, params) if args.resume else {}
    reports = {str(v): done_before[str(v)] for v in videos if str(v) in done_before}
    todo = [v for v in videos if str(v) not in reports]
    summary = {"params": params, "videos": []}
    overall = tqdm(total=len(videos), initial=len(reports), desc="videos", unit="video", position=0)
    bars = {}
    written = skipped_existing = 0
    try:
        with writer, VideoJobRunner(config, args.workers, spec, args.timeout) as runner:
            for event in runner.run([(v, 0, args.max_frames) for v in todo]):
                kind, job = event[0], event[1]
                if kind == "progress":
                    bar = bars.get(job)
                    if bar is None:
                        bar = bars[job] = tqdm(total=event[3], desc=todo[job].name, unit="frame",
                                               position=1 + len(bars) % max(1, args.workers), leave=False)
                    bar.total = event[3]
                    bar.update(event[2] - bar.n)
                elif kind == "pair":
                    _, _, sid, source, mask, target, record = event
                    if writer.has(sid):
                        skipped_existing += 1
                        continue
                    writer.write(sid, source, mask, target, record)
                    written += 1
                    reports.setdefault(f"written:{todo[job]}", 0)
                    reports[f"written:{todo[job]}"] += 1
                else:
                    report = event[2]
                    report["written"] = reports.pop(f"written:{todo[job]}", 0)
                    reports[str(todo[job])] = report
                    bar = bars.pop(job, None)
                    if bar is not None:
                        bar.close()
                    overall.update(1)
                    line = f"{todo[job].name}: {report['status']}, {report['pairs']} pairs"
                    if report["reason"]:
                        line += f" ({report['reason']})"
                    overall.write(line)
                    summary["videos"] = [reports[str(v)] for v in videos if str(v) in reports]
                    write_summary(path, summary)
    except KeyboardInterrupt:
        overall.write("interrupted: finished samples are kept; run again with --resume to continue")
        return 130
    finally:
        overall.close()
        for bar in bars.values():
            bar.close()
    summary["videos"] = [reports[str(v)] for v in videos if str(v) in reports]
    write_summary(path, summary)
    statuses = [v["status"] for v in summary["videos"]]
    print(f"{len(videos)} videos: {statuses.count('ok')} mined, {statuses.count('skipped')} skipped, "
          f"{statuses.count('crashed')} crashed; {written} samples written"
          + (f", {skipped_existing} already present" if skipped_existing else "") + f"; summary in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
