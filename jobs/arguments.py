"""What the commands that read an existing output share: its arguments and storage options."""

from __future__ import annotations

import argparse
from typing import Any


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_uri", help="a job's output.uri")
    parser.add_argument(
        "--labels-from",
        help="segmentation checkpoint whose id2label names the classes "
        "(default: the one the latest run used)",
    )
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, Ceph, R2)")


def storage_options(args: argparse.Namespace) -> dict[str, Any]:
    """fsspec options from the arguments; credentials come from the AWS chain, as for jobs."""
    return {"client_kwargs": {"endpoint_url": args.endpoint_url}} if args.endpoint_url else {}
