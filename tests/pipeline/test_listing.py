import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.config import InputConfig
from pipeline import listing, s3_listing
from pipeline.keys import image_id_for
from pipeline.listing import InputNotFoundError, has_image_extension, list_input


def _write(root, names, data=b"x"):
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def _list(uri, **settings):
    result = list_input(InputConfig(uri=str(uri), **settings), {})
    return result.format, list(result.rows)


def test_lists_images_of_any_letter_case_with_relative_keys(tmp_path):
    _write(tmp_path, ("a/x.JPG", "b/x.jpg", "c/d/y.TiFf", "notes.txt", "z.webp", ".hidden/k.png"))
    fmt, rows = _list(tmp_path, extensions=("jpg", "tiff", "webp", "png"))
    assert fmt == "files"
    assert sorted(row["source_key"] for row in rows) == [
        ".hidden/k.png",
        "a/x.JPG",
        "b/x.jpg",
        "c/d/y.TiFf",
        "z.webp",
    ]
    by_key = {row["source_key"]: row for row in rows}
    assert by_key["a/x.JPG"]["source_uri"] == str(tmp_path / "a/x.JPG")
    assert by_key["a/x.JPG"]["image_id"] == image_id_for(str(tmp_path / "a/x.JPG"))
    assert len({row["image_id"] for row in rows}) == 5


def test_files_whose_name_starts_with_a_dot_are_skipped_and_counted(tmp_path, caplog):
    # What Finder and bsdtar leave beside each file copied from a Mac.
    _write(tmp_path, ("a.jpg", "._a.jpg", "b/.x.png", "b/y.png", "shards/._000.tar"))
    with caplog.at_level("WARNING", logger="pipeline.listing"):
        fmt, rows = _list(tmp_path, extensions=("jpg", "png"))
    assert fmt == "files"
    assert [row["source_key"] for row in rows] == ["a.jpg", "b/y.png"]
    assert "skipped 3 files under the input whose name starts with '.'" in caplog.text
    # Named on its own, such a file is what the user asked for.
    assert [row["source_key"] for row in _list(tmp_path / "._a.jpg")[1]] == ["._a.jpg"]


@pytest.mark.parametrize(("name", "fmt"), [("shard", "webdataset"), ("rows.bin", "parquet")])
def test_one_shard_without_a_shards_suffix_is_refused_naming_the_suffixes(tmp_path, name, fmt):
    _write(tmp_path, (name,))
    with pytest.raises(InputNotFoundError, match=rf"one {fmt} shard without a shard's suffix"):
        _list(tmp_path / name, format=fmt)
    _write(tmp_path, ("_x.TAR",))  # a shard's name, whatever else it holds
    assert _list(tmp_path / "_x.TAR", format="webdataset")[1][0]["shard_key"] == "_x.TAR"


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(InputNotFoundError, match="not a folder, prefix or file"):
        _list(tmp_path / "missing")


def test_extension_needs_a_dot():
    assert has_image_extension("a/b.PNG", ["png"]) and not has_image_extension("a/png", ["png"])


def test_auto_picks_webdataset_shards_and_skips_side_files(tmp_path):
    _write(tmp_path, ("s/000.tar", "s/001.tar", "s/_SUCCESS", "s/readme.md"))
    result = list_input(InputConfig(uri=str(tmp_path / "s")), {})
    assert result.format == "webdataset" and "2 .tar shards" in result.reason
    assert [row["shard_key"] for row in result.rows] == ["000.tar", "001.tar"]


def test_auto_prefers_images_and_says_what_it_ignored(tmp_path):
    _write(tmp_path, ("a.jpg", "b.tar"))
    result = list_input(InputConfig(uri=str(tmp_path)), {})
    assert result.format == "files" and "set input.format" in result.reason
    assert [row["source_key"] for row in result.rows] == ["a.jpg"]


def test_auto_tells_image_parquet_from_manifest_parquet_by_columns(tmp_path):
    (tmp_path / "images").mkdir()
    pq.write_table(pa.table({"image": [b"x"], "id": ["a"]}), tmp_path / "images/part-0.parquet")
    (tmp_path / "manifest").mkdir()
    pq.write_table(pa.table({"uri": ["s3://b/x.jpg"]}), tmp_path / "manifest/part-0.parquet")
    assert _list(tmp_path / "images")[0] == "parquet"
    fmt, rows = _list(tmp_path / "manifest")
    assert fmt == "manifest" and rows[0]["source_uri"] == "s3://b/x.jpg"
    pq.write_table(pa.table({"pixels": [b"x"]}), tmp_path / "other.parquet")
    with pytest.raises(InputNotFoundError, match=r"input\.image_column.*columns: pixels"):
        _list(tmp_path / "other.parquet")


def test_auto_with_nothing_recognisable_names_what_it_found(tmp_path):
    _write(tmp_path, ("notes.md", "data.bin"))
    with pytest.raises(InputNotFoundError, match=r"set input\.format or input\.extensions"):
        _list(tmp_path)


def test_text_manifest_resolves_relative_entries_and_drops_signatures(tmp_path):
    _write(tmp_path, ("pics/a.jpg",))
    signed = "https://bucket.example.com/k/b.jpg?X-Amz-Signature=abc&X-Amz-Credential=KEY"
    (tmp_path / "list.txt").write_text(
        f"# images to annotate\n\npics/a.jpg\n{signed}\ns3://other-bucket/c/d.png\n"
    )
    fmt, rows = _list(tmp_path / "list.txt")
    assert fmt == "manifest"
    assert [row["source_key"] for row in rows] == [
        "pics/a.jpg",
        "bucket.example.com/k/b.jpg",
        "other-bucket/c/d.png",
    ]
    assert rows[0]["fetch_uri"] == str(tmp_path / "pics/a.jpg")
    assert rows[1]["source_uri"] == "https://bucket.example.com/k/b.jpg"
    assert rows[1]["fetch_uri"] == signed
    assert "Signature" not in json.dumps(
        [{k: v for k, v in r.items() if k != "fetch_uri"} for r in rows]
    )
    assert rows[1]["image_id"] == image_id_for("https://bucket.example.com/k/b.jpg")


def test_manifests_in_two_folders_may_list_the_same_relative_name(tmp_path):
    _write(tmp_path, ("train/x.jpg", "val/x.jpg"))
    (tmp_path / "train/list.txt").write_text("x.jpg\n")
    (tmp_path / "val/list.txt").write_text("x.jpg\n")
    fmt, rows = _list(tmp_path, format="manifest")
    assert fmt == "manifest"
    assert sorted(row["source_key"] for row in rows) == ["train/x.jpg", "val/x.jpg"]
    assert len({row["image_id"] for row in rows}) == 2


def test_manifest_without_its_uri_column_names_the_key(tmp_path):
    buffer = io.BytesIO()
    pq.write_table(pa.table({"path": ["x.jpg"]}), buffer)
    (tmp_path / "m.parquet").write_bytes(buffer.getvalue())
    with pytest.raises(InputNotFoundError, match=r"input\.uri_column"):
        _list(tmp_path / "m.parquet", format="manifest")


def test_a_manifests_version_column_is_each_entrys_source_version(tmp_path):
    _write(tmp_path, ("a.jpg", "b.jpg", "c.jpg"))
    buffer = io.BytesIO()
    table = pa.table({"uri": ["a.jpg", "b.jpg", "c.jpg"], "md5": [b"\x01\xab", None, b""]})
    pq.write_table(table, buffer)
    (tmp_path / "m.parquet").write_bytes(buffer.getvalue())
    _, rows = _list(tmp_path / "m.parquet", format="manifest", version_column="md5")
    assert [row["source_version"] for row in rows] == ["01ab", "", ""]
    _, rows = _list(tmp_path / "m.parquet", format="manifest")
    assert {row["source_version"] for row in rows} == {""}  # immutable without the column
    with pytest.raises(InputNotFoundError, match=r"no column 'etag' \(input\.version_column\)"):
        _list(tmp_path / "m.parquet", format="manifest", version_column="etag")
    (tmp_path / "list.txt").write_text("a.jpg\n")
    with pytest.raises(InputNotFoundError, match=r"input\.version_column .* is text"):
        _list(tmp_path / "list.txt", version_column="md5")


def test_a_version_column_of_numbers_or_times_is_arrows_text_of_them(tmp_path):
    from datetime import UTC, datetime

    _write(tmp_path, ("a.jpg", "b.jpg"))
    modified = [datetime(2026, 12, 4, 10, 30, tzinfo=UTC), None]
    table = pa.table(
        {
            "uri": ["a.jpg", "b.jpg"],
            "size": [120, 7],
            "mtime": pa.array(modified, pa.timestamp("ns", "UTC")),
            "tags": [["x"], []],
        }
    )
    pq.write_table(table, tmp_path / "m.parquet")
    _, rows = _list(tmp_path / "m.parquet", format="manifest", version_column="size")
    assert [row["source_version"] for row in rows] == ["120", "7"]
    _, rows = _list(tmp_path / "m.parquet", format="manifest", version_column="mtime")
    assert [row["source_version"] for row in rows] == ["2026-12-04 10:30:00.000000000Z", ""]
    with pytest.raises(InputNotFoundError, match=r"'tags' of manifest .* holds list<"):
        _list(tmp_path / "m.parquet", format="manifest", version_column="tags")
    with pytest.raises(ValueError, match=r"'uri' is input\.uri_column too"):
        _list(tmp_path / "m.parquet", format="manifest", version_column="uri")


def test_an_image_a_manifest_names_twice_or_spelt_two_ways_is_listed_once(tmp_path, caplog):
    _write(tmp_path, ("imgs/a.jpg", "imgs/b.jpg"))
    absolute = str(tmp_path / "imgs/a.jpg")
    spellings = ["imgs/a.jpg", "./imgs/a.jpg", "imgs//a.jpg", absolute, f"file://{absolute}"]
    (tmp_path / "list.txt").write_text("\n".join([*spellings, "imgs/b.jpg", "imgs/a.jpg"]))
    with caplog.at_level("WARNING", logger="pipeline.listing"):
        _, rows = _list(tmp_path / "list.txt")
    assert [row["source_key"] for row in rows] == ["imgs/a.jpg", "imgs/b.jpg"]
    assert "5 manifest entries name an image an earlier entry named" in caplog.text


def test_an_entry_out_of_the_manifests_folder_is_the_file_its_full_path_names(tmp_path):
    _write(tmp_path, ("imgs/a.jpg",))
    (tmp_path / "lists").mkdir()
    absolute = str(tmp_path / "imgs/a.jpg")
    (tmp_path / "lists/list.txt").write_text(f"../imgs/a.jpg\n{absolute}\n")
    _, rows = _list(tmp_path / "lists/list.txt")
    assert [(row["fetch_uri"], row["source_key"]) for row in rows] == [
        (absolute, absolute.lstrip("/"))
    ]


def test_a_manifest_entry_climbing_out_of_its_bucket_is_left_as_written():
    from pipeline.listing import _climbed

    assert _climbed("s3://bucket/lists", "../imgs/a.jpg") == "s3://bucket/imgs/a.jpg"
    assert _climbed("s3://bucket/lists", "../../../a.jpg") is None
    assert _climbed("/data/lists", "../../../a.jpg") == "/a.jpg"


def test_a_utf8_manifest_saved_with_a_byte_order_mark_reads_its_first_entry(tmp_path):
    _write(tmp_path, ("a.jpg", "b.jpg"))
    (tmp_path / "list.txt").write_bytes(b"\xef\xbb\xbfa.jpg\nb.jpg\n")
    _, rows = _list(tmp_path / "list.txt")
    assert [row["source_key"] for row in rows] == ["a.jpg", "b.jpg"]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le"])  # with and without its BOM
def test_a_utf16_manifest_is_one_clear_error_not_rows_of_junk(tmp_path, encoding):
    (tmp_path / "list.txt").write_bytes("a.jpg\nb.jpg\n".encode(encoding))
    with pytest.raises(InputNotFoundError, match=r"list\.txt is UTF-16 text: save it as UTF-8"):
        _list(tmp_path / "list.txt")


@pytest.mark.parametrize("content", [b"", b"PAR1 not really"], ids=["empty", "corrupt"])
def test_a_parquet_file_that_cannot_be_read_is_one_clear_error(tmp_path, content):
    (tmp_path / "x.parquet").write_bytes(content)
    with pytest.raises(InputNotFoundError, match=r"x\.parquet is not a readable Parquet file"):
        _list(tmp_path)  # auto: its columns decide what it is
    with pytest.raises(InputNotFoundError, match=r"x\.parquet is not a readable Parquet file"):
        _list(tmp_path, format="manifest")


def test_a_fifo_under_the_input_is_skipped_not_waited_on(tmp_path, caplog):
    _write(tmp_path, ("a.jpg",))
    os.mkfifo(tmp_path / "p.jpg")  # a read would wait for a writer forever
    with caplog.at_level("WARNING", logger="pipeline.listing"):
        _, rows = _list(tmp_path)
    assert [row["source_key"] for row in rows] == ["a.jpg"]
    assert "skipped 1 entries under the input that are not regular files" in caplog.text


def test_a_link_to_a_folder_is_named_in_a_warning_not_followed(tmp_path, caplog):
    _write(tmp_path, ("input/a.jpg", "elsewhere/x.jpg"))
    (tmp_path / "input" / "linked").symlink_to(tmp_path / "elsewhere")
    with caplog.at_level("WARNING", logger="pipeline.listing"):
        _, rows = _list(tmp_path / "input")
    assert [row["source_key"] for row in rows] == ["a.jpg"]
    assert "skipped 1 symbolic links to folders under the input" in caplog.text
    assert "not regular files" not in caplog.text


def test_links_to_files_are_listed_with_their_targets_version(tmp_path, caplog):
    _write(tmp_path, ("elsewhere/t.jpg", "elsewhere/folder/x.jpg"), data=b"first")
    (tmp_path / "input").mkdir()
    (tmp_path / "input" / "absolute.jpg").symlink_to(tmp_path / "elsewhere" / "t.jpg")
    (tmp_path / "input" / "relative.jpg").symlink_to("../elsewhere/t.jpg")
    (tmp_path / "input" / "relative-folder").symlink_to("../elsewhere/folder")
    (tmp_path / "input" / "nowhere.jpg").symlink_to("missing.jpg")
    with caplog.at_level("WARNING", logger="pipeline.listing"):
        _, rows = _list(tmp_path / "input")
    # A link that leads nowhere is listed, so its read failure is an error row.
    assert [row["source_key"] for row in rows] == ["absolute.jpg", "nowhere.jpg", "relative.jpg"]
    assert "skipped 1 symbolic links to folders under the input" in caplog.text
    assert "not regular files" not in caplog.text

    target = tmp_path / "elsewhere" / "t.jpg"
    target.write_bytes(b"an edit of another size")
    _, edited = _list(tmp_path / "input")
    versions = {row["source_key"]: row["source_version"] for row in rows}
    for row in edited:
        changed = row["source_version"] != versions[row["source_key"]]
        assert changed == (row["source_key"] != "nowhere.jpg"), row["source_key"]
    assert f"size:{target.stat().st_size}," in edited[0]["source_version"]


def test_a_linked_shard_is_listed(tmp_path):
    _write(tmp_path, ("elsewhere/s0.tar",))
    (tmp_path / "input").mkdir()
    (tmp_path / "input" / "s0.tar").symlink_to("../elsewhere/s0.tar")
    fmt, rows = _list(tmp_path / "input", format="webdataset")
    assert fmt == "webdataset"
    assert [row["shard_key"] for row in rows] == ["s0.tar"]


def test_s3_listing_in_key_ranges_matches_the_walk(s3_endpoint, monkeypatch):
    """Pages of 7 keys: the walk's first pages, then ranges split off and listed at once."""
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("listing-pages")
    keys = sorted(
        [f"p/{index:03d}.jpg" for index in range(60)]
        + ["p/sub/z.png", "p/été.jpg", "p/字/x.jpg", "p/a", "p/a/b.jpg", "q/outside.jpg"]
    )
    for key in keys:
        fs.pipe_file(f"listing-pages/{key}", b"x")
    monkeypatch.setattr(s3_listing, "PAGE_KEYS", 7)
    # One character level of ranges: found within the walk's first pages here.
    monkeypatch.setattr(s3_listing, "RANGES_PER_REQUEST", 1)
    ranges_split_off = []
    split_range = s3_listing.split_range

    async def recorded_split(*args, **kwargs):
        ranges_split_off.append(await split_range(*args, **kwargs))
        return ranges_split_off[-1]

    monkeypatch.setattr(s3_listing, "split_range", recorded_split)
    options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    inside = [key[2:] for key in keys if key.startswith("p/")]
    for concurrency in (1, 4):
        config = InputConfig(
            uri="s3://listing-pages/p", format="files", list_concurrency=concurrency
        )
        objects = list(listing.iter_objects(fs, "listing-pages/p", concurrency))
        assert [stored.path for stored in objects] == [f"listing-pages/p/{key}" for key in inside]
        assert all(stored.version.startswith("etag:") for stored in objects)
        rows = list(list_input(config, options).rows)
        assert [row["source_key"] for row in rows] == [
            k for k in inside if k.endswith((".jpg", ".png"))
        ]
    assert rows[0]["source_uri"] == "s3://listing-pages/p/000.jpg"
    # The split ran on moto and found ranges (p/0…, p/a, p/s…, p/é…, p/字…).
    assert ranges_split_off and all(len(items) > 3 for items in ranges_split_off)
    fs.rm("listing-pages", recursive=True)


def test_an_output_inside_the_input_is_not_listed(tmp_path):
    _write(
        tmp_path, ("a.jpg", "out/depth/a.jpg.0123abcd.png", "out/report/thumbs/x.jpg", "outer.jpg")
    )
    listing = list_input(InputConfig(uri=str(tmp_path)), {}, output_uri=f"{tmp_path}/out/")
    assert sorted(row["source_key"] for row in listing.rows) == ["a.jpg", "outer.jpg"]
    with pytest.raises(InputNotFoundError, match=r"output\.uri is input\.uri"):
        list_input(InputConfig(uri=str(tmp_path)), {}, output_uri=f"file://{tmp_path}//")


def test_an_output_inside_the_input_through_a_link_is_not_listed(tmp_path):
    _write(tmp_path, ("data/a.jpg", "data/out/depth/a.jpg.0123abcd.png"))
    (tmp_path / "by-link").symlink_to(tmp_path / "data")
    (tmp_path / "out-link").symlink_to(tmp_path / "data" / "out")
    for input_uri, output_uri in (
        (tmp_path / "by-link", tmp_path / "data" / "out"),
        (tmp_path / "data", tmp_path / "out-link"),
    ):
        listing = list_input(InputConfig(uri=str(input_uri)), {}, output_uri=str(output_uri))
        assert [row["source_key"] for row in listing.rows] == ["a.jpg"], (input_uri, output_uri)
    with pytest.raises(InputNotFoundError, match=r"output\.uri is input\.uri"):
        list_input(
            InputConfig(uri=str(tmp_path / "by-link")), {}, output_uri=str(tmp_path / "data")
        )


def test_one_folder_spelt_two_ways_gives_the_same_ids(tmp_path):
    _write(tmp_path, ("images/a.jpg",))
    plain = _list(tmp_path / "images")[1]
    assert _list(f"{tmp_path}/./images//")[1] == plain
    assert _list(f"{tmp_path}/images/../images")[1] == plain


def test_names_that_are_not_utf8_become_error_rows_not_a_stopped_job(tmp_path):
    import os

    from pipeline.read import ShardInput, read_batch, read_shard

    _write(tmp_path / "files", ("good.jpg",))
    (tmp_path / "shards").mkdir()
    for folder, name in (("files", b"\xff\xfebad.jpg"), ("shards", b"\xffs.tar")):
        with open(os.path.join(os.fsencode(tmp_path / folder), name), "wb") as file:
            file.write(b"x")
    (tmp_path / "list.txt").write_bytes(b"files/good.jpg\nfiles/\xe9.jpg\n")

    _, rows = _list(tmp_path / "files")
    _, shard_rows = _list(tmp_path / "shards", format="webdataset")
    _, manifest_rows = _list(tmp_path / "list.txt")
    for listed in (rows, shard_rows, manifest_rows):
        block = pa.Table.from_pylist(listed)  # where the job used to stop
        assert "\\x" in json.dumps(block.to_pylist())
    by_key = {row["source_key"]: row for row in rows}
    assert by_key["\\xff\\xfebad.jpg"]["listing_error"].startswith("list: name is not valid UTF-8")
    assert by_key["good.jpg"]["listing_error"] == ""

    def columns(listed):
        return {key: [row[key] for row in listed] for key in listed[0]}

    read = read_batch(columns(rows), {})
    assert sorted(read["status"].tolist()) == ["error", "ok"]
    assert "listing_error" not in read
    read = read_batch(columns(manifest_rows), {})
    assert read["status"].tolist() == ["ok", "error"]
    assert read["error"][1].startswith("list: name is not valid UTF-8")
    shard_input = ShardInput("webdataset", ("jpg",), "image", None)
    [shard] = read_shard(columns(shard_rows), shard_input, storage_options={}, rows_per_batch=4)
    assert shard["status"].tolist() == ["error"]
    assert shard["source_uri"][0].endswith("/\\xffs.tar")


def test_closing_an_s3_listing_stops_its_ranges(s3_endpoint, monkeypatch):
    """input.limit: once the rows wanted are in, the ranges stop listing ahead."""
    import itertools
    import time

    import s3fs

    from pipeline.bench.fault_proxy import FaultInjectingProxy

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("listing-closed")
    for letter in "abcdefgh":
        for index in range(30):
            fs.pipe_file(f"listing-closed/{letter}/{index:02d}.jpg", b"x")
    monkeypatch.setattr(s3_listing, "PAGE_KEYS", 2)  # 120 pages
    monkeypatch.setattr(s3_listing, "RANGES_PER_REQUEST", 1)
    with FaultInjectingProxy(s3_endpoint, delay_s=0.05) as proxy:
        options = {"client_kwargs": {"endpoint_url": proxy.endpoint}}
        config = InputConfig(uri="s3://listing-closed", format="files", list_concurrency=4)
        result = list_input(config, options)
        taken = list(itertools.islice(result.rows, 100))
        result.close()
        # The proxy counts a request once its delay is over: those already on
        # their way when the listing closed (4 at most) are counted after it.
        when_closed = proxy.forwarded
        time.sleep(0.3)
        settled = proxy.forwarded
        time.sleep(0.6)
        assert proxy.forwarded == settled
        assert settled - when_closed <= 4
    assert [row["source_key"] for row in taken][-1] == "d/09.jpg"
    fs.rm("listing-closed", recursive=True)


@pytest.mark.parametrize(
    ("endpoint_url", "concurrency"),
    [
        (None, listing.AWS_LIST_CONCURRENCY),
        ("https://s3.us-west-2.amazonaws.com", listing.AWS_LIST_CONCURRENCY),
        ("https://bucket.vpce-0a1b.s3.us-east-1.vpce.amazonaws.com", listing.AWS_LIST_CONCURRENCY),
        ("http://127.0.0.1:9000", 1),
        ("https://minio.example.org", 1),
        ("https://acct.r2.cloudflarestorage.com", 1),
    ],
)
def test_key_ranges_are_listed_at_once_by_default_on_aws_only(endpoint_url, concurrency):
    """Gateways over a filesystem have listed folder by folder, where a split loses
    keys unseen: other endpoints are walked unless input.list_concurrency is set.
    (Making the client sends no request.)"""
    import fsspec.asyn
    import s3fs

    client_kwargs = {"endpoint_url": endpoint_url} if endpoint_url else {}
    fs = s3fs.S3FileSystem(anon=True, client_kwargs=client_kwargs, skip_instance_cache=True)
    found = fsspec.asyn.sync(fs.loop, listing._default_list_concurrency, fs, "bucket")
    assert found == concurrency


def test_an_object_without_an_etag_has_the_same_version_listed_either_way():
    """Its version is size and time: s3fs's entries say "size", ListObjectsV2's "Size"."""
    import datetime

    stamp = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    listed = {"Key": "p/a.jpg", "Size": 123, "LastModified": stamp}
    from_s3fs = {**listed, "size": 123, "type": "file", "name": "b/p/a.jpg"}
    assert listing.object_version(listed) == listing.object_version(from_s3fs)
    assert "size:123," in listing.object_version(listed)


# SIGINT gets Python's handler first: a child of a shell that ran the suite in
# the background inherits SIGINT ignored, and interrupt_main then does nothing.
_INTERRUPTED_LISTING = """
import _thread, signal, threading
import s3fs
from pipeline import listing
from pipeline.bench.fault_proxy import FaultInjectingProxy
from pipeline.bench.listing_server import endpoint_of, listing_server

signal.signal(signal.SIGINT, signal.default_int_handler)
with listing_server("bucket", "p/", 20000) as server:
    with FaultInjectingProxy(endpoint_of(server), delay_s=1.0) as proxy:
        fs = s3fs.S3FileSystem(anon=True, client_kwargs={"endpoint_url": proxy.endpoint})
        threading.Timer(0.5, _thread.interrupt_main).start()
        try:
            for _ in listing.iter_objects(fs, "bucket/p", 8):
                pass
        except BaseException as error:
            print(type(error).__name__)
"""


@pytest.mark.slow
def test_ctrl_c_while_a_page_is_awaited_is_a_keyboard_interrupt():
    """Not the RuntimeError of closing a listing caught mid-step."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _INTERRUPTED_LISTING],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.stdout.strip().splitlines()[-1:] == ["KeyboardInterrupt"], (
        done.returncode,
        done.stderr[-2000:],
    )
