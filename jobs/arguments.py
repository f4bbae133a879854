"""What the commands that read an existing output share: its arguments and storage options."""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.output.view import PREDICTIONS_FOLDER
from pipeline.schema import storage_problem, strip_url_secrets
from pipeline.storage import (
    StorageUnreachableError,
    check_reachable,
    filesystem_for,
    join,
    missing_bucket_hint,
)


def add_output_arguments(parser: argparse.ArgumentParser, labels: bool = True) -> None:
    parser.add_argument("output_uri", help="a job's output.uri")
    if labels:
        parser.add_argument(
            "--labels-from",
            help="segmentation checkpoint whose id2label names the classes "
            "(default: the one the latest run used)",
        )
    parser.add_argument(ENDPOINT_FLAG, help="S3-compatible endpoint (MinIO, Ceph, R2)")


def storage_options(args: argparse.Namespace) -> dict[str, Any]:
    """fsspec options from the arguments; credentials come from the AWS chain, as for jobs."""
    return {"client_kwargs": {"endpoint_url": args.endpoint_url}} if args.endpoint_url else {}


ENDPOINT_FLAG = "--endpoint-url"
EXIT_UNREACHABLE = 1
EXIT_BAD_ARGUMENTS = 2


def output_problem(output_uri: str, options: dict[str, Any]) -> tuple[int, str] | None:
    """(exit code, message) when ``output_uri`` cannot be read or holds no predictions.

    Checked first, so a wrong endpoint or a typo costs seconds and one line,
    not retries and a traceback.
    """
    try:
        check_reachable("output", output_uri, options, ENDPOINT_FLAG)
        fs, root = filesystem_for(output_uri, options)
        if fs.exists(join(root, PREDICTIONS_FOLDER)):
            return None
        why = missing_bucket_hint(fs, root)
    except StorageUnreachableError as error:
        return EXIT_UNREACHABLE, str(error)
    except OSError as error:
        return EXIT_UNREACHABLE, storage_problem("output", output_uri, error, ENDPOINT_FLAG)
    return EXIT_BAD_ARGUMENTS, f"no predictions under {strip_url_secrets(output_uri)}{why}"


def positive_integer(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
