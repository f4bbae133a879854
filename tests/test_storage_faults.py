"""The job against an S3 endpoint that fails a share of requests, and model downloads."""

from __future__ import annotations

import struct
import uuid

import pyarrow.parquet as pq
import s3fs

from jobs.config import load_config
from jobs.sample_images import encoded, synthetic_photo
from pipeline import read_predictions
from pipeline.bench.fault_proxy import FaultInjectingProxy
from pipeline.encode import decode_depth_png
from pipeline.storage import arrow_filesystem
from tests.conftest import SEEDED_VIT_DEPTH_HW

IMAGES = 12


def upload_job_inputs(s3_endpoint: str, checkpoints) -> tuple[s3fs.S3FileSystem, str]:
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    bucket = f"faults-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    for index in range(IMAGES):
        image = encoded(synthetic_photo(96, 64, seed=index), "JPEG")
        fs.pipe_file(f"{bucket}/images/{index:02d}.jpg", image)
    fs.put(f"{checkpoints['depth-vit']}/", f"{bucket}/model/", recursive=True)
    return fs, bucket


def job_config(bucket: str, endpoint: str, cache_dir, *settings: str):
    return load_config(
        None,
        [
            f"input.uri=s3://{bucket}/images",
            f"output.uri=s3://{bucket}/out",
            f"models.depth=s3://{bucket}/model",
            f"models.cache_dir={cache_dir}",
            f"storage.endpoint_url={endpoint}",
            "inference.batch_size=2",
            "output.rows_per_part=4",
            *settings,
        ],
    )


def test_a_flaky_endpoint_loses_no_row_and_no_map_file(
    ray_cluster, s3_endpoint, checkpoints, tmp_path
):
    from pipeline.run import run_annotation

    fs, bucket = upload_job_inputs(s3_endpoint, checkpoints)
    with FaultInjectingProxy(s3_endpoint, fail_share=0.15, seed=3) as proxy:
        summary = run_annotation(job_config(bucket, proxy.endpoint, tmp_path / "cache"))
        injected = sum(proxy.injected.values())
    # Every kind of request met faults: listing and reads (GET), writes (PUT), checks (HEAD).
    assert {method for method, _ in proxy.injected} >= {"GET", "PUT", "HEAD"}, proxy.injected
    assert injected >= 10
    assert (summary.images_ok, summary.images_error) == (IMAGES, 0), summary.error_reasons

    fs.invalidate_cache()
    committed = pq.read_table(f"{bucket}/out/predictions", filesystem=arrow_filesystem(fs))
    assert committed.num_rows == IMAGES  # exactly once
    options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    view = read_predictions(f"s3://{bucket}/out", options).to_pylist()
    assert len({row["image_id"] for row in view}) == IMAGES
    for row in view:
        assert decode_depth_png(fs.cat_file(row["depth_uri"])).shape == SEEDED_VIT_DEPTH_HW
    fs.rm(bucket, recursive=True)


def test_two_actors_on_one_node_download_the_weights_once(
    ray_cluster, s3_endpoint, checkpoints, tmp_path
):
    from pipeline.run import run_annotation

    fs, bucket = upload_job_inputs(s3_endpoint, checkpoints)
    [weights] = [p for p in fs.ls(f"{bucket}/model") if p.endswith(".safetensors")]
    with FaultInjectingProxy(s3_endpoint) as proxy:
        config = job_config(
            bucket,
            proxy.endpoint,
            tmp_path / "cache",
            "resources.actors.min=2",
            "resources.actors.max=2",
            "resources.cpus_per_actor=0.5",
        )
        summary = run_annotation(config)
    assert summary.images_ok == IMAGES
    # Both actors resolved the model; one downloaded it while the other waited
    # on the cache lock, and the driver fetched only the JSON files and two
    # byte ranges of the weights: the header's length, then the header.
    assert proxy.requests[("GET", f"/{weights}")] == 3
    header = 8 + struct.unpack("<Q", fs.cat_file(weights, start=0, end=8))[0]
    assert proxy.bytes_relayed[("GET", f"/{weights}")] == fs.size(weights) + header
    assert proxy.requests[("GET", f"/{bucket}/model/config.json")] == 2
    fs.rm(bucket, recursive=True)
