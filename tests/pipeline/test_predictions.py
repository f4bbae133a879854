import json
import os
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpt_model.loading import ModelLoadError
from pipeline.predictions import (
    done_key,
    iter_predictions,
    latest_rows,
    load_done_images,
    read_committed,
    read_predictions,
)
from pipeline.schema import PREDICTION_SCHEMA
from pipeline.storage import filesystem_for

T0 = datetime(2026, 11, 25, tzinfo=UTC)


def row(image_id, status, minutes, version="v1", config="c1", run="r"):
    return {
        "image_id": image_id,
        "source_uri": f"s3://b/{image_id}.jpg",
        "status": status,
        "error": None if status == "ok" else "read: SlowDown",
        "run_id": run,
        "source_version": version,
        "config_hash": config,
        "written_at": T0 + timedelta(minutes=minutes),
    }


def write_part(output, name, rows):
    folder = output / "predictions"
    folder.mkdir(parents=True, exist_ok=True)
    full = [{field.name: r.get(field.name) for field in PREDICTION_SCHEMA} for r in rows]
    pq.write_table(pa.Table.from_pylist(full, schema=PREDICTION_SCHEMA), folder / name)


def test_the_view_has_one_row_per_image_latest_first_but_errors_never_hide_ok(tmp_path):
    write_part(tmp_path, "a.parquet", [row("x", "ok", 0), row("y", "ok", 0), row("z", "error", 0)])
    write_part(
        tmp_path,
        "b.parquet",
        [
            row("x", "error", 5),  # same source and config: the ok row stays
            row("y", "error", 5, version="v2"),  # the source changed: the new row wins
            row("z", "ok", 5),
        ],
    )
    # A crashed writer's hidden part is not committed.
    (tmp_path / "predictions" / ".c.parquet.tmp").write_bytes(b"PAR1 half")
    view = {r["image_id"]: r for r in read_predictions(str(tmp_path)).to_pylist()}
    assert {key: (r["status"], r["source_version"]) for key, r in view.items()} == {
        "x": ("ok", "v1"),
        "y": ("error", "v2"),
        "z": ("ok", "v1"),
    }


def test_done_images_are_ok_rows_of_the_same_config_and_source_version(tmp_path):
    write_part(
        tmp_path,
        "a.parquet",
        [
            row("x", "ok", 0),
            row("y", "ok", 0, config="other"),
            row("z", "error", 0),
            {**row("s", "ok", 0), "source_uri": "s3://b/shard.tar#s"},
        ],
    )
    write_part(
        tmp_path,
        "b.parquet",
        [
            {**row("t", "ok", 1), "source_uri": "s3://b/shard.tar#t"},
            {**row("n", "ok", 1), "source_version": None},  # a store without versions
            {**row("h", "ok", 1), "source_uri": "s3://b/photos#1.jpg"},  # '#' in a file name
            # a forced run's second row for "s": the shard still holds two done images
            {**row("s", "ok", 2), "source_uri": "s3://b/shard.tar#s"},
        ],
    )
    # A part from before the pseudo-label columns existed, and a crashed
    # writer's hidden part (not committed, so not done).
    older_schema = pa.schema([f for f in PREDICTION_SCHEMA if f.name != "kept"])
    pq.write_table(
        pa.Table.from_pylist([row("o", "ok", 0)], schema=older_schema),
        tmp_path / "predictions" / "old.parquet",
    )
    (tmp_path / "predictions" / ".c.parquet.tmp").write_bytes(b"PAR1 half")
    import fsspec

    done = load_done_images(fsspec.filesystem("file"), str(tmp_path), "c1")
    assert len(done) == 6
    assert done.per_shard == {("s3://b/shard.tar", "v1"): 2}
    found = [
        done.has(image_id, version)
        for image_id, version in zip(
            ["x", "x", "y", "z", "s", "t", "n", "h", "o"],
            ["v1", "v2", "v1", "v1", "v1", "v1", "", "v1", "v1"],
            strict=True,
        )
    ]
    assert found == [True, False, False, False, True, True, True, True, True]
    assert done.has("x", "v1") and not done.has("x", "v2") and not done.has("zz", "v1")


def test_an_output_without_predictions_reads_as_empty(tmp_path):
    assert read_predictions(str(tmp_path / "nothing")).num_rows == 0


def test_parts_written_before_a_column_was_added_still_read(tmp_path):
    # Outputs grow by runs of different versions; a part without the
    # pseudo-label columns reads with those columns null.
    write_part(tmp_path, "new.parquet", [row("x", "ok", 1)])
    older_schema = pa.schema(
        [f for f in PREDICTION_SCHEMA if f.name not in ("label_coverage", "entropy_mean", "kept")]
    )
    old_rows = [{f.name: row("y", "ok", 0).get(f.name) for f in older_schema}]
    pq.write_table(
        pa.Table.from_pylist(old_rows, schema=older_schema),
        tmp_path / "predictions" / "old.parquet",
    )
    view = read_predictions(str(tmp_path)).to_pylist()
    assert sorted(r["image_id"] for r in view) == ["x", "y"]
    assert all(r["kept"] is None and r["label_coverage"] is None for r in view)


def _latest_rows_one_by_one(rows: list[dict]) -> list[int]:
    """The view's rule applied row by row in written order: the reference for latest_rows."""
    chosen: dict[str, int] = {}
    order = sorted(
        range(len(rows)),
        key=lambda i: (rows[i]["written_at"] is None, rows[i]["written_at"] or T0),
    )
    for index in order:
        current, previous = rows[index], chosen.get(rows[index]["image_id"])
        if (
            previous is not None
            and current["status"] != "ok"
            and rows[previous]["status"] == "ok"
            and (current["source_version"], current["config_hash"])
            == (rows[previous]["source_version"], rows[previous]["config_hash"])
        ):
            continue
        chosen[current["image_id"]] = index
    return sorted(chosen.values())


def test_the_vectorised_view_agrees_with_the_rule_row_by_row():
    generator = np.random.default_rng(7)
    for trial in range(200):
        rows = [
            row(
                f"i{generator.integers(4)}",
                "ok" if generator.random() < 0.5 else "error",
                int(generator.integers(6)),  # ties in written_at on purpose
                version=f"v{generator.integers(2)}",
                config=f"c{generator.integers(2)}",
            )
            for _ in range(int(generator.integers(1, 12)))
        ]
        for item in rows:
            if generator.random() < 0.1:
                item["written_at"] = None  # parts from before the column counted as newest
        table = pa.Table.from_pylist(
            [{f.name: r.get(f.name) for f in PREDICTION_SCHEMA} for r in rows],
            schema=PREDICTION_SCHEMA,
        )
        assert latest_rows(table).tolist() == _latest_rows_one_by_one(rows), (trial, rows)


def test_the_view_of_chosen_images_reads_only_their_rows(tmp_path):
    write_part(tmp_path, "a.parquet", [row("x", "ok", 0), row("y", "ok", 0)])
    write_part(tmp_path, "b.parquet", [row("x", "error", 5, version="v2")])
    view = read_predictions(str(tmp_path), image_ids=["x"]).to_pylist()
    assert [(r["image_id"], r["status"]) for r in view] == [("x", "error")]


def test_an_empty_choice_of_images_reads_nothing(tmp_path):
    write_part(tmp_path, "a.parquet", [row("x", "ok", 0)])
    assert read_predictions(str(tmp_path), image_ids=[]).num_rows == 0


def test_chosen_images_can_be_read_without_their_id_column(tmp_path):
    write_part(tmp_path, "a.parquet", [row("x", "ok", 0), row("y", "error", 0)])
    fs, root = filesystem_for(str(tmp_path), {})
    table = read_committed(fs, root, ["status"], image_ids=["y"])
    assert table.column_names == ["status"] and table["status"].to_pylist() == ["error"]


def test_done_images_are_the_same_whatever_the_parts_per_scan(tmp_path, monkeypatch):
    import fsspec

    import pipeline.predictions

    for part in range(5):
        write_part(tmp_path, f"p{part}.parquet", [row(f"i{part}{n}", "ok", part) for n in range(3)])
    fs = fsspec.filesystem("file")
    whole = load_done_images(fs, str(tmp_path), "c1")
    monkeypatch.setattr(pipeline.predictions, "_PARTS_PER_SCAN", 2)  # groups of 2, 2 and 1
    grouped = load_done_images(fs, str(tmp_path), "c1")
    assert len(whole) == 15 and whole.keys.tolist() == grouped.keys.tolist()


@pytest.mark.parametrize("parts_per_scan", [1, 256])
def test_the_streamed_view_is_the_view(tmp_path, monkeypatch, parts_per_scan):
    import pipeline.predictions

    monkeypatch.setattr(pipeline.predictions, "_PARTS_PER_SCAN", parts_per_scan)
    write_part(tmp_path, "a.parquet", [row("x", "ok", 0), row("y", "ok", 0), row("z", "error", 0)])
    write_part(tmp_path, "b.parquet", [row("w", "ok", 1)])
    write_part(
        tmp_path,
        "c.parquet",
        [row("x", "error", 5), row("y", "error", 5, version="v2"), row("z", "ok", 5)],
    )
    columns = ["image_id", "status", "source_version", "written_at"]
    expected = read_predictions(str(tmp_path), columns=columns).to_pylist()
    streamed = [r for batch in iter_predictions(str(tmp_path), columns) for r in batch.to_pylist()]
    assert streamed == expected and len(expected) == 4
    assert list(iter_predictions(str(tmp_path / "none"), columns)) == []


def test_the_streamed_view_stops_if_a_part_changes_between_its_passes(tmp_path, monkeypatch):
    import pipeline.predictions

    write_part(tmp_path, "a.parquet", [row("x", "ok", 0), row("x", "error", 5, version="v2")])
    scans = []
    real_scan = pipeline.predictions._scan_parts

    def scan_growing(fs, parts, columns, rows=None):
        scans.append(columns)
        yield from real_scan(fs, parts, columns, rows)
        if len(scans) == 2:  # the second pass finds a row more, as if a part was rewritten
            yield from real_scan(fs, parts, columns, rows)

    monkeypatch.setattr(pipeline.predictions, "_scan_parts", scan_growing)
    with pytest.raises(RuntimeError, match="changed while being read"):
        list(iter_predictions(str(tmp_path), ["image_id"]))


def test_shard_markers_name_the_shard_version_and_its_image_count(tmp_path):
    from pipeline.keys import image_id_for, shard_marker_key, shard_marker_stem
    from pipeline.predictions import read_shard_markers

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
    from pipeline.predictions import read_shard_markers

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


def test_the_done_check_names_shards_whose_own_error_row_stands_in_the_view(tmp_path):
    import fsspec

    from pipeline.keys import image_id_for

    def shard_row(shard, status, minutes, **fields):
        return {**row(image_id_for(shard), status, minutes, **fields), "source_uri": shard}

    write_part(
        tmp_path,
        "a.parquet",
        [
            shard_row("s3://b/broken.tar", "error", 5, config="other"),  # any config's
            shard_row("s3://b/fixed.tar.gz", "error", 5),
            shard_row("s3://b/fixed.tar.gz", "ok", 9),  # a newer row of the id: not the view's
            shard_row("s3://b/table.PARQUET", "error", 7),  # suffixes in any case
            row("plain", "error", 5),  # an image file's error
            {**row("member", "error", 5), "source_uri": "s3://b/broken.tar#0"},  # a member's
        ],
    )
    done = load_done_images(fsspec.filesystem("file"), str(tmp_path), "c1")
    at = (T0 + timedelta(minutes=5)).timestamp(), (T0 + timedelta(minutes=7)).timestamp()
    assert done.shard_errors == {
        image_id_for("s3://b/broken.tar"): pytest.approx(at[0]),
        image_id_for("s3://b/table.PARQUET"): pytest.approx(at[1]),
    }


def test_runs_going_have_a_start_record_renewed_lately_and_no_newer_finish_record(tmp_path):
    from pipeline.predictions import runs_going

    fs, root = filesystem_for(str(tmp_path), {})
    assert runs_going(fs, root, 900, time.time()) == []
    now = time.time()
    records = {
        "done.started.json": now - 100,
        "done.json": now - 50,
        "going.started.json": now - 60,
        "crashed.started.json": now - 7200,  # not renewed for two hours
        "again.json": now - 3600,  # an id used before, now going again
        "again.started.json": now - 30,
    }
    for name, stamp in records.items():
        fs.pipe_file(f"{root}/_runs/{name}", b"{}")
        os.utime(f"{root}/_runs/{name}", (stamp, stamp))
    found = runs_going(fs, root, 900, now)
    assert [run_id for run_id, _ in found] == ["again", "going"]
    assert 59 <= found[1][1] < 62


def test_runs_of_a_copied_output_are_told_by_their_records_not_their_file_times(tmp_path):
    """cp -r and aws s3 sync give every record the copy's time, in any order."""
    from pipeline.predictions import RunHeartbeat, runs_going

    fs, root = filesystem_for(str(tmp_path), {})
    runs = tmp_path / "_runs"

    def start(run, at):
        return json.dumps({"run_id": run, "started_at": at}).encode()

    fs.pipe_file(f"{root}/_runs/a.started.json", start("a", "2026-01-01T00:00:00"))
    fs.pipe_file(f"{root}/_runs/a.json", json.dumps({"started_at": "2026-01-01T00:00:00"}).encode())
    # Ended by a stop: its end record names the same start.
    b_start = start("b", "2026-01-02T00:00:00")
    fs.pipe_file(f"{root}/_runs/b.started.json", b_start)
    with (
        pytest.raises(KeyboardInterrupt),
        RunHeartbeat(
            fs, f"{root}/_runs/b.started.json", b_start, ended_path=f"{root}/_runs/b.ended.json"
        ),
    ):
        raise KeyboardInterrupt
    # An id used again: its finish record is of an earlier start.
    fs.pipe_file(f"{root}/_runs/c.started.json", start("c", "2026-01-03T00:00:00"))
    fs.pipe_file(f"{root}/_runs/c.json", json.dumps({"started_at": "2025-12-01T00:00:00"}).encode())
    now = time.time()
    for name in ("a.json", "b.ended.json", "c.json"):  # the copy wrote finish records first
        os.utime(runs / name, (now - 20, now - 20))
    for name in ("a.started.json", "b.started.json", "c.started.json"):
        os.utime(runs / name, (now - 10, now - 10))
    assert [run_id for run_id, _ in runs_going(fs, root, 900, now)] == ["c"]


def test_a_going_run_renews_its_start_record(tmp_path):
    from pipeline.predictions import RunHeartbeat

    fs, root = filesystem_for(str(tmp_path), {})
    path = f"{root}/_runs/r.started.json"
    fs.pipe_file(path, b"{}")
    os.utime(path, (1, 1))
    with RunHeartbeat(fs, path, b'{"run_id": "r"}', every_s=0.05):
        deadline = time.time() + 10
        while os.stat(path).st_mtime < 2:
            assert time.time() < deadline, "the start record was not renewed"
            time.sleep(0.02)
    assert (tmp_path / "_runs" / "r.started.json").read_bytes() == b'{"run_id": "r"}'


def test_a_run_that_stopped_renewing_is_not_renewed_after_its_finish_record(tmp_path):
    from pipeline.predictions import RunHeartbeat, runs_going

    fs, root = filesystem_for(str(tmp_path), {})
    start, finish = f"{root}/_runs/r.started.json", f"{root}/_runs/r.json"
    fs.pipe_file(start, b"{}")
    with RunHeartbeat(fs, start, b"{}", every_s=0.01) as heartbeat:
        time.sleep(0.05)
        heartbeat.stop_renewing()
        fs.pipe_file(finish, b"{}")
        os.utime(finish, (time.time() + 1, time.time() + 1))  # past any coarse mtime tie
        renewed = os.stat(start).st_mtime_ns
        time.sleep(0.1)  # ten beats' time, inside the block
        assert os.stat(start).st_mtime_ns == renewed
    assert runs_going(fs, root, within_s=900, now_s=time.time()) == []


def test_the_latest_segmentation_classes_are_found_without_reading_every_run_record(
    tmp_path, caplog
):
    from pipeline.predictions import segmentation_class_names

    runs = tmp_path / "_runs"
    runs.mkdir()
    now = time.time()
    for index in range(100):  # years of scheduled runs, unreadable if read at all
        path = runs / f"old-{index:03d}.json"
        path.write_text("{broken")
        os.utime(path, (now - 1000 + index, now - 1000 + index))
    records = [
        {"config": {"models": {"segmentation": "relative/seg-model"}}},  # nowhere from here
        {"config": {"models": {"segmentation": None}}},  # a depth-only run after it
    ]
    for index, record in enumerate(records):
        path = runs / f"new-{index}.json"
        path.write_text(json.dumps(record))
        os.utime(path, (now - 10 + index, now - 10 + index))
    with caplog.at_level("WARNING", logger="pipeline.predictions"):
        with pytest.raises(ModelLoadError, match="relative/seg-model"):
            segmentation_class_names(str(tmp_path))  # a record written before classes were
        records[0]["segmentation_classes"] = {"0": "wall", "3": "sky"}
        (runs / "new-0.json").write_text(json.dumps(records[0]))
        assert segmentation_class_names(str(tmp_path)) == {0: "wall", 3: "sky"}
    assert not [record for record in caplog.records if "skipping run record" in record.message]


def test_compaction_keeps_the_view_in_fewer_parts_and_drops_superseded_rows(tmp_path):
    from pipeline.keys import image_id_for, shard_marker_key
    from pipeline.predictions import compact_predictions, load_done_images

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


@pytest.mark.parametrize(
    ("rows", "done_under_c1"),
    [
        # Back to config c1 after c2: the view shows c2's rows, so c1 redoes x.
        ([row("x", "ok", 0), row("x", "ok", 5, config="c2")], False),
        ([row("x", "ok", 0), row("x", "error", 5, config="c2")], False),
        # Back to v1 of the source after v2 (a restored file, a re-uploaded object).
        ([row("x", "ok", 0), row("x", "ok", 5, version="v2")], False),
        # A failed forced rerun under c1 leaves the ok row the view's, and done.
        ([row("x", "ok", 0), row("x", "error", 5)], True),
        # An error under c2 between them: the view is the last c1 error.
        ([row("x", "ok", 0), row("x", "error", 5, config="c2"), row("x", "error", 9)], False),
        ([row("x", "ok", 0, version="v2"), row("x", "ok", 5)], True),
    ],
)
def test_an_image_is_done_when_its_row_in_the_view_is_ok_under_the_config(
    tmp_path, rows, done_under_c1
):
    from pipeline.predictions import compact_predictions, load_done_images

    for index, one in enumerate(rows):
        write_part(tmp_path, f"r{index}_a.parquet", [one])
    fs, root = filesystem_for(str(tmp_path), {})
    view = read_predictions(str(tmp_path)).to_pylist()
    assert bool(load_done_images(fs, root, "c1").has("x", "v1")) is done_under_c1
    [shown] = view
    shown_as = (shown["status"], shown["config_hash"], shown["source_version"])
    assert (shown_as == ("ok", "c1", "v1")) is done_under_c1
    # Compaction keeps the view, and with it what is done.
    compact_predictions(str(tmp_path))
    assert read_predictions(str(tmp_path)).to_pylist() == view
    assert bool(load_done_images(fs, root, "c1").has("x", "v1")) is done_under_c1


def test_done_images_are_the_views_ok_rows_under_the_config(tmp_path):
    """Against the view itself, over many runs' parts of random rows (more parts than
    the resume check joins its arrays after, and images in every bucket)."""
    from pipeline.predictions import load_done_images

    generator = np.random.default_rng(7)
    for part in range(300):
        write_part(
            tmp_path,
            f"r{part:03d}_a.parquet",
            [
                row(
                    f"i{generator.integers(60)}",
                    "ok" if generator.random() < 0.7 else "error",
                    int(generator.integers(1000)),
                    version=f"v{generator.integers(2)}",
                    config=f"c{generator.integers(2)}",
                )
                for _ in range(3)
            ],
        )
    view = read_predictions(str(tmp_path)).to_pylist()
    fs, root = filesystem_for(str(tmp_path), {})
    done = load_done_images(fs, root, "c1")
    expected = sorted(
        done_key(r["image_id"], r["source_version"])
        for r in view
        if r["status"] == "ok" and r["config_hash"] == "c1"
    )
    assert 5 < len(expected) < 55 and done.keys.tolist() == expected


def test_two_compactions_within_one_second_keep_every_row(tmp_path, monkeypatch):
    import pipeline.predictions
    from pipeline.predictions import compact_predictions

    class FrozenClock(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 1, 1, 12, 0, 0, tzinfo=tz)

    monkeypatch.setattr(pipeline.predictions, "datetime", FrozenClock)
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
    from pipeline.predictions import compact_predictions

    write_part(tmp_path, "r1_a.parquet", [row("x", "ok", 0)])
    before = (tmp_path / "predictions" / "r1_a.parquet").stat().st_mtime_ns
    assert compact_predictions(str(tmp_path)).rows is None
    assert (tmp_path / "predictions" / "r1_a.parquet").stat().st_mtime_ns == before


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (ValueError("bad"), "failed"),
        (KeyboardInterrupt(), "stopped"),  # Ctrl-C, and SIGTERM before Ray starts
        (SystemExit(15), "stopped"),  # SIGTERM once ray.init has put in its handler
        (SystemExit(3), "failed"),
    ],
)
def test_a_run_left_by_an_error_or_a_stop_records_its_end_and_is_not_going(
    tmp_path, error, outcome
):
    from pipeline.predictions import RunHeartbeat, iter_run_records, runs_going

    fs, root = filesystem_for(str(tmp_path), {})
    start, ended = f"{root}/_runs/r.started.json", f"{root}/_runs/r.ended.json"
    fs.pipe_file(start, b"{}")
    with pytest.raises(type(error)), RunHeartbeat(fs, start, b"{}", ended_path=ended):
        raise error
    record = json.loads((tmp_path / "_runs" / "r.ended.json").read_text())
    assert record["outcome"] == outcome and record["error_type"] == type(error).__name__
    assert runs_going(fs, root, 900, time.time() + 1) == []
    assert list(iter_run_records(str(tmp_path))) == []  # not a finished run's record


def test_a_run_that_ends_without_an_error_writes_no_end_record(tmp_path):
    from pipeline.predictions import RunHeartbeat, runs_going

    fs, root = filesystem_for(str(tmp_path), {})
    start, ended = f"{root}/_runs/r.started.json", f"{root}/_runs/r.ended.json"
    fs.pipe_file(start, b"{}")
    with RunHeartbeat(fs, start, b"{}", ended_path=ended):
        pass
    assert not (tmp_path / "_runs" / "r.ended.json").exists()
    assert [run_id for run_id, _ in runs_going(fs, root, 900, time.time())] == ["r"]


def test_map_files_are_found_in_an_output_copied_elsewhere(tmp_path):
    """The rows name the maps where they were written; in a copy (``aws s3 sync``
    down, ``cp -r``) the readers find them in the copy, also where the original
    output's own path holds a ``depth/`` folder."""
    import shutil

    from pipeline.predictions import MapLocator

    original = tmp_path / "depth" / "out"
    for key in ("depth/a/depth/x.1.png", "segmentation/a/x.1.png"):
        (original / key).parent.mkdir(parents=True, exist_ok=True)
        (original / key).write_bytes(b"map")
    copy = tmp_path / "copies" / "out"
    shutil.copytree(original, copy)
    shutil.rmtree(tmp_path / "depth")

    maps = MapLocator(str(copy))
    assert maps(f"{original}/depth/a/depth/x.1.png", "depth") == f"{copy}/depth/a/depth/x.1.png"
    assert maps.earlier_roots == [str(original)]
    moved = maps(f"{original}/segmentation/a/x.1.png", "segmentation")
    assert moved == f"{copy}/segmentation/a/x.1.png"
    assert maps(f"{copy}/depth/a/depth/x.1.png", "depth") == f"{copy}/depth/a/depth/x.1.png"
    assert maps(None, "depth") is None
    # In neither place: left as written, for the reader's error to name it.
    assert maps("/elsewhere/out/depth/gone.png", "depth") == "/elsewhere/out/depth/gone.png"
    assert maps.earlier_roots == [str(original)]


def test_a_shard_read_under_other_settings_is_skipped_only_by_an_all_done_marker(tmp_path):
    from pipeline.keys import shard_done_marker_key, shard_marker_key, shard_marker_stem
    from pipeline.predictions import read_shard_markers

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


def test_a_compaction_stopped_while_it_deletes_leaves_the_view_as_it_was(tmp_path, monkeypatch):
    """An earlier compaction's part holds an old ok row; a run under another config
    came between it and a later error of the first config. Deleted in name order
    (the timestamped run parts before compacted-…), the ok row would stand again."""
    import pipeline.predictions
    from pipeline.predictions import compact_predictions

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

    monkeypatch.setattr(pipeline.predictions, "remove_files", stopped_after_one)
    with pytest.raises(KeyboardInterrupt):
        compact_predictions(str(tmp_path))
    assert removed == ["compacted-20261101T000000-0000_000000.parquet"]  # the oldest rows
    [after] = read_predictions(str(tmp_path)).to_pylist()
    assert (after["status"], after["config_hash"]) == ("error", "A")


def test_two_runs_under_one_run_id_at_once_the_first_ending_does_not_end_the_second(tmp_path):
    from pipeline.predictions import runs_going

    fs, root = filesystem_for(str(tmp_path), {})
    now = time.time()

    def record(name: str, started_at: str | None, stamp: float) -> None:
        body = {} if started_at is None else {"started_at": started_at}
        fs.pipe_file(f"{root}/_runs/{name}", json.dumps(body).encode())
        os.utime(f"{root}/_runs/{name}", (stamp, stamp))

    # The second start overwrote the first's start record; the first then finished.
    record("same.started.json", "2026-12-04T10:05:00+00:00", now - 60)
    record("same.json", "2026-12-04T10:00:00+00:00", now - 10)
    assert [run_id for run_id, _ in runs_going(fs, root, 900, now)] == ["same"]
    record("same.json", "2026-12-04T10:05:00+00:00", now - 5)  # the second finished
    assert runs_going(fs, root, 900, now) == []
    # An older release's record names no start: newer than the start, it ends it.
    record("old.started.json", "2026-12-04T10:05:00+00:00", now - 60)
    record("old.json", None, now - 10)
    assert runs_going(fs, root, 900, now) == []
    record("old.json", None, now - 100)
    assert [run_id for run_id, _ in runs_going(fs, root, 900, now)] == ["old"]
