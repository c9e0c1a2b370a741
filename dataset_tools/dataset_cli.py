"""``erasekit-dataset``: check, repair or convert a triplet dataset (a folder, or WebDataset shards).

    erasekit-dataset check DIR [--json]    validate every record and file; changes nothing
    erasekit-dataset repair DIR [--json]   mend the folder: nothing is deleted (dataset_check.py)
    erasekit-dataset convert SRC DST [--to webdataset|folder] [--shard-size N]
                                           copy a dataset into the other format (the PNGs and records as they are)

``check`` lists each problem (a damaged manifest line, a missing or damaged file, a file no record names) on one
line. ``repair`` keeps the undamaged records, lists complete triplets whose record was lost again, and moves
everything else (rejected lines with their numbers, the manifests as they were, stray and damaged files) to
``DIR/recovered/<time>/``. Both read either format (``shards.py``); for shards, ``repair`` moves partial writes,
tars without an index and unreadable shards aside and writes a shard with damaged samples again with its good ones.
DIR and DST may be fsspec URLs for shards (``s3://bucket/data``).

Exit codes (shared by every ``erasekit-*`` command): ``check`` 0 clean, 1 problems found; ``repair`` and ``convert``
0 done; 2 bad arguments (a folder that is not there), 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import sys

from ..jobs import EXIT_FAILED, EXIT_OK, CliHost, cli_main
from .dataset_check import check, repair
from .shards import FORMATS, SHARD_SIZE, convert


def build_parser():
    parser = argparse.ArgumentParser(prog="erasekit-dataset", description="Check, repair or convert a triplet dataset.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("check", "validate every record and file; change nothing"),
                       ("repair", "mend the folder; nothing is deleted (moved to DIR/recovered/<time>/)")):
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument("dataset", help="triplet dataset folder (source/, mask/, target/, manifest*.jsonl) or "
                                             "folder of WebDataset shards (*.tar + *.parquet; local or a URL)")
        command.add_argument("--json", action="store_true", help="print the result as one JSON object")
    text = "copy a dataset into the other format: the PNGs and records as they are, every sample checked"
    command = commands.add_parser("convert", help=text, description=text)
    command.add_argument("dataset", help="triplet folder, shard folder or shard pattern (shards/shard-{000000..000009}.tar)")
    command.add_argument("output", help="new folder (or, for shards, a URL) to write")
    command.add_argument("--to", choices=FORMATS, default=None, help="target format (default: the other one)")
    command.add_argument("--shard-size", type=int, default=SHARD_SIZE, help="samples per shard (to webdataset)")
    command.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return parser


def run(args, host):
    if args.command == "convert":
        stats = convert(args.dataset, args.output, args.to, args.shard_size, host)
        host.close()
        print(json.dumps(stats) if args.json else f"{args.output}: {stats['written']} samples converted"
              + (f" into {stats['shards']} shards" if stats["shards"] else ""))
        return EXIT_OK
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
