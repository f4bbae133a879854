"""The committed predictions of an output: every row, and the view of one row per image.

Every complete Parquet part under ``<output>/predictions`` is committed: a row is
written only after its map files, and a part becomes visible only when whole
(see ``storage.arrow_filesystem``), so whatever a crashed run left there is
valid. Runs append parts and never rewrite them; the same image can therefore
appear in several parts (a forced rerun, a changed source, a task Ray re-ran).
:func:`read_predictions` gives the view a reader wants: one row per image.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator
from typing import Any, TypeVar

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from pipeline.output.shard_markers import read_shard_markers
from pipeline.schema import PREDICTION_SCHEMA, schema_for, strip_url_secrets
from pipeline.storage import arrow_filesystem, filesystem_for, forget_listing, join

logger = logging.getLogger(__name__)

PREDICTIONS_FOLDER = "predictions"
# A compaction deletes parts only after it wrote the view they hold: a read that
# finds a listed part gone lists again, and finds the new ones.
_READS_WHILE_PARTS_GO = 3
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
    batches = _scan_parts(fs, committed_parts(fs, root), list(schema.names), only)
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
    table = read_again_if_parts_go(lambda: read_committed(fs, root, needed, image_ids))
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
    yield from iter_view(fs, root, committed_parts(fs, root), columns, output_uri)


def iter_view(
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


_Read = TypeVar("_Read")


def read_again_if_parts_go(read: Callable[[], _Read]) -> _Read:
    """``read()``, from the start again where a part it listed was gone when it
    came to it: a compaction (``jobs.compact``) that began before it replaced
    the part with others holding the same view, which a new listing finds."""
    for _ in range(_READS_WHILE_PARTS_GO - 1):
        try:
            return read()
        except FileNotFoundError as gone:
            logger.info(
                "a part went while it was being read (a compaction?): reading the parts again (%s)",
                strip_url_secrets(str(gone)),
            )
    return read()


def scan_committed(
    fs: fsspec.AbstractFileSystem,
    root: str,
    columns: list[str],
    rows: pc.Expression | None = None,
    part_named: Callable[[str], bool] | None = None,
) -> Iterator[pa.RecordBatch]:
    """``columns`` of the committed rows matching ``rows`` (duplicates too), a batch at a
    time, from the parts whose file names ``part_named`` takes (all by default)."""
    parts = [
        path
        for path in committed_parts(fs, root)
        if part_named is None or part_named(path.rsplit("/", 1)[-1])
    ]
    return _scan_parts(fs, parts, columns, rows)


def committed_parts(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
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
    return view_rows(
        _codes(table["image_id"]), pair, *row_times(table["written_at"]), ok_mask(table["status"])
    )


def row_times(written_at: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """``written_at`` as int64 microseconds (0 for null), and where it is null."""
    # Nulls filled before numpy sees them: with nulls it would give float64,
    # which loses microseconds past 2^53.
    written = pc.fill_null(written_at.cast(pa.int64()), 0).to_numpy()
    return written, pc.is_null(written_at).to_numpy(zero_copy_only=False)


def ok_mask(status: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return pc.fill_null(pc.equal(status, "ok"), False).to_numpy(zero_copy_only=False)


def view_rows(
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
