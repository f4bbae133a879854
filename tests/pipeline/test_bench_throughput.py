"""The throughput benchmark runs end to end at toy size and reports what it measured."""

import json
from pathlib import Path

import pytest

from pipeline.bench import throughput
from pipeline.bench.__main__ import main as run_benchmark
from pipeline.bench.stages import STAGES
from pipeline.bench.throughput import _map_file_times, _packed_in_shards, pipeline_output
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
        ]
    )
    results = json.loads(out.read_text())
    naive, job, ceiling = results["naive"], results["pipeline"], results["model_only"]
    assert naive["images"] == job["images"] == 3
    assert job["errors"] == 0
    assert ceiling["images"] >= 3 and ceiling["images_per_s"] > 0
    assert 0 < job["time_to_first_map_s"] <= job["elapsed_s"]

    assert len(list((tmp_path / "naive-output").glob("*.png"))) == 3
    maps = sorted((pipeline_output(tmp_path, 0) / "depth").glob("*.png"))
    assert [decode_depth_png(path.read_bytes()).shape for path in maps] == [SEEDED_VIT_DEPTH_HW] * 3

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


def test_each_variant_runs_the_job_again_with_its_overrides_into_its_own_output(
    tmp_path, monkeypatch, capsys
):
    # The job itself is measured above; here only what main hands each pipeline run
    # and how the runs' rates become ratios. Full-size maps are tested with the job.
    calls = []

    def fake_child(measurement, params):
        calls.append((measurement, params))
        if measurement == "naive":
            return {"images_per_s": 1.0, "loop_s": 1.0}
        rate = 2.0 + len(calls)
        return {
            "images_per_s": rate,
            "elapsed_s": 1 / rate,
            "time_to_first_map_s": 0.1,
            "steady_images_per_s": rate,
        }

    monkeypatch.setattr(throughput, "_run_child", fake_child)
    out = run_benchmark(
        [
            "throughput",
            "--images=1",
            "--only",
            "naive",
            f"--work-dir={tmp_path}",
            f"--out={tmp_path / 'tp.json'}",
            "--variant=output.depth_resolution=original",
            "--variant=inference.segmentation_scales=[1,1.5],inference.batch_size=2",
        ]
    )
    assert [
        (measurement, params.get("overrides"), params.get("run")) for measurement, params in calls
    ] == [
        ("naive", None, None),
        ("pipeline", ["output.depth_resolution=original"], 1),
        ("pipeline", ["inference.segmentation_scales=[1,1.5]", "inference.batch_size=2"], 2),
    ]
    runs = [params.get("run", 0) for _, params in calls[1:]]
    outputs = {pipeline_output(tmp_path, run) for run in [0, *runs]}
    assert len(outputs) == 3  # no variant writes over the plain job's maps or another's
    results = json.loads(out.read_text())
    assert [variant["overrides"] for variant in results["pipeline_variants"]] == [
        params["overrides"] for _, params in calls[1:]
    ]
    report = capsys.readouterr().out
    assert "output.depth_resolution=original     4.00 images/s" in report
    assert results["ratios"] == {
        "output.depth_resolution=original_over_naive": 4.0,
        "inference.segmentation_scales=[1,1.5]_inference.batch_size=2_over_naive": 5.0,
    }


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


def test_shards_pack_every_image_once_and_the_job_reads_them(tmp_path, monkeypatch):
    import tarfile

    images = tmp_path / "images"
    images.mkdir()
    for index in range(5):
        (images / f"{index:05d}.jpg").write_bytes(bytes([index]) * 10)
    shards = _packed_in_shards(images, tmp_path / "shards", 2)
    members = {}
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as archive:
            members[tar.name] = {m.name: archive.extractfile(m).read() for m in archive}
    assert [len(names) for names in members.values()] == [3, 2]
    packed = {name: data for names in members.values() for name, data in names.items()}
    assert packed == {path.name: path.read_bytes() for path in images.iterdir()}
    assert not list(shards.glob("*.partial"))
    with pytest.raises(ValueError, match="--shards must be from 1 to the number of images"):
        _packed_in_shards(images, tmp_path / "too-many", 6)

    handed = []
    monkeypatch.setattr(
        throughput, "_run_child", lambda measurement, params: handed.append(params) or {}
    )
    monkeypatch.setattr(throughput, "_ratios", lambda results: {})
    monkeypatch.setattr(throughput, "_report", lambda results: "")
    arguments = ["throughput", "--images=2", "--shards=2", "--only", "pipeline"]
    run_benchmark([*arguments, f"--work-dir={tmp_path}", f"--out={tmp_path / 'tp.json'}"])
    [params] = handed
    assert sorted(path.name for path in Path(params["job_input"]).iterdir()) == [
        "00000.tar",
        "00001.tar",
    ]
    assert json.loads((tmp_path / "tp.json").read_text())["parameters"]["shards"] == 2
