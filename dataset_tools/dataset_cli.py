"""``erasekit-dataset``: check or repair a triplet dataset folder.

    erasekit-dataset check DIR [--json]    validate every record and file; changes nothing
    erasekit-dataset repair DIR [--json]   mend the folder: nothing is deleted (dataset_check.py)

``check`` lists each problem (a damaged manifest line, a missing or damaged file, a file no record names) on one
line. ``repair`` keeps the undamaged records, lists complete triplets whose record was lost again, and moves
everything else (rejected lines with their numbers, the manifests as they were, stray and damaged files) to
``DIR/recovered/<time>/``.

Exit codes (shared by every ``erasekit-*`` command): ``check`` 0 clean, 1 problems found; ``repair`` 0 mended;
2 bad arguments (a folder that is not there), 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import sys

from ..jobs import EXIT_FAILED, EXIT_OK, CliHost, cli_main
from .dataset_check import check, repair


def build_parser():
    parser = argparse.ArgumentParser(prog="erasekit-dataset", description="Check or repair a triplet dataset folder.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("check", "validate every record and file; change nothing"),
                       ("repair", "mend the folder; nothing is deleted (moved to DIR/recovered/<time>/)")):
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument("dataset", help="triplet dataset folder (source/, mask/, target/, manifest*.jsonl)")
        command.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return parser


def run(args, host):
    if args.command == "check":
        result, findings = check(args.dataset, host)
        host.close()
        if args.json:
            print(json.dumps({"samples": result.samples, "problems": [str(f) for f in findings]}))
        else:
            for finding in findings:
                print(finding)
            print(f"{args.dataset}: {result.samples} valid samples"
                  + (f"; {len(findings)} problems: mend them with erasekit-dataset repair {args.dataset} "
                     "(nothing is deleted)" if findings else "; no problem found"))
        return EXIT_FAILED if findings else EXIT_OK
    report = repair(args.dataset, host)
    host.close()
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{args.dataset}: {report['samples']} samples listed ({len(report['rebuilt'])} listed again from their "
              f"files); {report['rejected_lines']} damaged lines and {len(report['rejected_records'])} records with "
              f"missing or damaged files taken out; {len(report['moved'])} files moved aside"
              + (f" to {report['recovered']}" if report["recovered"] else ""))
    return EXIT_OK


def main(argv=None):
    args = build_parser().parse_args(argv)
    with CliHost(unit="records") as host:
        return cli_main("erasekit-dataset", lambda: run(args, host))


if __name__ == "__main__":
    sys.exit(main())
