"""``erasekit-train``: one command, one subcommand per model family.

    erasekit-train flux --model FLUX.1-dev/ --data triplets/ --output out/          # OmniEraser LoRA
    accelerate launch -m erasekit.train.cli flux ...                                # several GPUs

``TRAINERS`` maps a subcommand to a module of ``erasekit.train`` that defines ``add_arguments(parser)`` and
``run(args)``; a new family (e.g. SD inpainting with CRO) adds one line here. Modules are imported only when
their subcommand runs, so one family's heavy imports never slow another. Exit codes are the job layer's
(``jobs.cli_main``): 0 done, 1 failed, 2 usage, 130 interrupted (finished checkpoints are kept).
"""
import argparse
import importlib
import importlib.util
import sys

from ..jobs import EXIT_OK, EXIT_USAGE, cli_main

TRAINERS = {
    "flux": ("flux", "OmniEraser: a control LoRA on FLUX.1-dev (PRIS-CV/Omnieraser, train_control_lora_flux.py)"),
    "sd-inpaint": ("sd_inpaint", "SD inpainting eraser (SmartEraser's recipe; Erase Diffusion's CRO objective)"),
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
        return EXIT_USAGE

    def body():
        _module(_available()[args.trainer][0]).run(args)
        return EXIT_OK

    return cli_main(f"erasekit-train {args.trainer}", body)


if __name__ == "__main__":
    sys.exit(main())
