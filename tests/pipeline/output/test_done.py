from datetime import timedelta

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.output.done import done_key, load_done_images
from pipeline.output.view import read_predictions
from pipeline.schema import PREDICTION_SCHEMA
from pipeline.storage import filesystem_for
from tests.pipeline.output.parts import T0, row, write_part


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
    # Errors: only "z"'s row is an error of this config, and only under its version.
    assert done.has_error_row("z", "v1") and done.has_error_row("z", "v1", on_bytes=True)
    assert not any(done.has_error_row(i, "v1") for i in ["x", "y", "s", "t", "h", "o"])
    assert not done.has_error_row("z", "v2")


def test_done_images_are_the_same_whatever_the_parts_per_scan(tmp_path, monkeypatch):
    import fsspec

    import pipeline.output.view

    for part in range(5):
        write_part(tmp_path, f"p{part}.parquet", [row(f"i{part}{n}", "ok", part) for n in range(3)])
    fs = fsspec.filesystem("file")
    whole = load_done_images(fs, str(tmp_path), "c1")
    monkeypatch.setattr(pipeline.output.view, "_PARTS_PER_SCAN", 2)  # groups of 2, 2 and 1
    grouped = load_done_images(fs, str(tmp_path), "c1")
    assert len(whole) == 15 and whole.keys.tolist() == grouped.keys.tolist()


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
    from pipeline.output.compaction import compact_predictions
    from pipeline.output.done import load_done_images

    for index, one in enumerate(rows):
        write_part(tmp_path, f"r{index}_a.parquet", [one])
    fs, root = filesystem_for(str(tmp_path), {})
    view = read_predictions(str(tmp_path)).to_pylist()
    assert bool(load_done_images(fs, root, "c1").has("x", "v1")) is done_under_c1
    [shown] = view
    shown_as = (shown["status"], shown["config_hash"], shown["source_version"])
    assert (shown_as == ("ok", "c1", "v1")) is done_under_c1
    # What a limited run takes last: an image whose row in the view is c1's error.
    errored = load_done_images(fs, root, "c1").has_error_row("x", "v1")
    assert errored is (shown_as == ("error", "c1", "v1"))
    # Compaction keeps the view, and with it what is done.
    compact_predictions(str(tmp_path))
    assert read_predictions(str(tmp_path)).to_pylist() == view
    assert bool(load_done_images(fs, root, "c1").has("x", "v1")) is done_under_c1


def test_done_images_are_the_views_ok_rows_under_the_config(tmp_path):
    """Against the view itself, over many runs' parts of random rows (more parts than
    the resume check joins its arrays after, and images in every bucket)."""
    from pipeline.output.done import load_done_images

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
    errored = sorted(
        done_key(r["image_id"], r["source_version"])
        for r in view
        if r["status"] == "error" and r["config_hash"] == "c1"
    )
    assert errored and done.errored.tolist() == errored


def test_the_done_check_reads_again_when_a_compaction_replaced_the_parts_it_listed(
    tmp_path, monkeypatch, caplog
):
    """A run whose done check began just before a compaction deleted its parts."""
    from pipeline.output import done as done_module
    from pipeline.output import view
    from pipeline.output.compaction import compact_predictions

    for index in range(4):
        write_part(tmp_path, f"r{index}_a.parquet", [row(f"x{index}", "ok", index)])
    fs, root = filesystem_for(str(tmp_path), {})
    listings = []

    def scan_then_compact(*args, **kwargs):
        parts = view.committed_parts(fs, root)
        listings.append(parts)
        if len(listings) == 1:  # the compaction runs between the listing and the reads
            compact_predictions(str(tmp_path))
        return view._scan_parts(fs, parts, *args[2:], **kwargs)

    monkeypatch.setattr(done_module, "scan_committed", scan_then_compact)
    with caplog.at_level("INFO", logger="pipeline.output.view"):
        done = load_done_images(fs, root, "c1")
    assert [len(parts) for parts in listings] == [4, 1]
    assert all(done.has(f"x{index}", "v1") for index in range(4)) and len(done) == 4
    assert "a part went while it was being read (a compaction?)" in caplog.text


def test_errors_of_an_images_bytes_are_told_from_those_of_later_stages(tmp_path):
    from pipeline.output.done import load_done_images

    reasons = {
        "no-image": "read: sample has no image member (extensions found: json)",
        "corrupt": "decode: truncated or corrupt image data: …",
        "oom": "infer: out of GPU memory for this image alone",
        "write": "write: SlowDown",
    }
    write_part(
        tmp_path, "a.parquet", [{**row(i, "error", 0), "error": r} for i, r in reasons.items()]
    )
    done = load_done_images(*filesystem_for(str(tmp_path), {}), "c1")
    assert all(done.has_error_row(image_id, "v1") for image_id in reasons)
    on_bytes = [i for i in reasons if done.has_error_row(i, "v1", on_bytes=True)]
    assert on_bytes == ["no-image", "corrupt"]
