"""The whole job over a folder of mixed valid, odd and hostile images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dpt_model import depth_at_size
from jobs.config import load_config
from jobs.sample_images import encoded, synthetic_photo
from pipeline.encode import decode_depth_png, decode_segmentation_png
from tests.conftest import PARITY_SIZES, SEEDED_VIT_DEPTH_HW
from tests.corpus import hostile_files, map_tag, odd_files, write_files
from tests.dpt_model.test_parity import reference_depth, reference_segmentation

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    write_files(
        root / "photos",
        {
            f"p{i}.jpg": encoded(synthetic_photo(w, h, seed=i), "JPEG")
            for i, (h, w) in enumerate(PARITY_SIZES)
        },
    )
    # the same file name in another folder, and a name with a space and non-ASCII
    write_files(root / "more", {"p0.jpg": encoded(synthetic_photo(90, 60, seed=50), "JPEG")})
    write_files(root / "more", {"café photo.png": encoded(synthetic_photo(70, 50, seed=51), "PNG")})
    write_files(root / "hostile", hostile_files())
    write_files(root / "odd", {name: data for name, (data, _) in odd_files().items()})
    (root / "readme.txt").write_text("not listed: wrong extension")
    return root


def run_job(ray_cluster, corpus: Path, output: Path, checkpoints, *overrides: str):
    from pipeline.run import run_annotation

    config = load_config(
        None,
        [
            f"input.uri={corpus}",
            f"output.uri={output}",
            f"models.depth={checkpoints['depth-vit']}",
            f"models.segmentation={checkpoints['segmentation-vit']}",
            "inference.batch_size=4",
            "run_id=test-run",
            *overrides,
        ],
    )
    return run_annotation(config)


@pytest.fixture(scope="module")
def finished_run(ray_cluster, mixed_corpus, checkpoints, tmp_path_factory):
    output = tmp_path_factory.mktemp("output")
    summary = run_job(ray_cluster, mixed_corpus, output, checkpoints)
    table = pq.read_table(output / "predictions")
    return summary, {row["source_uri"]: row for row in table.to_pylist()}


def test_one_row_per_input_file_with_error_rows_for_hostile_files(finished_run, mixed_corpus):
    summary, rows = finished_run
    files = sorted(p for p in mixed_corpus.rglob("*") if p.is_file() and p.suffix != ".txt")
    assert sorted(rows) == sorted(str(p) for p in files)
    assert summary.images_listed == len(files)
    for name in hostile_files():
        row = rows[str(mixed_corpus / "hostile" / name)]
        assert row["status"] == "error" and row["error"].startswith("decode: ")
        assert row["depth_uri"] is None and row["segmentation_uri"] is None
    assert summary.images_error == len(hostile_files())
    assert summary.images_ok == len(files) - len(hostile_files())


def test_odd_images_are_annotated_at_their_oriented_size(finished_run, mixed_corpus):
    _, rows = finished_run
    for name, (_, (height, width)) in odd_files().items():
        row = rows[str(mixed_corpus / "odd" / name)]
        assert row["status"] == "ok", row["error"]
        assert (row["height"], row["width"]) == (height, width)
        depth = decode_depth_png(Path(row["depth_uri"]).read_bytes())
        classes = decode_segmentation_png(Path(row["segmentation_uri"]).read_bytes())
        assert depth.shape == SEEDED_VIT_DEPTH_HW  # output.depth_resolution: model
        assert classes.shape == (height, width)


def test_map_files_match_the_transformers_reference(finished_run, mixed_corpus, checkpoints):
    _, rows = finished_run
    for index in range(len(PARITY_SIZES)):
        path = mixed_corpus / "photos" / f"p{index}.jpg"
        row = rows[str(path)]
        image = np.asarray(Image.open(path).convert("RGB"))
        # Stored at the model's size; brought to the image's as a user would.
        depth = depth_at_size(
            decode_depth_png(Path(row["depth_uri"]).read_bytes()),
            row["depth_min"],
            row["depth_max"],
            (row["height"], row["width"]),
        )
        reference = reference_depth(checkpoints["depth-vit"], image)
        depth_range = float(reference.max() - reference.min())
        assert np.abs(depth - reference).max() <= depth_range / 65535 + 1e-4 * depth_range
        classes = decode_segmentation_png(Path(row["segmentation_uri"]).read_bytes())
        expected = reference_segmentation(checkpoints["segmentation-vit"], image)
        assert (classes == expected).mean() >= 0.999
        assert row["seg_labels"] == sorted(np.unique(classes).tolist())
        assert 0 < row["seg_confidence_mean"] <= 1


def test_rows_carry_ids_models_and_keys_under_the_output(finished_run, mixed_corpus):
    summary, rows = finished_run
    output = Path(summary.output_uri)
    same_name = [rows[str(mixed_corpus / folder / "p0.jpg")] for folder in ("photos", "more")]
    assert same_name[0]["depth_uri"] != same_name[1]["depth_uri"]
    row = rows[str(mixed_corpus / "more" / "café photo.png")]
    assert row["depth_uri"].endswith(f"depth/more/café photo.png.{map_tag(row)}.png")
    for row in rows.values():
        assert len(row["image_id"]) == 32 and row["run_id"] == "test-run"
        assert row["model_depth"].startswith("depth-vit@sha256:")
        assert row["model_segmentation"].startswith("segmentation-vit@sha256:")
        for uri in (row["depth_uri"], row["segmentation_uri"]):
            assert uri is None or Path(uri).resolve().is_relative_to(output.resolve())
    report = json.loads((output / "_runs" / "test-run.json").read_text())
    stages = report["summary"]["stage_timings_s"]
    assert any("InferenceActor" in name for name in stages), stages
    # Encoding runs in its own tasks, not fused into the Parquet write, which
    # bundles output.rows_per_part rows and would run them all in one task.
    assert "MapBatches(write_maps_batch)" in stages, stages
    # Every operator that does work reports time (reading the listing from the
    # object store can round to 0.000 s).
    assert all(
        entry["operator_wall_s"] > 0 for name, entry in stages.items() if name != "FromArrow"
    )
    assert report["summary"]["images_listed"] == summary.images_listed


def test_a_second_run_skips_done_images_and_a_forced_one_supersedes_them(
    ray_cluster, finished_run, checkpoints, mixed_corpus
):
    from pipeline import read_predictions

    first, _ = finished_run
    output = Path(first.output_uri)
    again = run_job(ray_cluster, mixed_corpus, output, checkpoints, "run_id=second")
    # Only the error rows are tried again: every ok image is already done.
    assert again.images_skipped_done == first.images_ok
    assert (again.images_ok, again.images_error) == (0, first.images_error)
    assert again.images_listed == first.images_listed and again.config_hash == first.config_hash

    # A dotted run id: Ray refuses "." in part names, so parts take it as "-".
    forced = run_job(
        ray_cluster, mixed_corpus, output, checkpoints, "run_id=third.v2", "mode=force"
    )
    assert forced.images_skipped_done == 0 and forced.images_ok == first.images_ok

    view = read_predictions(str(output)).to_pylist()
    assert len(view) == len({row["image_id"] for row in view}) == first.images_listed
    assert {row["run_id"] for row in view if row["status"] == "ok"} == {"third.v2"}
    committed = pq.read_table(output / "predictions").num_rows
    assert committed == first.images_listed * 2 + first.images_error
    assert {p.name for p in (output / "_runs").iterdir()} >= {"second.json", "third.v2.json"}
    assert any(p.name.startswith("third-v2_") for p in (output / "predictions").iterdir())


def test_overwrite_replaces_results_only_once_the_new_input_is_listed(
    ray_cluster, mixed_corpus, checkpoints, tmp_path
):
    from pipeline.listing import InputNotFoundError

    depth_only = ["models.segmentation=null"]
    first = run_job(ray_cluster, mixed_corpus / "more", tmp_path, checkpoints, *depth_only)
    with pytest.raises(InputNotFoundError, match="typo"):
        run_job(
            ray_cluster, mixed_corpus / "typo", tmp_path, checkpoints, *depth_only,
            "output.overwrite=true", "run_id=mistyped",
        )  # fmt: skip
    assert pq.read_table(tmp_path / "predictions").num_rows == first.images_listed

    replaced = run_job(
        ray_cluster, mixed_corpus / "photos", tmp_path, checkpoints, *depth_only,
        "output.overwrite=true", "run_id=replaced",
    )  # fmt: skip
    rows = pq.read_table(tmp_path / "predictions").to_pylist()
    assert len(rows) == replaced.images_ok == len(PARITY_SIZES)
    assert {row["run_id"] for row in rows} == {"replaced"}
    assert sorted(p.name for p in (tmp_path / "_runs").iterdir()) == [
        "replaced.json",
        "replaced.started.json",
    ]
    assert sorted(p.name for p in (tmp_path / "depth").rglob("*.png")) == sorted(
        f"{Path(row['source_uri']).name}.{map_tag(row)}.png" for row in rows
    )


def test_full_size_depth_maps_and_auto_batch_size(ray_cluster, mixed_corpus, checkpoints, tmp_path):
    summary = run_job(
        ray_cluster,
        mixed_corpus / "photos",
        tmp_path,
        checkpoints,
        "output.depth_resolution=original",
        "models.segmentation=null",
        "inference.batch_size=auto",
        "inference.max_batch_size=4",
    )
    assert summary.images_ok == len(PARITY_SIZES)
    for row in pq.read_table(tmp_path / "predictions").to_pylist():
        depth = decode_depth_png(Path(row["depth_uri"]).read_bytes())
        assert depth.shape == (row["height"], row["width"])


def test_each_shard_gets_a_read_task_of_its_own(ray_cluster, checkpoints, tmp_path):
    """Ray fused read and decode into tasks of 16 input rows: 16 shards read one
    after another in one task, where each could have had a CPU."""
    from tests.pipeline.test_shards import tar_bytes

    for shard in range(4):
        members = [(f"{i}.jpg", encoded(synthetic_photo(64, 48, seed=i), "JPEG")) for i in range(2)]
        write_files(tmp_path / "shards", {f"{shard}.tar": tar_bytes(members)})
    summary = run_job(
        ray_cluster,
        tmp_path / "shards",
        tmp_path / "output",
        checkpoints,
        "models.segmentation=null",
        "report.enabled=false",
        # Decode tasks apart from the actors, as on a GPU cluster: with the same
        # CPU request Ray fuses them into the actor, whose batches set its bundles.
        "resources.cpus_per_actor=0.5",
    )
    assert summary.images_ok == 8
    stages = summary.stage_timings_s
    assert stages["MapBatches(read_shard)->MapBatches(decode_in_slices)"]["tasks"] == 4


@pytest.mark.slow
def test_command_line_job_finishes_with_error_rows_and_exit_0(mixed_corpus, checkpoints, tmp_path):
    """Depth only, Dinov2 backbone (keep-aspect inputs), over good, odd and hostile files."""
    output = tmp_path / "cli-output"
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    result = subprocess.run(
        [
            sys.executable, "-m", "jobs.run",
            "--config", str(REPO_ROOT / "jobs/configs/local.yaml"),
            "--set", f"input.uri={mixed_corpus}",
            "--set", f"output.uri={output}",
            "--set", f"models.depth={checkpoints['depth-dinov2']}",
            "--set", "models.segmentation=null",
        ],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    table = pq.read_table(output / "predictions").to_pylist()
    errors = [row for row in table if row["status"] == "error"]
    assert len(errors) == len(hostile_files())
    ok = len(table) - len(errors)
    assert f"{ok} ok, {len(errors)} errors" in result.stdout
    assert all(row["depth_uri"] for row in table if row["status"] == "ok")
    assert all(row["segmentation_uri"] is None for row in table)


@pytest.mark.slow
def test_bad_config_exits_2_naming_the_key(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "jobs.run", "--set", "input.uri=x", "--set", "output.uri=y",
         "--set", "models.depth=m", "--set", "inference.dtype=float64"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "inference.dtype" in result.stderr and "float64" in result.stderr
