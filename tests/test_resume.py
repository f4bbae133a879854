"""A job killed mid-run (SIGKILL, no cleanup) and run again: nothing lost, nothing twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.config import load_config
from jobs.sample_images import encoded, synthetic_photo
from pipeline import read_predictions
from pipeline.encode import decode_depth_png
from tests.conftest import SEEDED_VIT_DEPTH_HW
from tests.corpus import write_files
from tests.processes import session_processes, stop_session

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGES = 48


def depth_job(images: Path, output: Path, checkpoints, *settings: str) -> list[str]:
    """``--set`` values of a depth-only job with the seeded ViT checkpoint."""
    return [
        f"input.uri={images}",
        f"output.uri={output}",
        f"models.depth={checkpoints['depth-vit']}",
        *settings,
    ]


def committed_parts(output: Path) -> list[Path]:
    folder = output / "predictions"
    return sorted(folder.glob("[!._]*.parquet")) if folder.is_dir() else []


def job_past_its_first_part(
    tmp_path: Path, checkpoints, run_id: str, width: int, log: Path | None = None
) -> tuple[subprocess.Popen, Path, Path, list[str]]:
    """``python -m jobs.run`` over IMAGES photos ``width`` wide, in a process group of
    its own (the driver and the Ray it starts), once it has committed a part;
    (the job, its images, its output, its settings)."""
    corpus, output = tmp_path / "images", tmp_path / "output"
    photos = {f"{i:03d}.jpg": synthetic_photo(width, width * 3 // 4, seed=i) for i in range(IMAGES)}
    write_files(corpus, {name: encoded(photo, "JPEG") for name, photo in photos.items()})
    settings = depth_job(
        corpus, output, checkpoints, "inference.batch_size=2", "output.rows_per_part=4"
    )
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    with open(log or os.devnull, "w") as said:
        job = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jobs.run",
                *(f"--set={s}" for s in [*settings, f"run_id={run_id}"]),
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=said,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 240
    while not committed_parts(output) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    return job, corpus, output, settings


def test_a_killed_job_resumes_where_it_stopped(ray_cluster, checkpoints, tmp_path, caplog):
    job, corpus, output, settings = job_past_its_first_part(tmp_path, checkpoints, "killed", 640)
    still_running = job.poll() is None
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert still_running, "the job ended before it could be killed; give it more images"
    # Ray's workers have process groups of their own and exit when they notice
    # their raylet is gone; one may finish the part it was writing meanwhile.
    # Count what the killed run committed once none of its processes is left.
    stop_session(job.pid)
    assert not session_processes(job.pid)
    before = pq.read_table(output / "predictions").num_rows
    assert 0 < before < IMAGES

    from pipeline.run import run_annotation

    with caplog.at_level("WARNING", logger="pipeline.run"):
        summary = run_annotation(load_config(None, [*settings, "run_id=resumed"]))
    # The killed run never finished, and its start record is fresh: the next run
    # takes it for one going, and says so.
    assert any("run killed is going" in record.getMessage() for record in caplog.records)
    assert summary.images_skipped_done == before
    assert summary.images_ok == IMAGES - before and summary.images_error == 0

    view = read_predictions(str(output)).to_pylist()
    assert sorted(row["source_uri"] for row in view) == sorted(
        str(corpus / f"{i:03d}.jpg") for i in range(IMAGES)
    )
    # Exactly once: the resumed run wrote a row only for images without one.
    assert pq.read_table(output / "predictions").num_rows == IMAGES
    for row in view:
        assert row["status"] == "ok"
        assert decode_depth_png(Path(row["depth_uri"]).read_bytes()).shape == SEEDED_VIT_DEPTH_HW


@pytest.mark.slow
@pytest.mark.parametrize("whole_group", [False, True], ids=["driver", "process-group"])
def test_a_job_stopped_by_sigterm_exits_130_with_its_stop_recorded(
    checkpoints, tmp_path, whole_group
):
    """``kill <pid>``, or the whole group (``timeout(1)``, a terminal's hangup): each
    once aborted in Ray's shutdown after the stop was recorded, exiting 134."""
    job, _, output, _ = job_past_its_first_part(
        tmp_path, checkpoints, "s", 320, log=tmp_path / "job.log"
    )
    assert job.poll() is None, "the job ended before it could be stopped; give it more images"
    if whole_group:
        os.killpg(job.pid, signal.SIGTERM)
    else:
        job.send_signal(signal.SIGTERM)
    try:
        exit_code = job.wait(timeout=120)
    finally:
        stop_session(job.pid)
    said = (tmp_path / "job.log").read_text()
    assert exit_code == 130, said[-2000:]
    assert "stopped: the rows committed so far are kept" in said
    ended = json.loads((output / "_runs" / "s.ended.json").read_text())
    assert ended["outcome"] == "stopped"


def test_resume_inside_a_shard_redoes_only_images_without_a_row(ray_cluster, checkpoints, tmp_path):
    from pipeline.run import run_annotation
    from tests.pipeline.test_shards import tar_bytes

    shard = tar_bytes(
        [(f"{i:03d}.jpg", encoded(synthetic_photo(64, 48, seed=i), "JPEG")) for i in range(10)]
    )
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "000.tar").write_bytes(shard)
    settings = depth_job(tmp_path / "shards", tmp_path / "output", checkpoints)
    # A first run stopped after 4 images stands in for one that crashed mid-shard.
    first = run_annotation(load_config(None, [*settings, "input.limit=4", "run_id=first"]))
    assert (first.images_ok, first.limit_reached) == (4, True)
    second = run_annotation(load_config(None, [*settings, "run_id=second"]))
    assert (second.images_skipped_done, second.images_ok, second.limit_reached) == (4, 6, False)
    assert second.images_listed == 10
    view = read_predictions(str(tmp_path / "output")).to_pylist()
    assert len(view) == len({row["image_id"] for row in view}) == 10
    assert pq.read_table(tmp_path / "output" / "predictions").num_rows == 10


def test_a_repeated_limited_run_annotates_the_next_images(ray_cluster, checkpoints, tmp_path):
    from pipeline.run import run_annotation

    write_files(
        tmp_path / "images",
        {f"{i}.jpg": encoded(synthetic_photo(64, 48, seed=i), "JPEG") for i in range(5)},
    )
    settings = depth_job(tmp_path / "images", tmp_path / "output", checkpoints, "input.limit=2")
    first = run_annotation(load_config(None, [*settings, "run_id=first"]))
    second = run_annotation(load_config(None, [*settings, "run_id=second"]))
    assert (first.images_ok, second.images_skipped_done, second.images_ok) == (2, 2, 2)
    assert first.limit_reached and second.limit_reached
    third = run_annotation(load_config(None, [*settings, "run_id=third"]))
    assert (third.images_ok, third.limit_reached) == (1, False)  # the last one: all listed
    assert (
        len({row["image_id"] for row in read_predictions(str(tmp_path / "output")).to_pylist()})
        == 5
    )


def test_limited_runs_move_past_samples_that_fail_every_time(
    ray_cluster, checkpoints, tmp_path, caplog
):
    """A shard whose first samples hold no image: their error rows would fill
    a limit of 2 on every run, and no run would reach the images after them."""
    from pipeline.run import run_annotation
    from tests.pipeline.test_shards import tar_bytes

    members = [("000.json", b"{}"), ("001.json", b"{}")] + [
        (f"{i:03d}.jpg", encoded(synthetic_photo(64, 48, seed=i), "JPEG")) for i in range(2, 5)
    ]
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "000.tar").write_bytes(tar_bytes(members))
    settings = depth_job(tmp_path / "shards", tmp_path / "output", checkpoints, "input.limit=2")
    with caplog.at_level("INFO", logger="pipeline.run"):
        runs = [
            run_annotation(load_config(None, [*settings, f"run_id=limited-{n}"])) for n in range(3)
        ]
    assert [(run.images_ok, run.images_error) for run in runs] == [(0, 2), (2, 0), (1, 0)]
    assert [run.images_skipped_done for run in runs] == [0, 0, 2]
    # The runs after the first said what they left behind (told by the read tasks).
    left = [r.getMessage() for r in caplog.records if r.getMessage().startswith("input.limit: ")]
    assert len(left) == 2 and all(message.startswith("input.limit: 2 shard") for message in left)
    view = read_predictions(str(tmp_path / "output")).to_pylist()
    assert sorted(row["status"] for row in view) == ["error", "error", "ok", "ok", "ok"]
    # The shard's images are all done: a run without a limit reads it no more.
    unlimited = run_annotation(load_config(None, [*settings[:-1], "run_id=unlimited"]))
    assert (unlimited.images_ok, unlimited.images_error, unlimited.images_skipped_done) == (0, 0, 3)


def test_a_parquet_shard_read_under_another_id_column_counts_no_image_as_done(
    ray_cluster, checkpoints, tmp_path
):
    """The view counts a shard's done images under any read settings; under
    another input.id_column its images have other ids, and none is done."""
    from pipeline.run import run_annotation

    photos = [encoded(synthetic_photo(64, 48, seed=i), "JPEG") for i in range(3)]
    (tmp_path / "shards").mkdir()
    table = pa.table({"image": photos, "uid": ["u0", "u1", "u2"]})
    pq.write_table(table, tmp_path / "shards" / "000.parquet")
    settings = depth_job(
        tmp_path / "shards", tmp_path / "output", checkpoints, "report.enabled=false"
    )
    by_row = run_annotation(load_config(None, [*settings, "run_id=by-row"]))
    by_uid = run_annotation(load_config(None, [*settings, "input.id_column=uid", "run_id=by-uid"]))
    assert (by_row.images_ok, by_row.images_skipped_done) == (3, 0)
    assert (by_uid.images_ok, by_uid.images_skipped_done, by_uid.images_listed) == (3, 0, 3)


def test_a_manifests_version_column_has_changed_images_annotated_again(
    ray_cluster, checkpoints, tmp_path
):
    import pyarrow as pa

    from pipeline.run import run_annotation

    images = tmp_path / "images"
    write_files(
        images, {f"{i}.jpg": encoded(synthetic_photo(64, 48, seed=i), "JPEG") for i in range(3)}
    )

    def manifest(versions: list[str]) -> None:
        uris = [f"{i}.jpg" for i in range(3)]
        pq.write_table(pa.table({"uri": uris, "etag": versions}), images / "list.parquet")

    settings = depth_job(
        images / "list.parquet", tmp_path / "output", checkpoints, "input.version_column=etag"
    )
    manifest(["a", "a", "a"])
    first = run_annotation(load_config(None, [*settings, "run_id=first"]))
    (images / "1.jpg").write_bytes(encoded(synthetic_photo(64, 48, seed=9), "JPEG"))
    manifest(["a", "b", "a"])
    second = run_annotation(load_config(None, [*settings, "run_id=second"]))
    assert (first.images_ok, second.images_skipped_done, second.images_ok) == (3, 2, 1)
    view = {
        Path(row["source_uri"]).name: row
        for row in read_predictions(str(tmp_path / "output")).to_pylist()
    }
    assert {name: row["source_version"] for name, row in view.items()} == {
        "0.jpg": "a",
        "1.jpg": "b",
        "2.jpg": "a",
    }
    assert view["1.jpg"]["run_id"] == "second"


def test_parts_are_committed_while_later_images_are_still_annotated(
    ray_cluster, checkpoints, tmp_path
):
    # On a two-CPU cluster the actor and the encode tasks hold every CPU; a
    # Parquet write that asked for a CPU of its own waited for the last image,
    # so a run stopped before its end had committed nothing to resume from.

    write_files(
        tmp_path / "images",
        {f"{i:03d}.jpg": encoded(synthetic_photo(320, 240, seed=i), "JPEG") for i in range(60)},
    )
    summary, committed, last_map = annotated_with_part_times(
        tmp_path / "images", tmp_path / "output", checkpoints, batch_size=2
    )
    assert summary.images_ok == 60
    assert len(committed) >= 10
    assert committed[len(committed) // 2] < last_map  # half the parts before the last map


def annotated_with_part_times(images: Path, output: Path, checkpoints, batch_size: int):
    """(summary, committed parts' times in order, the last map's time) of a run that
    commits a part every 4 rows."""
    from pipeline.run import run_annotation

    settings = depth_job(
        images,
        output,
        checkpoints,
        f"inference.batch_size={batch_size}",
        "output.rows_per_part=4",
        "report.enabled=false",
    )
    summary = run_annotation(load_config(None, settings))
    last_map = max(path.stat().st_mtime for path in (output / "depth").rglob("*.png"))
    return summary, sorted(path.stat().st_mtime for path in committed_parts(output)), last_map


def test_a_shards_rows_are_committed_while_its_later_images_are_annotated(
    ray_cluster, checkpoints, tmp_path
):
    """A shard's rows once left its read task only as blocks of 128 MiB: a run
    killed mid-shard had committed none of the maps it had written."""
    from tests.pipeline.test_shards import tar_bytes

    members = [
        (f"{i:03d}.jpg", encoded(synthetic_photo(96, 72, seed=i), "JPEG")) for i in range(80)
    ]
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "000.tar").write_bytes(tar_bytes(members))
    summary, committed, last_map = annotated_with_part_times(
        tmp_path / "shards", tmp_path / "output", checkpoints, batch_size=4
    )
    assert summary.images_ok == 80
    assert len(committed) >= 5
    assert committed[len(committed) // 2] < last_map  # half the parts before the last map


def test_an_incremental_run_skips_shards_whose_images_are_all_done(
    ray_cluster, checkpoints, tmp_path
):
    from pipeline.run import run_annotation
    from tests.pipeline.test_shards import tar_bytes

    shards = tmp_path / "shards"
    shards.mkdir()
    for name in ("000", "001"):
        members = [
            (f"{i:03d}.jpg", encoded(synthetic_photo(64, 48, seed=i), "JPEG")) for i in range(3)
        ]
        if name == "000":  # a sample with no image can never be done: it must not count
            members.append(("003.txt", b"a caption without its image"))
        (shards / f"{name}.tar").write_bytes(tar_bytes(members))
    settings = depth_job(shards, tmp_path / "output", checkpoints, "report.enabled=false")
    first = run_annotation(load_config(None, [*settings, "run_id=first"]))
    assert (first.images_ok, first.images_error) == (6, 1)
    # Same size and modification time, so the same version, but unreadable: a
    # run that opened the shard would write an error row for it.
    done_shard = shards / "000.tar"
    stat = done_shard.stat()
    done_shard.write_bytes(b"not a tar " * (stat.st_size // 10) + b"x" * (stat.st_size % 10))
    os.utime(done_shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    new_members = [("000.jpg", encoded(synthetic_photo(64, 48, seed=9), "JPEG"))]
    (shards / "002.tar").write_bytes(tar_bytes(new_members))

    second = run_annotation(load_config(None, [*settings, "run_id=second"]))
    assert (second.images_skipped_done, second.images_ok, second.images_error) == (6, 1, 0)
    rows = read_predictions(str(tmp_path / "output")).to_pylist()
    assert sorted(row["status"] for row in rows) == ["error"] + ["ok"] * 7
    assert [row["source_uri"] for row in rows if row["status"] == "error"] == [f"{done_shard}#003"]


def test_shards_read_under_other_settings_are_read_again_for_the_images_they_left_out(
    ray_cluster, checkpoints, tmp_path
):
    """A marker counts the images of one read's settings: under others (here a
    PNG taken as an image too) the shard holds images it never counted."""
    from pipeline.run import run_annotation
    from tests.pipeline.test_shards import tar_bytes

    shards = tmp_path / "shards"
    shards.mkdir()
    members = [
        ("000.jpg", encoded(synthetic_photo(64, 48, seed=0), "JPEG")),
        ("001.jpg", encoded(synthetic_photo(64, 48, seed=1), "JPEG")),
        ("002.png", encoded(synthetic_photo(64, 48, seed=2), "PNG")),
    ]
    (shards / "000.tar").write_bytes(tar_bytes(members))
    settings = depth_job(shards, tmp_path / "output", checkpoints, "report.enabled=false")

    jpeg_only = run_annotation(load_config(None, [*settings, "input.extensions=jpg"]))
    assert (jpeg_only.images_ok, jpeg_only.images_error) == (2, 1)  # 002: no jpg member
    again = run_annotation(load_config(None, [*settings, "input.extensions=jpg"]))
    assert (again.images_skipped_done, again.images_ok, again.images_error) == (2, 0, 0)

    every_kind = run_annotation(load_config(None, settings))
    assert (every_kind.images_skipped_done, every_kind.images_ok) == (2, 1)
    rows = read_predictions(str(tmp_path / "output")).to_pylist()
    assert sorted(row["source_uri"].rsplit("#", 1)[-1] for row in rows) == ["000", "001", "002"]
    assert {row["status"] for row in rows} == {"ok"}  # 002's error row replaced
    markers = sorted(path.name for path in (tmp_path / "output" / "_shards").iterdir())
    assert len(markers) == 2 and markers[0].split(".")[:2] == markers[1].split(".")[:2]
    assert sorted(name.rsplit(".", 1)[1] for name in markers) == ["2", "3"]
    # Under the defaults the marker has no settings tag: markers written
    # before tags existed still skip their shards.
    assert sorted(name.count(".") for name in markers) == [2, 3]
    last = run_annotation(load_config(None, settings))
    assert (last.images_skipped_done, last.images_ok, last.images_error) == (3, 0, 0)


def test_a_shard_restored_after_it_broke_is_read_again_to_retire_its_error_row(
    ray_cluster, checkpoints, tmp_path
):
    """Read whole, broken (its error row is its id's row in the view), then put
    back as it was: its images are all done and its old marker counts them, but
    skipped, nothing would ever retire the error row."""
    from pipeline.run import run_annotation
    from tests.pipeline.test_shards import tar_bytes

    shards = tmp_path / "shards"
    shards.mkdir()
    shard = shards / "000.tar"
    members = [(f"{i:03d}.jpg", encoded(synthetic_photo(64, 48, seed=i), "JPEG")) for i in range(2)]
    shard.write_bytes(tar_bytes(members))
    intact, stat = shard.read_bytes(), shard.stat()
    settings = depth_job(shards, tmp_path / "output", checkpoints, "report.enabled=false")
    assert run_annotation(load_config(None, settings)).images_ok == 2

    shard.write_bytes(b"not a tar at all")
    broken = run_annotation(load_config(None, settings))
    assert (broken.images_ok, broken.images_error) == (0, 1)
    view = read_predictions(str(tmp_path / "output")).to_pylist()
    assert [row["source_uri"] for row in view if row["status"] == "error"] == [str(shard)]

    shard.write_bytes(intact)
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the version read whole
    restored = run_annotation(load_config(None, settings))
    assert (restored.images_skipped_done, restored.images_ok, restored.images_error) == (2, 0, 0)
    view = read_predictions(str(tmp_path / "output")).to_pylist()
    assert sorted((row["source_uri"], row["status"]) for row in view) == [
        (f"{shard}#000", "ok"),
        (f"{shard}#001", "ok"),
    ]
    # Retired, the error row no longer holds the shard: the next run skips it unread.
    shard.write_bytes(b"unreadable, " * (stat.st_size // 12) + b"!" * (stat.st_size % 12))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    last = run_annotation(load_config(None, settings))
    assert (last.images_skipped_done, last.images_ok, last.images_error) == (2, 0, 0)


def test_a_shard_read_under_other_settings_is_skipped_only_once_a_read_found_all_done(
    ray_cluster, checkpoints, tmp_path
):
    """Read under two sets of settings, a shard's done images include images of
    the other settings: their count cannot say that this settings' images are done."""
    from pipeline.run import run_annotation
    from tests.pipeline.test_shards import tar_bytes

    shards = tmp_path / "shards"
    shards.mkdir()
    shard = shards / "000.tar"
    members = [
        ("000.jpg", encoded(synthetic_photo(64, 48, seed=0), "JPEG")),
        ("001.png", encoded(synthetic_photo(64, 48, seed=1), "PNG")),
    ]
    shard.write_bytes(tar_bytes(members))
    settings = depth_job(shards, tmp_path / "output", checkpoints, "report.enabled=false")

    def run(*more: str):
        summary = run_annotation(load_config(None, [*settings, *more]))
        return summary.images_ok, summary.images_error

    assert run("input.extensions=png") == (1, 1)  # 000: no png member
    assert run("input.extensions=jpg", "decode.max_side_px=32") == (0, 1)  # 000.jpg too large
    # One done image (001, a png) and one jpg image counted: the count would skip it.
    assert run("input.extensions=jpg") == (1, 0)
    assert run("input.extensions=jpg") == (0, 0)  # read once more: all done, and so marked
    intact = shard.stat()
    shard.write_bytes(b"unreadable, " * (intact.st_size // 12) + b"!" * (intact.st_size % 12))
    os.utime(shard, ns=(intact.st_atime_ns, intact.st_mtime_ns))  # the same version
    assert run("input.extensions=jpg") == (0, 0)  # skipped unread: a read would fail
    view = read_predictions(str(tmp_path / "output")).to_pylist()
    assert sorted((row["source_uri"][-3:], row["status"]) for row in view) == [
        ("000", "ok"),
        ("001", "ok"),
    ]
