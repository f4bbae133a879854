import gzip
import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.shards import ShardError, iter_parquet_images, iter_webdataset, split_member_name

EXTENSIONS = ("jpg", "png")


def tar_bytes(members: list[tuple[str, bytes]], compress: bool = False) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return gzip.compress(buffer.getvalue()) if compress else buffer.getvalue()


SAMPLES = [
    ("a/000.jpg", b"jpeg-0"),
    ("a/000.json", b'{"caption": "a cat"}'),
    ("a/000.cls", b"3"),
    ("a/001.seg.png", b"mask"),
    ("a/001.png", b"png-1"),
    ("a/002.json", b"{}"),
    ("./003.JPG", b"jpeg-3"),
]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a/000123.seg.png", ("a/000123", "seg.png")),
        ("./x.JPG", ("x", "jpg")),
        ("noext", ("noext", "")),
        ("d.1/k.txt", ("d.1/k", "txt")),
    ],
)
def test_member_names_split_at_the_first_dot_of_the_file_name(name, expected):
    assert split_member_name(name) == expected


@pytest.mark.parametrize("compress", [False, True])
def test_webdataset_groups_members_into_samples(compress):
    samples = list(iter_webdataset(io.BytesIO(tar_bytes(SAMPLES, compress)), EXTENSIONS))
    assert [s.sample_id for s in samples] == ["a/000", "a/001", "a/002", "003"]
    first, second, no_image, last = samples
    assert (first.name, first.data) == ("a/000.jpg", b"jpeg-0")
    assert json.loads(first.metadata) == {"cls": "3", "json": {"caption": "a cat"}}
    # "seg.png" is not an image extension; the sample's "png" member is its image.
    assert (second.name, second.data, second.metadata) == ("a/001.png", b"png-1", None)
    assert no_image.data is None and "no image member (extensions found: json)" in no_image.problem
    assert (last.name, last.data) == ("003.JPG", b"jpeg-3")


def test_a_member_appended_again_under_its_name_replaces_the_first_copy():
    # What `tar -rf` leaves when it adds an updated file: tar extracts the last copy.
    members = [
        ("000.jpg", b"stale"),
        ("000.png", b"other image"),
        ("000.json", b'{"v": 1}'),
        ("000.jpg", b"updated"),
        ("000.json", b'{"v": 2}'),
    ]
    [sample] = iter_webdataset(io.BytesIO(tar_bytes(members)), EXTENSIONS)
    assert (sample.name, sample.data) == ("000.jpg", b"updated")  # first image member's place
    assert json.loads(sample.metadata) == {"json": {"v": 2}}


def test_side_members_are_json_txt_and_cls_not_names_ending_so():
    members = [
        ("0.jpg", b"jpeg"),
        ("0.seg.json", b"{}"),
        ("0.geojson", b"{}"),
        ("0.notxt", b"x"),
        ("0.txt", b"caption"),
    ]
    [sample] = iter_webdataset(io.BytesIO(tar_bytes(members)), EXTENSIONS)
    assert json.loads(sample.metadata) == {"seg.json": {}, "txt": "caption"}


def test_hidden_members_such_as_macos_resource_forks_are_not_samples():
    # What bsdtar on macOS writes beside each file, unless COPYFILE_DISABLE=1.
    members = [
        ("./._000.jpg", b"\x00\x05\x16\x07AppleDouble"),
        ("./000.jpg", b"jpeg-0"),
        ("a/.DS_Store", b"Bud1"),
        ("a/._001.jpg", b"\x00\x05\x16\x07AppleDouble"),
        ("a/001.jpg", b"jpeg-1"),
    ]
    samples = list(iter_webdataset(io.BytesIO(tar_bytes(members)), EXTENSIONS))
    assert [(s.sample_id, s.data, s.problem) for s in samples] == [
        ("000", b"jpeg-0", None),
        ("a/001", b"jpeg-1", None),
    ]


def test_truncated_tar_yields_what_it_can_then_fails():
    data = tar_bytes([(f"{i:03d}.jpg", bytes(3000)) for i in range(4)])
    stream = iter_webdataset(io.BytesIO(data[:6000]), EXTENSIONS)
    assert next(stream).sample_id == "000"
    with pytest.raises(ShardError, match="truncated or corrupt"):
        list(stream)


# Each member here is a 512-byte header and 1024 bytes of data.
MEMBER_BYTES = 1536
CUTS = {
    "at a member boundary": 2 * MEMBER_BYTES,
    "inside a header": 2 * MEMBER_BYTES + 100,
    "with every member but no end marker": 4 * MEMBER_BYTES,
}


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("cut", CUTS.values(), ids=CUTS.keys())
def test_a_tar_cut_where_a_header_belongs_fails_rather_than_looking_shorter(cut, compress):
    whole = tar_bytes([(f"{i:03d}.jpg", bytes(1000)) for i in range(4)])
    data = gzip.compress(whole[:cut]) if compress else whole[:cut]
    read = []
    with pytest.raises(ShardError, match=r"truncated or corrupt: .*byte"):
        read.extend(sample.sample_id for sample in iter_webdataset(io.BytesIO(data), EXTENSIONS))
    # The last sample read is held back: its other members may be the ones cut.
    assert read == [f"{i:03d}" for i in range(cut // MEMBER_BYTES - 1)]


def test_a_cut_after_a_long_name_header_says_where_in_the_tar():
    long_name = "d" * 150 + "/000.jpg"  # over 100 characters: a pax header holds it
    whole = tar_bytes([(long_name, bytes(1000)), ("001.jpg", bytes(1000))])
    data = whole[:1024]  # the long-name header and its data block, no member header
    with pytest.raises(ShardError, match="ends at byte 1024 without the end-of-archive"):
        list(iter_webdataset(io.BytesIO(data), EXTENSIONS))


def test_a_corrupt_compressed_shard_is_a_shard_error_wherever_the_damage_is():
    # zlib and lzma raise errors of their own (neither OSError nor ValueError):
    # one had stopped the job instead of becoming the shard's error row.
    import lzma

    members = [(f"{i}.jpg", b"abc%d" % i * 5000) for i in range(6)]
    plain = tar_bytes(members)
    for whole in (gzip.compress(plain), lzma.compress(plain)):
        outcomes = set()
        for position in range(10, len(whole) - 10):
            damaged = bytearray(whole)
            damaged[position : position + 8] = b"\xa5\x5a" * 4
            try:
                list(iter_webdataset(io.BytesIO(bytes(damaged)), EXTENSIONS))
                outcomes.add("read")
            except ShardError:
                outcomes.add("shard error")
        assert "shard error" in outcomes


def test_a_gzip_of_several_members_is_read_to_its_end():
    # bgzip writes such files, as does joining gzipped pieces; gzip(1) reads them whole.
    whole = tar_bytes([(f"{i:03d}.jpg", bytes(1000)) for i in range(4)])
    pieces = gzip.compress(whole[: 2 * MEMBER_BYTES]) + gzip.compress(whole[2 * MEMBER_BYTES :])
    samples = iter_webdataset(io.BytesIO(pieces), EXTENSIONS)
    assert [sample.sample_id for sample in samples] == ["000", "001", "002", "003"]


def test_a_corrupt_header_halfway_fails_rather_than_ending_the_tar():
    data = bytearray(tar_bytes([(f"{i:03d}.jpg", bytes(1000)) for i in range(4)]))
    data[2 * MEMBER_BYTES + 10] ^= 0xFF  # inside the third member's name: its checksum fails
    with pytest.raises(ShardError, match="bad header at byte 3072"):
        list(iter_webdataset(io.BytesIO(bytes(data)), EXTENSIONS))


def test_a_tar_with_only_its_end_marker_after_the_last_member_is_whole():
    whole = tar_bytes([(f"{i:03d}.jpg", bytes(1000)) for i in range(4)])
    # One zero block ends a tar; writers add a second one and pad to 10 KiB.
    samples = iter_webdataset(io.BytesIO(whole[: 4 * MEMBER_BYTES + 512]), EXTENSIONS)
    assert [sample.sample_id for sample in samples] == ["000", "001", "002", "003"]


def test_an_empty_file_is_not_a_tar():
    with pytest.raises(ShardError, match="the file is empty"):
        list(iter_webdataset(io.BytesIO(b""), EXTENSIONS))


def test_bytes_that_are_not_a_tar_fail_clearly():
    with pytest.raises(ShardError, match="tar shard"):
        list(iter_webdataset(io.BytesIO(b"<html>not found</html>" * 40), EXTENSIONS))


def _parquet(table: pa.Table) -> io.BytesIO:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=3)
    buffer.seek(0)
    return buffer


def test_parquet_images_by_row_number_from_binary_column():
    table = pa.table({"image": [b"i0", None, b"i2", b"i3"], "caption": ["a", "b", "c", "d"]})
    images = list(iter_parquet_images(_parquet(table), "image", None, batch_rows=2))
    assert [(i.sample_id, i.data) for i in images] == [
        ("0", b"i0"),
        ("1", None),
        ("2", b"i2"),
        ("3", b"i3"),
    ]
    assert images[1].problem == "column 'image' is null"


def test_parquet_images_from_hugging_face_struct_column_with_ids():
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "img": pa.array(
                [{"bytes": b"a", "path": "a.jpg"}, {"bytes": None, "path": "b.jpg"}],
                type=image_type,
            ),
            "key": ["k-a", "k-b"],
        }
    )
    images = list(iter_parquet_images(_parquet(table), "img", "key"))
    assert [(i.sample_id, i.name, i.data) for i in images] == [
        ("k-a", "k-a", b"a"),
        ("k-b", "k-b", None),
    ]
    assert images[1].problem == (
        "column 'img' holds a path, not image bytes (images stored by path are not read): 'b.jpg'"
    )


def test_parquet_rows_with_a_null_or_repeated_id_are_error_rows_by_row_number():
    table = pa.table({"image": [b"a", b"b", b"c", b"d"], "id": ["x", None, "x", "y"]})
    images = list(iter_parquet_images(_parquet(table), "image", "id", batch_rows=2))
    assert [(i.sample_id, i.data is not None) for i in images] == [
        ("x", True),
        ("row-1", False),
        ("row-2", False),
        ("y", True),
    ]
    assert images[1].problem == "id column 'id' is null"
    assert images[2].problem == "id 'x' (column 'id') repeats row 0's"


def test_a_row_number_name_never_takes_a_real_ids_place():
    ids = ["row-1~1", None, "row-1", "row-2", "row-2", "7", "7"]
    table = pa.table({"image": [bytes([n]) for n in range(7)], "id": ids})
    images = list(iter_parquet_images(_parquet(table), "image", "id", batch_rows=2))
    assert [(i.sample_id, i.data is not None) for i in images] == [
        ("row-1~1", True),
        ("row-1~2", False),  # row-1 and row-1~1 are ids of the file, one of them still to come
        ("row-1", True),
        ("row-2", True),
        ("row-4", False),
        ("7", True),
        ("row-6", False),
    ]
    assert len({image.sample_id for image in images}) == len(images)
    numbered = pa.table({"image": [b"a", b"b"], "id": pa.array([None, 5], pa.int64())})
    assert [i.sample_id for i in iter_parquet_images(_parquet(numbered), "image", "id")] == [
        "row-0",
        "5",
    ]


def test_parquet_without_the_configured_column_names_the_key():
    table = pa.table({"pixels": [b"x"]})
    with pytest.raises(ShardError, match=r"no column 'image' \(input.image_column\).*pixels"):
        list(iter_parquet_images(_parquet(table), "image", None))
    with pytest.raises(ShardError, match=r"input.id_column"):
        list(iter_parquet_images(_parquet(table), "pixels", "id"))


def test_parquet_of_text_not_bytes_is_a_per_row_problem():
    images = list(iter_parquet_images(_parquet(pa.table({"image": ["path.jpg"]})), "image", None))
    assert images[0].data is None and "holds str" in images[0].problem


def test_corrupt_parquet_fails_clearly():
    with pytest.raises(ShardError, match="Parquet"):
        list(iter_parquet_images(io.BytesIO(b"PAR1 garbage"), "image", None))


def test_a_json_member_that_does_not_parse_is_kept_as_text():
    members = [("k.jpg", b"jpeg"), ("k.json", b"{oops"), ("k.txt", b"a cap")]
    [sample] = list(iter_webdataset(io.BytesIO(tar_bytes(members)), EXTENSIONS))
    assert json.loads(sample.metadata) == {"json": "{oops", "txt": "a cap"}
    deep = b"[" * 100_000 + b"]" * 100_000
    for odd in (deep, b'{"a": NaN}'):
        members = [("k.jpg", b"jpeg"), ("k.json", odd)]
        [sample] = list(iter_webdataset(io.BytesIO(tar_bytes(members)), EXTENSIONS))
        assert json.loads(sample.metadata, parse_constant=pytest.fail) == {"json": odd.decode()}


def test_a_linked_image_member_is_an_error_row_not_a_gap():
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in [("a.jpg", b"jpeg-a"), ("b.json", b"{}")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("b.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
    samples = list(iter_webdataset(io.BytesIO(buffer.getvalue()), EXTENSIONS))
    assert [(s.sample_id, s.data) for s in samples] == [("a", b"jpeg-a"), ("b", None)]
    assert samples[1].problem == "image member is a link, not a file: b.jpg"


def test_members_over_the_byte_limit_are_problems_left_unread():
    members = [("a.jpg", bytes(100)), ("a.json", b"{}"), ("b.jpg", bytes(11)), ("c.jpg", b"jpeg")]
    samples = list(iter_webdataset(io.BytesIO(tar_bytes(members)), EXTENSIONS, 10))
    assert [(s.sample_id, s.data) for s in samples] == [("a", None), ("b", None), ("c", b"jpeg")]
    assert samples[0].problem == "image over decode.max_image_bytes (10): 100 bytes"
    assert [s.has_image for s in samples] == [False, False, True]  # not counted for markers
    assert json.loads(samples[0].metadata) == {"json": {}}  # side members still travel
    # A sample's other image member is taken where the first is too large.
    members = [("k.png", bytes(100)), ("k.jpg", b"small")]
    [sample] = list(iter_webdataset(io.BytesIO(tar_bytes(members)), EXTENSIONS, 10))
    assert (sample.name, sample.data, sample.problem) == ("k.jpg", b"small", None)


def test_parquet_images_over_the_byte_limit_are_per_row_problems():
    table = pa.table({"image": [bytes(11), b"ok"]})
    images = list(iter_parquet_images(_parquet(table), "image", None, max_image_bytes=10))
    assert [image.data for image in images] == [None, b"ok"]
    assert images[0].problem == "image over decode.max_image_bytes (10): 11 bytes"
    assert [image.has_image for image in images] == [False, True]


def test_member_names_that_are_not_utf8_keep_their_images_under_escaped_names():
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT, encoding="latin-1") as t:
        for name, data in (("b\xe9d.jpg", b"jpeg"), ("b\xe9d.json", b'{"a": 1}')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    [sample] = list(iter_webdataset(io.BytesIO(buffer.getvalue()), EXTENSIONS))
    assert (sample.sample_id, sample.name, sample.data) == ("b\\xe9d", "b\\xe9d.jpg", b"jpeg")
    assert json.loads(sample.metadata) == {"json": {"a": 1}}
    sample.sample_id.encode("utf-8")  # storable: Arrow refuses surrogates


def test_a_key_that_comes_back_later_in_the_tar_is_its_own_error_sample():
    members = [("a.jpg", b"jpeg-a"), ("b.jpg", b"jpeg-b"), ("a.json", b"{}"), ("c.jpg", b"c")]
    samples = list(iter_webdataset(io.BytesIO(tar_bytes(members)), EXTENSIONS))
    assert [(s.sample_id, s.data, s.has_image) for s in samples] == [
        ("a", b"jpeg-a", True),
        ("b", b"jpeg-b", True),
        ("a@member-2", None, False),
        ("c", b"c", True),
    ]
    assert "repeats an earlier sample's" in samples[2].problem


def test_a_repeated_keys_name_is_no_other_samples_key():
    members = [
        ("a@member-3.jpg", b"1"),  # a real key the repeat's name would take
        ("a.jpg", b"2"),
        ("b.jpg", b"3"),
        ("a.jpg", b"4"),  # repeats "a"
        ("a@member-3~1.jpg", b"5"),  # a key equal to the name that repeat was given
    ]
    samples = list(iter_webdataset(io.BytesIO(tar_bytes(members)), EXTENSIONS))
    assert [(s.sample_id, s.data) for s in samples] == [
        ("a@member-3", b"1"),
        ("a", b"2"),
        ("b", b"3"),
        ("a@member-3~1", None),
        ("a@member-3~1@member-4", None),
    ]
