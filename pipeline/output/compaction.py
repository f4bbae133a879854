"""Compaction: an output's committed view rewritten as few parts, between runs."""

from __future__ import annotations

import itertools
import os
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.listing import iter_objects
from pipeline.output.done import in_sorted, text_key
from pipeline.output.maps import MapLocator
from pipeline.output.runs import RUN_GOING_WITHIN_S, runs_going
from pipeline.output.view import PREDICTIONS_FOLDER, committed_parts, iter_view, scan_committed
from pipeline.schema import PREDICTION_SCHEMA
from pipeline.storage import (
    arrow_filesystem,
    filesystem_for,
    full_uri,
    is_local,
    join,
    remove_files,
)

MAP_FOLDERS = ("depth", "segmentation")
_MAPS_PER_DELETE = 1000  # S3's DeleteObjects takes at most this many keys

# compacted-<when it began, to the second>-<random>_<number>.parquet
COMPACTED_PART_PREFIX = "compacted-"
_STAMP_FORMAT = "%Y%m%dT%H%M%S"
_STAMP_CHARS = len(datetime(2000, 1, 1).strftime(_STAMP_FORMAT))


def compacted_since(part_name: str, moment: datetime) -> bool:
    """Whether ``part_name`` is a part of a compaction that began at ``moment`` or
    later (to the second): the only ones that can hold rows written after it."""
    stamp = part_name.removeprefix(COMPACTED_PART_PREFIX)[:_STAMP_CHARS]
    return part_name.startswith(COMPACTED_PART_PREFIX) and stamp >= f"{moment:{_STAMP_FORMAT}}"


@dataclass(frozen=True)
class Compaction:
    parts_before: int
    parts_after: int
    rows: int | None  # rows after: one per image
    # Local disks: hidden part files a killed writer left half-written.
    leftovers_removed: int = 0


def compact_predictions(
    output_uri: str, storage_options: dict[str, Any] | None = None, rows_per_part: int = 100_000
) -> Compaction:
    """Rewrite the committed view as few large parts, then delete the parts it came from.

    Scheduled runs each add parts, and every run, report and export opens every
    part (on an object store, a request each). Kept: each image's row in
    :func:`read_predictions`, which is also all that :func:`load_done_images`
    reads as done, so the view and every run's skips stay as they were. Gone:
    older duplicates, rows of earlier versions and configs, retried errors, and
    shard error rows a later read healed.
    Safe to stop at any point: the new parts are complete before any old one
    is deleted, and until then the view holds each row twice, which it
    collapses. Best not while a run writes to the output: the run's count of its
    rows finds them here (:func:`compacted_since`), less those the view drops.
    Reads that began before it list again (``read_again_if_parts_go``), except
    streamed ones.
    """
    fs, root = filesystem_for(output_uri, storage_options or {})
    leftovers = _leftover_part_files(fs, root, time.time() - RUN_GOING_WITHIN_S)
    remove_files(fs, leftovers)
    parts = committed_parts(fs, root)
    if len(parts) < 2:
        return Compaction(len(parts), len(parts), None, len(leftovers))  # nothing to gain
    # Unique per compaction: a second one within the same second must not
    # write over (and then delete) a part it is reading.
    stamp = f"{datetime.now(UTC):{_STAMP_FORMAT}}-{uuid.uuid4().hex[:8]}"
    written: list[str] = []
    pending: list[pa.RecordBatch] = []
    pending_rows = rows_after = 0

    def write_part() -> None:
        nonlocal pending, pending_rows
        name = f"{COMPACTED_PART_PREFIX}{stamp}_{len(written):06d}.parquet"
        path = join(root, f"{PREDICTIONS_FOLDER}/{name}")
        table = pa.Table.from_batches(pending, schema=PREDICTION_SCHEMA)
        with arrow_filesystem(fs).open_output_stream(path) as stream:
            pq.write_table(table, stream)
        written.append(path)
        pending, pending_rows = [], 0

    columns = list(PREDICTION_SCHEMA.names)
    for batch in iter_view(fs, root, parts, columns, output_uri):
        pending.append(batch)
        pending_rows += batch.num_rows
        rows_after += batch.num_rows
        if pending_rows >= rows_per_part:
            write_part()
    if pending_rows:
        write_part()
    # Oldest rows first: the view lets an ok row stand over later errors of its
    # version and config with nothing between, so deleting a part that holds a
    # row between them before the part with the old ok row (name order would,
    # for an earlier compaction's part) would change the view of a compaction
    # stopped half-way.
    if is_local(fs):
        _sync_to_disk([*written, join(root, PREDICTIONS_FOLDER)])
    superseded = set(parts) - set(written)
    remove_files(fs, sorted(superseded, key=lambda path: (_newest_row_time(fs, path), path)))
    return Compaction(len(parts), len(written), rows_after, len(leftovers))


def _leftover_part_files(fs: fsspec.AbstractFileSystem, root: str, before: float) -> list[str]:
    """Local parts' hidden ``.<name>.<random>.tmp`` files last written before ``before``
    (seconds): what a writer killed mid-part leaves. Object stores keep no such
    files (a part is one upload), and the view never reads them."""
    folder = join(root, PREDICTIONS_FOLDER)
    if not is_local(fs) or not os.path.isdir(folder):
        return []
    with os.scandir(folder) as entries:
        return [
            entry.path
            for entry in entries
            if entry.name.startswith(".")
            and entry.name.endswith(".tmp")
            and entry.is_file(follow_symlinks=False)
            and entry.stat(follow_symlinks=False).st_mtime < before
        ]


def _sync_to_disk(paths: list[str]) -> None:
    """fsync files and folders: the new parts, and their names, must be on the disk
    before the parts they replace are deleted, or a power cut could lose both."""
    for path in paths:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _newest_row_time(fs: fsspec.AbstractFileSystem, path: str) -> int:
    """The newest ``written_at`` in a part, in microseconds (-1 where none is known)."""
    try:
        written_at = pq.read_table(path, columns=["written_at"], filesystem=arrow_filesystem(fs))
    except (pa.ArrowException, OSError, KeyError):  # a part from before the column
        return -1
    newest = pc.max(written_at["written_at"].cast(pa.int64())).as_py()
    return -1 if newest is None else newest


@dataclass(frozen=True)
class MapPruning:
    maps_listed: int
    maps_deleted: int
    # A run that started while maps were deleted: pruning stopped there.
    stopped_for_run: str | None = None


def delete_unreferenced_maps(
    output_uri: str, storage_options: dict[str, Any] | None = None
) -> MapPruning:
    """Delete the map files that no committed row names.

    Maps are named per image, source version and config, so every model
    change or changed image leaves the old maps behind; after
    :func:`compact_predictions` only the view's rows remain, and the maps only
    superseded rows named go here. A map whose row was never committed (a
    run killed between the two) goes too: the next run writes it again. Every
    committed row keeps its maps, compacted or not. A run writes its start
    record before any map, so before each batch of deletes the runs going are
    looked up, and a run that started stops the pruning: its maps have no rows
    yet. The driver keeps 8 bytes per map a row names.
    """
    fs, root = filesystem_for(output_uri, storage_options or {})
    here = full_uri(fs, root).rstrip("/") + "/"
    referenced = _referenced_map_keys(fs, root, MapLocator(output_uri, storage_options), here)
    listed = deleted = 0
    for kind in MAP_FOLDERS:
        folder = join(root, kind)
        if not fs.exists(folder):
            continue
        paths = (stored.path for stored in iter_objects(fs, folder))
        while chunk := list(itertools.islice(paths, _MAPS_PER_DELETE)):
            listed += len(chunk)
            keys = np.fromiter(
                (text_key(full_uri(fs, path).removeprefix(here)) for path in chunk),
                dtype=np.uint64,
                count=len(chunk),
            )
            named = in_sorted(referenced, keys)
            unreferenced = [path for path, kept in zip(chunk, named, strict=True) if not kept]
            if not unreferenced:
                continue
            if going := runs_going(fs, root, RUN_GOING_WITHIN_S, time.time()):
                return MapPruning(listed, deleted, going[0][0])
            remove_files(fs, unreferenced)
            deleted += len(unreferenced)
    return MapPruning(listed, deleted)


def _referenced_map_keys(
    fs: fsspec.AbstractFileSystem, root: str, locator: MapLocator, here: str
) -> np.ndarray:
    """Sorted 64-bit keys of the maps committed rows name, as keys under ``here``
    (rows of an output copied here name maps where it was: the locator finds them)."""
    keys: list[np.ndarray] = []
    for batch in scan_committed(fs, root, ["depth_uri", "segmentation_uri"]):
        for kind, column in zip(MAP_FOLDERS, batch.columns, strict=True):
            located = (locator(uri, kind) for uri in column.to_pylist() if uri is not None)
            keys.append(
                np.fromiter(
                    (text_key(uri.removeprefix(here)) for uri in located if uri.startswith(here)),
                    dtype=np.uint64,
                )
            )
    return np.unique(np.concatenate(keys)) if keys else np.empty(0, dtype=np.uint64)
