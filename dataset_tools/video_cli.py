"""``erasekit-video``: mine removal pairs from static-camera videos into a triplet dataset.

    erasekit-video VIDEOS_OR_FOLDERS... -o DATASET [--workers N] [--shard i/N] [--resume | --append]
                   [--outside-changes mask|reject] [--grounding-dino DIR --sam-model PATH --prompt "car"]
                   [--format webdataset [--shard-size N]] [--ray [ADDRESS]]

Videos may also be listed in a text file (one path or URL per line) or a parquet file of paths, and be at any
fsspec URL; ``--format webdataset`` writes tar shards (a video's pairs to its own shards) to a folder or a URL;
``--ray`` runs the videos as Ray Data tasks on this machine or a cluster (``dataset_tools/scale.py``).

Each video is mined in its own process (a file that crashes OpenCV's decoder loses only itself, and is tried
once more with PyAV). The run summary (every video with its status, reason and counts; the videos left out by
problem, with their first names) is stored next to the manifest as ``video-summary.json``
(``video-summary-shard-i-of-N.json`` for a shard). The settings are the dataset's (``dataset.json``):
``--resume`` continues a folder made with the same settings, skipping the videos a previous summary lists as
finished and the samples already written; ``--append`` adds samples made with other settings, each recording
them. The work itself is ``dataset_tools.video_job.run_video_job``, which the ComfyUI node runs too.

Exit codes (shared by every ``erasekit-*`` command): 0 every video mined, 1 a video was skipped or crashed, the
dataset holds no sample, or a write failed (the summary says what was done), 2 bad arguments or an output
folder that cannot be used, 130 interrupted (finished samples are kept; ``--resume``).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from ..jobs import EXIT_FAILED, EXIT_OK, CliHost, Skips, UsageError, cli_main
from .scale import add_arguments as add_scale_arguments
from .triplets import add_resume_arguments
from .video_job import VideoJob, failed_videos, run_video_job, summary_path
from .video_mining import MASK_AUGMENTATIONS, OUTSIDE_CHANGES, PairingConfig

CHOICES = {"mask_augment": MASK_AUGMENTATIONS, "outside_changes": OUTSIDE_CHANGES}


def build_parser():
    parser = argparse.ArgumentParser(
        prog="erasekit-video",
        description="Mine real removal pairs (frame with object, object mask, same view empty) from "
                    "static-camera videos (OmniEraser's Video4Removal recipe).",
    )
    parser.add_argument("videos", nargs="+", help="video files, folders of videos (searched recursively), lists of "
                                                  "paths (.txt) or parquet files of paths; local or fsspec URLs")
    parser.add_argument("-o", "--output", required=True, help="triplet dataset folder to write")
    parser.add_argument("--workers", type=int, default=1, help="videos mined at once, each in its own process")
    parser.add_argument("--shard", default=None, help="i/N: mine every N-th video starting at i, into its own manifest in the shared folder")
    add_resume_arguments(parser)
    parser.add_argument("--max-frames", type=int, default=None, help="mine only the first N frames of each video")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds without progress before a decoder counts as hung")
    defaults = PairingConfig()
    for item in fields(PairingConfig):
        default = getattr(defaults, item.name)
        note = " (default: min(0.002, foreground ratio / 2))" if item.name == "background_ratio" else f" (default {default})"
        parser.add_argument("--" + item.name.replace("_", "-"), type=type(default), default=None,
                            choices=CHOICES.get(item.name), help="pairing setting" + note)
    group = parser.add_argument_group("object masks from GroundingDINO + SAM / SAM 2 (else the MOG foreground)")
    group.add_argument("--grounding-dino", default=None, help="transformers GroundingDINO folder")
    group.add_argument("--sam-model", "--sam", dest="sam_model", default=None,
                       help="SAM / SAM 2 weights: transformers folder or checkpoint file")
    group.add_argument("--prompt", default=None, help='object class to segment, e.g. "car" or "person. bicycle."')
    group.add_argument("--device", default="cpu", help="torch device for the segmenters")
    add_scale_arguments(parser)
    return parser


def job_from_args(args):
    """The ``VideoJob`` the command line describes (pairing settings left out keep their defaults)."""
    given = {f.name: getattr(args, f.name) for f in fields(PairingConfig) if getattr(args, f.name) is not None}
    try:
        pairing = PairingConfig.from_dict(given)
    except ValueError as error:
        raise UsageError(str(error)) from None
    return VideoJob(videos=args.videos, output=args.output, pairing=pairing,
                    max_frames=args.max_frames, workers=args.workers, shard=args.shard, resume=args.resume,
                    append=args.append,
                    timeout=args.timeout, grounding_dino=args.grounding_dino, sam_model=args.sam_model,
                    prompt=args.prompt, device=args.device, format=args.format, shard_size=args.shard_size,
                    ray=args.ray)


def run(args, host):
    summary = run_video_job(job_from_args(args), host)
    statuses = [v["status"] for v in summary["videos"]]
    for line in Skips(summary["skipped"]).lines():
        host.log(f"left out: {line}")
    print(f"{len(statuses)} videos: {statuses.count('ok')} mined, {statuses.count('skipped')} skipped, "
          f"{statuses.count('crashed')} crashed"
          + (f", {statuses.count('duplicate')} duplicates" if "duplicate" in statuses else "")
          + f"; {summary['written']} samples written"
          + (f", {summary['already_present']} already present" if summary["already_present"] else "")
          + f"; summary in {summary_path(args.output, args.shard)}")
    return EXIT_FAILED if failed_videos(summary) or not summary["samples"] else EXIT_OK


def main(argv=None):
    args = build_parser().parse_args(argv)
    with CliHost(unit="videos") as host:
        return cli_main("erasekit-video", lambda: run(args, host))


if __name__ == "__main__":
    sys.exit(main())
