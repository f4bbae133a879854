"""Pure parts of the job's composition, without Ray."""

import json
import os

import numpy as np
import pytest

from jobs.config import load_config
from pipeline.output.done import DoneImages
from pipeline.output.runs import start_record_path
from pipeline.run import (
    DECODE_BATCH_ROWS,
    _clear_earlier_results,
    _count_shard_reads,
    _limited,
    _ListingCounts,
    _not_done,
    _top_reasons,
    _with_listing_progress,
    config_hash_for,
    decode_rows,
)
from pipeline.storage import filesystem_for

REQUIRED = ["input.uri=in", "output.uri=out", "models.depth=m"]


def test_config_hash_changes_with_what_shapes_outputs_not_with_speed_settings():
    with_labels = [*REQUIRED, "models.segmentation=s"]
    base = config_hash_for({}, load_config(None, with_labels))
    shaping_settings = (
        "output.depth_resolution=original",
        "decode.jpeg_draft=false",
        "pseudo_labels.enabled=true",
        "inference.flip_tta=true",
        "inference.segmentation_scales=[0.75,1.0]",
        "output.depth_format=npz_float16",
        "models.depth_kind=metric",
    )
    hashes = {config_hash_for({}, load_config(None, [*with_labels, s])) for s in shaping_settings}
    assert base not in hashes and len(hashes) == len(shaping_settings)
    # Later settings at their defaults leave the hash as it was before they existed.
    defaults = ("pseudo_labels.min_confidence=0.9", "inference.segmentation_scales=[1.0]")
    for default in defaults:
        assert config_hash_for({}, load_config(None, [*with_labels, default])) == base, default
    # The coverage bar only sets `kept`: changing it must not redo every image.
    labelled = [*with_labels, "pseudo_labels.enabled=true"]
    assert config_hash_for({}, load_config(None, labelled)) == config_hash_for(
        {}, load_config(None, [*labelled, "pseudo_labels.min_coverage=0.7"])
    )
    for speed in ("inference.batch_size=32", "output.png_compress_level=6"):
        assert config_hash_for({}, load_config(None, [*with_labels, speed])) == base, speed
    for speed in ("inference.cpu_threads=3", "resources.cpus_per_actor=2"):
        assert config_hash_for({}, load_config(None, [*with_labels, speed])) == base, speed


def test_decode_batches_never_exceed_one_inference_batch():
    def rows_for(batch_size):
        return decode_rows(load_config(None, [*REQUIRED, f"inference.batch_size={batch_size}"]))

    expected = [1, 8, DECODE_BATCH_ROWS, DECODE_BATCH_ROWS]
    assert [rows_for(size) for size in (1, 8, 32, "auto")] == expected


@pytest.mark.parametrize("where", ["local", "s3"])
def test_overwrite_clears_its_own_output_only_when_its_path_holds_glob_characters(
    where, tmp_path, request
):
    if where == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        options = ["storage.endpoint_url=" + endpoint]
        base = "s3://overwrite-glob"
    else:
        options, base = [], str(tmp_path)
    output, sibling = f"{base}/run[1]", f"{base}/run1"
    config = load_config(None, ["input.uri=in", f"output.uri={output}", "models.depth=m", *options])
    fs, root = filesystem_for(output, config.storage_options())
    _, sibling_root = filesystem_for(sibling, config.storage_options())
    if where == "s3":
        fs.mkdir("overwrite-glob")
    kept = start_record_path(root, "now")
    for path in (f"{root}/predictions/a.parquet", f"{root}/depth/x[1].jpg.png", kept):
        fs.pipe_file(path, b"ours")
    fs.pipe_file(f"{sibling_root}/predictions/b.parquet", b"another output")

    _clear_earlier_results(fs, root, config, "now")

    fs.invalidate_cache()
    assert sorted(fs.find(root)) == [kept]
    assert fs.cat_file(f"{sibling_root}/predictions/b.parquet") == b"another output"


def test_a_runs_count_opens_only_the_parts_named_after_it(tmp_path):
    from datetime import UTC, datetime, timedelta

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.run import _rows_of_run
    from pipeline.schema import schema_for

    started = datetime.now(UTC)
    columns = ["image_id", "source_uri", "status", "error", "run_id", "written_at"]
    rows = [
        ["a", "b"],
        ["s3://in/a", "s3://in/b"],
        ["ok", "error"],
        [None, "decode: empty file"],
        ["r1", "r1"],
        [started + timedelta(seconds=1)] * 2,
    ]
    (tmp_path / "predictions").mkdir()
    pq.write_table(
        pa.table(rows, schema=schema_for(columns)), tmp_path / "predictions" / "r1_w_000000.parquet"
    )
    # Another run's part, unreadable: opening it would fail the count.
    (tmp_path / "predictions" / "r0_w_000000.parquet").write_bytes(b"PAR1 not a part PAR1")
    fs, root = filesystem_for(str(tmp_path), {})
    counted = _rows_of_run(fs, root, "r1", started)
    assert (counted.ok, counted.errors, counted.reasons) == (1, 1, {"decode: empty file": 1})


def test_a_runs_count_finds_its_rows_a_compaction_moved_during_the_run(tmp_path, caplog):
    from datetime import UTC, datetime, timedelta

    from pipeline.output.compaction import compact_predictions
    from pipeline.run import _rows_of_run
    from tests.pipeline.output.parts import row, write_part

    started = datetime.now(UTC) - timedelta(seconds=5)
    write_part(tmp_path, "r0_w_000000.parquet", [row("old", "ok", 0, run="r0")])
    mine = [
        {**row("a", "ok", 0, run="r1"), "written_at": started + timedelta(seconds=1)},
        {**row("b", "error", 0, run="r1"), "written_at": started + timedelta(seconds=2)},
    ]
    write_part(tmp_path, "r1_w_000000.parquet", mine[:1])
    write_part(tmp_path, "r1_w_000001.parquet", mine[1:])
    fs, root = filesystem_for(str(tmp_path), {})
    before = _rows_of_run(fs, root, "r1", started)
    compact_predictions(str(tmp_path))  # --even-if-running, while r1 goes on
    write_part(tmp_path, "r1_w_000002.parquet", [{**mine[0], "image_id": "c"}])
    # A compacted part and one it has not deleted yet both hold "b".
    write_part(tmp_path, "r1_w_000001.parquet", mine[1:])
    with caplog.at_level("WARNING", logger="pipeline.run"):
        after = _rows_of_run(fs, root, "r1", started)
    assert (before.ok, before.errors, before.reasons) == (1, 1, {"read: SlowDown": 1})
    assert (after.ok, after.errors, after.reasons) == (2, 1, {"read: SlowDown": 1})
    assert "a compaction ran during this run (compacted-" in caplog.text
    # For a run that began after the compaction, its parts are not the run's.
    later = _rows_of_run(fs, root, "r1", datetime.now(UTC) + timedelta(seconds=2))
    assert (later.ok, later.errors) == (0, 0)


def test_a_runs_count_lists_again_when_a_compaction_deleted_its_parts_meanwhile(
    tmp_path, monkeypatch
):
    from datetime import UTC, datetime, timedelta

    from pipeline import run as run_module
    from pipeline.output import view
    from pipeline.output.compaction import compact_predictions
    from tests.pipeline.output.parts import row, write_part

    started = datetime.now(UTC) - timedelta(seconds=5)
    for index in range(3):
        written = {"written_at": started + timedelta(seconds=1)}
        write_part(
            tmp_path,
            f"r1_w_{index:06d}.parquet",
            [{**row(f"i{index}", "ok", 0, run="r1"), **written}],
        )
    fs, root = filesystem_for(str(tmp_path), {})
    scans = []

    def scan_then_compact(*args, **kwargs):
        scans.append(1)
        batches = view.scan_committed(*args, **kwargs)
        if len(scans) == 1:  # the parts were listed; the compaction deletes them now
            compact_predictions(str(tmp_path))
        return batches

    monkeypatch.setattr(run_module, "scan_committed", scan_then_compact)
    counted = run_module._rows_of_run(fs, root, "r1", started)
    assert (len(scans), counted.ok, counted.errors) == (2, 3, 0)


def test_a_run_with_nothing_done_under_its_config_says_why_everything_is_redone(tmp_path, caplog):
    from pipeline.run import _warn_if_done_under_other_configs
    from tests.pipeline.output.parts import row, write_part

    fs, root = filesystem_for(str(tmp_path), {})
    with caplog.at_level("WARNING", logger="pipeline.run"):
        _warn_if_done_under_other_configs(fs, root, "new")  # an empty output: nothing to say
        assert not caplog.records
        write_part(tmp_path, "r_a.parquet", [row("x", "error", 0, config="old")])
        _warn_if_done_under_other_configs(fs, root, "new")  # errors are redone anyway
        assert not caplog.records
        # Back to "new" after "old": its own earlier rows are not the other config.
        write_part(tmp_path, "r_0.parquet", [row("x", "ok", -1, config="new")])
        write_part(tmp_path, "r_b.parquet", [row("x", "ok", 1, config="old")])
        _warn_if_done_under_other_configs(fs, root, "new")
    [warning] = caplog.records
    assert "config_hash new" in warning.getMessage() and "another (old" in warning.getMessage()


def test_a_long_listing_says_how_far_it_has_got(caplog):
    skipped = _ListingCounts()
    rows = [{"image_id": str(index)} for index in range(3)]
    listed = _with_listing_progress(iter(rows), "images", skipped, interval_s=0)
    with caplog.at_level("INFO", logger="pipeline.run"):
        first = next(listed)
        skipped.images = 1  # as the done-filter after it counts
        rest = list(listed)
    assert [first, *rest] == rows
    assert [record.getMessage().split(" (")[0] for record in caplog.records] == [
        "listing: 1 images so far, 0 images already done",
        "listing: 2 images so far, 1 images already done",
        "listing: 3 images so far, 1 images already done",
    ]


def test_a_run_id_used_again_after_its_run_finished_is_named_in_a_warning(tmp_path, caplog):
    from pipeline.run import _warn_if_run_id_finished

    fs, root = filesystem_for(str(tmp_path), {})
    fs.pipe_file(f"{root}/_runs/nightly.started.json", b"{}")
    with caplog.at_level("WARNING", logger="pipeline.run"):
        _warn_if_run_id_finished(fs, root, "nightly")  # stopped, not finished: resumed
        assert not caplog.records
        fs.pipe_file(f"{root}/_runs/nightly.json", b"{}")
        _warn_if_run_id_finished(fs, root, "nightly")
    [warning] = caplog.records
    assert warning.getMessage().startswith("run_id nightly has already finished on this output")


def test_a_min_coverage_other_than_the_last_pseudo_label_runs_is_said(tmp_path, caplog):
    from pipeline.run import _warn_if_min_coverage_changed

    def record(name: str, pseudo_labels: dict, minutes: int) -> None:
        path = tmp_path / "_runs" / f"{name}.json"
        path.parent.mkdir(exist_ok=True)
        body = {"summary": {"run_id": name}, "config": {"pseudo_labels": pseudo_labels}}
        path.write_text(json.dumps(body))
        os.utime(path, (1_000_000 + minutes * 60,) * 2)

    def warnings_for(min_coverage: float) -> list[str]:
        config = load_config(
            None,
            [
                "input.uri=x",
                f"output.uri={tmp_path}",
                "models.segmentation=m",
                "pseudo_labels.enabled=true",
                f"pseudo_labels.min_coverage={min_coverage}",
            ],
        )
        caplog.clear()
        with caplog.at_level("WARNING", logger="pipeline.run"):
            _warn_if_min_coverage_changed(config)
        return [r.getMessage() for r in caplog.records]

    record("strict", {"enabled": True, "min_coverage": 0.6}, 0)
    record("plain", {"enabled": False, "min_coverage": 0.3}, 5)  # no pseudo-labels: not a bar
    assert warnings_for(0.6) == []
    [said] = warnings_for(0.3)
    assert said.startswith("pseudo_labels.min_coverage is 0.3 here and was 0.6 in run strict:")
    assert "jobs.export --min-coverage" in said


def test_the_summary_names_the_commonest_reasons_and_counts_the_rest():
    import collections

    reasons = collections.Counter({f"decode: kind {n}": 12 - n for n in range(12)})
    top = _top_reasons(reasons)
    assert list(top)[:10] == [f"decode: kind {n}" for n in range(10)]
    assert top["(2 other reasons)"] == 2 + 1
    assert sum(top.values()) == sum(reasons.values())
    assert _top_reasons(collections.Counter({"read: x": 3})) == {"read: x": 3}


def test_under_a_limit_images_that_failed_before_go_after_the_rest():
    from pipeline.output.done import DoneImages, done_key

    listed = [{"image_id": f"i{n}", "source_version": "v1"} for n in range(6)]
    failed = ["i0", "i1", "i3"]  # the first images of the listing fail every time
    done = DoneImages(errored=np.sort(np.array([done_key(i, "v1") for i in failed], np.uint64)))

    def taken(limit: int, names: list[str] | None = None) -> tuple[list[str], _ListingCounts]:
        rows = [row for row in listed if names is None or row["image_id"] in names]
        counts = _ListingCounts()
        return [row["image_id"] for row in _limited(iter(rows), done, limit, counts)], counts

    # The limit met before the listing's end: what is left is not counted.
    first, counts = taken(2)
    assert (first, counts.more_after_limit, counts.errors_left) == (["i2", "i4"], True, 0)
    everything, counts = taken(10)
    assert everything == ["i2", "i4", "i5", "i0", "i1", "i3"]
    assert (counts.more_after_limit, counts.errors_left) == (False, 0)
    # Only one image not tried yet is left: two of the failed ones go after it.
    last, counts = taken(3, ["i0", "i1", "i3", "i5"])
    assert (last, counts.more_after_limit, counts.errors_left) == (["i5", "i0", "i1"], True, 1)
    exactly, counts = taken(2, ["i0", "i5"])  # the last two there are
    assert (exactly, counts.more_after_limit, counts.errors_left) == (["i5", "i0"], False, 0)
    # Another source version is another image: not held back.
    other = [{"image_id": "i0", "source_version": "v2"}, {"image_id": "i1", "source_version": "v1"}]
    assert [r["image_id"] for r in _limited(iter(other), done, 1, _ListingCounts())] == ["i0"]


@pytest.mark.parametrize(("listed", "taken", "more"), [(5, 2, True), (2, 2, False), (1, 1, False)])
def test_a_limit_says_whether_images_were_left(listed, taken, more):
    counts = _ListingCounts()
    rows = [{"image_id": str(n), "source_version": ""} for n in range(listed)]
    assert len(list(_limited(iter(rows), DoneImages(), 2, counts))) == taken
    assert counts.more_after_limit is more


def test_done_shard_images_are_counted_from_the_reads_where_shards_were_read():
    """The view's count of a shard's done images may hold rows of other read
    settings (other ids); a read's own count replaces it."""
    import collections

    from pipeline.keys import shard_marker_stem
    from pipeline.output.done import done_key
    from pipeline.output.shard_markers import ShardMarkers
    from pipeline.progress import ProgressBeacon

    shards = [("s3://b/a.tar", "v1"), ("s3://b/b.tar", "v1"), ("s3://b/c.tar", "v1")]
    new_shard = ("s3://b/d.tar", "v1")
    # a.tar's 4 images are done, and 3 rows under the ids of other read settings.
    done = DoneImages(
        keys=np.array([1], dtype=np.uint64),
        per_shard=collections.Counter({shards[0]: 7, shards[1]: 3, shards[2]: 2}),
    )
    markers = ShardMarkers(images={shard_marker_stem(*shards[0]): 4})
    counts = _ListingCounts()
    rows = [{"shard_uri": uri, "shard_version": version} for uri, version in [*shards, new_shard]]
    passed = list(_not_done(iter(rows), done, True, counts, markers))
    assert passed == rows[1:]  # a.tar: all 4 of its images done, counted from its marker
    assert (counts.shards_skipped, counts.images) == (1, 4)
    assert len(counts.shards_to_read) == 2  # not d.tar: nothing of it is done
    # b.tar's read (tried twice by Ray) found none of its images done and left
    # one error behind; d.tar's found nothing; c.tar was never read (the limit
    # was met first), so the view's count stands.
    beacon = ProgressBeacon()
    for shard, images_done, errors_left in [
        (shards[1], 3, 0),
        (shards[1], 0, 1),
        (new_shard, 0, 0),
    ]:
        beacon.shard_read_started(done_key(*shard))
        beacon.shard_read(done_key(*shard), images_done, errors_left)
    beacon.shard_read_started(done_key(*shards[2]))
    heard = beacon.shard_reads()
    assert heard.still_reading == 1 and len(heard.keys) == 3
    _count_shard_reads(heard.last_per_shard(), counts)
    assert (counts.images, counts.errors_left) == (4 + 0 + 2, 1)


def test_a_beacon_that_cannot_answer_costs_the_shard_counts_not_the_run(caplog):
    from types import SimpleNamespace

    from pipeline.run import _shard_reads

    def dead(*_):
        raise RuntimeError("actor died: s3://bucket/key?X-Amz-Signature=secret")

    beacon = SimpleNamespace(
        shard_reads=SimpleNamespace(remote=dead), reads_in_flight=SimpleNamespace(remote=dead)
    )
    config = load_config(None, ["input.uri=/in", "output.uri=/out", "models.depth=/m"])
    with caplog.at_level("WARNING", logger="pipeline.run"):
        reads = _shard_reads(beacon, config)
    assert len(reads.keys) == 0 and reads.still_reading == 0
    [warning] = [record.getMessage() for record in caplog.records]
    assert "counts are lost (RuntimeError)" in warning and "secret" not in warning
