"""``python -m jobs.report OUTPUT_URI``: rebuild ``<output>/report/index.html``.

Every run writes the report; this rebuilds it from what an output already holds
(after a run whose report failed, or with another sample size) without running
the models. Class names come from the segmentation checkpoint the latest run
used, or ``--labels-from``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

from jobs.config import ReportConfig
from pipeline.predictions import latest_segmentation_model, run_records
from pipeline.report import ShardInput, write_quality_report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = ReportConfig()
    parser = argparse.ArgumentParser(
        prog="python -m jobs.report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("output_uri", help="a job's output.uri")
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
    parser.add_argument(
        "--labels-from",
        help="segmentation checkpoint whose id2label names the classes "
        "(default: the one the latest run used)",
    )
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, Ceph, R2)")
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
    options = {"client_kwargs": {"endpoint_url": args.endpoint_url}} if args.endpoint_url else {}
    model = args.labels_from or latest_segmentation_model(args.output_uri, options)
    class_names = {}
    if model:
        from dpt_model import ModelCard

        card = ModelCard.fetch("segmentation", model, storage_options=options, with_weights=False)
        class_names = card.class_names
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
