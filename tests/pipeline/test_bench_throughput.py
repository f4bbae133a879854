"""The throughput benchmark runs end to end at toy size and reports what it measured."""

import json

import pytest

from pipeline.bench.__main__ import main as run_benchmark


@pytest.mark.slow
def test_throughput_benchmark_annotates_every_image_both_ways(tmp_path):
    out = run_benchmark(
        ["throughput", "--images=3", f"--work-dir={tmp_path}", f"--out={tmp_path / 'tp.json'}"]
    )
    results = json.loads(out.read_text())
    assert results["naive"]["images"] == results["pipeline"]["images"] == 3
    assert results["pipeline"]["errors"] == 0
    assert len(list((tmp_path / "naive-output").glob("*.png"))) == 3
    assert len(list((tmp_path / "pipeline-output" / "depth").glob("*.png"))) == 3
    assert results["pipeline_over_naive"] == pytest.approx(
        results["pipeline"]["images_per_s"] / results["naive"]["images_per_s"]
    )
    assert any("InferenceActor" in stage for stage in results["pipeline"]["stage_timings_s"])
