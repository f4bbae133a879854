"""What an output's committed view says is already done: the resume check."""

from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.keys import SHARD_URI_PATTERN, shard_uris
from pipeline.output.view import (
    ok_mask,
    read_again_if_parts_go,
    row_times,
    scan_committed,
    view_rows,
)


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
    # Sorted keys of the images whose row in the view is an error under this
    # config and source version: what a run under ``input.limit`` takes last;
    # and of those whose error came from their bytes (read:, decode:), which a
    # shard's unchanged version gives again.
    errored: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint64))
    errored_on_bytes: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint64))

    def __len__(self) -> int:
        return len(self.keys)

    def has(self, image_id: str, version: str) -> bool:
        return _holds(self.keys, done_key(image_id, version))

    def has_error_row(self, image_id: str, version: str, on_bytes: bool = False) -> bool:
        """Whether the image's row in the view is an error of this config and version
        (with ``on_bytes``: one its bytes caused, at read or decode)."""
        keys = self.errored_on_bytes if on_bytes else self.errored
        return _holds(keys, done_key(image_id, version))


def _holds(sorted_keys: np.ndarray, key: int) -> bool:
    position = int(np.searchsorted(sorted_keys, np.uint64(key)))
    return position < len(sorted_keys) and bool(sorted_keys[position] == key)


def in_sorted(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Whether each of ``keys`` is in ``sorted_keys``: :func:`_holds` for an array."""
    if not len(sorted_keys):
        return np.zeros(len(keys), dtype=bool)
    position = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[position] == keys


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
    hashed into keys, live only as long as their batch (and a byte per row for
    the stage of its error). Images whose row is an error under ``config_hash``
    are kept too (:attr:`DoneImages.errored`, ``errored_on_bytes``), as 8 bytes
    each.
    """

    def read() -> DoneImages:
        rows = _DoneCheckRows(config_hash)
        for batch in scan_committed(fs, root, list(_DoneCheckRows.COLUMNS)):
            rows.add(batch)
        return rows.done_images()

    return read_again_if_parts_go(read)


class _DoneCheckRows:
    """What :func:`load_done_images` keeps of each committed row, in numpy arrays."""

    COLUMNS = (
        "image_id",
        "source_uri",
        "source_version",
        "config_hash",
        "status",
        "error",
        "written_at",
    )
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
        self.on_bytes: list[np.ndarray] = []  # an error of the read or decode stage
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
        written, written_null = row_times(batch["written_at"])
        is_ok = ok_mask(batch["status"])
        on_bytes = np.zeros(count, dtype=bool)
        if not is_ok.all():
            stage = pc.match_substring_regex(batch["error"], _BYTES_STAGES)
            on_bytes = pc.fill_null(stage, False).to_numpy(zero_copy_only=False) & ~is_ok
            errors = pa.array(np.flatnonzero(~is_ok & ~written_null))
            whole_shard = pc.match_substring_regex(
                pc.take(batch["source_uri"], errors), SHARD_URI_PATTERN
            )
            for row in errors.filter(whole_shard).to_pylist():
                self.shard_error_rows.append(self.rows + row)
                self.shard_error_ids.append(ids[row])
        self.rows += count
        self.image.append(np.fromiter(map(text_key, ids), dtype=np.uint64, count=count))
        self.pair.append(pairs)
        self.written.append(written)
        self.written_null.append(written_null)
        self.is_ok.append(is_ok)
        self.on_bytes.append(on_bytes)
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
            self.on_bytes,
            self.shard,
        ]

    def done_images(self) -> DoneImages:
        if not self.image:
            return DoneImages()
        joined = []
        for column in self._columns():  # one at a time: each list goes as it is joined
            joined.append(np.concatenate(column))
            column.clear()
        image, pair, written, written_null, is_ok, on_bytes, shard = joined
        del joined
        bucket_of = (image >> np.uint64(64 - self.BUCKET_BITS)).astype(np.uint8)
        done_rows, errored_rows, errors_in_view = [], [], []
        for bucket in range(1 << self.BUCKET_BITS):
            rows = np.flatnonzero(bucket_of == bucket)
            # Rows under other configs share one pair code: whichever of them is
            # an image's row, the image is not done under this one.
            view = view_rows(
                image[rows], pair[rows], written[rows], written_null[rows], is_ok[rows]
            )
            picked = rows[view]
            # A row under this config has its done_key as its pair, never 0.
            done_rows.append(picked[is_ok[picked] & (pair[picked] != 0)])
            errored_rows.append(picked[~is_ok[picked] & (pair[picked] != 0)])
            if self.shard_error_rows:
                errors_in_view.append(picked[~is_ok[picked]])
        done = np.concatenate(done_rows)
        shard_errors = {}
        if self.shard_error_rows:
            standing = np.isin(self.shard_error_rows, np.concatenate(errors_in_view))
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
        errored = np.concatenate(errored_rows)
        return DoneImages(
            np.unique(pair[done]),
            per_shard,
            shard_errors,
            np.unique(pair[errored]),
            np.unique(pair[errored[on_bytes[errored]]]),
        )


# Stages whose errors come from an image's bytes: the same bytes fail again.
_BYTES_STAGES = r"^(read|decode): "


def text_key(text: str) -> int:
    """64 bits of a text: how the resume check (and a run's count of its rows)
    tells image ids apart, and pruning map keys."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")
