"""The quality report's parts without Ray: stats, thumbnails, the page, and the builder
over hand-made outputs (local and on a real S3 endpoint)."""

from __future__ import annotations

import io
import json
import re
from datetime import timedelta
from html.parser import HTMLParser

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.sample_images import encoded, synthetic_photo
from pipeline.encode import IGNORE_CLASS_ID, encode_depth_png, encode_segmentation_png
from pipeline.output.runs import run_records
from pipeline.report import ShardInput, write_quality_report
from pipeline.report.build import MAX_SHARDS_READ
from pipeline.report.page import ReportPage, Sample, render_page
from pipeline.report.stats import (
    SampleChooser,
    StatsAccumulator,
    output_stats,
    sample_image_ids,
)
from pipeline.report.thumbnails import (
    PALETTE,
    TURBO_LUT,
    colorize_depth,
    fit_within,
    overlay_segmentation,
)
from pipeline.schema import PREDICTION_SCHEMA
from pipeline.storage import filesystem_for
from tests.pipeline.output.parts import T0, row
from tests.pipeline.test_shards import tar_bytes
from tests.processes import run_module

# --- stats ------------------------------------------------------------------


def predictions(rows: list[dict]) -> pa.Table:
    full = [{field.name: r.get(field.name) for field in PREDICTION_SCHEMA} for r in rows]
    return pa.Table.from_pylist(full, schema=PREDICTION_SCHEMA)


def labelled(image_id: str, labels: list[int], confidence: float, coverage: float, kept: bool):
    return {
        **row(image_id, "ok", 0),
        "seg_labels": labels,
        "seg_confidence_mean": confidence,
        "label_coverage": coverage,
        "kept": kept,
        "depth_kind": "relative_inverse",
    }


def test_counts_error_groups_classes_and_histograms_come_from_the_rows():
    errors = [
        {**row(f"t{i}", "error", 0), "error": f"decode: truncated or corrupt image data: t{i}"}
        for i in range(5)
    ]
    errors.append({**row("e", "error", 0), "error": "read: FileNotFoundError: gone"})
    for error in errors:
        error["kept"] = False  # as the job writes error rows in pseudo-label mode
    rows = [
        labelled("a", [0, 3], 0.9, 0.97, True),
        labelled("b", [3], 0.6, 0.22, False),
        labelled("c", [3, 7], 0.55, 0.58, True),
        *errors,
    ]
    stats = output_stats(predictions(rows), examples_per_group=2)

    assert (stats.images, stats.ok, stats.error) == (9, 3, 6)
    # Error rows carry kept = false too, but they are errors, not weak labels.
    assert (stats.kept, stats.weak) == (2, 1)
    assert [(g.reason, g.count) for g in stats.error_groups] == [
        ("decode: truncated or corrupt image data", 5),
        ("read: FileNotFoundError", 1),
    ]
    assert stats.error_groups[0].examples == [
        ("s3://b/t0.jpg", "decode: truncated or corrupt image data: t0"),
        ("s3://b/t1.jpg", "decode: truncated or corrupt image data: t1"),
    ]
    assert stats.class_images == [(3, 3), (0, 1), (7, 1)]
    coverage = stats.histograms["label_coverage"]
    assert sum(coverage.counts) == 3 and coverage.missing == 6
    assert coverage.counts[19] == 1 and coverage.counts[4] == 1 and coverage.counts[11] == 1
    assert stats.depth_kinds == {"relative_inverse": 3}


def test_error_groups_beyond_the_cap_are_counted_not_listed():
    kinds = "abcdefg"  # kinds of failure: numbers in a reason are detail, grouped as N
    rows = [
        {**row(f"x{i}", "error", 0), "error": f"decode: kind {k}: detail"}
        for i, k in enumerate(kinds)
    ]
    stats = output_stats(predictions(rows), max_error_groups=3)
    assert len(stats.error_groups) == 3 and stats.more_error_groups == 4


def test_an_output_without_segmentation_or_rows_still_summarises():
    stats = output_stats(predictions([row("a", "ok", 0)]))
    assert (stats.images, stats.ok, stats.class_images, stats.histograms) == (1, 1, [], {})
    empty = output_stats(predictions([]))
    assert (empty.images, empty.error_groups) == (0, [])


def test_histogram_bins_cover_zero_to_one_inclusive():
    coverage = [0.0, 0.049, 0.05, 1.0, 1.2, None, float("nan")]
    rows = [{**row(f"i{n}", "ok", 0), "label_coverage": c} for n, c in enumerate(coverage)]
    result = output_stats(predictions(rows)).histograms["label_coverage"]
    assert result.counts[0] == 2 and result.counts[1] == 1 and result.counts[19] == 2
    assert sum(result.counts) == 5 and result.missing == 2
    assert result.edges[0] == 0.0 and result.edges[-1] == 1.0 and len(result.edges) == 21


def test_the_sample_is_the_smallest_ok_image_ids_and_stable_as_the_output_grows():
    rows = [row(f"img{i:02d}", "ok", 0) for i in range(50)] + [row("a-bad", "error", 0)]
    first = sample_image_ids(predictions(rows), 10)
    # "a-bad" has the smallest id of all, but it is an error row.
    assert first == [f"img{i:02d}" for i in range(10)]
    assert sample_image_ids(predictions(rows[::-1]), 10) == first
    grown = [*rows, row("a-new", "ok", 0), row("zz-new", "ok", 0)]
    assert sample_image_ids(predictions(grown), 10) == ["a-new", *first[:9]]
    assert sample_image_ids(predictions(rows), 0) == []


def test_images_in_shards_are_sampled_shard_by_shard_and_files_with_a_hash_are_files():
    rows = [
        {**row(f"{shard}-{i}", "ok", 0), "source_uri": f"s3://b/set#1/{shard}.tar#{i}"}
        for shard in ("s2", "s1")
        for i in range(3)
    ]
    rows.append({**row("zz-file", "ok", 0), "source_uri": "s3://b/photos/best#1.jpg"})
    # Files first (one group), then the first shard by URI, whole, then the next.
    assert sample_image_ids(predictions(rows), 5) == ["zz-file", "s1-0", "s1-1", "s1-2", "s2-0"]


def random_view(seed: int, count: int) -> pa.Table:
    """A one-row-per-image view with every kind of value the statistics read."""
    generator = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        status = "error" if generator.random() < 0.2 else "ok"
        shard = generator.integers(4)
        source = f"s3://b/s{shard}.tar#{i}" if shard < 2 else f"s3://b/{i}.jpg"
        score = [None, float("nan"), 0.0, 1.0, 1.3, -0.1, *generator.random(4)]
        rows.append(
            {
                **row(f"{generator.integers(1 << 40):012x}", status, 0),
                "source_uri": source,
                "error": f"stage{i % 7}: kind {i % 5}: detail {i}" if status == "error" else None,
                "seg_labels": sorted(set(generator.integers(12, size=3).tolist())),
                "seg_confidence_mean": score[generator.integers(len(score))],
                "label_coverage": score[generator.integers(len(score))],
                "entropy_mean": score[generator.integers(len(score))],
                "kept": [None, True, False][generator.integers(3)],
                "depth_kind": [None, "relative_inverse", "metric"][generator.integers(3)],
            }
        )
    return predictions(rows)


@pytest.mark.parametrize("seed", range(5))
def test_statistics_and_sample_fed_in_batches_equal_those_of_the_whole_view(seed):
    table = random_view(seed, 400)
    whole_stats = output_stats(table, max_error_groups=4, examples_per_group=2)
    whole_sample = sample_image_ids(table, 7)
    assert whole_stats.images == 400 and whole_stats.error_groups and whole_stats.histograms
    summary = StatsAccumulator(max_error_groups=4, examples_per_group=2)
    chooser = SampleChooser(7)
    cuts = np.sort(np.random.default_rng(seed).integers(0, 400, size=6))
    for start, stop in zip([0, *cuts], [*cuts, 400], strict=True):  # some batches empty
        for batch in table.slice(start, stop - start).to_batches() or [table.schema.empty_table()]:
            summary.add(batch)
            chooser.add(batch)
    assert summary.result() == whole_stats
    assert chooser.image_ids() == whole_sample


# --- thumbnails --------------------------------------------------------------


def test_turbo_runs_from_dark_blue_through_green_to_dark_red():
    low, middle, high = TURBO_LUT[16], TURBO_LUT[128], TURBO_LUT[255]
    assert low[2] > 2 * low[0] and high[0] > 3 * high[2] and middle[1] > 200
    assert TURBO_LUT.shape == (256, 3) and TURBO_LUT.dtype == np.uint8
    brightness = TURBO_LUT.astype(int).sum(axis=1)
    assert brightness[0] < brightness[128] > brightness[255]


@pytest.mark.parametrize("kind_near_is_high", [True, False])
def test_depth_colours_put_red_where_the_scene_is_near(kind_near_is_high):
    # Left half near, right half far, in the model's convention.
    near, far = (10.0, 1.0) if kind_near_is_high else (1.0, 10.0)
    depth = np.full((20, 40), far, dtype=np.float32)
    depth[:, :20] = near
    rgb = colorize_depth(depth, (80, 40), near_is_high=kind_near_is_high)
    assert rgb.shape == (40, 80, 3)
    assert tuple(rgb[20, 5]) == tuple(TURBO_LUT[255]) and tuple(rgb[20, 75]) == tuple(TURBO_LUT[0])


def test_a_flat_or_empty_depth_map_does_not_divide_by_zero():
    assert colorize_depth(np.ones((4, 4), np.float32), (8, 8), True).shape == (8, 8, 3)
    nan_map = np.full((4, 4), np.nan, dtype=np.float32)
    assert not colorize_depth(nan_map, (8, 8), True).any()


def test_the_overlay_blends_class_colours_and_dims_ignored_pixels():
    photo = np.full((10, 10, 3), 200, dtype=np.uint8)
    class_ids = np.full((5, 5), 2, dtype=np.uint8)
    class_ids[0, 0] = IGNORE_CLASS_ID
    overlay = overlay_segmentation(photo, class_ids, (10, 10), alpha=0.5)
    expected = np.round(200 * 0.5 + PALETTE[2].astype(float) * 0.5)
    np.testing.assert_array_equal(overlay[9, 9], expected)
    np.testing.assert_array_equal(overlay[0, 0], [70, 70, 70])  # 200 × 0.35, no class colour
    without_photo = overlay_segmentation(None, class_ids, (10, 10), alpha=0.5)
    np.testing.assert_array_equal(without_photo[9, 9], np.round(128 * 0.5 + PALETTE[2] * 0.5))


def test_thumbnails_keep_the_aspect_and_never_grow():
    assert fit_within(4000, 3000, 192) == (192, 144)
    assert fit_within(300, 4000, 192) == (14, 192)
    assert fit_within(100, 50, 192) == (100, 50)


# --- page ---------------------------------------------------------------------


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.sources, self.counts, self._count = [], [], {}, None
        self.attributes = []  # attribute names of every tag

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append(tag)
        self.attributes.append(set(attributes))
        if tag in ("img", "script", "link", "iframe"):
            self.sources.append(attributes.get("src") or attributes.get("href"))
        self._count = attributes.get("data-count")

    def handle_data(self, data):
        if self._count:
            self.counts[self._count] = data
            self._count = None


def test_the_page_escapes_every_value_from_the_data():
    hostile = '<script>alert("x")</script>" onerror="alert(1)'
    rows = [
        {**labelled("a", [1], 0.8, 0.9, True), "source_uri": f"s3://b/{hostile}.jpg"},
        {**row("e", "error", 0), "error": f"decode: {hostile}: bad"},
    ]
    rows[0].update(width=64, height=48)
    stats = output_stats(predictions(rows))
    page = render_page(
        ReportPage(
            output_uri=f"s3://out/{hostile}",
            generated_at="now",
            stats=stats,
            class_names={1: hostile},
            runs=[{"run_id": hostile, "images_ok": 1}],  # a record from an older version
            samples=[Sample(row=rows[0], input_thumbnail="thumbs/x-input.jpg", classes=[1])],
        )
    )
    collector = _Collector()
    collector.feed(page)
    assert "script" not in collector.tags and "<script>" not in page
    assert all("onerror" not in attributes for attributes in collector.attributes)
    assert collector.sources == ["thumbs/x-input.jpg"]  # nothing fetched from elsewhere
    assert collector.counts == {"images": "2", "ok": "1", "error": "1", "kept": "1", "weak": "0"}


# --- builder ------------------------------------------------------------------


def write_output(fs: fsspec.AbstractFileSystem, root: str, images: int) -> list[dict]:
    """An output as a job leaves it: sources, maps, one Parquet part and a run record."""
    rows = []
    for index in range(images):
        width, height = 120 + 8 * index, 90
        source = f"{root}/src/img {index}.jpg"
        fs.pipe_file(source, encoded(synthetic_photo(width, height, seed=index), "JPEG"))
        levels = np.tile(np.linspace(0, 65535, 24, dtype=np.uint16), (18, 1))
        class_ids = np.zeros((18, 24), dtype=np.uint8)
        class_ids[:, 12:] = 4
        class_ids[0, 0] = IGNORE_CLASS_ID
        fs.pipe_file(f"{root}/depth/{index}.png", encode_depth_png(levels, 1))
        fs.pipe_file(f"{root}/segmentation/{index}.png", encode_segmentation_png(class_ids, 1))
        rows.append(
            {
                **labelled(f"img{index}", [0, 4], 0.7, 0.8, True),
                "source_uri": fs.unstrip_protocol(source),
                "width": width,
                "height": height,
                "depth_uri": fs.unstrip_protocol(f"{root}/depth/{index}.png"),
                "segmentation_uri": fs.unstrip_protocol(f"{root}/segmentation/{index}.png"),
            }
        )
    rows.append({**row("broken", "error", 0), "error": "decode: not an image: x"})
    buffer = io.BytesIO()
    pq.write_table(predictions(rows), buffer)
    fs.pipe_file(f"{root}/predictions/part-0.parquet", buffer.getvalue())
    for minutes, run_id in ((0, "older"), (5, "newer")):
        record = {
            "summary": {
                "run_id": run_id,
                "images_ok": images,
                "images_error": 1,
                "images_skipped_done": 0,
                "elapsed_s": 3.0,
                "images_per_s": 2.0,
            },
            "finished_at": (T0 + timedelta(minutes=minutes)).isoformat(),
            "config": {"models": {"segmentation": None}},
        }
        fs.pipe_file(f"{root}/_runs/{run_id}.json", json.dumps(record).encode())
    return rows


def page_of(fs, root) -> _Collector:
    collector = _Collector()
    collector.feed(fs.cat_file(f"{root}/report/index.html").decode())
    return collector


def test_the_report_shows_a_bounded_sample_and_replaces_its_earlier_thumbnails(tmp_path):
    fs, root = filesystem_for(str(tmp_path), {})
    write_output(fs, root, images=6)
    uri = write_quality_report(root, {}, {0: "wall", 4: "person"}, samples=5, thumbnail_px=64)
    assert uri == f"{root}/report/index.html"
    page = page_of(fs, root)
    assert page.counts == {"images": "7", "ok": "6", "error": "1", "kept": "6", "weak": "0"}
    assert len(page.sources) == 15
    for source in page.sources:
        with Image.open(tmp_path / "report" / source) as thumbnail:
            assert max(thumbnail.size) == 64
    html = (tmp_path / "report/index.html").read_text()
    assert html.index("newer") < html.index("older")  # runs newest first
    assert "person (4)" in html and "wall (0)" in html

    write_quality_report(root, {}, {}, samples=2, thumbnail_px=64)
    shown = page_of(fs, root).sources
    assert len(shown) == 6 and set(shown) <= set(page.sources)
    assert sorted(f"thumbs/{p.name}" for p in (tmp_path / "report/thumbs").iterdir()) == sorted(
        shown
    )


def test_a_row_without_a_size_is_reported_not_fatal(tmp_path):
    fs, root = filesystem_for(str(tmp_path), {})
    rows = write_output(fs, root, images=2)
    rows[0]["width"] = None
    buffer = io.BytesIO()
    pq.write_table(predictions(rows), buffer)
    fs.pipe_file(f"{root}/predictions/part-0.parquet", buffer.getvalue())
    write_quality_report(root, {}, {}, samples=4)
    html = (tmp_path / "report/index.html").read_text()
    assert "no thumbnails: the row records no image size" in html
    assert len(page_of(fs, root).sources) == 3  # the other image's three


def test_a_missing_source_leaves_its_thumbnail_out_and_says_why(tmp_path):
    fs, root = filesystem_for(str(tmp_path), {})
    write_output(fs, root, images=1)
    (tmp_path / "src/img 0.jpg").unlink()
    write_quality_report(root, {}, {}, samples=4)
    html = (tmp_path / "report/index.html").read_text()
    assert [source.rsplit("-", 1)[1] for source in page_of(fs, root).sources] == [
        "depth.jpg",
        "segmentation.jpg",
    ]
    assert re.search(r'class="problem">input: FileNotFoundError', html)


def report_command(*arguments: str):
    return run_module("jobs.report", *arguments)


def test_the_report_command_rebuilds_a_report_on_s3(s3_endpoint, tmp_path):
    from tests.test_fault_proxy import s3_through

    s3 = s3_through(s3_endpoint)
    s3.mkdir("report-out")
    # Glob characters in the output path, and a sibling output they would match.
    output = "report-out/job[1]"
    write_output(s3, output, images=3)
    write_output(s3, "report-out/job1", images=1)
    assert report_command("s3://report-out/job1", "--endpoint-url", s3_endpoint).returncode == 0
    sibling_thumbnails = sorted(s3.ls("report-out/job1/report/thumbs"))
    for samples in ("3", "2"):  # the second build replaces the first one's extra thumbnails
        result = report_command(
            f"s3://{output}", "--samples", samples, "--endpoint-url", s3_endpoint
        )
        assert result.returncode == 0, result.stderr
    assert f"s3://{output}/report/index.html" in result.stdout
    s3 = s3_through(s3_endpoint)
    page = page_of(s3, output)
    assert page.counts["images"] == "4" and len(page.sources) == 6
    assert sorted(s3.ls(f"{output}/report/thumbs")) == sorted(
        f"{output}/report/{source}" for source in page.sources
    )
    assert sorted(s3.ls("report-out/job1/report/thumbs")) == sibling_thumbnails
    # Served as a page and pictures, not as downloads.
    s3.invalidate_cache()  # listings do not carry Content-Type; a HEAD does
    assert s3.info(f"{output}/report/index.html")["ContentType"].startswith("text/html")
    assert s3.info(f"{output}/report/{page.sources[0]}")["ContentType"] == "image/jpeg"


@pytest.mark.slow
def test_the_report_command_names_a_bad_argument_and_a_wrong_uri(tmp_path):
    result = report_command(str(tmp_path), "--samples", "-1")
    assert result.returncode == 2 and "--samples" in result.stderr
    result = report_command(str(tmp_path / "typo"))
    assert result.returncode == 2 and "no predictions under" in result.stderr
    assert not (tmp_path / "typo").exists()


def write_shard_output(fs, root: str, shards: int, images_per_shard: int) -> None:
    """Webdataset shards and an output whose rows point into them (depth maps only)."""
    rows = []
    for shard in range(shards):
        members = [
            (f"{index:03d}.jpg", encoded(synthetic_photo(80, 60, seed=index), "JPEG"))
            for index in range(images_per_shard)
        ]
        shard_path = f"{root}/shards/s{shard}.tar"
        fs.pipe_file(shard_path, tar_bytes(members))
        levels = np.tile(np.arange(24, dtype=np.uint16) * 2000, (18, 1))
        for index in range(images_per_shard):
            depth_path = f"{root}/depth/s{shard}/{index}.png"
            fs.pipe_file(depth_path, encode_depth_png(levels, 1))
            rows.append(
                {
                    **row(f"s{shard}-{index}", "ok", 0),
                    "source_uri": f"{fs.unstrip_protocol(shard_path)}#{index:03d}",
                    "width": 80,
                    "height": 60,
                    "depth_uri": fs.unstrip_protocol(depth_path),
                    "depth_kind": "metric",
                }
            )
    buffer = io.BytesIO()
    pq.write_table(predictions(rows), buffer)
    fs.pipe_file(f"{root}/predictions/part-0.parquet", buffer.getvalue())


def test_sampled_images_come_from_few_shards_read_once(tmp_path):
    fs, root = filesystem_for(str(tmp_path), {})
    write_shard_output(fs, root, shards=5, images_per_shard=2)
    webdataset = ShardInput("webdataset", ("jpg",), "image", None)
    write_quality_report(root, {}, samples=8, shard_input=webdataset)
    html = (tmp_path / "report/index.html").read_text()
    inputs = [source for source in page_of(fs, root).sources if source.endswith("-input.jpg")]
    assert len(inputs) == 2 * MAX_SHARDS_READ  # the shards past the cap show maps only
    assert html.count("its shard was not read for the report") == 8 - 2 * MAX_SHARDS_READ

    write_quality_report(root, {}, samples=8)  # without knowing how the shards are laid out
    assert not [s for s in page_of(fs, root).sources if s.endswith("-input.jpg")]
    html = (tmp_path / "report/index.html").read_text()
    assert html.count("its shard was not read for the report") == 8


def test_a_file_named_like_a_shard_member_is_shown_where_the_input_is_files(tmp_path):
    fs, root = filesystem_for(str(tmp_path), {})
    rows = write_output(fs, root, images=1)
    fs.mv(f"{root}/src/img 0.jpg", f"{root}/src/clip.tar#0.jpg")
    rows[0]["source_uri"] = fs.unstrip_protocol(f"{root}/src/clip.tar#0.jpg")
    buffer = io.BytesIO()
    pq.write_table(predictions(rows), buffer)
    fs.pipe_file(f"{root}/predictions/part-0.parquet", buffer.getvalue())
    write_quality_report(root, {}, {}, samples=4)
    assert [source.rsplit("-", 1)[1] for source in page_of(fs, root).sources] == [
        "input.jpg",
        "depth.jpg",
        "segmentation.jpg",
    ]


def test_unreadable_or_odd_run_records_hide_only_themselves(tmp_path):
    fs, root = filesystem_for(str(tmp_path / "out[1]"), {})
    write_output(fs, root, images=1)
    fs.pipe_file(f"{root}/_runs/broken.json", b"{not json")
    fs.pipe_file(f"{root}/_runs/list.json", b"[1, 2]")
    fs.pipe_file(f"{root}/_runs/nulls.json", b'{"summary": null, "finished_at": null}')
    records = run_records(root)
    assert [
        record.get("summary", {}) and record["summary"].get("run_id") for record in records
    ] == [
        "newer",
        "older",
        None,
    ]
    write_quality_report(root, {}, {}, samples=1)
    assert "newer" in (tmp_path / "out[1]/report/index.html").read_text()


def test_the_shard_layout_comes_from_the_run_record():
    record = {
        "summary": {"input_format": "parquet"},
        "config": {"input": {"extensions": ["jpg"], "image_column": "img", "id_column": "uid"}},
    }
    assert ShardInput.from_run_record(record) == ShardInput("parquet", ("jpg",), "img", "uid")
    record["summary"]["input_format"] = "files"
    assert ShardInput.from_run_record(record) is None
    assert ShardInput.from_run_record({"summary": None, "config": None}) is None


def test_the_runs_table_names_runs_that_did_not_finish(tmp_path):
    import os
    import time

    from pipeline.report.build import _runs_table

    runs = tmp_path / "_runs"
    runs.mkdir()

    def record(name: str, content: dict, age_s: float) -> None:
        (runs / name).write_text(json.dumps(content))
        when = time.time() - age_s
        os.utime(runs / name, (when, when))

    started = {"started_at": "2026-12-04T10:00:00+00:00"}
    record("done.started.json", {**started, "run_id": "done"}, 4000)
    record(
        "done.json",
        {**started, "summary": {"run_id": "done", "images_ok": 3}, "finished_at": T0.isoformat()},
        3900,
    )
    record("stopped.started.json", started, 3000)
    record(
        "stopped.ended.json", {**started, "outcome": "stopped", "ended_at": "2026-12-04T11"}, 2900
    )
    record("failed.started.json", started, 2000)
    ended = {**started, "outcome": "failed", "error_type": "OSError", "ended_at": "2026-12-04T12"}
    record("failed.ended.json", ended, 1900)
    record("killed.started.json", started, 1800)  # not renewed for 30 minutes
    record("going.started.json", started, 60)
    record("this.started.json", started, 1)  # the run writing the report
    table = _runs_table(str(tmp_path), {}, {"run_id": "this", "images_ok": 1})
    outcomes = {run["run_id"]: run["outcome"] for run in table}
    assert outcomes == {
        "this": "finished",
        "done": "finished",
        "stopped": "stopped",
        "failed": "failed (OSError)",
        "killed": "did not finish",
        "going": "going",
    }
    assert [run["run_id"] for run in table][:2] == ["this", "going"]  # newest first
    html = render_page(
        ReportPage(
            output_uri=str(tmp_path),
            generated_at="now",
            stats=output_stats(predictions([row("a", "ok", 0)])),
            class_names={},
            runs=table,
            samples=[],
        )
    )
    assert html.count("no counts: the run wrote no finish record") == 4
