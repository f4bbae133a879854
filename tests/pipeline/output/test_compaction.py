from datetime import datetime

import pytest

from pipeline.output.done import load_done_images
from pipeline.output.view import read_predictions
from pipeline.storage import filesystem_for
from tests.pipeline.output.parts import row, write_part


def test_compaction_keeps_the_view_in_fewer_parts_and_drops_superseded_rows(tmp_path):
    from pipeline.keys import image_id_for, shard_marker_key
    from pipeline.output.compaction import compact_predictions

    shard = "s3://b/a.tar"
    failed_shard = {**row(image_id_for(shard), "error", 0), "source_uri": shard}
    write_part(tmp_path, "r1_a.parquet", [row("x", "ok", 0), row("y", "ok", 0), failed_shard])
    write_part(tmp_path, "r2_a.parquet", [row("x", "error", 5), row("y", "ok", 5, config="c2")])
    write_part(tmp_path, "r3_a.parquet", [row("z", "error", 9), row("w", "ok", 9)])
    write_part(tmp_path, "r4_a.parquet", [row("z", "ok", 12)])
    marker = tmp_path / shard_marker_key(shard, "v1", 0)  # the shard was read whole later
    marker.parent.mkdir()
    marker.write_bytes(b"")
    view_before = read_predictions(str(tmp_path)).sort_by("image_id")
    assert view_before["image_id"].to_pylist() == ["w", "x", "y", "z"]
    fs, root = filesystem_for(str(tmp_path), {})
    # The view's rows are what is done: y's row is its c2 one.
    expected = {"c1": [True, True, False, True], "c2": [False, False, True, False]}
    for config, done_images in expected.items():
        done = load_done_images(fs, root, config)
        assert [done.has(image, "v1") for image in ("w", "x", "y", "z")] == done_images, config

    result = compact_predictions(str(tmp_path), rows_per_part=3)

    parts = sorted((tmp_path / "predictions").iterdir())
    assert [part.name.split("_")[0].startswith("compacted-") for part in parts] == [True, True]
    # Each image's row: x's error and ok duplicates, y's c1 row, z's retried
    # error and the healed shard error are gone.
    assert (result.parts_before, result.parts_after, result.rows) == (4, 2, 4)
    assert read_predictions(str(tmp_path)).sort_by("image_id").equals(view_before)
    # Every config finds done what it found done before.
    for config, done_images in expected.items():
        done = load_done_images(fs, root, config)
        assert [done.has(image, "v1") for image in ("w", "x", "y", "z")] == done_images, config


def test_two_compactions_within_one_second_keep_every_row(tmp_path, monkeypatch):
    import pipeline.output.compaction
    from pipeline.output.compaction import compact_predictions

    class FrozenClock(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 1, 1, 12, 0, 0, tzinfo=tz)

    monkeypatch.setattr(pipeline.output.compaction, "datetime", FrozenClock)
    for part in range(3):
        rows = [row(f"i{part}{n}", "ok", part) for n in range(10)]
        write_part(tmp_path, f"r{part}_a.parquet", rows)
    compact_predictions(str(tmp_path), rows_per_part=10)
    first = sorted(path.name for path in (tmp_path / "predictions").iterdir())
    compact_predictions(str(tmp_path), rows_per_part=10)
    second = sorted(path.name for path in (tmp_path / "predictions").iterdir())
    assert len(first) == len(second) == 3 and not set(first) & set(second)
    assert read_predictions(str(tmp_path)).num_rows == 30


def test_compaction_leaves_a_single_part_alone(tmp_path):
    from pipeline.output.compaction import compact_predictions

    write_part(tmp_path, "r1_a.parquet", [row("x", "ok", 0)])
    before = (tmp_path / "predictions" / "r1_a.parquet").stat().st_mtime_ns
    assert compact_predictions(str(tmp_path)).rows is None
    assert (tmp_path / "predictions" / "r1_a.parquet").stat().st_mtime_ns == before


@pytest.mark.parametrize("parts", [1, 3])
def test_compaction_removes_half_written_parts_that_no_writer_touched_for_long(tmp_path, parts):
    import os
    import time

    from pipeline.output.compaction import compact_predictions

    for index in range(parts):
        write_part(tmp_path, f"r{index}_a.parquet", [row(f"x{index}", "ok", index)])
    folder = tmp_path / "predictions"
    stale, fresh = folder / ".r9_a.parquet.0f3c.tmp", folder / ".r9_b.parquet.77aa.tmp"
    stale.write_bytes(b"PAR1 half")
    fresh.write_bytes(b"PAR1 half")
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    (folder / ".keep").write_bytes(b"")  # hidden, but not a part being written

    result = compact_predictions(str(tmp_path))
    assert result.leftovers_removed == 1
    assert not stale.exists() and fresh.exists() and (folder / ".keep").exists()
    assert sorted(r["image_id"] for r in read_predictions(str(tmp_path)).to_pylist()) == [
        f"x{index}" for index in range(parts)
    ]


def test_a_compaction_stopped_while_it_deletes_leaves_the_view_as_it_was(tmp_path, monkeypatch):
    """An earlier compaction's part holds an old ok row; a run under another config
    came between it and a later error of the first config. Deleted in name order
    (the timestamped run parts before compacted-…), the ok row would stand again."""
    import pipeline.output.compaction
    from pipeline.output.compaction import compact_predictions

    old_ok = row("img", "ok", 0, config="A")
    between = row("img", "ok", 5, config="B")
    latest_error = row("img", "error", 10, config="A")
    write_part(tmp_path, "compacted-20261101T000000-0000_000000.parquet", [old_ok])
    write_part(tmp_path, "20261102T000000Z_000000.parquet", [between])
    write_part(tmp_path, "20261103T000000Z_000000.parquet", [latest_error])
    [before] = read_predictions(str(tmp_path)).to_pylist()
    assert (before["status"], before["config_hash"]) == ("error", "A")

    removed: list[str] = []

    def stopped_after_one(fs, paths):
        for path in paths:
            if removed:
                raise KeyboardInterrupt  # stopped here
            fs.rm_file(path)
            removed.append(path.rsplit("/", 1)[-1])

    monkeypatch.setattr(pipeline.output.compaction, "remove_files", stopped_after_one)
    with pytest.raises(KeyboardInterrupt):
        compact_predictions(str(tmp_path))
    assert removed == ["compacted-20261101T000000-0000_000000.parquet"]  # the oldest rows
    [after] = read_predictions(str(tmp_path)).to_pylist()
    assert (after["status"], after["config_hash"]) == ("error", "A")
