"""``python -m jobs.export coco OUTPUT_URI``: segmentation pseudo-labels as COCO masks.

For correcting pseudo-labels in a labelling tool (CVAT, Label Studio's COCO
import, FiftyOne) or training with COCO loaders. One annotation per class
present in an image, its mask as COCO's uncompressed RLE, the image's mean
confidence as ``score``. Large runs are written in parts of
``--images-per-file`` images, never as one file, to ``<output>/export/coco/``
unless ``--dest`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

from dpt_model.labels import coco_annotations
from pipeline.encode import decode_segmentation_png
from pipeline.predictions import latest_segmentation_model, read_predictions
from pipeline.retry import retry_transient
from pipeline.storage import filesystem_for, join


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.export", description=__doc__.split("\n")[0]
    )
    parser.add_argument("format", choices=["coco"])
    parser.add_argument("output_uri", help="a job's output.uri")
    parser.add_argument("--dest", help="folder for the parts (default: <output>/export/coco)")
    parser.add_argument("--images-per-file", type=_positive, default=1000)
    parser.add_argument("--include-weak", action="store_true", help="also images with kept = false")
    parser.add_argument(
        "--labels-from",
        help="segmentation checkpoint whose id2label names the categories "
        "(default: the one the latest run used)",
    )
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, Ceph, R2)")
    return parser.parse_args(argv)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def export_coco(
    output_uri: str,
    dest_uri: str | None = None,
    images_per_file: int = 1000,
    include_weak: bool = False,
    labels_from: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> list[str]:
    """Write COCO parts for an output's segmentation maps; returns their URIs."""
    storage_options = storage_options or {}
    rows = [
        row
        for row in read_predictions(output_uri, storage_options).to_pylist()
        if row["status"] == "ok"
        and row["segmentation_uri"]
        and (include_weak or row["kept"] is not False)
    ]
    categories = [
        {"id": class_id + 1, "name": name}
        for class_id, name in sorted(_class_names(output_uri, labels_from, storage_options).items())
    ]
    dest_fs, dest_root = filesystem_for(
        dest_uri or join(output_uri, "export/coco"), storage_options
    )
    earlier_parts = set(dest_fs.glob(join(dest_root, "part-*.json")))
    written = []
    annotation_id = 1
    for part, start in enumerate(range(0, len(rows), images_per_file)):
        images, annotations = [], []
        for image_id, row in enumerate(rows[start : start + images_per_file], start=start + 1):
            map_fs, map_path = filesystem_for(row["segmentation_uri"], storage_options)
            data = retry_transient(lambda fs=map_fs, path=map_path: fs.cat_file(path))
            label = decode_segmentation_png(data)
            images.append(
                {
                    "id": image_id,
                    "file_name": row["source_uri"],
                    "width": row["width"],
                    "height": row["height"],
                    "dpt_image_id": row["image_id"],
                    "label_coverage": row["label_coverage"],
                }
            )
            found = coco_annotations(label, image_id, annotation_id, row["seg_confidence_mean"])
            annotations.extend(found)
            annotation_id += len(found)
        document = {
            "info": {
                "description": f"pseudo-labels from {output_uri}",
                "date_created": datetime.now(UTC).isoformat(),
            },
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        path = join(dest_root, f"part-{part:05d}.json")
        dest_fs.pipe_file(path, json.dumps(document).encode())
        written.append(path)
    # An export is a snapshot: parts an earlier, larger one left go, once the new
    # parts are all written (a failed export leaves the earlier one whole).
    for stale in earlier_parts - {dest_fs._strip_protocol(path) for path in written}:
        dest_fs.rm_file(stale)
    return written


def _class_names(
    output_uri: str, labels_from: str | None, storage_options: dict[str, Any]
) -> dict[int, str]:
    from dpt_model import ModelCard

    model = labels_from or latest_segmentation_model(output_uri, storage_options)
    if model is None:
        raise SystemExit(f"no finished run under {output_uri} used a segmentation model")
    return ModelCard.fetch(
        "segmentation", model, storage_options=storage_options, with_weights=False
    ).class_names


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = {"client_kwargs": {"endpoint_url": args.endpoint_url}} if args.endpoint_url else {}
    written = export_coco(
        args.output_uri,
        args.dest,
        args.images_per_file,
        args.include_weak,
        args.labels_from,
        options,
    )
    print(f"wrote {len(written)} COCO part(s)" + (f", first {written[0]}" if written else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
