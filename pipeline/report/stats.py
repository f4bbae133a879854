"""What the quality report says about an output: counts, errors, classes, histograms.

Pure functions over the one-row-per-image view of the predictions
(``pipeline.read_predictions``); vectorised, so a run of millions of rows is
summarised in seconds on the driver.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.schema import reason_group

# The columns the report reads; map and source URIs only for the sampled rows.
REPORT_COLUMNS = [
    "image_id",
    "source_uri",
    "status",
    "error",
    "width",
    "height",
    "depth_uri",
    "depth_kind",
    "segmentation_uri",
    "seg_labels",
    "seg_confidence_mean",
    "label_coverage",
    "entropy_mean",
    "kept",
]
HISTOGRAM_BINS = 20


@dataclass(frozen=True)
class ErrorGroup:
    reason: str  # reason_group(): stage and kind of failure
    count: int
    examples: list[tuple[str, str]]  # (source_uri, full reason), the first few


@dataclass(frozen=True)
class Histogram:
    edges: list[float]  # len(counts) + 1 bin edges
    counts: list[int]
    missing: int  # rows without a value (error rows, or runs without the setting)


@dataclass
class OutputStats:
    images: int
    ok: int
    error: int
    # Pseudo-label mode: ok images kept as training targets and ok images marked
    # weak (kept = false); rows from runs without the mode count in neither.
    kept: int
    weak: int
    error_groups: list[ErrorGroup] = field(default_factory=list)
    more_error_groups: int = 0  # groups beyond the ones listed
    class_images: list[tuple[int, int]] = field(default_factory=list)  # (class id, images)
    histograms: dict[str, Histogram] = field(default_factory=dict)
    depth_kinds: dict[str, int] = field(default_factory=dict)


def output_stats(
    table: pa.Table, max_error_groups: int = 30, examples_per_group: int = 3
) -> OutputStats:
    """Summarise predictions (one row per image, at least ``REPORT_COLUMNS``)."""
    status = table["status"]
    is_ok = pc.equal(status, "ok")
    ok = _count(is_ok)
    # Error rows also have kept = false; weak means annotated, yet under min_coverage.
    kept = table["kept"]
    stats = OutputStats(
        images=table.num_rows,
        ok=ok,
        error=table.num_rows - ok,
        kept=_count(pc.and_(is_ok, pc.equal(kept, True))),
        weak=_count(pc.and_(is_ok, pc.equal(kept, False))),
    )
    groups, stats.more_error_groups = _error_groups(
        table.filter(pc.not_equal(status, "ok")), max_error_groups, examples_per_group
    )
    stats.error_groups = groups
    stats.class_images = class_image_counts(table["seg_labels"])
    for name in ("seg_confidence_mean", "label_coverage", "entropy_mean"):
        values = table[name].to_numpy(zero_copy_only=False)
        present = values[~np.isnan(values.astype(np.float64))] if len(values) else values
        if len(present):
            stats.histograms[name] = histogram(present, missing=len(values) - len(present))
    kinds = pc.value_counts(table["depth_kind"].drop_null())
    stats.depth_kinds = {
        item["values"].as_py(): item["counts"].as_py() for item in kinds if item["values"].is_valid
    }
    return stats


def histogram(values: np.ndarray, missing: int = 0, bins: int = HISTOGRAM_BINS) -> Histogram:
    """Counts of values in [0, 1] over equal bins (values outside are clipped in)."""
    counts, edges = np.histogram(np.clip(values, 0.0, 1.0), bins=bins, range=(0.0, 1.0))
    return Histogram(
        edges=[round(float(edge), 6) for edge in edges],
        counts=[int(count) for count in counts],
        missing=missing,
    )


def class_image_counts(seg_labels: pa.ChunkedArray) -> list[tuple[int, int]]:
    """(class id, images in which it appears), most frequent first."""
    flat = pc.list_flatten(seg_labels)
    if len(flat) == 0:
        return []
    counts = pc.value_counts(flat)
    pairs = [(item["values"].as_py(), item["counts"].as_py()) for item in counts]
    return sorted(pairs, key=lambda pair: (-pair[1], pair[0]))


def _error_groups(
    errors: pa.Table, max_groups: int, examples_per_group: int
) -> tuple[list[ErrorGroup], int]:
    counts: dict[str, int] = {}
    examples: dict[str, list[tuple[str, str]]] = {}
    for source_uri, reason in zip(
        errors["source_uri"].to_pylist(), errors["error"].to_pylist(), strict=True
    ):
        reason = reason or "error: no reason recorded"
        group = reason_group(reason)
        counts[group] = counts.get(group, 0) + 1
        found = examples.setdefault(group, [])
        if len(found) < examples_per_group:
            found.append((source_uri, reason))
    ordered = sorted(counts, key=lambda group: (-counts[group], group))
    listed = [ErrorGroup(group, counts[group], examples[group]) for group in ordered[:max_groups]]
    return listed, max(0, len(ordered) - max_groups)


def sample_rows(table: pa.Table, count: int) -> list[dict[str, Any]]:
    """Up to ``count`` ok rows, picked by a hash of the image id.

    The same images come back each time the report is rebuilt, and a grown
    output keeps most of its earlier picks (a new image enters only where its
    hash is smaller), so reports of scheduled runs can be compared by eye.
    Images inside shards are picked shard by shard (by a hash of the shard), so
    showing them means reading one or two shards, not one per image.
    """
    ok_rows = table.filter(pc.equal(table["status"], "ok"))
    if count <= 0 or ok_rows.num_rows == 0:
        return []
    image_hashes = _crc32s(ok_rows["image_id"].to_pylist())
    shards = [
        uri.rsplit("#", 1)[0] if "#" in uri else "" for uri in ok_rows["source_uri"].to_pylist()
    ]
    shard_hashes = _crc32s(shards)  # crc32 of "" is 0: images that are files come first
    order = np.lexsort((np.arange(len(image_hashes)), image_hashes, shard_hashes))[:count]
    return ok_rows.take(pa.array(order, type=pa.int64())).to_pylist()


def _crc32s(texts: list[str]) -> np.ndarray:
    return np.fromiter(
        (zlib.crc32(text.encode()) for text in texts), dtype=np.uint32, count=len(texts)
    )


def _count(mask: pa.ChunkedArray) -> int:
    return int(pc.sum(mask).as_py() or 0)  # nulls (no value) count as false
