"""``python -m jobs.compact``: few parts, the same view, and never while a run is going."""

import pyarrow.parquet as pq
import pytest

from pipeline.output.view import read_predictions
from tests.pipeline.output.parts import row, write_part
from tests.processes import run_module


def compact(*arguments: str):
    return run_module("jobs.compact", *arguments)


@pytest.mark.slow
def test_compacting_waits_for_a_run_that_has_not_finished(tmp_path):
    for index in range(3):
        write_part(tmp_path, f"r{index}_a.parquet", [row(f"i{index}", "ok", index)])
    (tmp_path / "_runs").mkdir()
    (tmp_path / "_runs" / "going.started.json").write_text("{}")
    view = read_predictions(str(tmp_path)).sort_by("image_id")

    refused = compact(str(tmp_path))
    assert refused.returncode == 1
    assert "runs are going on this output: going (start record renewed 0 min " in refused.stderr
    assert "one that was killed counts as going for 15 min after" in refused.stderr
    assert len(list((tmp_path / "predictions").iterdir())) == 3  # untouched

    done = compact(str(tmp_path), "--even-if-running")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "compacted 3 parts into 1 (3 rows)"
    assert len(list((tmp_path / "predictions").iterdir())) == 1
    assert read_predictions(str(tmp_path)).sort_by("image_id").equals(view)


def test_compacting_an_s3_output(s3_endpoint, tmp_path):
    from pipeline.storage import filesystem_for

    local = tmp_path / "local"
    for index in range(3):
        write_part(local, f"r{index}_a.parquet", [row(f"i{index}", "ok", index)])
    fs, _ = filesystem_for("s3://compact-me", {"client_kwargs": {"endpoint_url": s3_endpoint}})
    fs.mkdir("compact-me")
    fs.put(str(local / "predictions"), "compact-me/out/predictions", recursive=True)

    result = compact("s3://compact-me/out", f"--endpoint-url={s3_endpoint}")
    assert result.returncode == 0, result.stderr
    [part] = fs.ls("compact-me/out/predictions", refresh=True)
    assert part.rsplit("/", 1)[-1].startswith("compacted-")
    with fs.open(part, "rb") as file:
        assert sorted(pq.read_table(file)["image_id"].to_pylist()) == ["i0", "i1", "i2"]


def test_compacting_with_prune_maps_deletes_the_maps_no_row_names_on_s3(s3_endpoint, tmp_path):
    from pipeline.storage import filesystem_for

    fs, _ = filesystem_for("s3://prune-me", {"client_kwargs": {"endpoint_url": s3_endpoint}})
    fs.mkdir("prune-me")
    for key in ["depth/a[1].jpg.c2.png", "depth/a[1].jpg.c1.png", "segmentation/b.jpg.c1.png"]:
        fs.pipe_file(f"prune-me/out/{key}", b"png")
    local = tmp_path / "local"
    old = {**row("a", "ok", 0), "depth_uri": "s3://prune-me/out/depth/a[1].jpg.c1.png"}
    new = {**row("a", "ok", 5, config="c2"), "depth_uri": "s3://prune-me/out/depth/a[1].jpg.c2.png"}
    write_part(local, "r1_a.parquet", [old])
    write_part(local, "r2_a.parquet", [new])
    fs.put(str(local / "predictions"), "prune-me/out/predictions", recursive=True)

    result = compact("s3://prune-me/out", f"--endpoint-url={s3_endpoint}", "--prune-maps")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "compacted 2 parts into 1 (1 rows)",
        "deleted 2 of 3 map files: no row names them",
    ]
    # Glob characters in keys are taken literally.
    assert fs.find("prune-me/out/depth", refresh=True) == ["prune-me/out/depth/a[1].jpg.c2.png"]
    assert not fs.exists("prune-me/out/segmentation/b.jpg.c1.png")
