"""Read: fetch image bytes; a failed read becomes an error row, never a lost image.

Image objects (``files``, ``manifest``) are fetched a batch at a time; shards
(``webdataset``, ``parquet``) are streamed and expanded into image rows.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import fsspec
import numpy as np

from pipeline.keys import (
    SHARD_FORMATS,
    image_id_for,
    shard_done_marker_key,
    shard_marker_key,
    shard_member_uri,
)
from pipeline.retry import backoff_delays, is_transient, retry_transient
from pipeline.schema import error_reason, strip_url_secrets
from pipeline.shards import (
    ShardError,
    ShardImage,
    iter_parquet_images,
    iter_webdataset,
    too_large,
)
from pipeline.storage import filesystem_for, join

if TYPE_CHECKING:
    from pipeline.output.done import DoneImages

logger = logging.getLogger(__name__)

# Read-ahead per shard stream: large sequential ranges keep S3 requests few.
SHARD_BLOCK_BYTES = 8 * 2**20


def read_batch(
    batch: dict[str, np.ndarray],
    storage_options: dict[str, Any],
    max_image_bytes: int | None = None,
) -> dict[str, np.ndarray]:
    """Add ``image_bytes``, ``status`` and ``error`` columns to listed image rows.

    One ``fs.cat`` per filesystem per batch: on object stores fsspec issues the
    requests concurrently instead of one at a time. Objects that fail with a
    transient error (throttling, 5xx, reset) are fetched again with backoff.
    Objects larger than ``max_image_bytes`` become error rows; no more than one
    byte past the limit is asked for (a ranged read, which S3 and most HTTP
    servers honour; one that ignores it sends the whole object), so a stray
    video or archive named ``.jpg`` cannot exhaust a read task's memory.
    """
    uris = [str(uri) for uri in batch.get("fetch_uri", batch["source_uri"])]
    count = len(uris)
    image_bytes = np.full(count, b"", dtype=object)
    status = np.full(count, "ok", dtype=object)
    # "" means no error: Ray turns an all-None column into floats.
    error = np.full(count, "", dtype=object)
    listing_errors = batch.get("listing_error", error)
    by_protocol: dict[str, list[int]] = collections.defaultdict(list)
    for index, uri in enumerate(uris):
        if listing_errors[index]:
            status[index], error[index] = "error", str(listing_errors[index])
            continue
        by_protocol[fsspec.core.split_protocol(uri)[0] or "file"].append(index)
    for indices in by_protocol.values():
        fs, _ = filesystem_for(uris[indices[0]], storage_options)
        paths = {index: fs._strip_protocol(uris[index]) for index in indices}
        for index, content in _cat_with_retries(fs, paths, max_image_bytes).items():
            if isinstance(content, bytes) and max_image_bytes and len(content) > max_image_bytes:
                # Past the limit only one byte was fetched: the size is not known.
                content = too_large(None, max_image_bytes)
            if isinstance(content, bytes):
                image_bytes[index] = content
            else:
                status[index], error[index] = "error", error_reason("read", content)
    result = {k: v for k, v in batch.items() if k not in ("fetch_uri", "listing_error")}
    return {**result, "image_bytes": image_bytes, "status": status, "error": error}


def _is_unsatisfiable_range(content: bytes | BaseException) -> bool:
    if isinstance(content, bytes):
        return False
    # s3fs raises OSError(EINVAL, S3's message); aiohttp an error with .status.
    return getattr(content, "status", None) == 416 or (
        "range is not satisfiable" in str(content).lower()
    )


def _cat_with_retries(
    fs: fsspec.AbstractFileSystem, paths: dict[int, str], max_bytes: int | None
) -> dict[int, bytes | BaseException]:
    """Bytes (at most ``max_bytes`` + 1 of them) or the final error for each path;
    only transient failures are retried."""
    results: dict[int, bytes | BaseException] = {}
    pending = dict(paths)
    for delay in [*backoff_delays(), None]:
        count = len(pending)
        starts, ends = (None, None) if max_bytes is None else ([0] * count, [max_bytes + 1] * count)
        # cat_ranges, not cat: cat would expand glob characters in key names.
        contents = fs.cat_ranges(list(pending.values()), starts, ends, on_error="return")
        for index, content in zip(list(pending), contents, strict=True):
            # A range from byte 0 is unsatisfiable only on an empty object (S3, HTTP: 416).
            results[index] = b"" if _is_unsatisfiable_range(content) else content
            if isinstance(content, bytes) or not is_transient(content):
                del pending[index]
        if not pending or delay is None:
            break
        time.sleep(delay)
    return results


@dataclass(frozen=True)
class ShardInput:
    """How a job reads the images out of its shards (from its ``input`` config)."""

    format: str  # "webdataset" or "parquet"
    extensions: tuple[str, ...]  # webdataset: image members' extensions
    image_column: str  # parquet
    id_column: str | None  # parquet; None: the row number
    max_image_bytes: int | None = None  # larger images are error rows
    # Names the settings above in shard markers where they are not the
    # defaults (:func:`read_settings_tag`); empty: the defaults, or no markers.
    marker_tag: str = ""

    @classmethod
    def from_run_record(cls, record: dict[str, Any]) -> ShardInput | None:
        """As a finished run read them (``_runs/<run_id>.json``); None for image files."""
        input_format = (record.get("summary") or {}).get("input_format")
        settings = (record.get("config") or {}).get("input") or {}
        if input_format not in SHARD_FORMATS or "extensions" not in settings:
            return None
        return cls(
            input_format,
            tuple(settings["extensions"]),
            settings.get("image_column", "image"),
            settings.get("id_column"),
        )


def read_settings_tag(shard_input: ShardInput, defaults: ShardInput) -> str:
    """8 hex digits naming the settings that decide a shard's images and their
    ids; empty where they are ``defaults``'s.

    A shard marker counts the images one read found, and the driver skips a
    shard once that many are done. Read under other extensions, another id
    column or a larger ``max_image_bytes``, a shard can hold other images than
    its marker counts: a marker under these settings' tag says nothing of them.
    Markers of the default settings have no tag, so those written before tags
    keep skipping their shards.
    """
    if shard_input.format == "webdataset":
        fields = ("extensions", "max_image_bytes")
    else:
        fields = ("image_column", "id_column", "max_image_bytes")
    settings = {name: getattr(shard_input, name) for name in fields}
    if settings == {name: getattr(defaults, name) for name in fields}:
        return ""
    basis = json.dumps({"format": shard_input.format, **settings}, sort_keys=True)
    return "r" + hashlib.sha256(basis.encode()).hexdigest()[:8]


def read_shard(
    batch: dict[str, np.ndarray],
    shard_input: ShardInput,
    storage_options: dict[str, Any],
    rows_per_batch: int,
    output_uri: str | None = None,
    done: DoneImages | None = None,
    config_hash: str = "",
    leave_errors: bool = False,
    shard_reads: ShardReadListener | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Expand each shard row into image rows, ``rows_per_batch`` at a time.

    An image is ``<shard_uri>#<sample id>``; those ``done`` holds are left out,
    and with ``leave_errors`` (a run under ``input.limit``) also those whose row
    is an error of their bytes (read, decode) under this config: a shard's
    version fixes its members' bytes, so they would fail again, and fill the
    limit every run. Errors of later stages (out of memory, a map's write) are
    tried again.
    A shard that cannot be opened, or
    breaks part-way, adds one error row for the shard itself after the images it
    did yield, so the loss is visible in the output. A shard read to its end
    leaves a marker under ``output_uri`` with its image count
    (:func:`~pipeline.keys.shard_marker_key`): once all those images
    are done, later runs skip it without reading it. One whose every image
    ``done`` holds also leaves :func:`~pipeline.keys.shard_done_marker_key`.
    ``shard_reads`` hears of each shard's read as it starts and, as it ends
    (also cut off part-way), what it left out: the run's counts
    (:class:`~pipeline.progress.ShardReadTeller`).
    """
    listing_errors = batch.get("listing_error", np.full(len(batch["shard_uri"]), ""))
    shards = zip(
        batch["shard_uri"], batch["shard_key"], batch["shard_version"], listing_errors, strict=True
    )
    for shard_uri, shard_key, shard_version, listing_error in shards:
        if listing_error:
            row = _shard_error_row(
                str(shard_uri), str(shard_key), str(shard_version), str(listing_error)
            )
            yield _as_columns([row])
            continue
        rows: list[dict[str, Any]] = []
        read = _ShardRead()
        shard = (str(shard_uri), str(shard_key), str(shard_version))
        tell = shard_reads is not None and done is not None
        if tell:
            shard_reads.started((str(shard_uri), str(shard_version)))
        try:
            for row in _shard_rows(*shard, shard_input, storage_options, read, done, leave_errors):
                rows.append(row)
                if len(rows) == rows_per_batch:
                    yield _as_columns(rows)
                    rows = []
            if rows:
                yield _as_columns(rows)
        finally:  # also when input.limit stops the read part-way
            if tell:
                try:
                    shard_reads.finished(
                        (str(shard_uri), str(shard_version)), read.images_done, read.errors_left
                    )
                except Exception as error:  # only a count is lost; the rows are not
                    logger.warning(
                        "could not count shard %s: %s",
                        strip_url_secrets(shard_uri),
                        strip_url_secrets(str(error)),
                    )
        # Here only once every row of the shard was taken downstream.
        if output_uri is not None and read.to_the_end:
            shard_uri, shard_version = str(shard_uri), str(shard_version)
            tag = shard_input.marker_tag
            keys = [shard_marker_key(shard_uri, shard_version, read.images, tag)]
            if done is not None and read.images_done == read.images:
                keys.append(shard_done_marker_key(shard_uri, shard_version, tag, config_hash))
            for key in keys:
                _leave_shard_marker(output_uri, storage_options, key, shard_uri)


class ShardReadListener(Protocol):
    """Hears of shard reads (:func:`read_shard`); shards are (URI, version)."""

    def started(self, shard: tuple[str, str]) -> None: ...

    def finished(self, shard: tuple[str, str], images_done: int, errors_left: int) -> None: ...


@dataclass
class _ShardRead:
    images: int = 0  # set once read to the end
    images_done: int = 0  # left out as already done (with ``done`` given), so far
    errors_left: int = 0  # left out, with ``leave_errors``, for errors of their bytes
    to_the_end: bool = False


def _leave_shard_marker(
    output_uri: str, storage_options: dict[str, Any], marker_key: str, shard_uri: str
) -> None:
    fs, root = filesystem_for(output_uri, storage_options)
    path = join(root, marker_key)
    # When it was read, on the clock that stamps rows' written_at: a copy of
    # the output (cp -r, a sync) gives the marker its own modification time.
    read_at = datetime.now(UTC).isoformat().encode()
    try:
        retry_transient(lambda: fs.pipe_file(path, read_at))
    except OSError as error:  # a later run reads the shard again; nothing is lost
        logger.warning("no marker for shard %s: %s", strip_url_secrets(shard_uri), error)


def _shard_rows(
    shard_uri: str,
    shard_key: str,
    shard_version: str,
    shard_input: ShardInput,
    storage_options: dict[str, Any],
    read: _ShardRead,
    done: DoneImages | None = None,
    leave_errors: bool = False,
) -> Iterator[dict[str, Any]]:
    images = with_image = 0
    try:
        for sample in iter_shard_images(shard_uri, shard_input, storage_options):
            images += 1
            row = _image_row(shard_uri, shard_key, shard_version, sample)
            # Resume inside a shard: its images with committed rows go no further.
            is_done = done is not None and done.has(row["image_id"], shard_version)
            with_image += sample.has_image
            read.images_done += sample.has_image and is_done
            if is_done:
                continue
            if (
                leave_errors
                and done is not None
                and done.has_error_row(row["image_id"], shard_version, on_bytes=True)
            ):
                read.errors_left += 1
                continue
            yield row
        # The marker counts images only: a sample without one can never be done,
        # and counting it would have every later run read the shard again.
        read.images, read.to_the_end = with_image, True
    except (ShardError, OSError, ValueError) as problem:
        where = f"after {images} images" if images else "before any image"
        reason = error_reason("read", f"shard failed {where}: {problem}")
        yield _shard_error_row(shard_uri, shard_key, shard_version, reason)


def _shard_error_row(shard_uri: str, shard_key: str, shard_version: str, reason: str) -> dict:
    """The row of a shard itself, for what kept its images (or some of them) from rows."""
    return {
        "image_id": image_id_for(shard_uri),
        "source_uri": shard_uri,
        "source_key": shard_key,
        "source_version": shard_version,
        "image_bytes": b"",
        "status": "error",
        "error": reason,
        "source_metadata": "",
    }


def iter_shard_images(
    shard_uri: str, shard_input: ShardInput, storage_options: dict[str, Any]
) -> Iterator[ShardImage]:
    """Stream a webdataset or Parquet shard's images; the shard closes when the caller stops."""
    fs, path = filesystem_for(shard_uri, storage_options)
    limit = shard_input.max_image_bytes
    with retry_transient(lambda: fs.open(path, "rb", block_size=SHARD_BLOCK_BYTES)) as file:
        if shard_input.format == "webdataset":
            yield from iter_webdataset(file, shard_input.extensions, limit)
        else:
            yield from iter_parquet_images(
                file, shard_input.image_column, shard_input.id_column, max_image_bytes=limit
            )


def _image_row(
    shard_uri: str, shard_key: str, shard_version: str, sample: ShardImage
) -> dict[str, Any]:
    source_uri = shard_member_uri(shard_uri, sample.sample_id)
    return {
        "image_id": image_id_for(source_uri),
        "source_uri": source_uri,
        "source_key": f"{shard_key}/{sample.name}",
        # A sample changes only with its shard, so the shard's version is its version.
        "source_version": shard_version,
        "image_bytes": sample.data or b"",
        "status": "ok" if sample.data is not None else "error",
        "error": "" if sample.problem is None else error_reason("read", sample.problem),
        "source_metadata": sample.metadata or "",
    }


def _as_columns(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    columns = {}
    for key in rows[0]:
        column = np.empty(len(rows), dtype=object)
        column[:] = [row[key] for row in rows]
        columns[key] = column
    return columns
