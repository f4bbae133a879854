"""One way to reach any URI: fsspec for bytes, pyarrow's view of it for Parquet."""

from __future__ import annotations

from typing import Any

import fsspec
import pyarrow.fs


def filesystem_for(
    uri: str, storage_options: dict[str, Any]
) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a URI or plain local path."""
    protocol = fsspec.core.split_protocol(uri)[0] or "file"
    options = dict(storage_options) if protocol in ("s3", "s3a") else {}
    if protocol in ("file", "local"):
        options["auto_mkdir"] = True
    return fsspec.core.url_to_fs(uri, **options)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in fs.protocol or "local" in fs.protocol


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path from ``fs`` as the URI a user would write (plain path when local)."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def join(root: str, key: str) -> str:
    return f"{root.rstrip('/')}/{key}"


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pyarrow.fs.FileSystem:
    """Ray Data's Parquet writer takes a pyarrow filesystem; wrap the same fsspec one."""
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
