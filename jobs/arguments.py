"""What the commands that read an existing output share: storage options and class names."""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.predictions import latest_segmentation_model


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


def class_names_for(
    output_uri: str, labels_from: str | None, options: dict[str, Any]
) -> dict[int, str] | None:
    """Class names from ``labels_from``, else from the latest run's segmentation checkpoint.

    None when no finished run used a segmentation model.
    """
    from dpt_model import ModelCard

    model = labels_from or latest_segmentation_model(output_uri, options)
    if model is None:
        return None
    return ModelCard.fetch(
        "segmentation", model, storage_options=options, with_weights=False
    ).class_names
