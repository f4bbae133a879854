import errno
import io
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.read import ShardInput, read_batch, read_shard
from pipeline.retry import is_transient, retry_transient
from tests.pipeline.test_shards import SAMPLES, tar_bytes


def _rows(**columns):
    return {key: np.array(values, dtype=object) for key, values in columns.items()}


def test_reads_names_with_glob_characters_and_reports_missing_files(tmp_path):
    (tmp_path / "a[1].jpg").write_bytes(b"one")
    (tmp_path / "a1.jpg").write_bytes(b"wrong file")
    (tmp_path / "b*.jpg").write_bytes(b"star")
    uris = [str(tmp_path / name) for name in ("a[1].jpg", "b*.jpg", "gone.jpg")]
    batch = read_batch(_rows(source_uri=uris, image_id=["1", "2", "3"]), {})
    assert batch["image_bytes"].tolist() == [b"one", b"star", b""]
    assert batch["status"].tolist() == ["ok", "ok", "error"]
    assert batch["error"][2].startswith("read: FileNotFoundError")


def test_reads_manifest_rows_from_several_filesystems_by_fetch_uri(tmp_path):
    import fsspec

    fsspec.filesystem("memory").pipe_file("/bucket/m.jpg", b"memory bytes")
    (tmp_path / "l.jpg").write_bytes(b"local bytes")
    batch = read_batch(
        _rows(
            source_uri=["memory://bucket/m.jpg", "https://host/l.jpg"],
            fetch_uri=["memory://bucket/m.jpg", str(tmp_path / "l.jpg")],
        ),
        {},
    )
    assert batch["image_bytes"].tolist() == [b"memory bytes", b"local bytes"]
    assert "fetch_uri" not in batch


def test_files_over_the_byte_limit_are_error_rows_and_empty_files_read_empty(tmp_path):
    (tmp_path / "big.jpg").write_bytes(bytes(11))
    (tmp_path / "limit.jpg").write_bytes(bytes(10))
    (tmp_path / "empty.jpg").write_bytes(b"")
    uris = [str(tmp_path / name) for name in ("big.jpg", "limit.jpg", "empty.jpg")]
    batch = read_batch(_rows(source_uri=uris), {}, max_image_bytes=10)
    assert batch["status"].tolist() == ["error", "ok", "ok"]
    assert batch["error"][0] == "read: image over decode.max_image_bytes (10): more than that"
    assert batch["image_bytes"].tolist() == [b"", bytes(10), b""]


def test_over_the_byte_limit_s3_fetches_only_up_to_it(s3_endpoint):
    import s3fs

    options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("read-limit")
    # S3 answers 416 to a ranged GET of an empty object: that is an empty file,
    # for the decode stage to name, not a read error.
    for name, data in {"empty.jpg": b"", "small.jpg": b"12345", "big.jpg": bytes(10**6)}.items():
        fs.pipe_file(f"read-limit/{name}", data)
    uris = [f"s3://read-limit/{name}" for name in ("empty.jpg", "small.jpg", "big.jpg")]
    batch = read_batch(_rows(source_uri=uris), options, max_image_bytes=10)
    assert batch["status"].tolist() == ["ok", "ok", "error"]
    assert batch["image_bytes"].tolist()[:2] == [b"", b"12345"]
    assert "over decode.max_image_bytes" in batch["error"][2]


def test_names_with_double_colons_are_names_not_url_chains(tmp_path, s3_endpoint):
    # fsspec reads "a::b" as two chained URLs; here it is one S3 key or file name.
    import s3fs

    options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("colons")
    fs.pipe_file("colons/in/a::b.jpg", b"colons")
    fs.pipe_file("colons/in/b.jpg", b"plain")
    (tmp_path / "run::1").mkdir()
    (tmp_path / "run::1" / "c.jpg").write_bytes(b"local")
    uris = ["s3://colons/in/a::b.jpg", "s3://colons/in/b.jpg"]
    batch = read_batch(_rows(source_uri=uris), options)
    assert batch["status"].tolist() == ["ok", "ok"]
    assert batch["image_bytes"].tolist() == [b"colons", b"plain"]
    batch = read_batch(_rows(source_uri=[str(tmp_path / "run::1" / "c.jpg")]), {})
    assert batch["image_bytes"].tolist() == [b"local"]
    shard = tmp_path / "x::y.tar"
    shard.write_bytes(tar_bytes(SAMPLES))
    [rows] = _read_shards([str(shard)], ["x::y.tar"], "webdataset")
    assert rows["status"] == ["ok", "ok", "error", "ok"]  # the third sample has no image


@pytest.mark.parametrize("honours_ranges", [True, False])
def test_http_images_over_the_byte_limit_are_error_rows(honours_ranges):
    """A server that ignores Range sends the whole file; the limit holds all the same."""
    import http.server
    import threading

    files = {"/big.jpg": bytes(1000), "/small.jpg": b"jpeg", "/empty.jpg": b""}
    sent = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            data = files[self.path]
            wanted = self.headers.get("Range", "")
            if honours_ranges and wanted.startswith("bytes=0-"):
                if not data:
                    self.send_response(416)
                    self.end_headers()
                    return
                data = data[: int(wanted.removeprefix("bytes=0-")) + 1]
                self.send_response(206)
            else:
                self.send_response(200)
            sent[self.path] = len(data)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        uris = [f"{base}/big.jpg", f"{base}/small.jpg", f"{base}/empty.jpg"]
        batch = read_batch(_rows(source_uri=uris), {}, max_image_bytes=10)
    finally:
        server.shutdown()
        server.server_close()
    assert batch["status"].tolist() == ["error", "ok", "ok"]
    assert batch["image_bytes"].tolist() == [b"", b"jpeg", b""]
    assert sent["/big.jpg"] == (11 if honours_ranges else 1000)


class ShardReadsHeard:
    """A :class:`~pipeline.read.ShardReadListener` that keeps what it heard."""

    def __init__(self) -> None:
        self.began: list = []
        self.ended: list = []

    def started(self, shard):
        self.began.append(shard)

    def finished(self, shard, images_done, errors_left):
        self.ended.append((shard, images_done, errors_left))


def _read_shards(uris, keys, input_format, **options):
    shard_input = ShardInput(
        input_format, ("jpg", "png"), options.get("image_column", "image"), options.get("id_column")
    )
    batches = read_shard(
        _rows(shard_uri=uris, shard_key=keys, shard_version=[f"v{i}" for i in range(len(uris))]),
        shard_input,
        storage_options={},
        rows_per_batch=options.get("rows_per_batch", 16),
    )
    return [{key: column.tolist() for key, column in batch.items()} for batch in batches]


def test_a_shards_done_images_go_no_further_under_their_own_version(tmp_path):
    """Resume inside a shard: an image done for this version of its shard is left out."""
    from pipeline.keys import image_id_for
    from pipeline.output.done import DoneImages, done_key

    shard = tmp_path / "000.tar"
    shard.write_bytes(tar_bytes(SAMPLES))
    first = image_id_for(f"{shard}#a/000")
    done = DoneImages(keys=np.sort(np.array([done_key(first, "v0")], dtype=np.uint64)))

    told = ShardReadsHeard()

    def read(version: str, done_images: DoneImages | None, rows_per_batch: int = 16):
        return read_shard(
            _rows(shard_uri=[str(shard)], shard_key=["s/000.tar"], shard_version=[version]),
            ShardInput("webdataset", ("jpg", "png"), "image", None),
            storage_options={},
            rows_per_batch=rows_per_batch,
            done=done_images,
            shard_reads=told,
        )

    def source_uris(version: str, done_images: DoneImages | None) -> list[str]:
        return [uri for batch in read(version, done_images) for uri in batch["source_uri"].tolist()]

    everything = source_uris("v0", None)
    assert len(everything) == 4
    assert told.ended == []  # nothing was done: nothing to count
    assert source_uris("v0", done) == everything[1:]
    assert source_uris("v1", done) == everything  # done for another version of the shard
    # What each read left out, for the run's count of images already done.
    assert told.ended == [((str(shard), "v0"), 1, 0), ((str(shard), "v1"), 0, 0)]
    assert told.began == [shard for shard, _, _ in told.ended]
    # A read stopped after its first row (input.limit met) tells what it left out so far.
    told = ShardReadsHeard()
    stopped = read("v0", done, rows_per_batch=1)
    next(stopped)
    assert (told.began, told.ended) == ([(str(shard), "v0")], [])
    stopped.close()
    assert told.ended == [((str(shard), "v0"), 1, 0)]


def test_under_a_limit_a_shards_members_with_error_rows_are_left_out(tmp_path):
    """A sample with no image fails on every read of its shard's version: under
    input.limit it would take a place in the limit each run."""
    from pipeline.keys import image_id_for
    from pipeline.output.done import DoneImages, done_key

    shard = tmp_path / "000.tar"
    shard.write_bytes(tar_bytes(SAMPLES))
    imageless = image_id_for(f"{shard}#a/002")
    imageless_key = np.array([done_key(imageless, "v0")], dtype=np.uint64)
    done = DoneImages(errored=imageless_key, errored_on_bytes=imageless_key)

    told = ShardReadsHeard()

    def source_uris(version: str, leave_errors: bool) -> list[str]:
        batches = read_shard(
            _rows(shard_uri=[str(shard)], shard_key=["s/000.tar"], shard_version=[version]),
            ShardInput("webdataset", ("jpg", "png"), "image", None),
            storage_options={},
            rows_per_batch=16,
            done=done,
            leave_errors=leave_errors,
            shard_reads=told,
        )
        return [uri for batch in batches for uri in batch["source_uri"].tolist()]

    everything = source_uris("v0", leave_errors=False)
    assert f"{shard}#a/002" in everything and len(everything) == 4
    assert source_uris("v0", leave_errors=True) == [u for u in everything if u != f"{shard}#a/002"]
    assert source_uris("v1", leave_errors=True) == everything  # another version: tried again
    # The member left behind is counted, for the run's summary.
    assert [errors_left for _, _, errors_left in told.ended] == [0, 1, 0]


def test_webdataset_shard_expands_into_image_rows_in_batches(tmp_path):
    shard = tmp_path / "000.tar"
    shard.write_bytes(tar_bytes(SAMPLES))
    batches = _read_shards([str(shard)], ["s/000.tar"], "webdataset", rows_per_batch=3)
    assert [len(batch["image_id"]) for batch in batches] == [3, 1]
    rows = [
        dict(zip(batch, values, strict=True))
        for batch in batches
        for values in zip(*batch.values(), strict=True)
    ]
    assert [row["source_uri"] for row in rows] == [
        f"{shard}#a/000",
        f"{shard}#a/001",
        f"{shard}#a/002",
        f"{shard}#003",
    ]
    assert rows[0]["source_key"] == "s/000.tar/a/000.jpg"
    assert {row["source_version"] for row in rows} == {"v0"}
    assert rows[0]["image_bytes"] == b"jpeg-0" and '"cls": "3"' in rows[0]["source_metadata"]
    assert rows[2]["status"] == "error" and "no image member" in rows[2]["error"]
    assert len({row["image_id"] for row in rows}) == 4


def test_broken_shards_leave_an_error_row_after_the_images_they_gave(tmp_path):
    whole = tar_bytes([(f"{i:03d}.jpg", bytes(3000)) for i in range(4)])
    (tmp_path / "cut.tar").write_bytes(whole[:6000])
    uris = [str(tmp_path / "cut.tar"), str(tmp_path / "missing.tar")]
    [cut, missing] = _read_shards(uris, ["cut.tar", "missing.tar"], "webdataset")
    assert cut["status"] == ["ok", "error"]
    assert cut["source_uri"][1] == uris[0]
    assert cut["error"][1].startswith("read: shard failed after 1 images: tar shard is truncated")
    assert missing["status"] == ["error"]
    assert "before any image" in missing["error"][0]


def test_parquet_shard_rows_carry_file_and_row_ids(tmp_path):
    buffer = io.BytesIO()
    pq.write_table(pa.table({"image": [b"a", b"b"], "id": ["x/1", "x/2"]}), buffer)
    (tmp_path / "p.parquet").write_bytes(buffer.getvalue())
    uri = str(tmp_path / "p.parquet")
    [batch] = _read_shards([uri], ["p.parquet"], "parquet", id_column="id")
    assert batch["source_uri"] == [f"{uri}#x/1", f"{uri}#x/2"]
    assert batch["source_key"] == ["p.parquet/x/1", "p.parquet/x/2"]
    assert batch["image_bytes"] == [b"a", b"b"]


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (OSError(errno.EBUSY, "SlowDown"), True),
        (OSError(121, "InternalError"), True),
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (OSError("An error occurred (ServiceUnavailable) when calling PutObject"), True),
        (FileNotFoundError("s3://b/k"), False),
        (PermissionError("Access Denied"), False),
        (ValueError("bad data"), False),
    ],
)
def test_transient_errors_are_told_from_permanent_ones(error, transient):
    assert is_transient(error) is transient


def test_retry_gives_up_on_permanent_errors_at_once_and_on_transient_after_attempts():
    calls = []

    def flaky(fail_times, error):
        def call():
            calls.append(1)
            if len(calls) <= fail_times:
                raise error
            return "done"

        return call

    assert retry_transient(flaky(2, ConnectionResetError()), attempts=3) == "done"
    calls.clear()
    with pytest.raises(ConnectionResetError):
        retry_transient(flaky(5, ConnectionResetError()), attempts=3)
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(FileNotFoundError):
        retry_transient(flaky(5, FileNotFoundError()), attempts=3)
    assert len(calls) == 1


def test_a_read_settings_tag_names_only_the_settings_that_decide_a_shards_images():
    from pipeline.read import ShardInput, read_settings_tag

    webdataset = ShardInput("webdataset", ("jpg", "png"), "image", None, 100)
    parquet = ShardInput("parquet", ("jpg", "png"), "image", None, 100)
    assert read_settings_tag(webdataset, webdataset) == ""
    assert read_settings_tag(parquet, parquet) == ""
    # webdataset reads no columns, Parquet no extensions: changing them changes nothing
    assert read_settings_tag(replace(webdataset, id_column="uid"), webdataset) == ""
    assert read_settings_tag(replace(parquet, extensions=("jpg",)), parquet) == ""
    changed = [
        read_settings_tag(replace(webdataset, extensions=("jpg",)), webdataset),
        read_settings_tag(replace(webdataset, extensions=("png", "jpg")), webdataset),  # order
        read_settings_tag(replace(webdataset, max_image_bytes=200), webdataset),
        read_settings_tag(replace(parquet, id_column="uid"), parquet),
        read_settings_tag(replace(parquet, image_column="img"), parquet),
        read_settings_tag(replace(parquet, max_image_bytes=200), parquet),
    ]
    assert all(len(tag) == 9 and tag.startswith("r") for tag in changed)
    assert len(set(changed)) == len(changed)
    # the same settings give the same tag in every run
    assert read_settings_tag(replace(parquet, id_column="uid"), parquet) == changed[3]
