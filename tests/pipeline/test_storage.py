import errno
import os
import subprocess
import sys

import fsspec
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.storage import arrow_filesystem, filesystem_for, forget_listing


def test_local_parquet_parts_are_invisible_until_closed(tmp_path):
    folder = tmp_path / "predictions"
    filesystem = arrow_filesystem(fsspec.filesystem("file"))
    pq.write_table(pa.table({"n": [1]}), str(folder / "done.parquet"), filesystem=filesystem)

    stream = filesystem.open_output_stream(str(folder / "half.parquet"))
    writer = pq.ParquetWriter(stream, pa.schema([("n", pa.int64())]))
    writer.write_table(pa.table({"n": [2, 3]}))
    # Mid-write, as a crash would leave it: a hidden temporary file, which
    # Parquet readers skip, and no part under its final name.
    [hidden, done] = sorted(os.listdir(folder))
    assert done == "done.parquet" and hidden.startswith(".half.parquet.")
    assert pq.read_table(str(folder))["n"].to_pylist() == [1]

    writer.close()
    stream.close()
    assert sorted(os.listdir(folder)) == ["done.parquet", "half.parquet"]
    assert sorted(pq.read_table(str(folder))["n"].to_pylist()) == [1, 2, 3]


@pytest.mark.slow
def test_a_process_whose_last_work_is_a_parquet_read_exits_cleanly(tmp_path):
    # Arrow's threads can still be calling into Python just after a read through
    # fsspec returns; exiting then aborted the process (exit 134) in 6 of 10
    # tries here. Eight tries all exiting 0 is what the exit grace buys.
    folder = tmp_path / "predictions"
    folder.mkdir()
    table = pa.table({"image_id": [f"{i:032x}" for i in range(1000)]})
    for part in range(3):
        pq.write_table(table, folder / f"part-{part}.parquet")
    # A plain threaded read, as a user's script would do it (the package's own
    # readers decode on the calling thread, which makes the abort rarer, not gone).
    script = (
        "import sys, fsspec, pyarrow.parquet as pq\n"
        "from pipeline.storage import arrow_filesystem\n"
        "pq.read_table(sys.argv[1], filesystem=arrow_filesystem(fsspec.filesystem('file')),"
        " columns=['image_id'])\n"
    )
    # One at a time: the race needs the read to end just before the exit.
    outcomes = [
        subprocess.run(
            [sys.executable, "-c", script, str(folder)], capture_output=True, timeout=120
        )
        for _ in range(8)
    ]
    assert [done.returncode for done in outcomes] == [0] * 8, [o.stderr[-300:] for o in outcomes]


class _DiskFullOnSecondWrite:
    """A local file whose second write fails as a full disk would."""

    def __init__(self, path, mode):
        self._file = open(path, mode)  # noqa: SIM115 (closed in close())
        self._writes = 0
        self.closed = False

    def write(self, data):
        self._writes += 1
        if self._writes == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._file.write(data)

    def flush(self):
        self._file.flush()

    def close(self):
        self._file.close()
        self.closed = True


def test_a_part_whose_write_failed_is_not_published(tmp_path, monkeypatch):
    # Arrow closes its output stream when a write fails; renaming the
    # temporary file then published a truncated part that no reader (and so
    # no resume check) could open.
    monkeypatch.setattr(storage, "open", _DiskFullOnSecondWrite, raising=False)
    table = pa.table({"n": list(range(10_000))})
    with pytest.raises(OSError, match="No space left"):
        ds.write_dataset(
            table,
            str(tmp_path / "predictions"),
            format="parquet",
            filesystem=arrow_filesystem(fsspec.filesystem("file")),
            basename_template="part-{i}.parquet",
        )
    # Nothing published. (The hidden temporary goes when Arrow lets go of the
    # stream; readers skip it meanwhile, as after a crash.)
    assert [name for name in os.listdir(tmp_path / "predictions") if name[0] != "."] == []
    assert ds.dataset(tmp_path / "predictions", format="parquet").files == []


@pytest.mark.parametrize("protocol", ["file", "memory"])
def test_a_parquet_file_closed_before_its_footer_is_not_published(tmp_path, protocol):
    fs = fsspec.filesystem(protocol)
    folder = f"{tmp_path}/predictions"
    filesystem = arrow_filesystem(fs)
    pq.write_table(pa.table({"n": [1]}), f"{folder}/done.parquet", filesystem=filesystem)

    stream = filesystem.open_output_stream(f"{folder}/half.parquet")
    writer = pq.ParquetWriter(stream, pa.schema([("n", pa.int64())]))
    writer.write_table(pa.table({"n": [2]}))
    stream.close()  # before the writer wrote its footer

    assert [os.path.basename(path) for path in fs.ls(folder, detail=False)] == ["done.parquet"]
    assert pq.read_table(folder, filesystem=filesystem)["n"].to_pylist() == [1]
    with pytest.raises(pa.ArrowInvalid, match="closed"):
        writer.close()
    fs.rm(folder, recursive=True)


def test_reading_an_s3_object_is_one_get_and_no_head(s3_endpoint):
    import numpy as np

    from pipeline.bench.fault_proxy import FaultInjectingProxy
    from pipeline.read import read_batch
    from pipeline.storage import read_bytes

    direct, _ = filesystem_for("s3://one-request", {"client_kwargs": {"endpoint_url": s3_endpoint}})
    direct.mkdir("one-request")
    uris = [f"s3://one-request/{index}.jpg" for index in range(3)]
    for uri in uris:
        direct.pipe_file(uri, b"x" * 100_000)
    with FaultInjectingProxy(s3_endpoint, fail_share=0.0) as proxy:
        options = {"client_kwargs": {"endpoint_url": proxy.endpoint}, "skip_instance_cache": True}
        assert read_bytes(uris[0], options) == b"x" * 100_000
        read = read_batch({"source_uri": np.array(uris, dtype=object)}, options)
        assert read["status"].tolist() == ["ok"] * 3
        methods = sorted(method for method, _ in proxy.requests.elements())
    assert methods == ["GET"] * 4  # one per read, and no HEAD for the size first


def test_removing_over_a_thousand_s3_objects_by_name(s3_endpoint):
    options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    fs, _ = filesystem_for("s3://remove-many", options)
    fs.mkdir("remove-many")
    names = [f"remove-many/out/depth/x[{index}].png" for index in range(1005)]
    fs.pipe({name: b"m" for name in names})
    fs.pipe_file("remove-many/out/depth/x1.png", b"kept: x[1] is no pattern")
    storage.remove_files(fs, names)  # two DeleteObjects requests
    fs.invalidate_cache()
    assert fs.find("remove-many") == ["remove-many/out/depth/x1.png"]


@pytest.mark.parametrize(
    "stamp",
    [
        "2026-01-01T00:00:00.000Z",  # ListObjectsV2's LastModified
        "2026-03-04T05:06:07Z",
        "2026-03-04T05:06:07.123456+02:00",
        "Wed, 04 Mar 2026 05:06:07 GMT",  # a Last-Modified header
        "2026-03-04T05:06:07",  # no zone: botocore's own rule applies
        1772600767,
        "1772600767.5",
    ],
)
def test_s3_timestamps_parse_as_botocore_parses_them(stamp):
    import botocore.parsers
    import botocore.utils

    filesystem_for("s3://bucket/key", {})
    assert botocore.parsers.DEFAULT_TIMESTAMP_PARSER is storage._iso_or_botocore_timestamp
    ours, botocores = (
        storage._iso_or_botocore_timestamp(stamp),
        botocore.utils.parse_timestamp(stamp),
    )
    assert ours == botocores
    assert ours.utcoffset() == botocores.utcoffset()
    assert str(ours) == str(botocores)  # object versions without an ETag hold it as text


def test_s3_listing_times_come_through_the_fast_parser(s3_endpoint, monkeypatch):
    import threading

    import botocore.utils

    fs, root = filesystem_for("s3://stamps", {"client_kwargs": {"endpoint_url": s3_endpoint}})
    fs.mkdir(root)
    fs.pipe_file(f"{root}/a.jpg", b"x")
    slow_parses = []
    botocore_parser = botocore.utils.parse_timestamp

    def counted(value):
        # Our client's parses only: moto's server, in this process, parses too.
        if threading.current_thread().name == "fsspecIO":
            slow_parses.append(value)
        return botocore_parser(value)

    monkeypatch.setattr(botocore.utils, "parse_timestamp", counted)
    [entry] = fs.ls(forget_listing(fs, root), detail=True)
    assert entry["LastModified"].tzinfo is not None
    assert slow_parses == []
    fs.info(forget_listing(fs, f"{root}/a.jpg"))  # a HEAD: Last-Modified is an HTTP date
    assert len(slow_parses) == 1
    fs.rm(root, recursive=True)


def test_a_parser_wrapped_around_ours_still_parses_http_dates(monkeypatch):
    """Another library wrapping the default after us, then a new S3 filesystem:
    the fallback must be botocore's parser, not whatever was installed."""
    import botocore.parsers

    filesystem_for("s3://bucket/key", {})
    ours = botocore.parsers.DEFAULT_TIMESTAMP_PARSER
    monkeypatch.setattr(botocore.parsers, "DEFAULT_TIMESTAMP_PARSER", lambda value: ours(value))
    filesystem_for("s3://bucket/other", {})
    assert storage._iso_or_botocore_timestamp("Wed, 04 Mar 2026 05:06:07 GMT").year == 2026
