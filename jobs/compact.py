"""``python -m jobs.compact OUTPUT_URI``: rewrite an output's predictions as few large parts.

Every run appends parts, and every later run, report and export opens all of
them: on an object store a request each, so an output of months of scheduled
runs spends minutes on them (3,000 parts at 30 ms a request: about 30 s per
pass, several passes per run). Compacting keeps each image's row in the
committed view (``read_predictions``), which is all a run's resume check
reads, and drops the rows they supersede; with ``--prune-maps`` it then deletes
the map files no row names. Run it between runs: it refuses
while a run is going (one renews its start record every 5 minutes). Exit codes:
0 compacted (or nothing to do); 1 the output cannot be reached, or a run is
going; 2 bad arguments or no predictions at that URI.
"""

from __future__ import annotations

import argparse
import sys
import time

from jobs.arguments import (
    add_output_arguments,
    output_problem,
    positive_integer,
    storage_options,
)
from pipeline.output.compaction import compact_predictions, delete_unreferenced_maps
from pipeline.output.runs import RUN_GOING_WITHIN_S, renewed_ago, runs_going
from pipeline.storage import filesystem_for

EXIT_RUN_GOING = 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.compact", description=__doc__.split("\n")[0]
    )
    add_output_arguments(parser, labels=False)
    parser.add_argument(
        "--rows-per-part",
        type=positive_integer,
        default=100_000,
        help="rows in each new part (default 100000: tens of MB)",
    )
    parser.add_argument(
        "--prune-maps",
        action="store_true",
        help="then delete the map files no row names any more (those of superseded "
        "annotations: an earlier model or config, an image since changed); stops if a "
        "run starts meanwhile",
    )
    parser.add_argument(
        "--even-if-running",
        action="store_true",
        help="compact although a run's start record was renewed in the last 15 minutes "
        "(a run that is going renews it every 5); that run may then fail, and can be run again",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = storage_options(args)
    if problem := output_problem(args.output_uri, options):
        exit_code, message = problem
        print(f"error: {message}", file=sys.stderr)
        return exit_code
    fs, root = filesystem_for(args.output_uri, options)
    going = runs_going(fs, root, RUN_GOING_WITHIN_S, time.time())
    if going and not args.even_if_running:
        runs = "; ".join(f"{run_id} (start record {renewed_ago(age_s)})" for run_id, age_s in going)
        print(
            f"error: runs are going on this output: {runs}. Compacting while one writes "
            "could make it miscount its rows; wait for it to finish, or pass --even-if-running",
            file=sys.stderr,
        )
        return EXIT_RUN_GOING
    result = compact_predictions(args.output_uri, options, args.rows_per_part)
    if result.leftovers_removed:
        print(f"removed {result.leftovers_removed} half-written part file(s) of killed writers")
    if result.rows is None:
        print(f"nothing to compact: {result.parts_before} part(s)")
    else:
        print(
            f"compacted {result.parts_before} parts into {result.parts_after} ({result.rows} rows)"
        )
    if args.prune_maps:
        pruning = delete_unreferenced_maps(args.output_uri, options)
        so_far = " listed so far" if pruning.stopped_for_run else ""
        print(
            f"deleted {pruning.maps_deleted} of {pruning.maps_listed} map files{so_far}: "
            "no row names them"
        )
        if pruning.stopped_for_run:
            print(
                f"error: run {pruning.stopped_for_run} is going on this output, and its maps "
                "may have no rows yet: pruning stopped; run it again between runs",
                file=sys.stderr,
            )
            return EXIT_RUN_GOING
    return 0


if __name__ == "__main__":
    sys.exit(main())
