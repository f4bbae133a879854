"""One way to reach any URI: fsspec for bytes, pyarrow's view of it for Parquet."""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import threading
import time
import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import fsspec
import fsspec.asyn
import pyarrow
import pyarrow.fs

from dpt_model.loading import storage_options_for
from pipeline.retry import retry_transient
from pipeline.schema import ENDPOINT_SETTING, storage_problem

# Ten times the pause that was always enough (see _wait_for_arrow_at_exit).
_EXIT_GRACE_S = 0.5
_exit_grace_lock = threading.Lock()
_exit_grace_registered = False


def filesystem_for(
    uri: str, storage_options: dict[str, Any]
) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a URI or plain local path."""
    protocol = fsspec.core.split_protocol(uri)[0] or "file"
    options = storage_options_for(uri, storage_options)
    if protocol in ("file", "local"):
        options["auto_mkdir"] = True
        fs, path = _unchained_filesystem(protocol, uri, options)
        # One spelling per folder ("a//b", "a/./b", "x/../a/b" are "a/b"): image
        # ids come from these paths, and a resumed run must find its images done.
        return fs, os.path.normpath(path)
    if protocol in ("s3", "s3a"):
        # s3fs fetches an object whole in concurrent ranges, after a HEAD for its
        # size: a request more for every image, map and part, which are small.
        # (Checkpoints, large, are fetched by dpt_model.loading with the default.)
        options.setdefault("max_concurrency", 1)
        _parse_s3_timestamps_fast()
    return _unchained_filesystem(protocol, uri, options)


def _unchained_filesystem(
    protocol: str, uri: str, options: dict[str, Any]
) -> tuple[fsspec.AbstractFileSystem, str]:
    """``fsspec.core.url_to_fs`` without its URL chains: there ``a::b`` is two URLs,
    and ``::`` is an ordinary part of an S3 key or a file name."""
    cls = fsspec.get_filesystem_class(protocol)
    fs = fsspec.filesystem(protocol, **{**cls._get_kwargs_from_urls(uri), **options})
    return fs, cls._strip_protocol(uri)


def _parse_s3_timestamps_fast() -> None:
    """Have botocore clients made from now on parse ISO 8601 times with the stdlib.

    botocore parses every timestamp with dateutil: for a ListObjectsV2 page
    that is 1000 LastModified values and, measured, 60 % of the client's time
    (a million-key listing took twice as long). ``datetime.fromisoformat``
    gives the same aware datetime for S3's form; anything else (HTTP dates,
    epoch numbers, a time without a zone) still goes to botocore's parser.
    botocore reads this default when it builds a client's parser.
    """
    import botocore.parsers

    botocore.parsers.DEFAULT_TIMESTAMP_PARSER = _iso_or_botocore_timestamp


def _iso_or_botocore_timestamp(value: Any) -> Any:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            parsed = datetime.fromisoformat(value)
            if parsed.tzinfo is not None:
                return parsed
    import botocore.utils

    # botocore's own parser by name, never whatever the default is now (ours,
    # or a wrapper around ours), which would lead back here.
    return botocore.utils.parse_timestamp(value)


def forget_listing(fs: fsspec.AbstractFileSystem, folder: str) -> str:
    """Drop the cached listing of ``folder`` before listing it; returns ``folder``.

    s3fs shares listings among its filesystem objects with the same options in
    a process, and one from before a run's writes misses them (an incremental
    run failed at its end on its own new part). The listing made next is kept:
    opening each file listed then needs no request of its own.
    """
    fs.invalidate_cache(folder)
    return folder


class StorageUnreachableError(OSError):
    """An object store that cannot be reached or authenticated against."""


def check_reachable(
    key: str, uri: str, storage_options: dict[str, Any], endpoint_setting: str = ENDPOINT_SETTING
) -> None:
    """One request with a small retry budget, before anything else runs.

    The job's S3 settings retry hard (right for a million reads on a busy
    bucket), which makes a wrong endpoint or a dead network fail only after
    minutes. This probe fails in seconds instead, naming ``key`` and the fix
    (``endpoint_setting``: where the caller's user sets the endpoint). A
    missing path is fine here (an output prefix need not exist yet).
    """
    if fsspec.core.split_protocol(uri)[0] not in ("s3", "s3a"):
        return  # local paths and other stores fail quickly on their own
    config = dict(storage_options.get("config_kwargs", {}))
    config.update(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=5)
    fs, path = filesystem_for(uri, {**storage_options, "config_kwargs": config})
    fs.retries = 1  # s3fs's own retry rounds, on top of botocore's
    try:
        fs.info(path)  # a HEAD, or a 1-key listing: never the whole prefix
    except FileNotFoundError:
        pass
    except Exception as error:
        problem = storage_problem(key, uri, error, endpoint_setting)
        raise StorageUnreachableError(problem) from None


def read_bytes(uri: str, storage_options: dict[str, Any]) -> bytes:
    """One object's bytes, transient errors retried.

    The filesystem is looked up per call (fsspec caches it per process), so a
    forked DataLoader worker never reuses its parent's S3 connections.
    """
    fs, path = filesystem_for(uri, storage_options)
    return retry_transient(lambda: fs.cat_file(path))


def files_in(fs: fsspec.AbstractFileSystem, folder: str) -> set[str]:
    """Paths of the files directly in ``folder``; none where it does not exist.

    A listing, not a glob: an output path may hold ``[``, ``*`` or ``?``.
    """
    try:
        listed = fs.ls(forget_listing(fs, folder), detail=True)
    except FileNotFoundError:
        return set()
    return {info["name"] for info in listed if info["type"] == "file"}


# S3's DeleteObjects takes at most this many keys.
_S3_DELETE_KEYS = 1000


def remove_files(fs: fsspec.AbstractFileSystem, paths: Iterable[str]) -> None:
    """Delete each path as written: ``fs.rm`` would expand ``[``, ``*`` and ``?`` as a glob.

    On S3 a thousand keys go in one DeleteObjects request, which takes them
    literally: one request per key would take hours for a million maps. S3
    answers it with a list of the keys it could not delete; those with a
    transient code are tried again, any other raises (s3fs's own bulk delete
    ignores that list).
    """
    if "s3" not in fs.protocol or not hasattr(fs, "_call_s3"):
        for path in paths:
            retry_transient(lambda path=path: fs.rm_file(path))
        return
    by_bucket: dict[str, list[str]] = {}
    for path in paths:
        bucket, key, _ = fs.split_path(path)
        by_bucket.setdefault(bucket, []).append(key)
    for bucket, keys in by_bucket.items():
        for start in range(0, len(keys), _S3_DELETE_KEYS):
            chunk = keys[start : start + _S3_DELETE_KEYS]
            retry_transient(lambda bucket=bucket, chunk=chunk: _delete_keys(fs, bucket, chunk))
        fs.invalidate_cache(bucket)


def _delete_keys(fs: Any, bucket: str, keys: list[str]) -> None:
    request = {"Objects": [{"Key": key} for key in keys], "Quiet": True}
    reply = fsspec.asyn.sync(fs.loop, fs._call_s3, "delete_objects", Bucket=bucket, Delete=request)
    failed = reply.get("Errors") or []
    if failed:
        first = failed[0]
        # An OSError retry_transient can judge: SlowDown, InternalError retry.
        raise OSError(
            f"could not delete {len(failed)} of {len(keys)} objects in bucket {bucket}, "
            f"first {first.get('Key')}: {first.get('Code')} {first.get('Message')}"
        )


def upload_options(fs: fsspec.AbstractFileSystem, content_type: str) -> dict[str, Any]:
    """Keyword arguments for ``pipe_file`` that set an object's Content-Type on S3.

    Without it S3 serves ``binary/octet-stream`` and a browser downloads an
    HTML page instead of showing it.
    """
    return {"ContentType": content_type} if "s3" in fs.protocol else {}


def missing_bucket_hint(fs: fsspec.AbstractFileSystem, root: str) -> str:
    """`` (bucket b does not exist, …)`` where ``root``'s S3 bucket is not there, else
    "": a typo in a bucket's name otherwise reads as an empty prefix."""
    if "s3" not in fs.protocol:
        return ""
    bucket = root.split("/", 1)[0]
    try:
        exists = fs.exists(bucket)
    except Exception:  # the hint is a courtesy; the error stands without it
        return ""
    return (
        "" if exists else f" (bucket {bucket} does not exist, or these credentials cannot see it)"
    )


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in fs.protocol or "local" in fs.protocol


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path from ``fs`` as the URI a user would write (plain path when local)."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def join(root: str, key: str) -> str:
    return f"{root.rstrip('/')}/{key}"


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pyarrow.fs.FileSystem:
    """Ray Data's Parquet writer takes a pyarrow filesystem; wrap the same fsspec one.

    Files written through it become visible only once whole: a local file is
    written under a hidden name (which Parquet readers skip) and renamed on
    close; an object is uploaded on close in one request. A file whose write
    failed, or a Parquet file closed before its footer was written, is thrown
    away instead: Arrow closes its output stream on errors too, and publishing
    that would leave a part no reader can open (and the resume check with it).
    """
    return pyarrow.fs.PyFileSystem(_CompleteFilesHandler(fs))


class _CompleteFilesHandler(pyarrow.fs.FSSpecHandler):
    def open_input_file(self, path: str) -> pyarrow.PythonFile:
        _wait_for_arrow_at_exit()
        return super().open_input_file(path)

    def open_output_stream(self, path: str, metadata: Any) -> pyarrow.PythonFile:
        return pyarrow.PythonFile(_PublishedWhenWhole(self.fs, path), mode="w")


def _wait_for_arrow_at_exit() -> None:
    """Give Arrow's threads a moment at exit, once this process has read through fsspec.

    After a Parquet read through a Python filesystem returns, Arrow's threads
    can still be finishing work that calls into Python for some milliseconds;
    a process that exits in that window aborts ("terminate called without an
    active exception", exit 134: apache/arrow issues 34314 and 39162). Seen
    here in most runs of a script whose last work was such a read, and in none
    with a 50 ms pause before exit.
    """
    global _exit_grace_registered
    with _exit_grace_lock:  # Arrow's threads open files too
        if not _exit_grace_registered:
            atexit.register(time.sleep, _EXIT_GRACE_S)
            _exit_grace_registered = True


class _PublishedWhenWhole(io.RawIOBase):
    """Bytes for ``path`` that appear there on close only if they make a whole file.

    Local files stream to ``.<name>.<random>.tmp`` beside ``path`` and are
    renamed; other filesystems get the bytes in one upload on close (Parquet
    parts are small: ``output.rows_per_part`` rows).
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        super().__init__()
        self._fs, self._path = fs, path
        self._failed = False
        self._tail = b""  # the last bytes written, for the Parquet footer check
        self._size = 0
        self._temporary: str | None = None
        if is_local(fs):
            folder, name = os.path.split(path)
            os.makedirs(folder, exist_ok=True)
            self._temporary = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
            self._file: Any = open(self._temporary, "wb")  # noqa: SIM115 (closed in close())
        else:
            self._file = io.BytesIO()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        try:
            written = self._file.write(data)
        except BaseException:
            self._failed = True
            raise
        self._tail = (self._tail + bytes(memoryview(data).cast("B")[-4:]))[-4:]  # no copy of data
        self._size += written
        return written

    def tell(self) -> int:
        return self._size

    def flush(self) -> None:
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self._is_whole():
                self._publish()
            else:
                self._discard()
        finally:
            super().close()

    def _is_whole(self) -> bool:
        # A Parquet file ends with its footer and the magic bytes "PAR1".
        return not self._failed and (not self._path.endswith(".parquet") or self._tail == b"PAR1")

    def _publish(self) -> None:
        if self._temporary is None:
            self._fs.pipe_file(self._path, self._file.getvalue())
            return
        try:
            self._file.close()
            os.replace(self._temporary, self._path)
        except BaseException:
            self._discard()
            raise

    def _discard(self) -> None:
        self._file.close()
        if self._temporary is not None and os.path.exists(self._temporary):
            os.remove(self._temporary)


def modified_time(info: dict[str, Any]) -> float:
    """A listing entry's modification time in seconds since the epoch (0 where none)."""
    stamp = info.get("mtime", info.get("LastModified", info.get("last_modified")))
    return stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp or 0)
