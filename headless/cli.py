"""``erasekit-run``: any EraseKit (or your own) workflow over a folder of photos and masks, headless.

    erasekit-run WORKFLOW.json --images DIR --masks DIR -o OUT [--resume] [--set steps=20] [-- COMFYUI ARGS]
    erasekit-run WORKFLOW.json --images DIR --prompt "person" -o OUT
    erasekit-run WORKFLOW.json --images TRIPLET_DATASET -o OUT

The workflow runs through a real ComfyUI (``--comfyui`` or ``COMFYUI_PATH``) in this process, with that ComfyUI's
model folders and no server or browser. Results are ``OUT/<image stem>.png``; ``OUT/erasekit-run.jsonl`` logs each
item (done, or skipped/failed with the reason). Exit codes: 0 all done, 1 some items failed or nothing was produced,
2 bad arguments or workflow, 130 interrupted (finished results are kept; ``--resume`` does the rest).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..jobs import EXIT_FAILED, EXIT_OK, CliHost, UsageError, check_input, cli_main
from ..segment.text_masks import BOX_THRESHOLD, TEXT_THRESHOLD

PROG = "erasekit-run"


def parse_args(argv):
    """(namespace, ComfyUI arguments): everything after a lone ``--`` goes to ComfyUI's own argument parser."""
    argv = list(argv)
    comfy_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        prog=PROG, description="Run a ComfyUI workflow over every photo/mask pair of a folder (no server, no browser).",
        epilog="Arguments after a lone -- go to ComfyUI (e.g. -- --lowvram, -- --reserve-vram 2).")
    parser.add_argument("workflow", type=Path, help="workflow JSON: saved from ComfyUI (UI format) or exported (API)")
    parser.add_argument("--images", type=Path, required=True,
                        help="folder of photos; or a triplet dataset (source/ mask/ target/ manifest.jsonl), or a "
                             "folder with images/ and masks/ (RemovalBench's layout)")
    parser.add_argument("--masks", type=Path, help="folder of masks, white = remove, named like the photos (a.jpg + a.png)")
    parser.add_argument("--prompt", help='make each mask from text instead: GroundingDINO + SAM 2 find "person", '
                                         '"car. bicycle." ...; the masks are kept in OUT/masks/')
    parser.add_argument("-o", "--out", type=Path, required=True, help="folder for the results (created)")
    parser.add_argument("--resume", action="store_true", help="keep results already in OUT and do the rest")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="[NODE.]INPUT=VALUE",
                        help="change a widget value before running, e.g. steps=20, 12.seed=7, KSampler.cfg=1.5 "
                             "(NODE: id, type or title; without it every node with that input); repeatable")
    parser.add_argument("--comfyui", type=Path, help="ComfyUI folder (default: COMFYUI_PATH, else ~/ComfyUI)")
    parser.add_argument("--extra-model-paths", type=Path, action="append", default=[], metavar="YAML",
                        help="more model folders, in ComfyUI's extra_model_paths.yaml format; repeatable")
    parser.add_argument("--custom-nodes", action="store_true",
                        help="also load the custom nodes installed in that ComfyUI (for workflows that use them)")
    parser.add_argument("--image-node", help="id of the LoadImage node that takes the photos, when there are several")
    parser.add_argument("--mask-node", help="id of the node that takes the masks, when there are several")
    parser.add_argument("--grounding-dino", help="with --prompt: folder name in models/grounding-dino "
                                                  "(default: the only one there)")
    parser.add_argument("--sam2", help="with --prompt: file or folder name in models/sam2 (default: the only one)")
    parser.add_argument("--box-threshold", type=float, default=BOX_THRESHOLD,
                        help=f"with --prompt: GroundingDINO box score ({BOX_THRESHOLD})")
    parser.add_argument("--text-threshold", type=float, default=TEXT_THRESHOLD,
                        help=f"with --prompt: phrase match ({TEXT_THRESHOLD})")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.masks is not None and args.prompt:
        parser.error("give --masks or --prompt, not both")
    for name in ("box_threshold", "text_threshold"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            parser.error(f"--{name.replace('_', '-')} must be between 0 and 1, got {getattr(args, name)}")
    return args, comfy_args


def pick_model(folder, choice, flag):
    """``choice``, or the only model in ComfyUI's ``folder`` when none is given."""
    from ..nodes._paths import model_choices

    if choice:
        return choice
    found = model_choices(folder)
    if len(found) == 1:
        return found[0]
    raise UsageError(f"--prompt needs a model in ComfyUI's models/{folder} folder: found "
                     f"{', '.join(found) if found else 'none'}; " + ("choose one with " + flag if found else
                                                                     "see the README's model table"))


def text_masker(args):
    """The GroundingDINO + SAM 2 pair ``--prompt`` uses, from ComfyUI's model folders (the node's own loader)."""
    import comfy.model_management

    from ..nodes import text_mask

    dino = pick_model(text_mask.DINO_FOLDER, args.grounding_dino, "--grounding-dino")
    sam2 = pick_model(text_mask.SAM2_FOLDER, args.sam2, "--sam2")
    try:
        return text_mask.masker_for(dino, sam2, comfy.model_management.get_torch_device())
    except FileNotFoundError as error:
        raise UsageError(str(error)) from None


def main(argv=None):
    args, comfy_args = parse_args(sys.argv[1:] if argv is None else argv)

    def body():
        from . import runtime
        from .run import RunJob, run_folder

        for flag, path in (("--images", args.images), ("--masks", args.masks)):
            if path is not None:
                check_input(path, flag)
        check_input(args.workflow, "workflow file", kind="file")
        started = runtime.start(runtime.find_comfyui(args.comfyui), comfy_args, args.extra_model_paths,
                                args.custom_nodes)
        import comfy.utils

        comfy.utils.set_progress_bar_enabled(False)  # ComfyUI's per-step bars: the command's own bar counts images
        masker = text_masker(args) if args.prompt else None
        job = RunJob(workflow=args.workflow, out=args.out, images=args.images, masks=args.masks, prompt=args.prompt,
                     overrides=args.overrides, resume=args.resume, image_node=args.image_node,
                     mask_node=args.mask_node, box_threshold=args.box_threshold, text_threshold=args.text_threshold)
        with CliHost(PROG, enabled=not args.quiet, unit="images") as host:
            report = run_folder(started, job, host, masker)
        print(f"{PROG}: {report.summary()}; results in {args.out}", file=sys.stderr)
        return EXIT_OK if report.ok else EXIT_FAILED

    return cli_main(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
