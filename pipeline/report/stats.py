"""What the quality report says about an output: counts, errors, classes, histograms.

Accumulators over the one-row-per-image view of the predictions, fed a batch
at a time (``predictions.iter_predictions``), in Arrow compute and numpy with
no per-row Python except for error rows; ``output_stats`` and
``sample_image_ids`` do the same for one table. The sampled images' full rows
are read separately.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.keys import shard_uris
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
_HISTOGRAM_EDGES = [round(float(edge), 6) for edge in np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)]
# Per-image scores in [0, 1] shown as histograms.
_SCORES = ("seg_confidence_mean", "label_coverage", "entropy_mean")


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
    summary = StatsAccumulator(max_error_groups, examples_per_group)
    summary.add(table)
    return summary.result()


class StatsAccumulator:
    """:class:`OutputStats` from the one-row-per-image view, fed a batch at a time.

    Every figure is a sum over rows (counts, histogram bins, class counts), so
    batches of any size give the same result as one table; error examples are
    the first ones in the order rows arrive.
    """

    def __init__(self, max_error_groups: int = 30, examples_per_group: int = 3) -> None:
        self._max_error_groups = max_error_groups
        self._examples_per_group = examples_per_group
        self._images = self._ok = self._kept = self._weak = 0
        self._error_counts: dict[str, int] = {}
        self._error_examples: dict[str, list[tuple[str, str]]] = {}
        self._class_images: collections.Counter[int] = collections.Counter()
        self._histograms = {name: np.zeros(HISTOGRAM_BINS, np.int64) for name in _SCORES}
        self._scored = dict.fromkeys(_SCORES, 0)  # rows with a value, by column
        self._depth_kinds: collections.Counter[str] = collections.Counter()

    def add(self, rows: pa.Table | pa.RecordBatch) -> None:
        status = rows["status"]
        is_ok = pc.equal(status, "ok")
        self._images += rows.num_rows
        self._ok += _count(is_ok)
        # Error rows also have kept = false; weak means annotated, yet under min_coverage.
        self._kept += _count(pc.and_(is_ok, pc.equal(rows["kept"], True)))
        self._weak += _count(pc.and_(is_ok, pc.equal(rows["kept"], False)))
        errors = rows.filter(pc.invert(is_ok))
        for source_uri, reason in zip(
            errors["source_uri"].to_pylist(), errors["error"].to_pylist(), strict=True
        ):
            reason = reason or "error: no reason recorded"
            group = reason_group(reason)
            self._error_counts[group] = self._error_counts.get(group, 0) + 1
            found = self._error_examples.setdefault(group, [])
            if len(found) < self._examples_per_group:
                found.append((source_uri, reason))
        for name in _SCORES:
            values = rows[name].drop_null().to_numpy(zero_copy_only=False).astype(np.float64)
            present = values[~np.isnan(values)]
            self._scored[name] += len(present)
            self._histograms[name] += np.histogram(
                np.clip(present, 0.0, 1.0), bins=HISTOGRAM_BINS, range=(0.0, 1.0)
            )[0]
        labels = pc.list_flatten(rows["seg_labels"])
        if len(labels):
            for item in pc.value_counts(labels):
                self._class_images[item["values"].as_py()] += item["counts"].as_py()
        for item in pc.value_counts(rows["depth_kind"].drop_null()):
            self._depth_kinds[item["values"].as_py()] += item["counts"].as_py()

    def result(self) -> OutputStats:
        groups = sorted(self._error_counts, key=lambda group: (-self._error_counts[group], group))
        listed = groups[: self._max_error_groups]
        return OutputStats(
            images=self._images,
            ok=self._ok,
            error=self._images - self._ok,
            kept=self._kept,
            weak=self._weak,
            error_groups=[
                ErrorGroup(group, self._error_counts[group], self._error_examples[group])
                for group in listed
            ],
            more_error_groups=len(groups) - len(listed),
            class_images=sorted(self._class_images.items(), key=lambda pair: (-pair[1], pair[0])),
            histograms={
                name: Histogram(
                    edges=_HISTOGRAM_EDGES,
                    counts=[int(count) for count in self._histograms[name]],
                    missing=self._images - self._scored[name],
                )
                for name in _SCORES
                if self._scored[name]
            },
            depth_kinds=dict(self._depth_kinds),
        )


def sample_image_ids(table: pa.Table, count: int) -> list[str]:
    """Up to ``count`` ok image ids, the same ones each time (see :class:`SampleChooser`)."""
    chooser = SampleChooser(count)
    chooser.add(table)
    return chooser.image_ids()


class SampleChooser:
    """Up to ``count`` ok images of the one-row-per-image view, fed a batch at a time.

    Image ids are hex digests, so the smallest ones are a stable pseudo-random
    sample: a rebuilt report shows the same images, and a grown output keeps
    most of its earlier picks (a new image enters only where its id is smaller),
    so reports of scheduled runs can be compared by eye. Images inside shards
    are picked shard by shard (the first shards by URI), so showing them means
    reading a shard or two, not one per image.
    """

    def __init__(self, count: int) -> None:
        self._count = count
        self._best: pa.Table | None = None  # (shard, image_id) of the picks so far

    def add(self, rows: pa.Table | pa.RecordBatch) -> None:
        if self._count <= 0:
            return
        ok_rows = rows.filter(pc.equal(rows["status"], "ok"))
        if ok_rows.num_rows == 0:
            return
        # Image files have no shard: all in one group, before every shard.
        shard = pc.fill_null(shard_uris(ok_rows["source_uri"]), "")
        keys = pa.table({"shard": shard, "image_id": ok_rows["image_id"]})
        if self._best is not None:
            keys = pa.concat_tables([self._best, keys])
        chosen = pc.select_k_unstable(
            keys, k=min(self._count, keys.num_rows), sort_keys=_SAMPLE_ORDER
        )
        self._best = keys.take(chosen)

    def image_ids(self) -> list[str]:
        if self._best is None:
            return []
        return self._best.sort_by(_SAMPLE_ORDER)["image_id"].to_pylist()


_SAMPLE_ORDER = [("shard", "ascending"), ("image_id", "ascending")]


def _count(mask: pa.ChunkedArray) -> int:
    return int(pc.sum(mask).as_py() or 0)  # nulls (no value) count as false
