"""The job against a real S3 HTTP endpoint (moto server on loopback), every input format."""

from __future__ import annotations

import io
import json
import re
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from dpt_model import depth_at_size
from dpt_model.labels import PseudoLabelDataset
from jobs.config import load_config
from jobs.sample_images import encoded, synthetic_photo
from pipeline import read_predictions
from pipeline.encode import decode_depth_png, decode_segmentation_png
from pipeline.storage import arrow_filesystem
from tests.conftest import SEEDED_VIT_DEPTH_HW
from tests.corpus import hostile_files, map_tag
from tests.pipeline.test_shards import tar_bytes


@pytest.fixture
def s3(s3_endpoint):
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    buckets = []

    def new_bucket() -> str:
        name = f"annotate-{uuid.uuid4().hex[:10]}"
        fs.mkdir(name)
        buckets.append(name)
        return name

    fs.new_bucket = new_bucket
    yield fs
    for name in buckets:
        fs.rm(name, recursive=True)
    fs.invalidate_cache()


def photo(seed: int, width: int = 96, height: int = 64) -> bytes:
    return encoded(synthetic_photo(width, height, seed=seed), "JPEG")


def run_on_s3(s3, s3_endpoint, checkpoints, bucket: str, *overrides: str):
    from pipeline.run import run_annotation

    s3.put(f"{checkpoints['depth-vit']}/", f"{bucket}/models/depth/", recursive=True)
    config = load_config(
        None,
        [
            f"output.uri=s3://{bucket}/out",
            f"models.depth=s3://{bucket}/models/depth",
            f"storage.endpoint_url={s3_endpoint}",
            "run_id=s3-run",
            *overrides,
        ],
    )
    summary = run_annotation(config)
    s3.invalidate_cache()
    table = pq.read_table(f"{bucket}/out/predictions", filesystem=arrow_filesystem(s3))
    return summary, {row["source_uri"]: row for row in table.to_pylist()}


def report_thumbnails(s3, bucket: str) -> list[str]:
    """The thumbnails the run's quality report shows, each checked to exist on S3."""
    html = s3.cat_file(f"{bucket}/out/report/index.html").decode()
    assert 'class="problem"' not in html  # no thumbnail left out
    shown = sorted(re.findall(r'<img src="(thumbs/[^"]+)"', html))
    assert all(s3.exists(f"{bucket}/out/report/{path}") for path in shown)
    return shown


def assert_depth_map(s3, row, image_hw):
    """An ok row of an image of that size, with its depth map at the model's size."""
    assert row["status"] == "ok", row["error"]
    assert (row["height"], row["width"]) == image_hw
    assert decode_depth_png(s3.cat_file(row["depth_uri"])).shape == SEEDED_VIT_DEPTH_HW


def test_image_files_models_and_outputs_all_on_s3(ray_cluster, s3_endpoint, s3, checkpoints):
    bucket = s3.new_bucket()
    images = {f"images/set {i}/im{i}.jpg": photo(i) for i in range(4)}
    images["images/bad/truncated.jpg"] = hostile_files()["truncated.jpg"]
    for key, data in images.items():
        s3.pipe_file(f"{bucket}/{key}", data)
    s3.put(f"{checkpoints['segmentation-vit']}/", f"{bucket}/models/seg/", recursive=True)

    on_s3 = (f"input.uri=s3://{bucket}/images", f"models.segmentation=s3://{bucket}/models/seg")
    summary, rows = run_on_s3(s3, s3_endpoint, checkpoints, bucket, *on_s3)
    assert (summary.input_format, summary.images_ok, summary.images_error) == ("files", 4, 1)
    assert summary.predictions_uri == f"s3://{bucket}/out/predictions"
    assert sorted(rows) == sorted(f"s3://{bucket}/{key}" for key in images)
    for key in images:
        row = rows[f"s3://{bucket}/{key}"]
        if "bad/" in key:
            assert row["status"] == "error"
            continue
        assert (
            row["depth_uri"]
            == f"s3://{bucket}/out/depth/{key[len('images/') :]}.{map_tag(row)}.png"
        )
        assert_depth_map(s3, row, (64, 96))
        assert decode_segmentation_png(s3.cat_file(row["segmentation_uri"])).shape == (64, 96)
    assert s3.exists(f"{bucket}/out/_runs/s3-run.json")
    assert summary.quality_report_uri == f"s3://{bucket}/out/report/index.html"
    assert len(report_thumbnails(s3, bucket)) == 4 * 3  # input, depth, segmentation

    # The scheduled case: a new image, the same command. Every listing of the
    # output in this process must see the parts this run commits (s3fs caches
    # listings: a stale one failed the run at its end, its rows committed).
    s3.pipe_file(f"{bucket}/images/new/im9.jpg", photo(9))
    again, rows = run_on_s3(s3, s3_endpoint, checkpoints, bucket, *on_s3, "run_id=s3-run-2")
    assert (again.images_skipped_done, again.images_ok, again.images_error) == (4, 1, 1)
    assert rows[f"s3://{bucket}/images/new/im9.jpg"]["status"] == "ok"
    assert s3.exists(f"{bucket}/out/_runs/s3-run-2.json")


def test_webdataset_shards_with_metadata_and_a_truncated_shard(
    ray_cluster, s3_endpoint, s3, checkpoints
):
    bucket = s3.new_bucket()
    first = [("000.jpg", photo(0)), ("000.json", b'{"caption": "first"}'), ("001.jpg", photo(1))]
    s3.pipe_file(f"{bucket}/shards/a-000.tar", tar_bytes(first))
    s3.pipe_file(f"{bucket}/shards/a-001.tar.gz", tar_bytes([("x/002.png", photo(2))], True))
    cut = tar_bytes([(f"{i:03d}.jpg", photo(i, 320, 240)) for i in (3, 4, 5)])
    s3.pipe_file(f"{bucket}/shards/a-002.tar", cut[: len(cut) // 2])

    summary, rows = run_on_s3(
        s3, s3_endpoint, checkpoints, bucket, f"input.uri=s3://{bucket}/shards"
    )
    prefix = f"s3://{bucket}/shards"
    assert (summary.input_format, summary.shards_listed) == ("webdataset", 3)
    ok = {uri for uri, row in rows.items() if row["status"] == "ok"}
    assert ok >= {
        f"{prefix}/a-000.tar#000",
        f"{prefix}/a-000.tar#001",
        f"{prefix}/a-001.tar.gz#x/002",
    }
    shard_error = rows[f"{prefix}/a-002.tar"]
    assert shard_error["status"] == "error" and "truncated or corrupt" in shard_error["error"]
    assert len(rows) == summary.images_listed == summary.images_ok + summary.images_error
    first_row = rows[f"{prefix}/a-000.tar#000"]
    assert json.loads(first_row["source_metadata"]) == {"json": {"caption": "first"}}
    assert (
        first_row["depth_uri"]
        == f"s3://{bucket}/out/depth/a-000.tar/000.jpg.{map_tag(first_row)}.png"
    )
    assert_depth_map(s3, first_row, (64, 96))
    assert rows[f"{prefix}/a-000.tar#001"]["source_metadata"] is None
    # The report finds its sampled images inside their shards (.tar and .tar.gz).
    assert len(report_thumbnails(s3, bucket)) == len(ok) * 2  # input, depth


def test_parquet_image_shards_with_an_id_column(ray_cluster, s3_endpoint, s3, checkpoints):
    bucket = s3.new_bucket()
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "image": pa.array(
                [{"bytes": photo(i), "path": f"{i}.jpg"} for i in range(3)]
                + [{"bytes": b"not an image", "path": "bad.jpg"}],
                type=image_type,
            ),
            "uid": ["u0", "u1", "u2", "u3"],
            "caption": ["a", "b", "c", "d"],
        }
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=2)
    s3.pipe_file(f"{bucket}/data/train-00000.parquet", buffer.getvalue())
    s3.pipe_file(f"{bucket}/data/_SUCCESS", b"")

    summary, rows = run_on_s3(
        s3,
        s3_endpoint,
        checkpoints,
        bucket,
        f"input.uri=s3://{bucket}/data",
        "input.id_column=uid",
    )
    shard = f"s3://{bucket}/data/train-00000.parquet"
    assert summary.input_format == "parquet"
    assert sorted(rows) == [f"{shard}#u{i}" for i in range(4)]
    assert [rows[f"{shard}#u{i}"]["status"] for i in range(4)] == ["ok", "ok", "ok", "error"]
    assert "not an image" in rows[f"{shard}#u3"]["error"]
    assert rows[f"{shard}#u1"]["depth_uri"] == (
        f"s3://{bucket}/out/depth/train-00000.parquet/u1.{map_tag(rows[f'{shard}#u1'])}.png"
    )
    assert_depth_map(s3, rows[f"{shard}#u1"], (64, 96))
    assert len(report_thumbnails(s3, bucket)) == 3 * 2  # input, depth


def test_manifest_across_buckets_and_presigned_urls(ray_cluster, s3_endpoint, s3, checkpoints):
    bucket, other = s3.new_bucket(), s3.new_bucket()
    s3.pipe_file(f"{bucket}/lists/pics/a.jpg", photo(0))
    s3.pipe_file(f"{other}/b/b.jpg", photo(1))
    s3.pipe_file(f"{other}/c/c.jpg", photo(2))
    presigned = s3.url(f"{other}/c/c.jpg", expires=600)
    assert "Signature" in presigned
    manifest = f"pics/a.jpg\ns3://{other}/b/b.jpg\n{presigned}\ns3://{other}/missing.jpg\n"
    s3.pipe_file(f"{bucket}/lists/today.txt", manifest.encode())

    summary, rows = run_on_s3(
        s3, s3_endpoint, checkpoints, bucket, f"input.uri=s3://{bucket}/lists/today.txt"
    )
    plain = presigned.split("?")[0]
    assert summary.input_format == "manifest"
    assert sorted(rows) == sorted(
        [
            f"s3://{bucket}/lists/pics/a.jpg",
            f"s3://{other}/b/b.jpg",
            plain,
            f"s3://{other}/missing.jpg",
        ]
    )
    assert rows[f"s3://{other}/missing.jpg"]["status"] == "error"
    for uri in (f"s3://{bucket}/lists/pics/a.jpg", f"s3://{other}/b/b.jpg", plain):
        assert_depth_map(s3, rows[uri], (64, 96))
    row = rows[f"s3://{other}/b/b.jpg"]
    assert row["depth_uri"] == f"s3://{bucket}/out/depth/{other}/b/b.jpg.{map_tag(row)}.png"
    written = b"".join(
        s3.cat_file(path)
        for path in s3.find(f"{bucket}/out")
        if path.endswith((".parquet", ".json"))
    )
    assert b"Signature" not in written


@pytest.mark.slow
def test_pseudo_label_dataset_reads_an_output_on_s3_and_synced_down(
    ray_cluster, s3_endpoint, s3, checkpoints, tmp_path
):
    bucket = s3.new_bucket()
    for i in range(3):
        s3.pipe_file(f"{bucket}/images/{i}.jpg", photo(i))
    run_on_s3(s3, s3_endpoint, checkpoints, bucket, f"input.uri=s3://{bucket}/images")
    options = load_config(
        None,
        ["input.uri=x", "output.uri=y", "models.depth=z", f"storage.endpoint_url={s3_endpoint}"],
    ).storage_options()

    dataset = PseudoLabelDataset(f"s3://{bucket}/out", storage_options=options)
    rows = {r["image_id"]: r for r in read_predictions(f"s3://{bucket}/out", options).to_pylist()}
    assert len(dataset) == 3
    for item in dataset:
        row = rows[item["image_id"]]
        assert item["image"].shape == (3, row["height"], row["width"])
        levels = decode_depth_png(s3.cat_file(row["depth_uri"]))
        size_hw = (row["height"], row["width"])
        expected = depth_at_size(levels, row["depth_min"], row["depth_max"], size_hw)
        np.testing.assert_array_equal(item["depth"].numpy(), expected)
        assert "label" not in item  # a depth-only run

    # Synced down to train locally (the bucket's maps then gone): the rows still
    # name the maps on S3, and the dataset reads the local copies.
    on_s3 = {item["image_id"]: item["depth"] for item in dataset}
    local = tmp_path / "synced"
    s3.get(f"{bucket}/out/", f"{local}/", recursive=True)
    s3.rm(f"{bucket}/out/depth", recursive=True)
    synced_dataset = PseudoLabelDataset(str(local), storage_options=options)  # images on S3
    synced = {item["image_id"]: item["depth"] for item in synced_dataset}
    assert synced.keys() == on_s3.keys()
    for image_id, depth in synced.items():
        np.testing.assert_array_equal(depth.numpy(), on_s3[image_id].numpy())
