"""The job against a real S3 HTTP endpoint (moto server on loopback)."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import s3fs

from jobs.config import load_config
from jobs.sample_images import encoded, synthetic_photo
from pipeline.encode import decode_depth_png, decode_segmentation_png
from pipeline.storage import arrow_filesystem
from tests.corpus import hostile_files


@pytest.fixture
def bucket(s3_endpoint):
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("annotate-test")
    yield fs
    fs.rm("annotate-test", recursive=True)
    fs.invalidate_cache()


def test_images_models_and_outputs_all_on_s3(ray_cluster, s3_endpoint, bucket, checkpoints):
    images = {
        f"images/set {i}/im{i}.jpg": encoded(synthetic_photo(96, 64, seed=i), "JPEG")
        for i in range(4)
    }
    images["images/bad/truncated.jpg"] = hostile_files()["truncated.jpg"]
    for key, data in images.items():
        bucket.pipe_file(f"annotate-test/{key}", data)
    for task in ("depth", "segmentation"):
        bucket.put(
            f"{checkpoints[f'{task}-vit']}/", f"annotate-test/models/{task}/", recursive=True
        )

    from pipeline.run import run_annotation

    config = load_config(
        None,
        [
            "input.uri=s3://annotate-test/images",
            "output.uri=s3://annotate-test/out",
            "models.depth=s3://annotate-test/models/depth",
            "models.segmentation=s3://annotate-test/models/segmentation",
            f"storage.endpoint_url={s3_endpoint}",
            "run_id=s3-run",
        ],
    )
    summary = run_annotation(config)
    assert (summary.images_ok, summary.images_error) == (4, 1)
    assert summary.predictions_uri == "s3://annotate-test/out/predictions"

    bucket.invalidate_cache()
    table = pq.read_table("annotate-test/out/predictions", filesystem=arrow_filesystem(bucket))
    rows = {row["source_uri"]: row for row in table.to_pylist()}
    assert sorted(rows) == sorted(f"s3://annotate-test/{key}" for key in images)
    for key in images:
        row = rows[f"s3://annotate-test/{key}"]
        if "bad/" in key:
            assert row["status"] == "error"
            continue
        assert row["depth_uri"] == f"s3://annotate-test/out/depth/{key[len('images/') :]}.png"
        assert decode_depth_png(bucket.cat_file(row["depth_uri"])).shape == (64, 96)
        assert decode_segmentation_png(bucket.cat_file(row["segmentation_uri"])).shape == (64, 96)
    assert bucket.exists("annotate-test/out/_runs/s3-run.json")
