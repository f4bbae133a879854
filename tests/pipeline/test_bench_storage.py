"""The storage benchmark runs end to end at toy sizes and counts what it measures."""

import json

import pytest

from pipeline.bench.__main__ import main as run_benchmark
from pipeline.run import LISTING_BLOCK_ROWS
from pipeline.s3_listing import PAGE_KEYS

KEYS = 3000


@pytest.mark.slow
def test_storage_benchmark_lists_every_key_and_reads_every_byte(tmp_path):
    out = run_benchmark(
        [
            "storage",
            f"--keys={KEYS}",
            "--objects=20",
            "--object-kb=10",
            "--no-aws",
            "--latency-ms=5",
            # One listing-concurrency run, on bare loopback: each run is a child process.
            "--list-latency-ms=0",
            "--list-concurrency",
            "4",
            f"--out={tmp_path / 'storage.json'}",
        ]
    )
    results = json.loads(out.read_text())

    for mode in ("without_ray", "with_ray"):
        listed = results["listing"][mode]
        assert listed["keys_listed"] == listed["keys_generated"] == KEYS, mode
        assert listed["keys_per_s"] > 0 and listed["peak_rss_mib"] > 0, mode
        # Names only: no image bytes travel with the listing.
        assert "image_bytes" not in listed["row_columns"].split(","), mode
    # Without Ray the rows go into tables of the driver's block size, then dropped.
    assert results["listing"]["without_ray"]["blocks"] == -(-KEYS // LISTING_BLOCK_ROWS)
    # With Ray the listing reaches the object store as many blocks, not one.
    assert results["listing"]["with_ray"]["blocks"] >= KEYS // LISTING_BLOCK_ROWS

    [[concurrency, listed]] = results["listing_concurrency"]["0ms"].items()
    assert concurrency == "4" and listed["list_concurrency"] == 4
    assert listed["keys_listed"] == KEYS and listed["keys_per_s"] > 0
    assert listed["server_requests"]["GET list-type=2"] >= -(-KEYS // PAGE_KEYS)

    for key, latency_ms in (("reads", 0), ("reads_with_latency", 5)):
        reads = results[key]
        assert reads["latency_ms"] == latency_ms
        assert reads["bytes_uploaded"] == 20 * 10 * 1024
        for method in ("read_batch", "naive_loop"):
            assert reads[method]["objects"] == 20, method
            assert reads[method]["bytes"] == reads["bytes_uploaded"], method
            assert reads[method]["objects_per_s"] > 0 and reads[method]["mb_per_s"] > 0, method
        assert reads["read_batch"]["errors"] == 0
        assert reads["aws_cli"] == {"skipped": "--no-aws"}
