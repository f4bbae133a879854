"""``python -m jobs.report OUTPUT_URI``: rebuild ``<output>/report/index.html``.

Every run writes the report; this rebuilds it from what an output already holds
(after a run whose report failed, or with another sample size) without running
the models. Class names come from the segmentation checkpoint the latest run
used, or ``--labels-from``. Exit codes: 0 written; 1 the output cannot be
reached, or the report could not be built; 2 bad arguments (a ``--labels-from``
that is no usable segmentation checkpoint) or no predictions at that URI.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

from dpt_model.loading import ModelLoadError
from jobs.arguments import EXIT_BAD_ARGUMENTS, add_output_arguments, output_problem, storage_options
from jobs.config import ReportConfig
from pipeline.output.maps import segmentation_class_names
from pipeline.output.runs import run_records
from pipeline.report import ShardInput, class_names_or_ids, write_quality_report
from pipeline.schema import strip_url_secrets


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = ReportConfig()
    parser = argparse.ArgumentParser(
        prog="python -m jobs.report", description=__doc__.split("\n")[0]
    )
    add_output_arguments(parser)
    parser.add_argument(
        "--samples",
        type=int,
        default=defaults.samples,
        help=f"images in the grid (default {defaults.samples})",
    )
    parser.add_argument(
        "--thumbnail-px",
        type=int,
        default=defaults.thumbnail_px,
        help=f"longest side of a thumbnail (default {defaults.thumbnail_px})",
    )
    args = parser.parse_args(argv)
    try:
        ReportConfig(samples=args.samples, thumbnail_px=args.thumbnail_px)
    except ValidationError as error:
        problem = error.errors()[0]
        parser.error(f"--{str(problem['loc'][0]).replace('_', '-')}: {problem['msg']}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    options = storage_options(args)
    if problem := output_problem(args.output_uri, options):
        exit_code, message = problem
        print(f"error: {message}", file=sys.stderr)
        return exit_code
    if args.labels_from:
        # Asked for by name: a checkpoint that cannot name the classes is an error
        # here, where the latest run's merely leaves them as ids.
        try:
            class_names = segmentation_class_names(args.output_uri, options, args.labels_from)
        except (ModelLoadError, OSError, ValueError) as error:
            print(f"error: --labels-from: {strip_url_secrets(str(error))}", file=sys.stderr)
            return EXIT_BAD_ARGUMENTS
    else:
        class_names = class_names_or_ids(args.output_uri, options)
    latest_run = run_records(args.output_uri, options, newest=1)
    uri = write_quality_report(
        args.output_uri,
        options,
        class_names,
        samples=args.samples,
        thumbnail_px=args.thumbnail_px,
        shard_input=ShardInput.from_run_record(latest_run[0]) if latest_run else None,
    )
    print(f"wrote {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
