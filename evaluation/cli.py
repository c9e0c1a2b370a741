"""``erasekit-eval``: score removal results against references.

    erasekit-eval RESULTS_DIR --reference DIR [--masks DIR] [-o OUT] [--dilate PX]
                  [--lpips-weights FILE] [--fid-weights FILE] [--clip FOLDER] [--sam CHECKPOINT]

DIR is a triplet dataset (source/ mask/ target/), RemovalBench's layout (images/ masks/ gt/) or a folder of clean
images. Writes OUT/per_image.csv, OUT/summary.md (also printed) and OUT/report.png (metric distributions and the
worst five images). Exit codes: 0 every reference scored, 1 some results missing or unreadable, 2 bad arguments,
130 interrupted.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..jobs import EXIT_FAILED, EXIT_OK, CliHost, check_input, cli_main
from . import learned, report
from .score import DILATION, OUTPUT, EvalJob, evaluate

PROG = "erasekit-eval"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=PROG, description="Score object-removal results against references.")
    parser.add_argument("results", type=Path, help="folder of results, named like the references (erasekit-run's output)")
    parser.add_argument("--reference", type=Path, required=True,
                        help="triplet dataset, RemovalBench folder (images/ masks/ gt/) or folder of clean images")
    parser.add_argument("--masks", type=Path, help="masks (white = removed), named like the references; replaces "
                                                   "the reference's own")
    parser.add_argument("-o", "--out", type=Path, help=f"folder for the report (default: RESULTS/{OUTPUT})")
    parser.add_argument("--dilate", type=int, default=DILATION,
                        help=f"grow the mask by this many px for PSNR inside / outside it (default {DILATION})")
    parser.add_argument("--lpips-weights", type=Path,
                        help="torchvision ImageNet weights of LPIPS' backbone (alexnet-owt-7be5be79.pth for alex; "
                             f"default: {learned.HUB_CHECKPOINTS} if there)")
    parser.add_argument("--lpips-net", choices=sorted(learned.LPIPS_BACKBONES), default="alex",
                        help="LPIPS backbone (default alex, as the LPIPS paper's headline metric)")
    parser.add_argument("--fid-weights", type=Path,
                        help=f"torch-fidelity's Inception-v3 ({learned.INCEPTION_FILE}; default: "
                             f"{learned.HUB_CHECKPOINTS} if there)")
    parser.add_argument("--clip", type=Path, help="CLIP folder for CMMD (openai/clip-vit-large-patch14-336)")
    parser.add_argument("--sam", type=Path, help="segment-anything checkpoint for ReMOVE (sam_vit_h_4b8939.pth)")
    parser.add_argument("--device", help="torch device for the learned metrics (default: cuda if present, else cpu)")
    parser.add_argument("--worst-by", default="psnr", choices=sorted(report.METRICS),
                        help="metric that picks the worst five images in the report (default psnr)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.dilate < 0:
        parser.error(f"--dilate must be >= 0, got {args.dilate}")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)

    def body():
        for flag, path in (("RESULTS_DIR", args.results), ("--reference", args.reference), ("--masks", args.masks)):
            if path is not None:
                check_input(path, flag)
        device = args.device
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        job = EvalJob(results=args.results, reference=args.reference, masks=args.masks, out=args.out,
                      dilation=args.dilate, lpips_weights=args.lpips_weights, lpips_net=args.lpips_net,
                      fid_weights=args.fid_weights, clip=args.clip, sam=args.sam, device=device,
                      worst_by=args.worst_by)
        with CliHost(PROG, enabled=not args.quiet, unit="images") as host:
            result = evaluate(job, host)
        print(result.markdown)
        print(f"{PROG}: wrote {', '.join(str(p) for p in result.files.values())}", file=sys.stderr)
        return EXIT_OK if result.ok else EXIT_FAILED

    return cli_main(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
