"""List: what to annotate under ``input.uri``, streamed as small rows with stable ids.

``files`` and ``manifest`` give one row per image (``image_id``, ``source_uri``,
``source_key``, ``source_version``); ``webdataset`` and ``parquet`` give one row
per shard (``shard_uri``, ``shard_key``, ``shard_version``), which the read stage
expands into image rows.
Only names travel: the driver never holds image bytes, and object listings are
consumed page by page, so a prefix of millions of keys is never held as one list.
"""

from __future__ import annotations

import codecs
import contextlib
import itertools
import logging
import os
import posixpath
import stat
from collections.abc import Collection, Generator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlsplit

import fsspec
import fsspec.asyn
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import split_protocol

from pipeline.keys import (
    PARQUET_SUFFIXES,
    WEBDATASET_SUFFIXES,
    image_id_for,
    printable_name,
)
from pipeline.s3_listing import list_in_order, s3_list_page
from pipeline.schema import source_uri_of, storage_problem, strip_url_secrets
from pipeline.storage import filesystem_for, full_uri, missing_bucket_hint

if TYPE_CHECKING:
    from jobs.config import InputConfig

TEXT_MANIFEST_SUFFIXES = (".txt", ".lst", ".list", ".manifest")
# Objects looked at before `auto` decides; enough to see past a few stray files.
AUTO_PEEK_OBJECTS = 1000
# S3 Express One Zone directory buckets' names (and their access points') end so.
DIRECTORY_BUCKET_SUFFIXES = ("--x-s3", "--xa-s3")
# S3 list requests at once on AWS (docs/benchmarks.md); botocore's pool holds 10.
AWS_LIST_CONCURRENCY = 8

logger = logging.getLogger(__name__)


class InputNotFoundError(FileNotFoundError):
    """The input URI cannot be listed, holds nothing to annotate, or is ambiguous."""


@dataclass(frozen=True)
class Listing:
    """The chosen input format, why it was chosen, and the rows, not yet listed."""

    format: str
    reason: str
    rows: Generator[dict[str, str], None, None]

    def close(self) -> None:
        """Stop listing before the end (``input.limit`` reached): on S3, the key
        ranges being listed ahead stop now rather than when the rows are collected."""
        self.rows.close()


def has_image_extension(path: str, extensions: Collection[str]) -> bool:
    """``extensions`` lower case (the config normalises them); the path's in any case."""
    suffix = path.rsplit("/", 1)[-1].rsplit(".", 1)
    return len(suffix) == 2 and suffix[1].lower() in extensions


def _has_suffix(path: str, suffixes: tuple[str, ...]) -> bool:
    name = path.rsplit("/", 1)[-1]
    # Spark/Hadoop side files (_SUCCESS, _metadata, .crc) are never data.
    return not name.startswith(("_", ".")) and name.lower().endswith(suffixes)


class StoredObject(NamedTuple):
    path: str
    version: str  # "etag:<ETag>", or "size:<bytes>,mtime:<time>" where there is no ETag


def object_version(info: dict[str, Any]) -> str:
    """What changes when an object's content does: its ETag, else size and mtime."""
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return f"etag:{str(etag).strip(chr(34))}"
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    size = info.get("size", info.get("Size"))  # fsspec's info, or a ListObjectsV2 entry
    return f"size:{size},mtime:{mtime}"


def _link_target(path: str, info: dict[str, Any]) -> dict[str, Any]:
    """A symbolic link's entry described by what it leads to.

    fsspec describes the link itself (type "other", the link's own mtime). The
    target's type, size and mtime are what the walk and the source version need:
    an edit to a linked file must be seen as a change. A link that leads nowhere
    stays a file: reading it fails, and it becomes an error row, not a gap.
    """
    try:
        target = os.stat(path)  # follows the link, relative ones from their folder
    except OSError:
        return {**info, "type": "file"}
    if stat.S_ISREG(target.st_mode):
        kind = "file"
    else:
        kind = "directory" if stat.S_ISDIR(target.st_mode) else "other"
    return {**info, "type": kind, "size": target.st_size, "mtime": target.st_mtime}


def iter_objects(
    fs: fsspec.AbstractFileSystem, root: str, list_concurrency: int | None = 1
) -> Iterator[StoredObject]:
    """Every file below ``root`` in key order, streamed: S3 page by page, others
    folder by folder. ``list_concurrency``: S3 list requests at once on a large
    prefix; None: ``AWS_LIST_CONCURRENCY`` on AWS S3, 1 on other endpoints."""
    if "s3" in fs.protocol:
        yield from _iter_s3_objects(fs, root, list_concurrency)
        return
    not_regular = linked_folders = 0
    for folder, subfolders, files in fs.walk(root, detail=True):
        # walk is top-down: reordering its folder dict in place orders the descent.
        ordered = sorted(subfolders.items())
        subfolders.clear()
        subfolders.update(ordered)
        for name in sorted(files):
            path, info = f"{folder.rstrip('/')}/{name}", files[name]
            if info.get("islink"):
                info = _link_target(path, info)
            if info.get("type", "file") != "file":
                # Walking into links to folders could loop, so they are counted in
                # a warning, not followed. A FIFO, socket or device holds no file:
                # a read of a FIFO would wait for a writer and stall the whole run.
                if info.get("islink") and info.get("type") == "directory":
                    linked_folders += 1
                else:
                    not_regular += 1
                continue
            yield StoredObject(path, object_version(info))
    if not_regular:
        logger.warning(
            "skipped %d entries under the input that are not regular files "
            "(FIFOs, sockets or devices)",
            not_regular,
        )
    if linked_folders:
        logger.warning(
            "skipped %d symbolic links to folders under the input: links are not followed; "
            "give the folder itself, or list its images in a manifest",
            linked_folders,
        )


def _iter_s3_objects(fs: Any, root: str, list_concurrency: int | None) -> Iterator[StoredObject]:
    bucket, key, _ = fs.split_path(root)
    prefix = f"{key.rstrip('/')}/" if key else ""
    if list_concurrency is None:
        list_concurrency = fsspec.asyn.sync(fs.loop, _default_list_concurrency, fs, bucket)
    # S3 Express directory buckets list in no particular order: walked, never split.
    concurrency = 1 if bucket.endswith(DIRECTORY_BUCKET_SUFFIXES) else list_concurrency
    pages = list_in_order(s3_list_page(fs, bucket), prefix, concurrency)

    async def next_page() -> list[dict[str, Any]] | None:
        try:
            return await anext(pages)
        except StopAsyncIteration:
            return None

    try:
        while (entries := fsspec.asyn.sync(fs.loop, next_page)) is not None:
            for entry in entries:
                yield StoredObject(f"{bucket}/{entry['Key']}", object_version(entry))
    finally:
        # Stops the ranges still being listed (a limited run, a failed one). An
        # interrupt (Ctrl-C) that came while a page was awaited leaves the
        # listing mid-step, and it cannot be closed: the interrupt is what counts.
        with contextlib.suppress(RuntimeError):
            fsspec.asyn.sync(fs.loop, pages.aclose)


async def _default_list_concurrency(fs: Any, bucket: str) -> int:
    """Key ranges at once on AWS S3 only, where keys are listed in UTF-8 byte
    order as documented. Gateways over a filesystem have listed folder by folder
    (versitygw #1283, MinIO #1411): split there, a listing loses keys that
    nothing in the answers gives away, so other endpoints are walked unless
    input.list_concurrency says otherwise."""
    await fs.set_session()
    endpoint = (await fs.get_s3(bucket)).meta.endpoint_url or ""
    host = urlsplit(endpoint).hostname or ""
    on_aws = host.endswith((".amazonaws.com", ".amazonaws.com.cn"))
    return AWS_LIST_CONCURRENCY if on_aws else 1


def list_input(
    input_config: InputConfig, storage_options: dict[str, Any], output_uri: str | None = None
) -> Listing:
    """Decide the input format (``auto`` looks first) and return its streamed rows.

    ``input_config`` is the job config's ``input`` section. Objects under
    ``output_uri`` are never listed: an output inside the input would
    otherwise have its own maps annotated by the next run. Raises
    :class:`InputNotFoundError` when the URI cannot be listed.
    """
    uri = input_config.uri
    fs, root = filesystem_for(uri, storage_options)
    root = root.rstrip("/") if len(root) > 1 else root
    try:
        # One HEAD (and for a prefix one 1-key listing). s3fs's isdir/isfile would
        # list, and cache, the whole prefix: minutes and a GB for a million keys.
        info = fs.info(root)
    except FileNotFoundError:
        raise InputNotFoundError(
            f"input.uri {strip_url_secrets(uri)} is not a folder, prefix or file"
            + missing_bucket_hint(fs, root)
        ) from None
    except Exception as error:  # credentials, endpoint, permissions: all surface here
        raise InputNotFoundError(storage_problem("input.uri", uri, error)) from None
    is_file = info["type"] == "file"

    if is_file:
        objects: Iterator[StoredObject] = iter([StoredObject(root, object_version(info))])
        base = root.rsplit("/", 1)[0]
    else:
        objects = _not_hidden(iter_objects(fs, root, input_config.list_concurrency))
        base = root
        if output_uri is not None:
            objects = _outside_of(objects, fs, root, output_uri, storage_options)
    fmt, reason = input_config.format, "set by input.format"
    if fmt == "auto":
        peeked = list(itertools.islice(objects, AUTO_PEEK_OBJECTS))
        fmt, reason = _detect_format(fs, [stored.path for stored in peeked], input_config)
        objects = itertools.chain(peeked, objects)

    def relative(path: str) -> str:
        return path.rsplit("/", 1)[-1] if is_file else path[len(base) + 1 :]

    if fmt == "files":
        rows = _image_rows(fs, objects, input_config.extensions, relative)
    elif fmt == "manifest":
        manifests = (
            stored.path
            for stored in objects
            if is_file or _has_suffix(stored.path, PARQUET_SUFFIXES + TEXT_MANIFEST_SUFFIXES)
        )
        rows = _manifest_rows(fs, manifests, input_config, relative)
    else:
        suffixes = WEBDATASET_SUFFIXES if fmt == "webdataset" else PARQUET_SUFFIXES
        if is_file and not root.lower().endswith(suffixes):
            # Its images' URIs are "<shard>#<id>", and every reader (the resume
            # check, the report, PseudoLabelDataset) knows a shard by its suffix.
            raise InputNotFoundError(
                f"input.uri {strip_url_secrets(uri)} is one {fmt} shard without a shard's "
                f"suffix ({', '.join(suffixes)}): rename it, or give its folder"
            )
        rows = (
            _shard_row(fs, stored, relative)
            for stored in objects
            if is_file or _has_suffix(stored.path, suffixes)
        )
    return Listing(format=fmt, reason=reason, rows=rows)


def _not_hidden(objects: Iterator[StoredObject]) -> Iterator[StoredObject]:
    """``objects`` less files whose name starts with a dot.

    macOS's ``._photo.jpg`` resource forks (Finder and bsdtar copies write one
    beside every file) carry an image's extension but hold no image: each would
    be an error row, read again by every run. Folders are not judged by their
    names: a dataset may well sit below one that starts with a dot.
    """
    hidden = 0
    for stored in objects:
        if stored.path.rpartition("/")[2].startswith("."):
            hidden += 1
            continue
        yield stored
    if hidden:
        logger.warning(
            "skipped %d files under the input whose name starts with '.' (such as macOS's "
            "._photo.jpg resource forks); list one in a manifest to annotate it",
            hidden,
        )


def _outside_of(
    objects: Iterator[StoredObject],
    fs: fsspec.AbstractFileSystem,
    root: str,
    output_uri: str,
    storage_options: dict[str, Any],
) -> Iterator[StoredObject]:
    output_fs, output_root = filesystem_for(output_uri, storage_options)
    if output_fs.protocol != fs.protocol:
        return objects
    if "file" in fs.protocol:
        output_root = _as_listed_under(root, output_root)
    output_prefix = output_root.rstrip("/") + "/"
    if not output_prefix.startswith(root.rstrip("/") + "/"):
        return objects
    if output_prefix == root.rstrip("/") + "/":
        raise InputNotFoundError(
            f"output.uri is input.uri ({strip_url_secrets(output_uri)}): give the output a "
            "folder of its own (one inside the input is fine)"
        )
    return (stored for stored in objects if not stored.path.startswith(output_prefix))


def _as_listed_under(root: str, path: str) -> str:
    """A local ``path`` as the walk of ``root`` names it, where links put it below
    ``root`` though its name does not say so (an input folder given by a link,
    an output that is one); else ``path``."""
    real_root, real_path = os.path.realpath(root), os.path.realpath(path)
    if os.path.commonpath([real_root, real_path]) != real_root:
        return path
    return os.path.normpath(os.path.join(root, os.path.relpath(real_path, real_root)))


def _detect_format(
    fs: fsspec.AbstractFileSystem, paths: list[str], input_config: InputConfig
) -> tuple[str, str]:
    extensions = frozenset(input_config.extensions)
    images = [p for p in paths if has_image_extension(p, extensions)]
    tars = [p for p in paths if _has_suffix(p, WEBDATASET_SUFFIXES)]
    parquets = [p for p in paths if _has_suffix(p, PARQUET_SUFFIXES)]
    texts = [p for p in paths if _has_suffix(p, TEXT_MANIFEST_SUFFIXES)]
    seen = f"{len(images)} images, {len(tars)} .tar shards, {len(parquets)} Parquet files"
    if images:
        ignored = " (other files ignored; set input.format to choose)" if tars or parquets else ""
        return "files", f"auto: found {seen} among the first keys{ignored}"
    if tars:
        return "webdataset", f"auto: found {seen}"
    if parquets:
        columns = set(_parquet_columns(fs, parquets[0]))
        if input_config.image_column in columns:
            return "parquet", f"auto: {parquets[0]} has image column {input_config.image_column!r}"
        if input_config.uri_column in columns:
            return "manifest", f"auto: {parquets[0]} has URI column {input_config.uri_column!r}"
        raise InputNotFoundError(
            f"input.uri holds Parquet files, but {parquets[0]} has neither image column "
            f"{input_config.image_column!r} (input.image_column) nor URI column "
            f"{input_config.uri_column!r} (input.uri_column); its columns: "
            f"{', '.join(sorted(columns))}"
        )
    if len(paths) == 1 and texts:
        return "manifest", f"auto: {paths[0]} is a text manifest"
    raise InputNotFoundError(
        f"nothing to annotate under input.uri {strip_url_secrets(input_config.uri)}: "
        f"found {seen} with extensions {', '.join(input_config.extensions)}; "
        "set input.format or input.extensions"
    )


def _parquet_columns(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    try:
        with fs.open(path, "rb") as file:
            return pq.ParquetFile(file).schema_arrow.names
    except pa.ArrowInvalid as error:  # empty, cut short, or not Parquet at all
        raise InputNotFoundError(
            f"input.uri holds Parquet files, but {full_uri(fs, path)} is not a readable "
            f"Parquet file ({error}): replace it, or set input.format"
        ) from None


def _image_rows(
    fs: fsspec.AbstractFileSystem,
    objects: Iterator[StoredObject],
    extensions: tuple[str, ...],
    relative: Any,
) -> Iterator[dict[str, str]]:
    extensions = frozenset(extensions)  # built once: this runs for every listed key
    for stored in objects:
        if has_image_extension(stored.path, extensions):
            source_uri, source_key, problem = _names(fs, stored.path, relative)
            yield {
                "image_id": image_id_for(source_uri),
                "source_uri": source_uri,
                "source_key": source_key,
                "source_version": stored.version,
                "listing_error": problem,
            }


def _shard_row(fs: fsspec.AbstractFileSystem, stored: StoredObject, relative: Any) -> dict:
    shard_uri, shard_key, problem = _names(fs, stored.path, relative)
    return {
        "shard_uri": shard_uri,
        "shard_key": shard_key,
        "shard_version": stored.version,
        "listing_error": problem,
    }


def _names(fs: fsspec.AbstractFileSystem, path: str, relative: Any) -> tuple[str, str, str]:
    """(URI, key, listing error) of a listed object; the error "" unless its name is bad."""
    uri, key, problem = full_uri(fs, path), relative(path), _name_problem(path)
    if problem:  # escaped only then: this runs for every key of a listing
        uri, key = printable_name(uri), printable_name(key)
    return uri, key, problem


def _name_problem(path: str) -> str:
    """Why an object cannot be read by the name it was listed under; "" if it can.

    A local file's name that is not UTF-8 reaches Python as surrogate escapes,
    which no Arrow column holds: its row carries the name as ``\\x`` text and
    becomes an error row, where it would otherwise stop the whole job.
    """
    if path.isascii() or printable_name(path) == path:
        return ""
    return "list: name is not valid UTF-8 (shown with \\x escapes); rename it to annotate it"


def _manifest_rows(
    fs: fsspec.AbstractFileSystem,
    manifests: Iterator[str],
    input_config: InputConfig,
    relative: Any,
) -> Iterator[dict[str, str]]:
    """One image row per manifest entry; entries may point anywhere fsspec reaches.

    ``source_uri`` (written out, and the id's basis) drops any query string, so a
    presigned URL's signature never reaches the output and re-signed URLs keep
    their ids; ``fetch_uri`` keeps the entry as given, for the read stage only.
    """
    # 64 bits of each id seen (about 60 bytes an entry): an entry listed twice
    # would otherwise be annotated twice, as two rows of one image.
    seen: set[int] = set()
    repeated = 0
    for manifest in manifests:
        folder_uri = full_uri(fs, manifest.rsplit("/", 1)[0])
        # Relative entries keep their manifest's folder under the input in the
        # key, so train/list.txt and val/list.txt may both list x.jpg.
        folder_key = relative(manifest).rpartition("/")[0]
        for entry, version in _manifest_entries(fs, manifest, input_config):
            listing_error = _name_problem(entry)
            entry = printable_name(entry)
            if entry.startswith("file:///"):  # a local path, as the input's own URI is taken
                entry = entry.removeprefix("file://")
            if "://" not in entry:  # a path: ./a.jpg, a//a.jpg and a.jpg are one file
                entry = posixpath.normpath(entry)
            is_relative = "://" not in entry and not entry.startswith("/")
            if (
                is_relative
                and entry.split("/", 1)[0] == ".."
                and (climbed := _climbed(folder_uri, entry))
            ):
                # Out of the manifest's folder: the file its full path names, with
                # the id and key of that spelling.
                entry, is_relative = climbed, False
            fetch_uri = f"{folder_uri}/{entry}" if is_relative else entry
            source_uri = source_uri_of(fetch_uri)
            # Entries from several buckets keep the bucket (or host) in the key,
            # so s3://a/x.jpg and s3://b/x.jpg never share an output path.
            if not is_relative:
                source_key = split_protocol(source_uri)[1].lstrip("/")
            else:
                source_key = f"{folder_key}/{entry}" if folder_key else entry
            image_id = image_id_for(source_uri)
            if (short_id := int(image_id[:16], 16)) in seen:
                repeated += 1
                continue
            seen.add(short_id)
            yield {
                "image_id": image_id,
                "source_uri": source_uri,
                "source_key": source_key,
                # Without input.version_column entries are taken as immutable:
                # checking each one's version would cost a request per image
                # before any work starts.
                "source_version": version,
                "fetch_uri": fetch_uri,
                "listing_error": listing_error,
            }
    if repeated:
        logger.warning(
            "%d manifest entries name an image an earlier entry named: each image is "
            "annotated once",
            repeated,
        )


def _climbed(folder_uri: str, entry: str) -> str | None:
    """``../x.jpg`` from ``folder_uri``, resolved lexically; None where it would
    climb above the filesystem's root or the bucket."""
    protocol, folder = split_protocol(folder_uri)
    joined = posixpath.normpath(f"{folder}/{entry}")
    if joined.startswith(".."):
        return None
    return f"{protocol}://{joined}" if protocol else joined


def _manifest_entries(
    fs: fsspec.AbstractFileSystem, path: str, input_config: InputConfig
) -> Iterator[tuple[str, str]]:
    """(entry, source version) of each image a manifest names; the version is ""
    unless ``input.version_column`` names a column of the (Parquet) manifest."""
    version_column = input_config.version_column
    with fs.open(path, "rb") as file:
        if path.lower().endswith(PARQUET_SUFFIXES):
            try:
                parquet = pq.ParquetFile(file)
            except pa.ArrowInvalid as error:
                raise InputNotFoundError(
                    f"manifest {full_uri(fs, path)} is not a readable Parquet file ({error})"
                ) from None
            names = parquet.schema_arrow.names
            for column, key in [
                (input_config.uri_column, "input.uri_column"),
                (version_column, "input.version_column"),
            ]:
                if column is not None and column not in names:
                    raise InputNotFoundError(
                        f"manifest {full_uri(fs, path)} has no column {column!r} "
                        f"({key}); its columns: {', '.join(names)}"
                    )
            columns = [input_config.uri_column, *([version_column] if version_column else [])]
            for batch in parquet.iter_batches(batch_size=10_000, columns=columns):
                uris = batch.column(0).to_pylist()
                versions = (
                    _version_texts(batch.column(1), version_column, full_uri(fs, path))
                    if version_column
                    else [""] * len(uris)
                )
                yield from ((str(uri), v) for uri, v in zip(uris, versions, strict=True) if uri)
            return
        if version_column is not None:
            raise InputNotFoundError(
                f"input.version_column is {version_column!r}, but manifest "
                f"{full_uri(fs, path)} is text: only Parquet manifests have columns"
            )
        for number, line in enumerate(file):
            if number == 0:
                if line.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or b"\0" in line:
                    raise InputNotFoundError(
                        f"manifest {full_uri(fs, path)} is UTF-16 text: save it as UTF-8"
                    )
                line = line.removeprefix(codecs.BOM_UTF8)  # as some editors save UTF-8
            entry = line.decode("utf-8", "surrogateescape").strip()
            if entry and not entry.startswith("#"):
                yield entry, ""


def _version_texts(column: pa.Array, name: str, manifest: str) -> list[str]:
    """A version column as ``source_version`` texts, by Arrow's casts (the same text
    whatever reads it): bytes (a binary MD5) as hex, null as ""."""
    if pa.types.is_binary(column.type) or pa.types.is_fixed_size_binary(column.type):
        return [value.hex() if value is not None else "" for value in column.to_pylist()]
    try:
        texts = pc.cast(column, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise InputNotFoundError(
            f"input.version_column {name!r} of manifest {manifest} holds {column.type}: "
            "give a column of text, numbers, times or bytes"
        ) from None
    return pc.fill_null(texts, "").to_pylist()
