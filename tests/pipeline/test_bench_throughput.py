"""The throughput benchmark runs end to end at toy size and reports what it measured."""

import json

import pytest

from pipeline.bench.__main__ import main as run_benchmark
from pipeline.bench.stages import STAGES
from pipeline.bench.throughput import IMAGE_SIZES, _map_file_times
from pipeline.encode import decode_depth_png
from tests.conftest import SEEDED_VIT_DEPTH_HW


@pytest.mark.slow
def test_throughput_benchmark_measures_every_side(tmp_path):
    out = run_benchmark(
        [
            "throughput",
            "--images=3",
            f"--work-dir={tmp_path}",
            f"--out={tmp_path / 'tp.json'}",
            "--variant=output.depth_resolution=original",
        ]
    )
    results = json.loads(out.read_text())
    naive, job, ceiling = results["naive"], results["pipeline"], results["model_only"]
    [full_size] = results["pipeline_variants"]
    assert naive["images"] == job["images"] == full_size["images"] == 3
    assert job["errors"] == full_size["errors"] == 0
    assert ceiling["images"] >= 3 and ceiling["images_per_s"] > 0
    assert 0 < job["time_to_first_map_s"] <= job["elapsed_s"]

    assert len(list((tmp_path / "naive-output").glob("*.png"))) == 3
    for folder, expected in (
        ("pipeline-output", lambda index: SEEDED_VIT_DEPTH_HW),
        ("pipeline-output-1", lambda index: IMAGE_SIZES[index][::-1]),
    ):
        maps = sorted((tmp_path / folder / "depth").glob("*.png"))
        assert [decode_depth_png(path.read_bytes()).shape for path in maps] == [
            expected(index) for index in range(3)
        ]

    ratios = results["ratios"]
    assert ratios["pipeline_over_naive"] == pytest.approx(
        job["images_per_s"] / naive["images_per_s"]
    )
    assert ratios["pipeline_over_model_only"] == pytest.approx(
        job["images_per_s"] / ceiling["images_per_s"]
    )
    stages = results["stages"]["stages"]
    assert list(stages) == list(STAGES)
    assert all(stages[name]["cpu_ms_per_image"] > 0 for name in ("decode", "forward", "encode"))
    assert set(results["stages"]["without_jpeg_draft"]) == {"decode", "preprocess"}
    segmentation = results["stages"]["segmentation"]
    assert segmentation["classes"] == 150
    assert segmentation["encode_cpu_ms_per_image"] > 0 and segmentation["bytes_per_image"] > 0
    encodings = {(e["resolution"], e["encoding"]): e for e in results["stages"]["encodings"]}
    formats = {"png16-level0", "png16-level1", "png16-level6", "npz-float16", "npy-float16-zstd"}
    assert set(encodings) == {(size, f) for size in ("model", "original") for f in formats}
    # The job's float16 format holds the same map: its bytes stay in the PNGs' range.
    model_npz = encodings[("model", "npz-float16")]
    assert (
        0
        < model_npz["bytes_per_image"]
        < 2 * encodings[("model", "png16-level1")]["bytes_per_image"]
    )
    model_png, full_png = (encodings[(size, "png16-level1")] for size in ("model", "original"))
    assert full_png["bytes_per_image"] > model_png["bytes_per_image"]
    assert any("InferenceActor" in stage for stage in job["stage_timings_s"])


def test_map_times_count_one_file_per_image_whichever_maps_the_job_wrote(tmp_path):
    for name in ("a.png", "b.png"):
        (tmp_path / "segmentation" / "2026").mkdir(parents=True, exist_ok=True)
        (tmp_path / "segmentation" / "2026" / name).write_bytes(b"")
    assert len(_map_file_times(tmp_path)) == 2  # segmentation only
    (tmp_path / "depth").mkdir()
    for name in ("a.npz", "b.npz", "c.npz"):
        (tmp_path / "depth" / name).write_bytes(b"")
    assert len(_map_file_times(tmp_path)) == 3  # depth first, NPZ too
    assert _map_file_times(tmp_path / "missing") == []
