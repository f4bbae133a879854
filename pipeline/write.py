"""Write: map files to the output prefix, then rows in the Parquet schema."""

from __future__ import annotations

import collections
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.encode import encode_depth_npz, encode_depth_png, encode_segmentation_png
from pipeline.keys import annotation_tag, map_file_key
from pipeline.metrics import record_map_bytes, record_outcomes
from pipeline.progress import report_progress
from pipeline.retry import is_storage_error, retry_transient
from pipeline.schema import PREDICTION_SCHEMA, error_reason
from pipeline.storage import filesystem_for, full_uri, join


def write_maps_batch(
    batch: dict[str, np.ndarray],
    output_uri: str,
    storage_options: dict[str, Any],
    compress_level: int,
    run_id: str,
    config_hash: str,
    min_coverage: float | None = None,
    depth_kind: str | None = None,
    beacon: Any = None,
) -> pa.Table:
    """Encode and write each ok row's maps; return the batch as Parquet-schema rows.

    ``beacon`` (a :class:`~pipeline.progress.ProgressBeacon`) hears of the batch
    once it is written: the stall watchdog's pulse.

    ``min_coverage`` (pseudo-label mode): ok rows get ``kept``, false where the
    segmentation labels fewer pixels than that; error rows are never kept.
    """
    fs, root = filesystem_for(output_uri, storage_options)
    count = len(batch["status"])
    status = batch["status"].astype(object)
    error = batch["error"].astype(object)
    has_depth = "depth_levels" in batch or "depth_float16" in batch
    depth_uri = np.full(count, None, dtype=object)
    segmentation_uri = np.full(count, None, dtype=object)
    source_versions = _column_or_nulls(batch, "source_version", count)
    bytes_written = collections.Counter()  # recorded once per batch, not per file
    for index in range(count):
        if status[index] != "ok":
            continue
        source_key = str(batch["source_key"][index])
        tag = annotation_tag(str(batch["image_id"][index]), source_versions[index], config_hash)
        try:
            maps = _encoded_maps(batch, index, has_depth, compress_level)
        except ValueError as problem:  # a map of the wrong shape or type
            status[index], error[index] = "error", error_reason("encode", problem)
            continue
        uris = {"depth": depth_uri, "segmentation": segmentation_uri}
        try:
            for kind, suffix, data in maps:
                path = join(root, map_file_key(kind, source_key, tag, suffix))
                retry_transient(lambda path=path, data=data: fs.pipe_file(path, data))
                uris[kind][index] = full_uri(fs, path)
                bytes_written[kind] += len(data)
        except Exception as problem:
            # The store's failure, not ours: an error row, retried by the next
            # run. Left to raise, one image would fail the batch and the job.
            if not is_storage_error(problem):
                raise
            status[index], error[index] = "error", error_reason("write", problem)
            depth_uri[index] = segmentation_uri[index] = None

    # Counted here, where every row's outcome is final.
    record_outcomes(status, error)
    for map_name, size in bytes_written.items():
        record_map_bytes(map_name, size)
    ok = status == "ok"
    kept = [None] * count
    if min_coverage is not None:
        coverage = batch.get("label_coverage")
        kept = [
            bool(is_ok and (coverage is None or coverage[index] >= min_coverage))
            for index, is_ok in enumerate(ok)
        ]
    rows = pa.Table.from_pydict(
        {
            "image_id": batch["image_id"].tolist(),
            "source_uri": batch["source_uri"].tolist(),
            "status": status.tolist(),
            "error": [reason or None for reason in error.tolist()],
            "width": _where(ok, batch["width"]),
            "height": _where(ok, batch["height"]),
            "depth_uri": depth_uri.tolist(),
            "depth_min": _where(ok, batch.get("depth_min")),
            "depth_max": _where(ok, batch.get("depth_max")),
            "depth_kind": [depth_kind if is_ok and has_depth else None for is_ok in ok],
            "segmentation_uri": segmentation_uri.tolist(),
            "seg_labels": _where(ok, batch.get("seg_labels"), lambda v: [int(x) for x in v]),
            "seg_confidence_mean": _where(ok, batch.get("seg_confidence_mean")),
            "label_coverage": _where(ok, batch.get("label_coverage")),
            "entropy_mean": _where(ok, batch.get("entropy_mean")),
            "kept": kept,
            "model_depth": _column_or_nulls(batch, "model_depth", count),
            "model_segmentation": _column_or_nulls(batch, "model_segmentation", count),
            "run_id": [run_id] * count,
            "source_metadata": [
                value or None for value in _column_or_nulls(batch, "source_metadata", count)
            ],
            "source_version": source_versions,
            "config_hash": [config_hash] * count,
            "written_at": [datetime.now(UTC)] * count,
        },
        schema=PREDICTION_SCHEMA,
    )
    if beacon is not None:
        report_progress(rows, beacon)
    return rows


def _where(ok: np.ndarray, values: np.ndarray | None, convert=lambda v: v.item()) -> list:
    if values is None:
        return [None] * len(ok)
    return [convert(value) if keep else None for keep, value in zip(ok, values, strict=True)]


def _encoded_maps(
    batch: dict[str, np.ndarray], index: int, has_depth: bool, compress_level: int
) -> list[tuple[str, str, bytes]]:
    """(kind, file suffix, bytes) of each map of row ``index``."""
    maps = []
    if has_depth and "depth_levels" in batch:
        maps.append(
            ("depth", ".png", encode_depth_png(batch["depth_levels"][index], compress_level))
        )
    elif has_depth:
        # Ray's hand-over between stages widens float16 arrays to float32; the
        # values are still float16's, so this is exact.
        depth = batch["depth_float16"][index].astype(np.float16)
        maps.append(("depth", ".npz", encode_depth_npz(depth)))
    if "seg_class_ids" in batch:
        png = encode_segmentation_png(batch["seg_class_ids"][index], compress_level)
        maps.append(("segmentation", ".png", png))
    return maps


def _column_or_nulls(batch: dict[str, np.ndarray], key: str, count: int) -> list:
    return batch[key].tolist() if key in batch else [None] * count
