"""Write ``<output>/report/``: ``index.html`` and the thumbnails it shows.

Reads the committed predictions and the run records, samples a fixed number of
images, reads their sources and maps, and writes small JPEG thumbnails next to
the page. The page's size depends on the sample count, never on the run's.
"""

from __future__ import annotations

import collections
import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from dpt_model import ModelLoadError
from dpt_model.loading import DEFAULT_CACHE_DIR
from pipeline.decode import LARGEST_IMAGE_PIXELS, LARGEST_SIDE_PX, decode_image
from pipeline.encode import decode_depth_map, decode_segmentation_png
from pipeline.keys import shard_member_uri, split_shard_member
from pipeline.output.maps import segmentation_class_names
from pipeline.output.runs import run_records, unfinished_runs
from pipeline.output.view import iter_predictions, read_predictions
from pipeline.read import ShardInput, iter_shard_images
from pipeline.report.page import ReportPage, Sample, render_page
from pipeline.report.stats import STATS_COLUMNS, SampleChooser, StatsAccumulator
from pipeline.report.thumbnails import (
    colorize_depth,
    encode_jpeg,
    fit_within,
    overlay_segmentation,
    resize_rgb,
)
from pipeline.retry import retry_transient
from pipeline.schema import error_reason, strip_url_secrets
from pipeline.storage import (
    files_in,
    filesystem_for,
    full_uri,
    join,
    read_bytes,
    remove_files,
    upload_options,
)

logger = logging.getLogger(__name__)

REPORT_FOLDER = "report"
THUMBNAILS_FOLDER = "thumbs"
# What the grid needs of each sampled image (its row is read on its own).
SAMPLE_COLUMNS = [
    "image_id",
    "source_uri",
    "width",
    "height",
    "depth_uri",
    "depth_kind",
    "segmentation_uri",
    "seg_confidence_mean",
    "label_coverage",
    "kept",
]
RUNS_SHOWN = 20
# Reads of sources and maps overlap: on S3 each is a round trip.
_READ_THREADS = 8
_OVERLAY_ALPHA = 0.55
_SHARD_NOT_READ = "input not shown: its shard was not read for the report"
# Sampled images inside shards are shown from at most this many shards (each is
# streamed until its sampled images are found); the rest show their maps only.
MAX_SHARDS_READ = 3


def write_quality_report(
    output_uri: str,
    storage_options: dict[str, Any] | None = None,
    class_names: dict[int, str] | None = None,
    samples: int = 24,
    thumbnail_px: int = 192,
    max_image_pixels: int = LARGEST_IMAGE_PIXELS,
    max_side_px: int = LARGEST_SIDE_PX,
    shard_input: ShardInput | None = None,
    this_run: dict[str, Any] | None = None,
) -> str:
    """Build the report for everything committed under ``output_uri``; returns the page's URI.

    ``class_names`` (the segmentation checkpoint's ``id2label``) names classes;
    without it they show as ids. Sources are decoded under ``max_image_pixels``
    and ``max_side_px`` (by default the largest the job's config accepts; the
    job passes its own). ``shard_input`` lets the report show images that live
    inside shards. ``this_run`` (a run summary) heads the runs table before its
    record is written.
    """
    storage_options = storage_options or {}
    fs, root = filesystem_for(output_uri, storage_options)
    folder = join(root, REPORT_FOLDER)
    # Streamed: the statistics and the sample are sums and running picks, so the
    # whole output's columns are never held at once.
    summary, chooser = StatsAccumulator(), SampleChooser(samples)
    for batch in iter_predictions(output_uri, STATS_COLUMNS, storage_options):
        summary.add(batch)
        chooser.add(batch)
    stats, sampled_ids = summary.result(), chooser.image_ids()
    sampled = (
        read_predictions(output_uri, storage_options, SAMPLE_COLUMNS, sampled_ids).to_pylist()
        if sampled_ids
        else []
    )
    sampled.sort(key=lambda row: sampled_ids.index(row["image_id"]))

    with ThreadPoolExecutor(_READ_THREADS) as pool:
        in_shards = _images_in_shards(pool, sampled, shard_input, storage_options)

        def thumbnails_for(row: dict[str, Any]) -> tuple[Sample, dict[str, bytes]]:
            return _sample_thumbnails(
                row,
                in_shards if shard_input else None,
                storage_options,
                thumbnail_px,
                max_image_pixels,
                max_side_px,
            )

        pictures = list(pool.map(thumbnails_for, sampled))
    earlier_thumbnails = files_in(fs, join(folder, THUMBNAILS_FOLDER))
    thumbnails = {
        join(folder, relative): data for _, files in pictures for relative, data in files.items()
    }
    if thumbnails:
        options = upload_options(fs, "image/jpeg")
        retry_transient(lambda: fs.pipe(thumbnails, **options))
    page = ReportPage(
        output_uri=strip_url_secrets(output_uri),
        generated_at=datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        stats=stats,
        class_names=class_names or {},
        runs=_runs_table(output_uri, storage_options, this_run),
        samples=[sample for sample, _ in pictures],
    )
    index = join(folder, "index.html")
    html = render_page(page).encode()
    options = upload_options(fs, "text/html; charset=utf-8")
    retry_transient(lambda: fs.pipe_file(index, html, **options))
    # Thumbnails only the earlier page showed go once the new page is in place;
    # one left behind costs a few kilobytes, so a failure here is only logged.
    stale = sorted(earlier_thumbnails - set(thumbnails))
    try:
        remove_files(fs, stale)
    except OSError as problem:
        logger.warning("could not remove %d old report thumbnails: %s", len(stale), problem)
    return full_uri(fs, index)


def class_names_or_ids(
    output_uri: str,
    storage_options: dict[str, Any],
    model_uri: str | None = None,
    cache_dir: Path = DEFAULT_CACHE_DIR,
) -> dict[int, str]:
    """``predictions.segmentation_class_names`` for the report, which never fails on it:
    where no checkpoint names the classes, or it cannot be fetched, they show as ids."""
    try:
        return segmentation_class_names(output_uri, storage_options, model_uri, cache_dir) or {}
    except (ModelLoadError, OSError, ValueError) as problem:
        logger.warning("report shows class ids: %s", error_reason("labels", problem))
        return {}


def _runs_table(
    output_uri: str, storage_options: dict[str, Any], this_run: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """The newest runs, finished or not: a stopped, failed or killed run's rows are
    in the view too, so the table names it (its counts are in no record)."""
    this_id = this_run["run_id"] if this_run is not None else None
    timed = [
        (
            str(record.get("finished_at") or ""),
            {**(record.get("summary") or {}), "outcome": "finished"},
        )
        for record in run_records(output_uri, storage_options, RUNS_SHOWN)
    ]
    timed += [
        (run["at"], {"run_id": run["run_id"], "outcome": _outcome_text(run)})
        for run in unfinished_runs(output_uri, storage_options, RUNS_SHOWN)
        if run["run_id"] != this_id
    ]
    if this_run is not None:
        timed = [(when, run) for when, run in timed if run.get("run_id") != this_id]
        timed.append((datetime.now(UTC).isoformat(), {**this_run, "outcome": "finished"}))
    timed.sort(key=lambda pair: pair[0], reverse=True)
    return [{**run, "finished_at": _shown_time(when)} for when, run in timed[:RUNS_SHOWN]]


def _outcome_text(run: dict[str, Any]) -> str:
    if run["outcome"] == "failed" and run.get("error_type"):
        return f"failed ({run['error_type']})"
    return str(run["outcome"])


def _images_in_shards(
    pool: ThreadPoolExecutor,
    rows: list[dict[str, Any]],
    shard_input: ShardInput | None,
    storage_options: dict[str, Any],
) -> dict[str, bytes | str]:
    """Source URI → image bytes (or why not) for sampled rows whose image is in a shard."""
    wanted = collections.defaultdict(set)
    for row in rows:
        if member := split_shard_member(row["source_uri"]):
            shard_uri, sample_id = member
            wanted[shard_uri].add(sample_id)
    if not wanted or shard_input is None:
        return {}

    def read(shard_uri: str) -> dict[str, bytes | str]:
        found, missing = {}, set(wanted[shard_uri])
        try:
            for image in iter_shard_images(shard_uri, shard_input, storage_options):
                if image.sample_id in missing and image.data is not None:
                    found[shard_member_uri(shard_uri, image.sample_id)] = image.data
                    missing.discard(image.sample_id)
                    if not missing:
                        break  # stop streaming the shard: the rest is not needed
        except Exception as problem:  # reported per image on the page
            reason = error_reason("input", problem)
            found.update({shard_member_uri(shard_uri, sample): reason for sample in missing})
        return found

    results = {}
    for found in pool.map(read, list(wanted)[:MAX_SHARDS_READ]):
        results.update(found)
    return results


def _sample_thumbnails(
    row: dict[str, Any],
    in_shards: dict[str, bytes | str] | None,
    storage_options: dict[str, Any],
    thumbnail_px: int,
    max_image_pixels: int,
    max_side_px: int,
) -> tuple[Sample, dict[str, bytes]]:
    """One grid entry: its input, depth and segmentation thumbnails as JPEG bytes.

    A file that cannot be read any more (moved source, deleted map) leaves that
    thumbnail out and says why on the page; it never fails the report. Names
    carry the image id, so a page never shows another page's picture.
    ``in_shards`` is None where the report reads no shards (image-file input).
    """
    sample, files = Sample(row=row), {}
    if not row.get("width") or not row.get("height"):
        sample.problems.append("no thumbnails: the row records no image size")
        return sample, files
    size_wh = fit_within(row["width"], row["height"], thumbnail_px)
    stem = f"{THUMBNAILS_FOLDER}/{row['image_id'][:20]}"
    rgb = None
    in_shard = in_shards.get(row["source_uri"]) if in_shards is not None else None
    # A webdataset sample or Parquet row: reading it means reading its shard. Where
    # the report reads no shards, a name like "a.tar#1.jpg" may be a plain file.
    in_unread_shard = in_shard is None and split_shard_member(row["source_uri"]) is not None
    if isinstance(in_shard, str):
        sample.problems.append(in_shard)
    elif in_unread_shard and in_shards is not None:
        sample.problems.append(_SHARD_NOT_READ)
    else:
        try:
            data = in_shard or read_bytes(row["source_uri"], storage_options)
            decoded = decode_image(data, max_image_pixels, max_side_px, reduce_to_px=thumbnail_px)
            rgb = resize_rgb(decoded.rgb, size_wh)
            files[f"{stem}-input.jpg"] = encode_jpeg(rgb)
            sample.input_thumbnail = f"{stem}-input.jpg"
        except FileNotFoundError as problem:
            sample.problems.append(
                _SHARD_NOT_READ if in_unread_shard else error_reason("input", problem)
            )
        except Exception as problem:  # any unreadable file is reported on the page
            sample.problems.append(error_reason("input", problem))
    if row["depth_uri"]:
        try:
            data = read_bytes(row["depth_uri"], storage_options)
            depth = decode_depth_map(row["depth_uri"], data).astype(np.float32)
            near_is_high = row["depth_kind"] != "metric"
            files[f"{stem}-depth.jpg"] = encode_jpeg(colorize_depth(depth, size_wh, near_is_high))
            sample.depth_thumbnail = f"{stem}-depth.jpg"
        except Exception as problem:
            sample.problems.append(error_reason("depth", problem))
    if row["segmentation_uri"]:
        try:
            data = read_bytes(row["segmentation_uri"], storage_options)
            class_ids = decode_segmentation_png(data)
            overlay = overlay_segmentation(rgb, class_ids, size_wh, _OVERLAY_ALPHA)
            files[f"{stem}-segmentation.jpg"] = encode_jpeg(overlay)
            sample.segmentation_thumbnail = f"{stem}-segmentation.jpg"
            sample.classes = [int(class_id) for class_id in np.unique(class_ids)]
        except Exception as problem:
            sample.problems.append(error_reason("segmentation", problem))
    return sample, files


def _shown_time(iso_time: str | None) -> str:
    return str(iso_time or "")[:19].replace("T", " ")
