"""Images inside shards: webdataset ``.tar`` files and Parquet files of image bytes.

Pure functions over open binary files, streamed: a 10 GB tar shard is read member
by member and a Parquet file row batch by row batch, so a read task holds one
small batch of images at a time. The read stage turns what they yield into rows.
"""

from __future__ import annotations

import gzip
import json
import lzma
import tarfile
import zlib
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.keys import printable_name

# webdataset side members carried into the output as passthrough metadata.
METADATA_EXTENSIONS = ("json", "txt", "cls")


# What a corrupt compressed stream raises: zlib's and lzma's errors are neither
# OSError nor ValueError (bz2 raises OSError).
_DECOMPRESSION_ERRORS = (zlib.error, lzma.LZMAError)


class ShardError(ValueError):
    """A shard that cannot be read as its format; the message says why."""


@dataclass(frozen=True)
class ShardImage:
    """One image of a shard, or the reason a sample has none."""

    sample_id: str  # webdataset key or Parquet row id: unique within its shard
    name: str  # path below the shard in output keys, e.g. "000123.jpg"
    data: bytes | None
    metadata: str | None = None  # JSON object of side members
    problem: str | None = None  # set when data is None
    # False where the sample holds no image to annotate (none, a link, a null, a
    # repeated id, one over decode.max_image_bytes): it gets an error row but
    # never counts among the shard's images, so the shard can be skipped once
    # its other images are done.
    has_image: bool = True


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset's convention: the key runs to the first dot of the file name.

    ``a/000123.seg.png`` → (``a/000123``, ``seg.png``).
    """
    name = name.removeprefix("./")
    folder, _, file_name = name.rpartition("/")
    stem, _, extension = file_name.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def _is_hidden(member_name: str) -> bool:
    """A file name that starts with a dot: macOS's ``._photo.jpg`` resource forks,
    ``.DS_Store``. webdataset skips them (no key before the first dot); taken
    as samples they would be one error row each, all under the same empty key."""
    return member_name.removeprefix("./").rpartition("/")[2].startswith(".")


@dataclass(frozen=True)
class _Member:
    name: str
    extension: str
    data: bytes | None
    problem: str | None = None  # set when data is None
    is_file: bool = True  # False for a link, or a member over the byte limit: no image to take


def iter_webdataset(
    file: BinaryIO, extensions: Iterable[str], max_member_bytes: int | None = None
) -> Iterator[ShardImage]:
    """Group a tar's members into samples by key; yield each sample's image.

    The image is the sample's first member whose extension is one of
    ``extensions``; ``.json``/``.txt``/``.cls`` members become its metadata. A
    sample with no image member is yielded with ``problem`` set, not skipped,
    as is one whose image member is a link or larger than ``max_member_bytes``
    (its bytes are streamed past, never held). Raises :class:`ShardError` where the tar
    itself is corrupt or truncated.
    """
    image_extensions = {extension.lower() for extension in extensions}
    samples = _SampleGrouper(image_extensions)
    try:
        # A forward-only stream (no seeks), compressed or not.
        stream, mode = _tar_stream(file)
        with tarfile.open(fileobj=stream, mode=mode, tarinfo=_EndCheckedTarInfo) as archive:
            for member in archive:
                is_link = member.issym() or member.islnk()
                if not member.isfile() and not is_link:
                    continue  # folders, devices
                name = printable_name(member.name)
                if _is_hidden(name):
                    continue
                member_key, extension = split_member_name(name)
                if member_key != samples.key and (sample := samples.finish()):
                    yield sample
                samples.add(member_key, _read_member(archive, member, extension, max_member_bytes))
    except (tarfile.TarError, EOFError, OSError, ValueError, *_DECOMPRESSION_ERRORS) as error:
        raise ShardError(f"tar shard is truncated or corrupt: {error}") from None
    if sample := samples.finish():
        yield sample


def _tar_stream(file: BinaryIO) -> tuple[BinaryIO, str]:
    """The stream and tarfile mode to read ``file`` with.

    gzip goes through GzipFile, which reads a file of several gzip members
    (bgzip's, or gzipped pieces joined) to its end as gzip(1) does; tarfile's
    own "r|gz" stops after the first member.
    """
    if file.seekable():
        start = file.tell()
        magic = file.read(2)
        file.seek(start)
        if magic == b"\x1f\x8b":
            return gzip.GzipFile(fileobj=file, mode="rb"), "r|"
    return file, "r|*"


class _EndCheckedTarInfo(tarfile.TarInfo):
    """A header reader that tells a tar's end from a cut or a corrupt header.

    tarfile ends its member list without an error on anything but a first
    header that is missing, cut short or corrupt, so a shard truncated at a
    member boundary, or with a bad header halfway, would just look shorter
    and lose its later samples unseen. A tar ends with a zero block (tarfile's
    EOFHeaderError); anything else where a header should be is raised here.
    """

    @classmethod
    def fromtarfile(cls, archive: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(archive)
        except tarfile.EOFHeaderError:
            raise  # the end-of-archive marker
        except tarfile.HeaderError as error:
            # Positions in the tar itself (uncompressed), read from the stream:
            # ``archive.offset`` stays at the start of a long-name or pax header.
            end = archive.fileobj.tell()
            if isinstance(error, tarfile.EmptyHeaderError):
                why = (
                    f"the data ends at byte {end} without the end-of-archive marker "
                    "(a whole file whose writer left it out needs packing again)"
                    if end
                    else "the file is empty"
                )
            elif isinstance(error, tarfile.TruncatedHeaderError):
                why = f"the data ends inside a header, at byte {end}"
            else:
                why = f"bad header at byte {end - tarfile.BLOCKSIZE}: {error}"
            raise tarfile.ReadError(why) from None


class _SampleGrouper:
    """The members of the sample being read, and the keys of those already yielded."""

    def __init__(self, image_extensions: set[str]) -> None:
        self.image_extensions = image_extensions
        self.key: str | None = None
        self.members: list[_Member] = []
        self.first_member = 0  # the sample's first member's position in the tar
        self.member_count = 0
        self.seen_keys: set[str] = set()

    def add(self, key: str, member: _Member) -> None:
        if not self.members:
            self.key, self.first_member = key, self.member_count
        self.member_count += 1
        for index, earlier in enumerate(self.members):
            if earlier.name == member.name:
                # `tar -rf` appends an updated file under its old name; as tar
                # extracts, the last copy stands (in the first one's place).
                self.members[index] = member
                return
        self.members.append(member)

    def finish(self) -> ShardImage | None:
        """The sample of the members added since the last call; None if there are none."""
        key, members = str(self.key), self.members
        self.members = []
        if not members:
            return None
        if key in self.seen_keys:
            # Two samples under one id would be one image in the output; the
            # first keeps it, this one is an error row of its own, under a name
            # no earlier sample holds. A later sample whose key is that name is
            # a repeat in its turn: an error row, not a silent replacement.
            sample_id = unused_name(f"{key}@member-{self.first_member}", self.seen_keys)
            self.seen_keys.add(sample_id)
            return ShardImage(
                sample_id=sample_id,
                name=members[0].name,
                data=None,
                problem=f"key {key!r} repeats an earlier sample's (a webdataset sample's "
                "members must be contiguous in the tar)",
                has_image=False,
            )
        self.seen_keys.add(key)
        return _sample(key, members, self.image_extensions)


def _read_member(
    archive: tarfile.TarFile, member: tarfile.TarInfo, extension: str, max_bytes: int | None
) -> _Member:
    name = printable_name(member.name.removeprefix("./"))
    # A link's image is not read from outside the shard; its sample becomes an
    # error row, not a silent gap.
    if member.issym() or member.islnk():
        problem = f"image member is a link, not a file: {name}"
        return _Member(name, extension, None, problem, is_file=False)
    if max_bytes is not None and member.size > max_bytes:
        # Not counted among the shard's images either: a shard re-read on every
        # run for an image it may never take would cost its whole download each time.
        return _Member(name, extension, None, too_large(member.size, max_bytes), is_file=False)
    return _Member(name, extension, archive.extractfile(member).read())


def too_large(size: int | None, max_image_bytes: int) -> str:
    """Why an image over ``decode.max_image_bytes`` has no row of its own; ``size`` if known."""
    size_text = f"{size} bytes" if size is not None else "more than that"
    return f"image over decode.max_image_bytes ({max_image_bytes}): {size_text}"


def _side_value(extension: str, data: bytes) -> Any:
    """A side member as a JSON value: a ``.json`` member's own value where it parses
    (readers then parse the metadata once), else the text."""
    text = data.decode("utf-8", "replace")
    if _last_extension(extension) == "json":
        try:
            return json.loads(text, parse_constant=_not_json)  # NaN is no JSON to others
        except (ValueError, RecursionError):  # RecursionError: nested past Python's stack
            pass
    return text


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


def _last_extension(extension: str) -> str:
    """``seg.json`` → ``json``: what a side member is (``geojson`` is not json)."""
    return extension.rpartition(".")[2]


def _is_metadata(extension: str) -> bool:
    return _last_extension(extension) in METADATA_EXTENSIONS


def _sample(key: str | None, members: list[_Member], image_extensions: set[str]) -> ShardImage:
    images = [m for m in members if m.extension in image_extensions]
    # A member read before one that was not (a link, too large): the latter is
    # the image only where nothing else is.
    image = next((m for m in images if m.data is not None), images[0] if images else None)
    side = {
        m.extension: _side_value(m.extension, m.data)
        for m in members
        if _is_metadata(m.extension) and m.data is not None
    }
    metadata = json.dumps(side, sort_keys=True) if side else None
    if image is None:
        found = ", ".join(m.extension or "(none)" for m in members)
        return ShardImage(
            sample_id=str(key),
            name=members[0].name,
            data=None,
            metadata=metadata,
            problem=f"sample has no image member (extensions found: {found})",
            has_image=False,
        )
    return ShardImage(
        sample_id=str(key),
        name=image.name,
        data=image.data,
        metadata=metadata,
        problem=image.problem,
        has_image=image.is_file,
    )


def iter_parquet_images(
    file: BinaryIO,
    image_column: str,
    id_column: str | None,
    batch_rows: int = 16,
    max_image_bytes: int | None = None,
) -> Iterator[ShardImage]:
    """Yield the images of a Parquet file, reading only the image and id columns.

    The image column holds encoded bytes, either as binary or as a struct with a
    ``bytes`` field (how Hugging Face datasets store ``Image`` features). Without
    an id column, the row number is the id. Images over ``max_image_bytes`` are
    yielded with ``problem`` set, as in every other input format.
    """
    try:
        parquet = pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as error:
        raise ShardError(f"not a readable Parquet file: {error}") from None
    names = parquet.schema_arrow.names
    for column, key in ((image_column, "input.image_column"), (id_column, "input.id_column")):
        if column is not None and column not in names:
            raise ShardError(
                f"Parquet file has no column {column!r} ({key}); its columns: {', '.join(names)}"
            )
    columns = [image_column] if id_column is None else [image_column, id_column]
    row = 0
    ids_checked = _IdChecker(parquet, id_column) if id_column is not None else None
    try:
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
            values = batch.column(0).to_pylist()
            ids = batch.column(1).to_pylist() if id_column else range(row, row + len(values))
            for offset, (value, sample_id) in enumerate(zip(values, ids, strict=True)):
                image = _parquet_image(str(sample_id), value, image_column, max_image_bytes)
                if ids_checked is not None:
                    image = ids_checked(image, sample_id, row + offset)
                yield image
            row += len(values)
    except (pa.ArrowException, OSError) as error:
        message = f"Parquet file is truncated or corrupt after {row} rows: {error}"
        raise ShardError(message) from None


class _IdChecker:
    """Ids of one Parquet file's rows, checked as they are read: an id names one image.

    A row whose id is null or repeats an earlier row's is an error row named by
    its row number (``row-<n>``): under its id it would take the other row's
    place, or "None"'s. That name must be no row's id either, so the first such
    row reads the file's id column (ids only, a few bytes a row) to pick one.
    """

    def __init__(self, parquet: pq.ParquetFile, id_column: str) -> None:
        self.parquet, self.id_column = parquet, id_column
        self.first_rows: dict[str, int] = {}  # id → its first row
        self.taken: set[str] | None = None  # every id in the file, and the names given

    def __call__(self, image: ShardImage, sample_id: object, row: int) -> ShardImage:
        if sample_id is None:
            problem = f"id column {self.id_column!r} is null"
        elif (first := self.first_rows.setdefault(str(sample_id), row)) != row:
            problem = f"id {str(sample_id)!r} (column {self.id_column!r}) repeats row {first}'s"
        else:
            return image
        if self.taken is None:
            ids = self.parquet.read(columns=[self.id_column]).column(0).drop_null()
            self.taken = {str(sample_id) for sample_id in ids.to_pylist()}
        name = unused_name(f"row-{row}", self.taken)
        self.taken.add(name)
        return ShardImage(sample_id=name, name=name, data=None, problem=problem, has_image=False)


def unused_name(name: str, taken: Collection[str]) -> str:
    """``name``, or the first of ``name~1``, ``name~2``, … that ``taken`` lacks."""
    candidate, number = name, 0
    while candidate in taken:
        number += 1
        candidate = f"{name}~{number}"
    return candidate


def _parquet_image(
    sample_id: str, value: object, image_column: str, max_bytes: int | None
) -> ShardImage:
    struct = value if isinstance(value, dict) else None  # struct<bytes, path>
    if struct is not None:
        value = struct.get("bytes")
    if isinstance(value, bytes) and (max_bytes is None or len(value) <= max_bytes):
        return ShardImage(sample_id=sample_id, name=sample_id, data=value)
    if isinstance(value, bytes):
        problem = too_large(len(value), max_bytes)
    elif value is None and struct is not None and struct.get("path"):
        # The path after the colon: errors are grouped by what comes before.
        problem = (
            f"column {image_column!r} holds a path, not image bytes (images stored "
            f"by path are not read): {struct['path']!r}"
        )
    elif value is None and struct is not None:
        problem = f"column {image_column!r} is a struct without image bytes"
    elif value is None:
        problem = f"column {image_column!r} is null"
    else:
        problem = f"column {image_column!r} holds {type(value).__name__}, not image bytes"
    return ShardImage(
        sample_id=sample_id, name=sample_id, data=None, problem=problem, has_image=False
    )
