"""The committed predictions of an output, and what they say is already done.

Every complete Parquet part under ``<output>/predictions`` is committed: a row is
written only after its map files, and a part becomes visible only when whole
(see ``storage.arrow_filesystem``), so whatever a crashed run left there is
valid. Runs append parts and never rewrite them; the same image can therefore
appear in several parts (a forced rerun, a changed source, a task Ray re-ran).
:func:`read_predictions` gives the view a reader wants: one row per image.
:func:`compact_predictions`, between runs, rewrites many parts as few.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import logging
import re
import signal
import threading
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from dpt_model import ModelCard
from dpt_model.loading import DEFAULT_CACHE_DIR
from pipeline.keys import SHARD_URI_PATTERN, SHARDS_FOLDER, shard_uris
from pipeline.schema import PREDICTION_SCHEMA, schema_for, strip_url_secrets
from pipeline.storage import (
    arrow_filesystem,
    filesystem_for,
    forget_listing,
    full_uri,
    join,
    remove_files,
)

logger = logging.getLogger(__name__)

PREDICTIONS_FOLDER = "predictions"
RUNS_FOLDER = "_runs"
_PARTS_READ_AHEAD = 8
_PARTS_PER_SCAN = 256
_ROW_CHOICE_COLUMNS = ("image_id", "status", "source_version", "config_hash", "written_at")


def read_committed(
    fs: fsspec.AbstractFileSystem,
    root: str,
    columns: list[str] | None = None,
    image_ids: Collection[str] | None = None,
) -> pa.Table:
    """Every row of every complete part under ``root``/predictions, duplicates included.

    ``image_ids`` reads only those images' rows (a filtered scan: the other rows
    are never held in memory).
    """
    only = None
    read_columns = columns
    if image_ids is not None:
        only = pc.field("image_id").isin(pa.array(list(image_ids), pa.string()))
        if columns is not None and "image_id" not in columns:
            read_columns = [*columns, "image_id"]  # the filter needs it in the schema
    schema = PREDICTION_SCHEMA if read_columns is None else schema_for(read_columns)
    # The same scan as every other reader here (eight parts fetched at a time):
    # pq.read_table over the folder took twice as long per part on S3.
    batches = _scan_parts(fs, _committed_parts(fs, root), list(schema.names), only)
    table = pa.Table.from_batches(list(batches), schema=schema)
    return table if read_columns == columns else table.select(columns)


def read_predictions(
    output_uri: str,
    storage_options: dict[str, Any] | None = None,
    columns: list[str] | None = None,
    image_ids: Collection[str] | None = None,
) -> pa.Table:
    """One row per image: the committed view of an output, whatever runs crashed.

    For each image the most recently written row wins, except that an error
    row never hides an ok row for the same source version and config (a
    transient failure in a forced rerun does not erase a good result).
    ``columns`` and ``image_ids`` narrow what is read.
    """
    fs, root = filesystem_for(output_uri, storage_options or {})
    # Only the columns asked for, plus those that pick each image's row.
    needed = None if columns is None else list(dict.fromkeys([*columns, *_ROW_CHOICE_COLUMNS]))
    table = read_committed(fs, root, needed, image_ids)
    keep = _without_healed_shard_errors(table, latest_rows(table), fs, root)
    # Usually every row is its image's only one: then the view is the table, and
    # no copy of it (the largest allocation here) is made.
    view = table if len(keep) == table.num_rows else table.take(pa.array(keep, type=pa.int64()))
    return view if columns is None else view.select(columns)


def iter_predictions(
    output_uri: str, columns: list[str], storage_options: dict[str, Any] | None = None
) -> Iterator[pa.RecordBatch]:
    """The rows of :func:`read_predictions`, ``columns`` only, a record batch at a time.

    Two passes over one listing of the parts: the columns that pick each
    image's row (about 110 bytes a row, held while the rows are picked), then
    ``columns`` batch by batch, keeping the picked rows. A whole output's
    statistics thus never hold its widest columns at once.
    """
    fs, root = filesystem_for(output_uri, storage_options or {})
    yield from _iter_view(fs, root, _committed_parts(fs, root), columns, output_uri)


def _iter_view(
    fs: fsspec.AbstractFileSystem,
    root: str,
    parts: list[str],
    columns: list[str],
    output_uri: str,
) -> Iterator[pa.RecordBatch]:
    """:func:`iter_predictions` over the given ``parts``."""
    choice_columns = list(_ROW_CHOICE_COLUMNS)
    choice = pa.Table.from_batches(
        list(_scan_parts(fs, parts, choice_columns)), schema=schema_for(choice_columns)
    )
    keep = _without_healed_shard_errors(choice, latest_rows(choice), fs, root)
    total = choice.num_rows
    del choice
    picked = None
    if len(keep) < total:
        picked = np.zeros(total, dtype=bool)
        picked[keep] = True
    changed = RuntimeError(
        f"predictions under {strip_url_secrets(output_uri)} changed while being read"
    )
    # Both passes see the same rows in the same order: Arrow's ScanBatches
    # yields batches in fragment order (arrow/dataset/scanner.h), and parts are
    # never rewritten (compaction replaces them whole, between runs); a row count
    # that differs means one was, and stops here.
    offset = 0
    for batch in _scan_parts(fs, parts, columns):
        rows = batch.num_rows
        if offset + rows > total:
            raise changed
        if picked is not None:
            batch = batch.filter(pa.array(picked[offset : offset + rows]))
        offset += rows
        yield batch
    if offset != total:
        raise changed


@dataclass(frozen=True)
class Compaction:
    parts_before: int
    parts_after: int
    rows: int | None  # rows after: one per image


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
    collapses. Not while a run writes to the output: it may find parts gone.
    """
    fs, root = filesystem_for(output_uri, storage_options or {})
    parts = _committed_parts(fs, root)
    if len(parts) < 2:
        return Compaction(len(parts), len(parts), None)  # nothing to gain
    # Unique per compaction: a second one within the same second must not
    # write over (and then delete) a part it is reading.
    stamp = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    written: list[str] = []
    pending: list[pa.RecordBatch] = []
    pending_rows = rows_after = 0

    def write_part() -> None:
        nonlocal pending, pending_rows
        path = join(root, f"{PREDICTIONS_FOLDER}/compacted-{stamp}_{len(written):06d}.parquet")
        table = pa.Table.from_batches(pending, schema=PREDICTION_SCHEMA)
        with arrow_filesystem(fs).open_output_stream(path) as stream:
            pq.write_table(table, stream)
        written.append(path)
        pending, pending_rows = [], 0

    columns = list(PREDICTION_SCHEMA.names)
    for batch in _iter_view(fs, root, parts, columns, output_uri):
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
    superseded = set(parts) - set(written)
    remove_files(fs, sorted(superseded, key=lambda path: (_newest_row_time(fs, path), path)))
    return Compaction(len(parts), len(written), rows_after)


def _newest_row_time(fs: fsspec.AbstractFileSystem, path: str) -> int:
    """The newest ``written_at`` in a part, in microseconds (-1 where none is known)."""
    try:
        written_at = pq.read_table(path, columns=["written_at"], filesystem=arrow_filesystem(fs))
    except (pa.ArrowException, OSError, KeyError):  # a part from before the column
        return -1
    newest = pc.max(written_at["written_at"].cast(pa.int64())).as_py()
    return -1 if newest is None else newest


def latest_rows(table: pa.Table) -> np.ndarray:
    """Indices (ascending) of each image's row in the committed view; vectorised.

    Rows are ordered per image by ``written_at`` (null last, then by position).
    The image's last row is its row, unless it is an error that follows an ok
    row of the same source version and config with only such errors between
    them: then that ok row stands.
    """
    if table.num_rows == 0:
        return np.empty(0, dtype=np.int64)
    # One code per (source_version, config_hash) pair.
    version, config = _codes(table["source_version"]), _codes(table["config_hash"])
    pair = version * (int(config.max()) + 2) + config
    return _view_rows(
        _codes(table["image_id"]), pair, *_row_times(table["written_at"]), _is_ok(table["status"])
    )


def _row_times(written_at: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """``written_at`` as int64 microseconds (0 for null), and where it is null."""
    # Nulls filled before numpy sees them: with nulls it would give float64,
    # which loses microseconds past 2^53.
    written = pc.fill_null(written_at.cast(pa.int64()), 0).to_numpy()
    return written, pc.is_null(written_at).to_numpy(zero_copy_only=False)


def _is_ok(status: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return pc.fill_null(pc.equal(status, "ok"), False).to_numpy(zero_copy_only=False)


def _view_rows(
    image: np.ndarray,
    pair: np.ndarray,
    written: np.ndarray,
    written_null: np.ndarray,
    is_ok: np.ndarray,
) -> np.ndarray:
    """:func:`latest_rows` over rows given as an image code and a (source version,
    config) code per row, with their times and whether each is ok."""
    count = len(image)
    if count == 0:
        return np.empty(0, dtype=np.int64)
    order = np.lexsort((np.arange(count), written, written_null, image))
    image, key, is_ok = image[order], pair[order], is_ok[order]
    last = np.flatnonzero(np.r_[image[1:] != image[:-1], True])
    first = np.r_[0, last[:-1] + 1]
    group = np.repeat(np.arange(len(last)), last - first + 1)
    # Errors with the same version and config as the image's last row: an ok
    # row of that pair before them (with nothing else between) stands.
    same_error = ~is_ok & (key == key[last][group])
    positions = np.where(same_error, -1, np.arange(count))
    positions[last] = -1
    before = np.maximum.reduceat(positions, first)
    safe = np.maximum(before, 0)
    ok_stands = (before >= first) & ~is_ok[last] & is_ok[safe] & (key[safe] == key[last])
    return np.sort(order[np.where(ok_stands, before, last)])


def _without_healed_shard_errors(
    table: pa.Table, keep: np.ndarray, fs: fsspec.AbstractFileSystem, root: str
) -> np.ndarray:
    """``keep`` less the error rows of whole shards that a later run read to their end.

    A shard that could not be read has one error row under the shard's own
    id; once it reads, its images get rows and that id none, so the error
    would stand for ever. A shard's marker (written when it was read whole)
    newer than the error row retires it.
    """
    is_error = pc.equal(table["status"], "error")
    if not len(keep) or not pc.any(is_error).as_py():
        return keep  # no error rows: the markers need not be listed
    markers = read_shard_markers(fs, root)
    if not markers.last_read:
        return keep
    shard_ids = pa.array(list(markers.last_read), pa.string())
    candidates = pc.and_(is_error, pc.is_in(table["image_id"], value_set=shard_ids))
    rows = np.flatnonzero(pc.fill_null(candidates, False).to_numpy(zero_copy_only=False))
    if not len(rows):
        return keep
    found = table.select(["image_id", "written_at"]).take(pa.array(rows, pa.int64())).to_pylist()
    read_whole = markers.read_times(fs, {fields["image_id"] for fields in found})
    healed = [
        row
        for row, fields in zip(rows, found, strict=True)
        if fields["written_at"] is None
        or fields["written_at"].timestamp() < read_whole[fields["image_id"]]
    ]
    return keep[~np.isin(keep, healed)]


def _codes(column: pa.ChunkedArray) -> np.ndarray:
    """An int64 code per distinct value (-1 for null)."""
    encoded = pc.dictionary_encode(column).combine_chunks()
    return pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def done_key(image_id: str, source_version: str) -> int:
    """64-bit key of (image, source version): 8 bytes per done image in memory."""
    digest = hashlib.blake2b(f"{image_id}\0{source_version}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass
class DoneImages:
    """Images an earlier run already annotated ok with the same config.

    ``keys`` is sorted, for lookups by binary search in read tasks; ``per_shard``
    counts them by (shard URI, shard version) so the driver can report how
    many images of the listed shards were skipped without reading them.
    """

    keys: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint64))
    per_shard: collections.Counter = field(default_factory=collections.Counter)
    # Shards' own error rows (shard id → written_at, seconds) that are their
    # ids' rows in the view, under any config: until a read of the shard to its
    # end retires such a row (:meth:`ShardMarkers.error_stands`), the shard is
    # read, even with all its images done.
    shard_errors: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    def has(self, image_id: str, version: str) -> bool:
        key = np.uint64(done_key(image_id, version))
        position = int(np.searchsorted(self.keys, key))
        return position < len(self.keys) and self.keys[position] == key


def load_done_images(fs: fsspec.AbstractFileSystem, root: str, config_hash: str) -> DoneImages:
    """What the committed view says is done: images whose row in :func:`read_predictions`
    is ok and was written with ``config_hash`` (each under its source version).

    Only the view counts, not every ok row ever written: an image annotated
    under this config, then under another (or from another version of its
    source), and then listed again as it was, is annotated again, so that the
    view shows what this config makes of it. Streamed a record batch at a
    time: while it picks each image's row the driver keeps 30 bytes per
    committed row (the table in docs/benchmarks.md has what it measured), then
    8 bytes per done image and a count per shard; rows, and the Python strings
    hashed into keys, live only as long as their batch.
    """
    rows = _DoneCheckRows(config_hash)
    for batch in scan_committed(fs, root, list(_DoneCheckRows.COLUMNS)):
        rows.add(batch)
    return rows.done_images()


class _DoneCheckRows:
    """What :func:`load_done_images` keeps of each committed row, in numpy arrays."""

    COLUMNS = ("image_id", "source_uri", "source_version", "config_hash", "status", "written_at")
    # Rows are picked a sixteenth at a time: all of an image's rows share its
    # key's top bits, and a sort's temporaries are several times the arrays.
    BUCKET_BITS = 4

    def __init__(self, config_hash: str) -> None:
        self.config_hash = config_hash
        self.image: list[np.ndarray] = []  # 64 bits of the image id
        self.pair: list[np.ndarray] = []  # done_key under this config, 0 under any other
        self.written: list[np.ndarray] = []
        self.written_null: list[np.ndarray] = []
        self.is_ok: list[np.ndarray] = []
        self.shard: list[np.ndarray] = []  # number of a member's (shard, version), else -1
        # Shard members' (shard, version), numbered: only they cost Python objects.
        self.shard_numbers: dict[tuple[str, str], int] = {}
        # Error rows of whole shards: their row numbers, ids and times (few).
        self.shard_error_rows: list[int] = []
        self.shard_error_ids: list[str] = []
        self.rows = 0
        self.batches = 0

    def add(self, batch: pa.RecordBatch) -> None:
        count = batch.num_rows
        ids = batch["image_id"].to_pylist()
        here = pc.fill_null(pc.equal(batch["config_hash"], self.config_hash), False)
        here_rows = np.flatnonzero(here.to_numpy(zero_copy_only=False))
        pairs = np.zeros(count, dtype=np.uint64)
        shards = np.full(count, -1, dtype=np.int32)
        if len(here_rows):
            taken = pa.array(here_rows)
            versions = pc.fill_null(pc.take(batch["source_version"], taken), "")
            pairs[here_rows] = np.fromiter(
                map(done_key, (ids[row] for row in here_rows), versions.to_pylist()),
                dtype=np.uint64,
                count=len(here_rows),
            )
            shard_uri = shard_uris(pc.take(batch["source_uri"], taken))
            in_shards = pc.is_valid(shard_uri)
            if pc.any(in_shards).as_py():
                members = zip(
                    pc.filter(shard_uri, in_shards).to_pylist(),
                    pc.filter(versions, in_shards).to_pylist(),
                    strict=True,
                )
                numbers = self.shard_numbers
                member_rows = here_rows[in_shards.to_numpy(zero_copy_only=False)]
                shards[member_rows] = [numbers.setdefault(m, len(numbers)) for m in members]
        written, written_null = _row_times(batch["written_at"])
        is_ok = _is_ok(batch["status"])
        if not is_ok.all():
            errors = pa.array(np.flatnonzero(~is_ok & ~written_null))
            whole_shard = pc.match_substring_regex(
                pc.take(batch["source_uri"], errors), SHARD_URI_PATTERN
            )
            for row in errors.filter(whole_shard).to_pylist():
                self.shard_error_rows.append(self.rows + row)
                self.shard_error_ids.append(ids[row])
        self.rows += count
        self.image.append(np.fromiter(map(_image_key, ids), dtype=np.uint64, count=count))
        self.pair.append(pairs)
        self.written.append(written)
        self.written_null.append(written_null)
        self.is_ok.append(is_ok)
        self.shard.append(shards)
        self.batches += 1
        if self.batches % 256 == 0:
            # Batches are a part each (1,000 rows by default): thousands of small
            # arrays would leave the heap fragmented once they are joined.
            for column in self._columns():
                column[-256:] = [np.concatenate(column[-256:])]

    def _columns(self) -> list[list[np.ndarray]]:
        return [
            self.image,
            self.pair,
            self.written,
            self.written_null,
            self.is_ok,
            self.shard,
        ]

    def done_images(self) -> DoneImages:
        if not self.image:
            return DoneImages()
        joined = []
        for column in self._columns():  # one at a time: each list goes as it is joined
            joined.append(np.concatenate(column))
            column.clear()
        image, pair, written, written_null, is_ok, shard = joined
        del joined
        bucket_of = (image >> np.uint64(64 - self.BUCKET_BITS)).astype(np.uint8)
        done_rows, view_rows = [], []
        for bucket in range(1 << self.BUCKET_BITS):
            rows = np.flatnonzero(bucket_of == bucket)
            # Rows under other configs share one pair code: whichever of them is
            # an image's row, the image is not done under this one.
            view = _view_rows(
                image[rows], pair[rows], written[rows], written_null[rows], is_ok[rows]
            )
            picked = rows[view]
            # A row under this config has its done_key as its pair, never 0.
            done_rows.append(picked[is_ok[picked] & (pair[picked] != 0)])
            if self.shard_error_rows:
                view_rows.append(picked[~is_ok[picked]])
        done = np.concatenate(done_rows)
        shard_errors = {}
        if self.shard_error_rows:
            standing = np.isin(self.shard_error_rows, np.concatenate(view_rows))
            shard_errors = {
                shard_id: float(written[row]) / 1e6
                for row, shard_id, stands in zip(
                    self.shard_error_rows, self.shard_error_ids, standing, strict=True
                )
                if stands
            }
        shard_of = shard[done]
        counts = np.bincount(shard_of[shard_of >= 0], minlength=len(self.shard_numbers))
        per_shard = collections.Counter(
            {
                key: int(counts[number])
                for key, number in self.shard_numbers.items()
                if counts[number]
            }
        )
        return DoneImages(np.unique(pair[done]), per_shard, shard_errors)


def _image_key(image_id: str) -> int:
    """64 bits of an image id: how the resume check tells images apart."""
    digest = hashlib.blake2b(image_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass
class ShardMarkers:
    """What the shard markers under an output say (:func:`~pipeline.keys.shard_marker_key`)."""

    # marker stem (shard, version, read settings) → images it held
    images: dict[str, int] = field(default_factory=dict)
    # shard id → when a version of it was last read whole (seconds since the epoch)
    last_read: dict[str, float] = field(default_factory=dict)
    # (marker stem, config hash's first 12) of reads that found every image done
    all_done: set[tuple[str, str]] = field(default_factory=set)
    # <shard id>.<version tag> → the read settings tags its markers carry ("" the defaults')
    settings_read: dict[str, set[str]] = field(default_factory=dict)
    # shard id → its markers' (path, modification time)
    paths: dict[str, list[tuple[str, float]]] = field(default_factory=dict)

    def can_skip(self, stem: str, config_hash: str, images_done: int) -> bool:
        """Whether the shard version of ``stem`` (these read settings) holds nothing to do.

        Read under these settings only, its marker's image count is trusted:
        skipped once that many images are done. Read under others too, the done
        images may be of other settings' (other ids, other extensions): skipped
        only once a read under these found them all done.
        """
        if (stem, config_hash[:12]) in self.all_done:
            return True
        images = self.images.get(stem)
        version, settings = _split_stem(stem)
        read_one_way = self.settings_read.get(version, {settings}) == {settings}
        return images is not None and images_done >= images and read_one_way

    def read_times(
        self, fs: fsspec.AbstractFileSystem, shard_ids: Collection[str]
    ) -> dict[str, float]:
        """``last_read``, with ``shard_ids``'s taken from their markers' own record
        of when they were read (their body), where the files' times may be a copy's.

        One small read per marker of these shards (those with error rows: few);
        a marker written before markers had bodies keeps its modification time.
        """
        markers = [
            (shard_id, path, modified)
            for shard_id in shard_ids
            for path, modified in self.paths.get(shard_id, [])
        ]
        paths = [path for _, path, _ in markers]
        contents = fs.cat_ranges(paths, None, None, on_error="return") if paths else []
        read: dict[str, float] = {}
        for (shard_id, _, modified), content in zip(markers, contents, strict=True):
            try:
                read_at = datetime.fromisoformat(content.decode()).timestamp()
            except (AttributeError, UnicodeDecodeError, ValueError):  # an error, or empty
                read_at = modified
            read[shard_id] = max(read.get(shard_id, 0.0), read_at)
        self.last_read.update(read)
        return self.last_read

    def error_stands(self, shard_id: str, error_written: float | None) -> bool:
        """Whether a shard's error row written then is still its row in the view:
        no read of the shard to its end came after it."""
        return error_written is not None and error_written >= self.last_read.get(shard_id, 0.0)


def read_shard_markers(fs: fsspec.AbstractFileSystem, root: str) -> ShardMarkers:
    """The markers under ``root``, one listing.

    Markers of other read settings have stems of their own
    (:func:`~pipeline.read.read_settings_tag`). Where one stem has markers of
    different counts (an older release counted samples without an image, or
    read other extensions under one stem), the latest read's count stands.
    """
    markers = ShardMarkers()
    for marker in sorted(_shard_markers(fs, root), key=lambda marker: marker.written):
        version, settings = _split_stem(marker.stem)
        markers.settings_read.setdefault(version, set()).add(settings)
        markers.last_read[marker.shard_id] = marker.written
        markers.paths.setdefault(marker.shard_id, []).append((marker.path, marker.written))
        if marker.done_under is not None:
            markers.all_done.add((marker.stem, marker.done_under))
        else:
            markers.images[marker.stem] = marker.images
    return markers


def _split_stem(stem: str) -> tuple[str, str]:
    """``_shards/<id>.<version tag>[.<settings tag>]`` → (``<id>.<version tag>``, settings tag)."""
    shard_id, version_tag, *settings = stem.removeprefix(f"{SHARDS_FOLDER}/").split(".")
    return f"{shard_id}.{version_tag}", "".join(settings)


class _ShardMarker(NamedTuple):
    stem: str  # _shards/<shard id>.<version tag>[.<read settings tag>]
    shard_id: str
    images: int
    written: float  # seconds since the epoch
    done_under: str | None = None  # an all-done marker's config (12 hex digits)
    path: str = ""


def _shard_markers(fs: fsspec.AbstractFileSystem, root: str) -> list[_ShardMarker]:
    """The markers under ``root`` (:func:`~pipeline.keys.shard_marker_key`), one listing."""
    try:
        listed = fs.ls(forget_listing(fs, join(root, SHARDS_FOLDER)), detail=True)
    except FileNotFoundError:
        return []
    markers = []
    for info in listed:
        stem, _, images = info["name"].rsplit("/", 1)[-1].rpartition(".")
        shard_id = stem.split(".", 1)[0]
        written = _modified(info)
        stem = f"{SHARDS_FOLDER}/{stem}"
        if images.isdigit():
            markers.append(_ShardMarker(stem, shard_id, int(images), written, path=info["name"]))
        elif re.fullmatch("c[0-9a-f]{12}", images):  # shard_done_marker_key
            markers.append(_ShardMarker(stem, shard_id, 0, written, images[1:], info["name"]))
    return markers


def scan_committed(
    fs: fsspec.AbstractFileSystem,
    root: str,
    columns: list[str],
    rows: pc.Expression | None = None,
    part_prefix: str = "",
) -> Iterator[pa.RecordBatch]:
    """``columns`` of the committed rows matching ``rows`` (duplicates too), a batch at a
    time, from the parts whose file names start with ``part_prefix``."""
    parts = [p for p in _committed_parts(fs, root) if p.rsplit("/", 1)[-1].startswith(part_prefix)]
    return _scan_parts(fs, parts, columns, rows)


def _committed_parts(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Paths of the complete parts under ``root``/predictions, in a fixed order."""
    folder = forget_listing(fs, join(root, PREDICTIONS_FOLDER))
    if not fs.exists(folder) or not fs.ls(folder):
        return []
    # Hidden and underscore files (parts being written) are skipped by the dataset.
    return ds.dataset(
        folder, schema=PREDICTION_SCHEMA, format="parquet", filesystem=arrow_filesystem(fs)
    ).files


def _scan_parts(
    fs: fsspec.AbstractFileSystem,
    parts: list[str],
    columns: list[str],
    rows: pc.Expression | None = None,
) -> Iterator[pa.RecordBatch]:
    """``columns`` of the rows matching ``rows``, a record batch at a time, in ``parts`` order."""
    filesystem = arrow_filesystem(fs)
    # A scan keeps each part's footer once read (the filter is checked against
    # its statistics), so a dataset over every part grows with the output
    # (4,000 parts: ~230 MiB). One dataset per group of parts lets them go.
    for first in range(0, len(parts), _PARTS_PER_SCAN):
        dataset = ds.dataset(
            parts[first : first + _PARTS_PER_SCAN],
            # The full schema: parts written before a column existed read it as nulls.
            schema=PREDICTION_SCHEMA,
            format="parquet",
            filesystem=filesystem,
        )
        # Files are fetched eight at a time (an object store's latency, paid per
        # part, dominates: 100 parts at 30 ms a request took 1.0 s, 1.9 s with
        # Arrow's default of four) and decoded one batch at a time on this
        # thread, in order: with Arrow's decode threads, batches piled up ahead
        # of the consumer, and the peak grew with the output.
        yield from dataset.to_batches(
            columns=columns,
            filter=rows,
            use_threads=False,
            batch_readahead=1,
            fragment_readahead=_PARTS_READ_AHEAD,
        )


def run_records(
    output_uri: str, storage_options: dict[str, Any] | None = None, newest: int | None = None
) -> list[dict[str, Any]]:
    """The records of finished runs (``_runs/<run_id>.json``), newest first.

    ``newest`` reads only that many, picked by the files' modification times, so
    an output of years of scheduled runs is not read whole.
    """
    records = list(itertools.islice(iter_run_records(output_uri, storage_options), newest))
    # Run ids are the user's to choose, so finish times, not names, give the order.
    return sorted(records, key=lambda record: str(record.get("finished_at") or ""), reverse=True)


def iter_run_records(
    output_uri: str, storage_options: dict[str, Any] | None = None, batch: int = 20
) -> Iterator[dict[str, Any]]:
    """The records of finished runs, newest file first, read ``batch`` at a time as
    the caller goes on: a caller that stops early reads few of years of records."""
    fs, root = filesystem_for(output_uri, storage_options or {})
    folder = forget_listing(fs, join(root, RUNS_FOLDER))
    if not fs.exists(folder):
        return
    files = [
        info
        for info in fs.ls(folder, detail=True)
        if info["name"].endswith(".json")
        and not info["name"].endswith((".started.json", ENDED_RECORD_SUFFIX))
    ]
    files.sort(key=_modified, reverse=True)
    paths = [info["name"] for info in files]
    for first in range(0, len(paths), batch):
        chunk = paths[first : first + batch]
        # cat_ranges, not cat: cat would expand glob characters in paths and run ids.
        contents = fs.cat_ranges(chunk, None, None, on_error="return")
        for path, content in zip(chunk, contents, strict=True):
            try:
                if isinstance(content, Exception):
                    raise content
                record = json.loads(content)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
                yield record
            except (OSError, ValueError) as problem:  # an unreadable record hides only itself
                logger.warning("skipping run record %s: %s", path, problem)


class MapLocator:
    """Where a row's map file is in the output as it is now, also after a move.

    Rows name their maps by the URI they were written at (``<output>/depth/…``).
    An output copied or synced elsewhere (``aws s3 sync`` down to train
    locally, ``cp -r``) keeps those URIs, which point at the original or at
    nothing. A URI outside this output is looked for here under each place in
    it where a ``depth/`` or ``segmentation/`` folder could start, nearest the
    bucket first; once one is found, every URI of that earlier output is moved
    here without another look. Where none is found the URI stays as written.
    """

    def __init__(self, output_uri: str, storage_options: dict[str, Any] | None = None) -> None:
        self.fs, root = filesystem_for(output_uri, storage_options or {})
        self.root = full_uri(self.fs, root).rstrip("/")
        self.earlier_roots: list[str] = []

    def __call__(self, uri: str | None, kind: str) -> str | None:
        if uri is None or uri.startswith(f"{self.root}/"):
            return uri
        for earlier in self.earlier_roots:
            if uri.startswith(f"{earlier}/"):
                return self.root + uri[len(earlier) :]
        at = uri.find(f"/{kind}/")
        while at >= 0:
            here = self.root + uri[at:]
            if self.fs.exists(here):
                self.earlier_roots.append(uri[:at])
                return here
            at = uri.find(f"/{kind}/", at + 1)
        return uri


def segmentation_class_names(
    output_uri: str,
    storage_options: dict[str, Any] | None = None,
    model_uri: str | None = None,
    cache_dir: Path = DEFAULT_CACHE_DIR,
) -> dict[int, str] | None:
    """Class id → name from ``model_uri``'s ``id2label``, else as the latest finished
    run with a segmentation model recorded them; None when no run used one.

    A run records its classes (``segmentation_classes``), so they are read where
    the output is, from any folder, also in a copy. For a run recorded before
    that, its checkpoint's JSON files are fetched (never its weights), by the
    URI as the run wrote it.
    """
    if model_uri is None:
        latest = _latest_segmentation_run(output_uri, storage_options)
        if latest is None:
            return None
        recorded = latest.get("segmentation_classes")
        if isinstance(recorded, dict):
            return {int(class_id): str(name) for class_id, name in recorded.items()}
        model_uri = latest["config"]["models"]["segmentation"]
    card = ModelCard.fetch("segmentation", model_uri, cache_dir, storage_options, False)
    return card.class_names


def _latest_segmentation_run(
    output_uri: str, storage_options: dict[str, Any] | None
) -> dict[str, Any] | None:
    for record in iter_run_records(output_uri, storage_options):
        models = (record.get("config") or {}).get("models") or {}
        if models.get("segmentation"):
            return record
    return None


# A going run rewrites its start record this often; one not rewritten for three
# times as long has stopped (crashed, killed) even without a finish record.
RUN_HEARTBEAT_S = 300
RUN_GOING_WITHIN_S = 3 * RUN_HEARTBEAT_S


# Beside a run's start record when the run ended on an error or was stopped
# (Ctrl-C, SIGTERM from `ray job stop` or Kubernetes): it is not going, so a
# later run does not warn of it and jobs.compact does not wait for it.
ENDED_RECORD_SUFFIX = ".ended.json"


def is_stop(error: BaseException) -> bool:
    """Whether ``error`` is a run being stopped rather than failing: Ctrl-C, or
    SIGTERM, which ray.init's handler raises as ``SystemExit(SIGTERM)``."""
    return isinstance(error, KeyboardInterrupt) or (
        isinstance(error, SystemExit) and error.code == signal.SIGTERM
    )


class RunHeartbeat:
    """Within ``with``: rewrites a run's start record every ``every_s`` seconds.

    Left by an exception (an interrupt included), it writes the run's end record,
    ``ended_path``, naming the outcome and the exception's type. A run calls
    :meth:`stop_renewing` before it writes its finish record: a renewal after
    that would make the finished run look going again for 15 minutes.
    """

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        path: str,
        data: bytes,
        every_s: float = RUN_HEARTBEAT_S,
        ended_path: str | None = None,
    ) -> None:
        self._fs, self._path, self._data, self._every_s = fs, path, data, every_s
        self._ended_path = ended_path
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="run-heartbeat", daemon=True)

    def __enter__(self) -> RunHeartbeat:
        self._thread.start()
        return self

    def stop_renewing(self) -> None:
        """Renew no more; returns once a renewal under way is written."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, _: object
    ) -> None:
        self.stop_renewing()
        if kind is None or self._ended_path is None:
            return
        stopped = error is not None and is_stop(error)
        record = {
            # The start record's own time: what ties this record to that run where
            # file times cannot (a copied output's are all the copy's).
            "started_at": _started_at(self._data),
            "ended_at": datetime.now(UTC).isoformat(),
            "outcome": "stopped" if stopped else "failed",
            # The type only: messages can quote URIs.
            "error_type": kind.__name__,
        }
        try:
            self._fs.pipe_file(self._ended_path, json.dumps(record).encode())
        except Exception as problem:  # the run's own error is the one to report
            logger.warning("could not write the run's end record: %s", problem)

    def _beat(self) -> None:
        while not self._stop.wait(self._every_s):
            try:
                self._fs.pipe_file(self._path, self._data)
            except OSError as error:  # the run goes on; others may take it for stopped
                logger.warning("could not renew the run's start record: %s", error)


def runs_going(
    fs: fsspec.AbstractFileSystem, root: str, within_s: float, now_s: float
) -> list[tuple[str, float]]:
    """(run id, seconds since its start record was last written) of the runs going:
    a start record written within ``within_s`` and newer than any finish or end
    record of that id (a run id may be used again)."""
    try:
        listed = fs.ls(forget_listing(fs, join(root, RUNS_FOLDER)), detail=True)
    except FileNotFoundError:
        return []
    names = {info["name"].rsplit("/", 1)[-1]: info for info in listed}
    going = []
    for name, info in names.items():
        run_id = name.removesuffix(".started.json")
        if run_id == name:
            continue
        renewed_s = _modified(info)
        if now_s - renewed_s >= within_s:
            continue
        ends = [
            names[end] for end in (f"{run_id}.json", run_id + ENDED_RECORD_SUFFIX) if end in names
        ]
        # An end record ends the start it names (started_at): not another use
        # of the run id, earlier or at the same time, whatever the file times
        # (a copy's, cp -r or a sync). One without started_at (an older
        # release's) ends the start if it is newer.
        ended = False
        for end in ends:
            same = _ends_that_start(fs, info["name"], end["name"])
            ended = ended or same or (same is None and _modified(end) >= renewed_s)
        if not ended:
            going.append((run_id, now_s - renewed_s))
    return sorted(going, key=lambda run: run[1])


def _ends_that_start(fs: fsspec.AbstractFileSystem, start_path: str, end_path: str) -> bool | None:
    """Whether the finish or end record at ``end_path`` is of the run that wrote the
    start record at ``start_path`` (a run id used again starts at another time);
    None where the end record does not say (an older release's, or unreadable)."""
    try:
        started = _started_at(fs.cat_file(end_path))
        return None if started is None else started == _started_at(fs.cat_file(start_path))
    except OSError:
        return None


def _started_at(record: bytes) -> str | None:
    try:
        value = json.loads(record)
    except ValueError:
        return None
    return value.get("started_at") if isinstance(value, dict) else None


def _modified(info: dict[str, Any]) -> float:
    stamp = info.get("mtime", info.get("LastModified", info.get("last_modified")))
    return stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp or 0)
