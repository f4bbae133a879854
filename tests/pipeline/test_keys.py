import posixpath

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.keys import (
    annotation_tag,
    image_id_for,
    map_file_key,
    output_key_for,
    shard_member_uri,
    shard_uris,
    split_shard_member,
)

source_keys = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=40
)
TAG = "0123abcd"


@settings(max_examples=500)
@given(source_keys, source_keys)
def test_output_keys_are_injective(first, second):
    if first != second:
        assert output_key_for(first) != output_key_for(second)


@settings(max_examples=500)
@given(source_keys)
def test_output_key_stays_under_the_prefix(source_key):
    key = map_file_key("depth", source_key, TAG)
    assert not key.startswith("/") and "\\" not in key and "\x00" not in key
    normalised = posixpath.normpath(posixpath.join("/out", key))
    assert normalised.startswith("/out/depth/")
    assert all(segment not in (".", "..", "") for segment in key.split("/"))


def test_same_name_in_two_folders_does_not_collide():
    assert map_file_key("depth", "a/x.jpg", TAG) != map_file_key("depth", "b/x.jpg", TAG)
    assert map_file_key("depth", "x.jpg", TAG) != map_file_key("depth", "x.png", TAG)


def test_each_image_version_and_config_gets_its_own_map_file():
    tag = annotation_tag(image_id_for("s3://b/x.jpg"), '"etag-1"', "config-a")
    assert len(tag) == 8 and int(tag, 16) >= 0
    assert tag == annotation_tag(image_id_for("s3://b/x.jpg"), '"etag-1"', "config-a")
    others = [
        annotation_tag(image_id_for("s3://b/x.jpg"), '"etag-2"', "config-a"),  # image changed
        annotation_tag(image_id_for("s3://b/x.jpg"), '"etag-1"', "config-b"),  # other models
        annotation_tag(
            image_id_for("s3://c/x.jpg"), '"etag-1"', "config-a"
        ),  # same key, other image
    ]
    assert len({tag, *others}) == 4
    assert annotation_tag("id", None, "config-a") == annotation_tag("id", "", "config-a")


def test_spaces_and_non_ascii_survive_as_written():
    assert map_file_key("depth", "Straße/café photo.jpg", TAG) == (
        f"depth/Straße/café photo.jpg.{TAG}.png"
    )


def test_escaping_keys_are_neutralised():
    assert (
        map_file_key("depth", "../../etc/passwd", TAG)
        == f"depth/%2E%2E/%2E%2E/etc/passwd.{TAG}.png"
    )
    assert map_file_key("depth", "/abs/x.jpg", TAG) == f"depth/%/abs/x.jpg.{TAG}.png"
    assert map_file_key("segmentation", "a\\..\\b\x00.jpg", TAG) == (
        f"segmentation/a%5C..%5Cb%00.jpg.{TAG}.png"
    )


def test_image_id_is_stable_and_distinct():
    assert image_id_for("s3://bucket/a.jpg") == image_id_for("s3://bucket/a.jpg")
    assert image_id_for("s3://bucket/a.jpg") != image_id_for("s3://bucket/b.jpg")
    assert len(image_id_for("x")) == 32


def test_a_shard_member_splits_after_the_shard_suffix_not_at_any_hash():
    assert split_shard_member("s3://b/set#1/a-000.tar#x/002") == ("s3://b/set#1/a-000.tar", "x/002")
    assert split_shard_member("s3://b/d/train.PARQUET#u#1") == ("s3://b/d/train.PARQUET", "u#1")
    member = shard_member_uri("s3://b/a.tar.gz", "k")
    assert split_shard_member(member) == ("s3://b/a.tar.gz", "k")
    # An image file whose name holds "#" is not in a shard.
    assert split_shard_member("s3://b/photos/best#1.jpg") is None
    assert split_shard_member("/data/tar#ball.png") is None


def test_shard_uris_is_split_shard_member_for_a_column():
    uris = [
        "s3://b/set#1/a-000.tar#x/002",
        "s3://b/d/train.PARQUET#u#1",
        "s3://b/photos/best#1.jpg",
        "/data/tar#ball.png",
        "s3://b/a.tgz#\nk",
        "s3://b/plain.jpg",
    ]
    expected = [(split_shard_member(uri) or (None,))[0] for uri in uris]
    assert shard_uris(pa.array(uris)).to_pylist() == expected
    assert expected[:2] == ["s3://b/set#1/a-000.tar", "s3://b/d/train.PARQUET"]


def test_a_name_over_255_bytes_is_cut_keeping_its_tag_and_its_distinctness():
    long_name = "é" * 120 + ".jpg"  # 244 bytes: with its tag and suffix, over 255
    key = map_file_key("depth", f"photos/{long_name}", TAG)
    folder, name = key.rsplit("/", 1)
    assert folder == "depth/photos"
    assert len(name.encode()) <= 255 and name.endswith(f".{TAG}.png")
    assert name.startswith("é" * 100) and "\ufffd" not in name  # no character cut in two
    other = map_file_key("depth", f"photos/{'é' * 120}.png", TAG)
    assert other != key
    # A folder that percent-encoding grew past the limit: cut and hashed, kept distinct.
    folders = {map_file_key("depth", f"{'#' * 90}{end}/x.jpg", TAG) for end in "ab"}
    assert len(folders) == 2
    assert all(len(part.encode()) <= 255 for key in folders for part in key.split("/"))
    # Names that fit are as before.
    assert map_file_key("depth", "a/x.jpg", TAG) == f"depth/a/x.jpg.{TAG}.png"


@settings(max_examples=300)
@given(st.lists(st.text(alphabet="ab%#é", min_size=80, max_size=300), min_size=2, max_size=2))
def test_map_keys_of_long_names_are_injective_and_fit(names):
    keys = [map_file_key("segmentation", f"d/{name}", TAG) for name in names]
    assert all(len(part.encode()) <= 255 for key in keys for part in key.split("/"))
    assert (keys[0] == keys[1]) == (names[0] == names[1])
