"""Stable ids and output keys derived from source keys.

Output keys keep the source's folder structure, so ``a/x.jpg`` and ``b/x.jpg``
never collide, and keep spaces and non-ASCII characters as they are. Only what
could escape the output prefix or be misread by a filesystem layer is
percent-encoded: ``%`` itself (so the mapping stays injective), ``\\``, control
characters (NUL included), glob and URL metacharacters, and ``.``/``..``/empty
segments. The result is always a relative key under the output prefix.
"""

from __future__ import annotations

import hashlib
import re

import pyarrow as pa
import pyarrow.compute as pc

# Input formats whose files hold many images each.
SHARD_FORMATS = frozenset({"webdataset", "parquet"})
WEBDATASET_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet", ".pq")
# An image inside a shard is "<shard URI>#<sample id>". The first "#" right after
# a shard's suffix splits it: file names, shard paths and sample ids may hold "#".
SHARD_MEMBER_PATTERN = (
    "(?s)^(.*?(?i:"
    + "|".join(re.escape(suffix) for suffix in WEBDATASET_SUFFIXES + PARQUET_SUFFIXES)
    + "))#(.*)$"
)
_SHARD_MEMBER = re.compile(SHARD_MEMBER_PATTERN)
# A shard's own URI (its error row's, where it could not be read), not a member's.
SHARD_URI_PATTERN = (
    "(?is)(?:"
    + "|".join(re.escape(suffix) for suffix in WEBDATASET_SUFFIXES + PARQUET_SUFFIXES)
    + ")$"
)
# The longest file name ext4, XFS, APFS and NTFS hold, in bytes (UTF-8 on disk).
MAX_NAME_BYTES = 255
# Under the output: one marker object per shard version read to its end.
SHARDS_FOLDER = "_shards"
_ENCODED_CHARACTERS = frozenset("%\\?#*[]") | {chr(code) for code in range(32)} | {"\x7f"}
_RESERVED_SEGMENTS = {".": "%2E", "..": "%2E%2E", "": "%"}


def printable_name(name: str) -> str:
    """``name`` as valid UTF-8: bytes a file system or tar gave undecoded (surrogate
    escapes) become ``\\xff`` text, which Arrow and every reader can store."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return name


def image_id_for(source_uri: str) -> str:
    """A stable 32-hex-digit id: the same source URI gives the same id in every run."""
    return hashlib.sha256(source_uri.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def shard_member_uri(shard_uri: str, sample_id: str) -> str:
    """The source URI of one image inside a shard."""
    return f"{shard_uri}#{sample_id}"


def split_shard_member(source_uri: str) -> tuple[str, str] | None:
    """(shard URI, sample id) of an image inside a shard; None for an image file."""
    match = _SHARD_MEMBER.match(source_uri)
    return (match[1], match[2]) if match else None


def shard_uris(source_uris: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """:func:`split_shard_member` for a column: each image's shard URI, null for a file."""
    if not pc.any(pc.match_substring(source_uris, "#")).as_py():
        # Image files only, the usual output: the substring test costs a fifth of the
        # regexes (62 against ~290 ms for 500,000 URIs here).
        return pa.nulls(len(source_uris), pa.string())
    return pc.if_else(
        pc.match_substring_regex(source_uris, SHARD_MEMBER_PATTERN),
        pc.replace_substring_regex(source_uris, pattern=SHARD_MEMBER_PATTERN, replacement=r"\1"),
        pa.scalar(None, pa.string()),
    )


def _encode_segment(segment: str) -> str:
    if segment in _RESERVED_SEGMENTS:
        return _RESERVED_SEGMENTS[segment]
    return "".join(
        "".join(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))
        if char in _ENCODED_CHARACTERS
        else char
        for char in segment
    )


def output_key_for(source_key: str) -> str:
    """Relative source key → relative output key (without suffix), injective."""
    return "/".join(_encode_segment(segment) for segment in source_key.split("/"))


def map_file_key(kind: str, source_key: str, tag: str, suffix: str = ".png") -> str:
    """Key under the output prefix of one map file, e.g. ``depth/a/x.jpg.3f9c2a1b.png``.

    ``tag`` is the row's :func:`annotation_tag`. A segment over a file name's
    255 bytes (a long source name plus the tag, or one that percent-encoding
    grew) is cut short and named by its hash, so the map can be written to a
    local disk as well as to S3.
    """
    folders, _, name = output_key_for(source_key).rpartition("/")
    fitted = [_fit_name(folder) for folder in folders.split("/")] if folders else []
    return "/".join([kind, *fitted, _fit_name(name, f".{tag}{suffix}")])


def _fit_name(name: str, ending: str = "") -> str:
    """``name + ending``, or where that is over :data:`MAX_NAME_BYTES`, the start of
    ``name``, ``~``, 8 hex digits of its hash, and ``ending``: distinct names stay
    distinct, and the ending (the tag and suffix) is kept whole."""
    whole = name + ending
    if len(whole.encode("utf-8", "surrogatepass")) <= MAX_NAME_BYTES:
        return whole
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    tail = f"~{digest}{ending}"
    budget = MAX_NAME_BYTES - len(tail.encode())
    start = name.encode("utf-8", "surrogatepass")[:budget]
    return start.decode("utf-8", "ignore") + tail  # "ignore": a character cut in two is left out


def annotation_tag(image_id: str, source_version: str | None, config_hash: str) -> str:
    """8 hex digits naming one annotation: this image, this version of it, these settings.

    Part of every map file's name, so a run never writes over a map that a
    committed row of another image, source version or config points at: a
    crash between a map and its row (rows are committed a part at a time)
    would otherwise leave an earlier row describing another run's map.
    """
    basis = f"{image_id}\0{source_version or ''}\0{config_hash}"
    return hashlib.sha256(basis.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def shard_marker_key(
    shard_uri: str, shard_version: str, images: int, read_settings_tag: str = ""
) -> str:
    """``_shards/<shard id>.<version tag>[.<read settings tag>].<images>``: a small
    object saying that this version of the shard was read to its end and held
    that many images, read under those settings; its body is when (ISO 8601).

    The facts are in the name, so one listing tells the driver which shards a
    run can skip: those whose every image is already done. The time is read
    only for shards with error rows, whose file times a copy may have changed.
    """
    return f"{shard_marker_stem(shard_uri, shard_version, read_settings_tag)}.{images}"


def shard_done_marker_key(
    shard_uri: str, shard_version: str, read_settings_tag: str, config_hash: str
) -> str:
    """``_shards/<shard id>.<version tag>[.<read settings tag>].c<config>``: a small
    object saying that a read of this version under those settings found every
    one of its images done under that config.

    Where a shard version was read under more than one set of settings, the
    count of its done images can hold images the current settings do not
    produce (other ids, other extensions), so only this marker lets it be skipped.
    """
    return f"{shard_marker_stem(shard_uri, shard_version, read_settings_tag)}.c{config_hash[:12]}"


def shard_marker_stem(shard_uri: str, shard_version: str, read_settings_tag: str = "") -> str:
    version_tag = hashlib.sha256(shard_version.encode()).hexdigest()[:8]
    settings = f".{read_settings_tag}" if read_settings_tag else ""
    return f"{SHARDS_FOLDER}/{image_id_for(shard_uri)}.{version_tag}{settings}"
