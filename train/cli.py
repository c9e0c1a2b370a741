"""``erasekit-train``: one command, one subcommand per model family.

    erasekit-train flux --model FLUX.1-dev/ --data triplets/ --output out/          # OmniEraser LoRA
    accelerate launch -m erasekit.train.cli flux ...                                # several GPUs

``TRAINERS`` maps a subcommand to a module of ``erasekit.train`` that defines ``add_arguments(parser)`` and
``run(args)``; a new family (e.g. SD inpainting with CRO) adds one line here. Modules are imported only when
their subcommand runs, so one family's heavy imports never slow another.
"""
import argparse
import importlib
import importlib.util
import sys

TRAINERS = {
    "flux": ("flux", "OmniEraser: a control LoRA on FLUX.1-dev (METHODS.md §3)"),
    "sd-inpaint": ("sd_inpaint", "SD inpainting eraser (Erase Diffusion's CRO objective, METHODS.md §2)"),
}


def _available():
    package = __package__
    return {name: (module, text) for name, (module, text) in TRAINERS.items()
            if importlib.util.find_spec(f"{package}.{module}") is not None}


def build_parser(argv=None):
    """The parser; only the chosen subcommand's module is imported to add its options."""
    available = _available()
    parser = argparse.ArgumentParser(prog="erasekit-train", description="Train eraser models on triplet datasets.")
    sub = parser.add_subparsers(dest="trainer", metavar="{" + ",".join(available) + "}")
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, text) in available.items():
        subparser = sub.add_parser(name, help=text, description=text)
        if name == chosen:
            _module(module).add_arguments(subparser)
    return parser


def _module(name):
    return importlib.import_module(f"{__package__}.{name}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.trainer is None:
        parser.print_help()
        return 2
    try:
        _module(_available()[args.trainer][0]).run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"erasekit-train {args.trainer}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
