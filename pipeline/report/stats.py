"""What the quality report says about an output: counts, errors, classes, histograms.

Pure functions over the one-row-per-image view of the predictions
(``pipeline.read_predictions``) in Arrow compute and numpy, no per-row Python
except for error rows; the sampled images' full rows are read separately.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.keys import SHARD_MEMBER_PATTERN
from pipeline.schema import reason_group

# The columns the statistics and the sample choice need, for every image. Map
# URIs and sizes are read only for the sampled images.
STATS_COLUMNS = [
    "image_id",
    "source_uri",
    "status",
    "error",
    "seg_labels",
    "seg_confidence_mean",
    "label_coverage",
    "entropy_mean",
    "kept",
    "depth_kind",
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
    error_groups: list[ErrorGroup]
    more_error_groups: int  # kinds of error beyond the ones listed
    class_images: list[tuple[int, int]]  # (class id, images it appears in), most first
    histograms: dict[str, Histogram]  # by column; only columns with values
    depth_kinds: dict[str, int] = field(default_factory=dict)


def output_stats(
    table: pa.Table, max_error_groups: int = 30, examples_per_group: int = 3
) -> OutputStats:
    """Summarise predictions (one row per image, at least ``STATS_COLUMNS``)."""
    status = table["status"]
    is_ok = pc.equal(status, "ok")
    ok = _count(is_ok)
    # Error rows also have kept = false; weak means annotated, yet under min_coverage.
    kept = table["kept"]
    error_groups, more_error_groups = _error_groups(
        table.filter(pc.not_equal(status, "ok")), max_error_groups, examples_per_group
    )
    histograms = {}
    for name in ("seg_confidence_mean", "label_coverage", "entropy_mean"):
        values = table[name].drop_null().to_numpy(zero_copy_only=False).astype(np.float64)
        present = values[~np.isnan(values)]
        if len(present):
            histograms[name] = histogram(present, missing=table.num_rows - len(present))
    kinds = pc.value_counts(table["depth_kind"].drop_null())
    return OutputStats(
        images=table.num_rows,
        ok=ok,
        error=table.num_rows - ok,
        kept=_count(pc.and_(is_ok, pc.equal(kept, True))),
        weak=_count(pc.and_(is_ok, pc.equal(kept, False))),
        error_groups=error_groups,
        more_error_groups=more_error_groups,
        class_images=class_image_counts(table["seg_labels"]),
        histograms=histograms,
        depth_kinds={item["values"].as_py(): item["counts"].as_py() for item in kinds},
    )


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


def sample_image_ids(table: pa.Table, count: int) -> list[str]:
    """The ids of up to ``count`` ok images, the same ones each time.

    Image ids are hex digests, so the smallest ones are a stable pseudo-random
    sample: a rebuilt report shows the same images, and a grown output keeps
    most of its earlier picks (a new image enters only where its id is smaller),
    so reports of scheduled runs can be compared by eye. Images inside shards
    are picked shard by shard (the first shards by URI), so showing them means
    reading a shard or two, not one per image.
    """
    ok_rows = table.filter(pc.equal(table["status"], "ok"))
    if count <= 0 or ok_rows.num_rows == 0:
        return []
    source_uri = ok_rows["source_uri"]
    shard = pc.if_else(
        pc.match_substring_regex(source_uri, SHARD_MEMBER_PATTERN),
        pc.replace_substring_regex(source_uri, pattern=SHARD_MEMBER_PATTERN, replacement=r"\1"),
        "",  # image files: no shard, all in one group
    )
    keys = pa.table({"shard": shard, "image_id": ok_rows["image_id"]})
    chosen = pc.select_k_unstable(
        keys,
        k=min(count, keys.num_rows),
        sort_keys=[("shard", "ascending"), ("image_id", "ascending")],
    )
    picked = keys.take(chosen).sort_by([("shard", "ascending"), ("image_id", "ascending")])
    return picked["image_id"].to_pylist()


def _count(mask: pa.ChunkedArray) -> int:
    return int(pc.sum(mask).as_py() or 0)  # nulls (no value) count as false
