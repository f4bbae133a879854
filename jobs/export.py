"""``python -m jobs.export coco OUTPUT_URI``: segmentation pseudo-labels as COCO masks.

For training with COCO loaders (pycocotools' masks) or correcting pseudo-labels
in a tool that imports COCO RLE masks. One annotation per class present in an
image, its mask as COCO's uncompressed RLE, the image's mean confidence as
``score``. Large runs are written in parts of
``--images-per-file`` images, never as one file, to ``<output>/export/coco/``
unless ``--dest`` says otherwise.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from dpt_model.labels import coco_annotations, is_kept
from dpt_model.loading import ModelLoadError
from jobs.arguments import (
    EXIT_BAD_ARGUMENTS,
    add_output_arguments,
    output_problem,
    positive_integer,
    storage_options,
)
from pipeline.encode import decode_segmentation_png
from pipeline.output.maps import MapLocator, segmentation_class_names
from pipeline.output.view import iter_predictions
from pipeline.schema import strip_url_secrets
from pipeline.storage import (
    files_in,
    filesystem_for,
    forget_listing,
    full_uri,
    is_local,
    join,
    read_bytes,
    remove_files,
)

_STAGING_PREFIX = ".export-"
EXIT_FAILED = 1
_EXPORT_COLUMNS = [
    "image_id",
    "source_uri",
    "status",
    "width",
    "height",
    "segmentation_uri",
    "seg_confidence_mean",
    "label_coverage",
    "kept",
]


class MissingMapError(FileNotFoundError):
    """A row's map file is gone (an output copied in part, a map deleted by hand)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.export", description=__doc__.split("\n")[0]
    )
    parser.add_argument("format", choices=["coco"])
    add_output_arguments(parser)
    parser.add_argument("--dest", help="folder for the parts (default: <output>/export/coco)")
    parser.add_argument("--images-per-file", type=positive_integer, default=1000)
    parser.add_argument("--include-weak", action="store_true", help="also images with kept = false")
    parser.add_argument(
        "--min-coverage",
        type=coverage_fraction,
        help="judge every image by this label_coverage bar instead of its row's kept, "
        "which was judged by the bar of the run that annotated it",
    )
    return parser.parse_args(argv)


def coverage_fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction from 0 to 1")
    return value


def export_coco(
    output_uri: str,
    dest_uri: str | None = None,
    images_per_file: int = 1000,
    include_weak: bool = False,
    labels_from: str | None = None,
    storage_options: dict[str, Any] | None = None,
    min_coverage: float | None = None,
) -> list[str]:
    """Write COCO parts for an output's segmentation maps; returns their URIs.

    Rows stream from the output a batch at a time and each part is written as
    soon as it holds ``images_per_file`` images, so an export of millions of
    images holds one part's rows and masks, not the output.
    """
    storage_options = storage_options or {}
    try:
        class_names = segmentation_class_names(output_uri, storage_options, labels_from)
    except ModelLoadError as error:
        if labels_from is not None:
            raise
        # A run recorded before runs kept their classes, naming its model by a
        # path relative to where it ran, say.
        raise ModelLoadError(f"{error}; name the run's checkpoint with --labels-from") from None
    if class_names is None:
        raise ValueError(
            f"no finished run under {strip_url_secrets(output_uri)} used a segmentation model; "
            "name a checkpoint with --labels-from"
        )
    categories = [
        {"id": class_id + 1, "name": name} for class_id, name in sorted(class_names.items())
    ]
    dest_fs, dest_root = filesystem_for(
        dest_uri or join(output_uri, "export/coco"), storage_options
    )
    earlier_parts = {
        path for path in files_in(dest_fs, dest_root) if re.search(r"/part-\d+\.json$", path)
    }
    for leftover in _staging_folders(dest_fs, dest_root):  # of an export that crashed
        _remove_folder(dest_fs, leftover)
    rows = _exported_rows(output_uri, storage_options, include_weak, min_coverage)
    # Parts are written to a hidden folder first and put in place only once all
    # are written: an export that fails while writing leaves the earlier one
    # whole. (One that fails while putting them in place leaves a mix; run it
    # again.)
    staging = join(dest_root, f"{_STAGING_PREFIX}{uuid.uuid4().hex}")
    try:
        staged = _write_coco_parts(
            dest_fs, staging, rows, images_per_file, categories, output_uri, storage_options
        )
        written = []
        for path in staged:
            # File by file (the staging folder goes after): fs.mv and recursive
            # rm read "[", "*" and "?" in a destination path as a glob.
            target = join(dest_root, path.rsplit("/", 1)[1])
            dest_fs.cp_file(path, target)
            written.append(target)
    finally:
        _remove_folder(dest_fs, staging)
    # An export is a snapshot: parts an earlier, larger one left go.
    remove_files(dest_fs, sorted(earlier_parts - set(written)))
    return [full_uri(dest_fs, path) for path in written]


def _staging_folders(fs: Any, root: str) -> list[str]:
    try:
        listed = fs.ls(root, detail=True)
    except FileNotFoundError:
        return []
    return [
        info["name"]
        for info in listed
        if info["type"] == "directory"
        and info["name"].rstrip("/").rsplit("/", 1)[-1].startswith(_STAGING_PREFIX)
    ]


def _remove_folder(fs: Any, folder: str) -> None:
    """Every file under ``folder`` by name (no glob), then the folder where one exists."""
    try:
        remove_files(fs, fs.find(forget_listing(fs, folder)))
    except FileNotFoundError:
        return
    if is_local(fs) and os.path.isdir(folder):
        os.rmdir(folder)


def _write_coco_parts(
    dest_fs: Any,
    folder: str,
    rows: Iterator[dict[str, Any]],
    images_per_file: int,
    categories: list[dict[str, Any]],
    output_uri: str,
    storage_options: dict[str, Any],
) -> list[str]:
    written: list[str] = []
    maps = MapLocator(output_uri, storage_options)
    named = {category["id"] for category in categories}
    image_id, annotation_id = 1, 1
    while part_rows := list(itertools.islice(rows, images_per_file)):
        images, annotations = [], []
        for row in part_rows:
            segmentation_uri = maps(row["segmentation_uri"], "segmentation")
            try:
                label = decode_segmentation_png(read_bytes(segmentation_uri, storage_options))
            except FileNotFoundError:
                raise MissingMapError(
                    f"the segmentation map of {row['source_uri']} is missing: {segmentation_uri}"
                ) from None
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
            if unnamed := sorted({a["category_id"] for a in found} - named):
                raise ValueError(
                    f"{row['source_uri']} has class ids {[i - 1 for i in unnamed]}, which the "
                    f"class names ({len(named)} classes) lack: with --labels-from, name the "
                    "checkpoint the run used"
                )
            annotations.extend(found)
            image_id, annotation_id = image_id + 1, annotation_id + len(found)
        document = {
            "info": {
                "description": f"pseudo-labels from {strip_url_secrets(output_uri)}",
                "date_created": datetime.now(UTC).isoformat(),
            },
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        path = join(folder, f"part-{len(written):05d}.json")
        dest_fs.pipe_file(path, json.dumps(document).encode())
        written.append(path)
    return written


def _exported_rows(
    output_uri: str,
    storage_options: dict[str, Any],
    include_weak: bool,
    min_coverage: float | None = None,
) -> Iterator[dict[str, Any]]:
    """The rows an export holds: ok images with a segmentation map (kept ones unless weak too)."""
    for batch in iter_predictions(output_uri, _EXPORT_COLUMNS, storage_options):
        for row in batch.to_pylist():
            if (
                row["status"] == "ok"
                and row["segmentation_uri"]
                and (include_weak or is_kept(row["kept"], row["label_coverage"], min_coverage))
            ):
                yield row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if problem := output_problem(args.output_uri, storage_options(args)):
        exit_code, message = problem
        print(f"error: {message}", file=sys.stderr)
        return exit_code
    try:
        written = export_coco(
            args.output_uri,
            args.dest,
            args.images_per_file,
            args.include_weak,
            args.labels_from,
            storage_options(args),
            args.min_coverage,
        )
    except (ValueError, ModelLoadError) as error:  # no labels, or --labels-from unusable
        print(f"error: {strip_url_secrets(str(error))}", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    except OSError as error:  # the store, after its retries; an earlier export stays whole
        said = error if isinstance(error, MissingMapError) else f"{type(error).__name__}: {error}"
        print(f"error: {strip_url_secrets(str(said))}", file=sys.stderr)
        return EXIT_FAILED
    print(f"wrote {len(written)} COCO part(s)" + (f", first {written[0]}" if written else ""))
    if not written and not args.include_weak:
        # Nothing kept was exported: every row an export with weak ones holds is weak.
        weak = sum(1 for _ in _exported_rows(args.output_uri, storage_options(args), True))
        if weak:
            print(
                f"all {weak} images with a segmentation map are weak (kept = false): "
                "--include-weak exports them too"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
