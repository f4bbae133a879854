import os
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


def _with_maps(output, image_id, minutes, config="c1", maps=("depth", "segmentation")):
    """A row naming map files it has under ``output``, as a run writes them."""
    uris = {}
    for kind in maps:
        path = output / kind / f"{image_id}.jpg.{config}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"png")
        uris[f"{kind}_uri"] = str(path)
    return {**row(image_id, "ok", minutes, config=config), **uris}


def test_pruning_deletes_the_maps_no_row_names_and_keeps_every_rows_maps(tmp_path):
    from pipeline.output.compaction import compact_predictions, delete_unreferenced_maps

    write_part(
        tmp_path, "r1_a.parquet", [_with_maps(tmp_path, "x", 0), _with_maps(tmp_path, "y", 0)]
    )
    # A later model for x: the first run's maps of x are superseded.
    write_part(tmp_path, "r2_a.parquet", [_with_maps(tmp_path, "x", 5, config="c2")])
    orphan = tmp_path / "depth" / "z.jpg.c1.png"  # a killed run's map, its row never committed
    orphan.write_bytes(b"png")
    # Before compaction, every committed row keeps its maps, superseded or not.
    assert delete_unreferenced_maps(str(tmp_path)).maps_deleted == 1
    assert not orphan.exists() and (tmp_path / "depth" / "x.jpg.c1.png").exists()

    compact_predictions(str(tmp_path))
    pruning = delete_unreferenced_maps(str(tmp_path))
    assert (pruning.maps_listed, pruning.maps_deleted, pruning.stopped_for_run) == (6, 2, None)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.png"))
    assert left == [
        "depth/x.jpg.c2.png",
        "depth/y.jpg.c1.png",
        "segmentation/x.jpg.c2.png",
        "segmentation/y.jpg.c1.png",
    ]
    for shown in read_predictions(str(tmp_path)).to_pylist():
        assert os.path.exists(shown["depth_uri"]) and os.path.exists(shown["segmentation_uri"])


def test_pruning_a_copied_output_keeps_the_maps_its_rows_name_where_they_were(tmp_path):
    import shutil

    from pipeline.output.compaction import delete_unreferenced_maps

    first = tmp_path / "first"
    write_part(first, "r1_a.parquet", [_with_maps(first, "x", 0, maps=("depth",))])
    (first / "depth" / "gone.jpg.c1.png").write_bytes(b"png")
    copy = tmp_path / "copy"
    shutil.copytree(first, copy)  # rows still name first/depth/…
    pruning = delete_unreferenced_maps(str(copy))
    assert (pruning.maps_listed, pruning.maps_deleted) == (2, 1)
    assert (copy / "depth" / "x.jpg.c1.png").exists()
    assert not (copy / "depth" / "gone.jpg.c1.png").exists()
    assert (first / "depth" / "gone.jpg.c1.png").exists()  # another output: untouched


def test_pruning_stops_when_a_run_is_going(tmp_path):
    from pipeline.output.compaction import delete_unreferenced_maps
    from pipeline.output.runs import start_record_path

    write_part(tmp_path, "r1_a.parquet", [_with_maps(tmp_path, "x", 0, maps=("depth",))])
    fresh = tmp_path / "depth" / "new.jpg.c1.png"  # the going run's map: no row yet
    fresh.write_bytes(b"png")
    record = start_record_path(str(tmp_path), "going")
    os.makedirs(os.path.dirname(record), exist_ok=True)
    with open(record, "w") as file:
        file.write('{"started_at": "2026-12-04T00:00:00+00:00"}')
    pruning = delete_unreferenced_maps(str(tmp_path))
    assert (pruning.maps_deleted, pruning.stopped_for_run) == (0, "going")
    assert fresh.exists()


def test_new_local_parts_are_synced_before_any_old_one_is_deleted(tmp_path, monkeypatch):
    from pipeline.output import compaction

    for index in range(3):
        write_part(tmp_path, f"r{index}_a.parquet", [row(f"x{index}", "ok", index)])
    events = []
    real_fsync, real_remove = os.fsync, compaction.remove_files

    def fsync(descriptor):
        events.append(("sync", os.readlink(f"/proc/self/fd/{descriptor}").rsplit("/", 1)[-1]))
        real_fsync(descriptor)

    def remove_files(fs, paths):
        paths = list(paths)
        events.extend(("delete", path.rsplit("/", 1)[-1]) for path in paths)
        real_remove(fs, paths)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(compaction, "remove_files", remove_files)
    compaction.compact_predictions(str(tmp_path))
    kinds = [kind for kind, _ in events]
    synced = [name for kind, name in events if kind == "sync"]
    assert kinds == ["sync", "sync"] + ["delete"] * 3  # the new part, then its folder
    assert synced[0].startswith("compacted-") and synced[1] == "predictions"
