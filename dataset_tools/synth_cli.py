"""``erasekit-synth``: build a removal triplet dataset by Syn4Removal paste synthesis.

Example::

    erasekit-synth --backgrounds photos/ --coco instances.json --coco-images coco/train2017 \\
        --clip-model models/clip-vit-large-patch14 --output data/syn --workers 4 --shard 0/8
    erasekit-synth --backgrounds s3://bucket/sa1b.parquet --coco instances.json --coco-images coco/train2017 \\
        --output s3://bucket/syn4removal --format webdataset --ray HEAD:6379 --workers 256

Sample ``i`` depends only on ``--seed`` and ``i``; shards (``i % N``), workers and resumed runs make the
same samples. A sample that meets a bad file is drawn again with another one, and the bad files are named. A
killed run is resumed by the same command with ``--resume``; ``--append`` adds samples made with another recipe
(seed, size, blend, filters, models) to a dataset, each recording its recipe. The work itself is
``dataset_tools.synth_job.run_synth_job``, which the ComfyUI node runs too.

Exit codes (shared by every ``erasekit-*`` command): 0 every planned sample is in the dataset, 1 some samples
could not be made (the summary says why), nothing could be made, or a write failed, 2 bad arguments or an
output folder that cannot be used (a file, no parent folder, not writable, holding another recipe's samples),
130 interrupted (finished samples are kept).
"""
import argparse
import json
import sys

from ..jobs import EXIT_FAILED, EXIT_OK, CliHost, Skips, cli_main
from . import instances as inst
from . import synth
from .scale import add_arguments as add_scale_arguments
from .triplets import add_resume_arguments
from .synth_job import SynthJob, failed_samples, run_synth_job


def build_parser():
    parser = argparse.ArgumentParser(prog="erasekit-synth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backgrounds", required=True, help="folder of background photos (searched recursively)")
    parser.add_argument("--background-annotations", help="COCO file of the backgrounds: objects < 40%% of the image are obstacles")
    parser.add_argument("--coco", action="append", default=[], help="COCO instance annotation file (polygons or RLE); repeatable")
    parser.add_argument("--coco-images", action="append", default=[], help="image folder of each --coco file, in the same order")
    parser.add_argument("--instances", action="append", default=[], help="folder of image + mask pairs; repeatable")
    parser.add_argument("--sam-model", help="SAM / SAM 2 transformers folder or checkpoint: propose instance masks on --sam-images")
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
    parser.add_argument("--no-clip-filter", dest="clip_filter", action="store_false", help="do not filter by CLIP score")
    parser.add_argument("--no-area-filter", dest="area_filter", action="store_false", help="do not filter by instance area")
    parser.add_argument("--no-class-filter", dest="class_filter", action="store_false",
                        help="keep classes with fewer than --min-class-instances")
    parser.add_argument("--min-class-instances", type=int, default=inst.MIN_CLASS_INSTANCES)
    parser.add_argument("--min-area", type=float, default=inst.MIN_AREA)
    parser.add_argument("--max-area", type=float, default=inst.MAX_AREA)
    parser.add_argument("--workers", type=int, default=1, help="processes making samples")
    parser.add_argument("--shard", help="i/N: make only samples with index %% N == i (independent jobs, one folder)")
    add_resume_arguments(parser, "the same recipe", "another recipe")
    add_scale_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    return parser


def job_from_args(args):
    """The ``SynthJob`` the command line describes (every flag but --no-progress is a job setting)."""
    settings = vars(args).copy()
    settings.pop("no_progress")
    return SynthJob(**settings)


def run(args, host):
    summary = run_synth_job(job_from_args(args), host)
    host.close()
    for line in Skips(summary["skipped"]).lines():
        print(f"erasekit-synth: left out: {line}", file=sys.stderr)
    for line in Skips(summary["failed"]).lines():
        print(f"erasekit-synth: samples not made: {line}", file=sys.stderr)
    print(json.dumps(summary))
    return EXIT_FAILED if failed_samples(summary) or not summary["written"] + summary["existing"] else EXIT_OK


def main(argv=None):
    args = build_parser().parse_args(argv)
    with CliHost(enabled=not args.no_progress, unit="samples") as host:
        return cli_main("erasekit-synth", lambda: run(args, host))


if __name__ == "__main__":
    sys.exit(main())
