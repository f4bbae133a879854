import os
import time
from datetime import timedelta

import pytest

from pipeline.output.view import iter_predictions, read_predictions
from pipeline.storage import filesystem_for
from tests.pipeline.output.parts import T0, row, write_part


def test_shard_markers_name_the_shard_version_and_its_image_count(tmp_path):
    from pipeline.keys import image_id_for, shard_marker_key, shard_marker_stem
    from pipeline.output.shard_markers import read_shard_markers

    fs, _ = filesystem_for(str(tmp_path), {})
    assert read_shard_markers(fs, str(tmp_path)).images == {}
    fs.pipe_file(f"{tmp_path}/{shard_marker_key('s3://b/a.tar', 'etag:1', 12)}", b"")
    markers = read_shard_markers(fs, str(tmp_path)).images
    assert markers == {shard_marker_stem("s3://b/a.tar", "etag:1"): 12}
    assert shard_marker_stem("s3://b/a.tar", "etag:2") not in markers
    # A later read of the same version counted otherwise: its count stands.
    later = f"{tmp_path}/{shard_marker_key('s3://b/a.tar', 'etag:1', 9)}"
    fs.pipe_file(later, b"")
    os.utime(later, (time.time() + 10, time.time() + 10))
    markers = read_shard_markers(fs, str(tmp_path))
    assert markers.images == {shard_marker_stem("s3://b/a.tar", "etag:1"): 9}
    assert markers.last_read == {image_id_for("s3://b/a.tar"): pytest.approx(time.time() + 10, 1)}
    # Another read's settings: a stem of its own, and the same shard read
    tagged = shard_marker_key("s3://b/a.tar", "etag:1", 4, "r0123abcd")
    fs.pipe_file(f"{tmp_path}/{tagged}", b"")
    assert read_shard_markers(fs, str(tmp_path)).images == {
        shard_marker_stem("s3://b/a.tar", "etag:1"): 9,
        shard_marker_stem("s3://b/a.tar", "etag:1", "r0123abcd"): 4,
    }


def test_a_shards_error_row_is_retired_once_the_shard_is_read_whole(tmp_path):
    import os

    from pipeline.keys import image_id_for, shard_marker_key

    shard = "s3://b/a.tar"
    failed = {**row(image_id_for(shard), "error", 0), "source_uri": shard}
    member = {**row(image_id_for(f"{shard}#0"), "ok", 60), "source_uri": f"{shard}#0"}
    write_part(tmp_path, "a.parquet", [failed, row("z", "error", 0), member])

    def view_ids():
        whole = {r["image_id"] for r in read_predictions(str(tmp_path)).to_pylist()}
        streamed = [
            r["image_id"]
            for batch in iter_predictions(str(tmp_path), ["image_id"])
            for r in batch.to_pylist()
        ]
        assert sorted(streamed) == sorted(whole)
        return whole

    assert image_id_for(shard) in view_ids()  # not read whole since it failed
    marker = tmp_path / shard_marker_key(shard, "v1", 1)
    marker.parent.mkdir()
    marker.write_bytes(b"")
    before_the_error = (T0 - timedelta(minutes=1)).timestamp()
    os.utime(marker, (before_the_error, before_the_error))
    assert image_id_for(shard) in view_ids()  # read whole, but before it failed
    os.utime(marker, None)  # now: after the error row
    assert view_ids() == {"z", member["image_id"]}


def test_a_marker_copied_with_its_output_keeps_the_time_it_was_read(tmp_path):
    """cp -r and syncs give files the copy's time: the marker's body says when
    the shard was read, so an error row written after that read still stands."""
    import shutil

    from pipeline.keys import image_id_for, shard_marker_key
    from pipeline.output.shard_markers import read_shard_markers

    shard = "s3://b/a.tar"
    original, copy = tmp_path / "original", tmp_path / "copy"
    failed = {**row(image_id_for(shard), "error", 10), "source_uri": shard}
    write_part(original, "a.parquet", [failed])
    marker = original / shard_marker_key(shard, "v1", 1)
    marker.parent.mkdir()
    marker.write_text((T0 + timedelta(minutes=5)).isoformat())  # read before it failed
    old = (T0 + timedelta(minutes=5)).timestamp()
    os.utime(marker, (old, old))
    assert [r["image_id"] for r in read_predictions(str(original)).to_pylist()] == [
        image_id_for(shard)
    ]
    shutil.copytree(original, copy)  # the marker's file time: now, after the error row
    os.utime(copy / shard_marker_key(shard, "v1", 1), None)
    assert [r["image_id"] for r in read_predictions(str(copy)).to_pylist()] == [image_id_for(shard)]
    fs, _ = filesystem_for(str(copy), {})
    markers = read_shard_markers(fs, str(copy))
    error_written = (T0 + timedelta(minutes=10)).timestamp()
    assert not markers.error_stands(image_id_for(shard), error_written)  # by the file's time
    markers.read_times(fs, [image_id_for(shard)])
    assert markers.last_read[image_id_for(shard)] == pytest.approx(old)
    assert markers.error_stands(image_id_for(shard), error_written)
    # A marker without a body (written before bodies) keeps its file's time: healed here.
    (copy / shard_marker_key(shard, "v1", 1)).write_bytes(b"")
    assert read_predictions(str(copy)).num_rows == 0


def test_a_shard_read_under_other_settings_is_skipped_only_by_an_all_done_marker(tmp_path):
    from pipeline.keys import shard_done_marker_key, shard_marker_key, shard_marker_stem
    from pipeline.output.shard_markers import read_shard_markers

    shard, version, config = "s3://b/a.tar", "etag:1", "0123456789abcdef"
    fs, root = filesystem_for(str(tmp_path), {})

    def markers_after(*keys: str):
        for key in keys:
            fs.pipe_file(f"{root}/{key}", b"")
        return read_shard_markers(fs, root)

    default, tagged = shard_marker_stem(shard, version), shard_marker_stem(shard, version, "r1")
    markers = markers_after(shard_marker_key(shard, version, 3))
    assert markers.can_skip(default, config, 3) and not markers.can_skip(default, config, 2)
    assert not markers.can_skip(tagged, config, 3)  # never read under those settings
    markers = markers_after(shard_marker_key(shard, version, 2, "r1"))
    # Read both ways: 3 done may be the other settings' images
    assert not markers.can_skip(default, config, 3) and not markers.can_skip(tagged, config, 5)
    markers = markers_after(shard_done_marker_key(shard, version, "r1", config))
    assert markers.can_skip(tagged, config, 0)  # a read under r1 found them all done
    assert not markers.can_skip(tagged, "fedcba9876543210", 5)  # under another config
    assert not markers.can_skip(default, config, 3)
    assert markers.images == {default: 3, tagged: 2}  # the all-done marker counts nothing
