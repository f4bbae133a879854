"""Compaction: an output's committed view rewritten as few parts, between runs."""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.output.runs import RUN_GOING_WITHIN_S
from pipeline.output.view import PREDICTIONS_FOLDER, committed_parts, iter_view
from pipeline.schema import PREDICTION_SCHEMA
from pipeline.storage import arrow_filesystem, filesystem_for, is_local, join, remove_files

# compacted-<when it began, to the second>-<random>_<number>.parquet
COMPACTED_PART_PREFIX = "compacted-"
_STAMP_FORMAT = "%Y%m%dT%H%M%S"


def compacted_since(part_name: str, moment: datetime) -> bool:
    """Whether ``part_name`` is a part of a compaction that began at ``moment`` or
    later (to the second): the only ones that can hold rows written after it."""
    stamp = part_name.removeprefix(COMPACTED_PART_PREFIX)[: len("20260101T000000")]
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
