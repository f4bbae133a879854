"""The end-of-run summary printed by `python -m jobs.run`."""

import dataclasses

from jobs.run import format_summary
from pipeline.run import RunSummary


def test_summary_shows_counts_speed_gpus_errors_and_stage_times():
    summary = RunSummary(
        run_id="r1",
        output_uri="s3://bucket/out",
        predictions_uri="s3://bucket/out/predictions",
        report_uri="s3://bucket/out/_runs/r1.json",
        input_format="files",
        config_hash="0" * 16,
        images_listed=1000,
        shards_listed=0,
        images_skipped_done=100,
        images_ok=880,
        images_error=20,
        elapsed_s=120.0,
        images_per_s=7.5,
        timings_s={"prepare": 1.0, "list": 2.0, "annotate": 117.0},
        stage_timings_s={
            "MapBatches(read_batch)->MapBatches(decode_batch)": {
                "operator_wall_s": 50.0,
                "task_cpu_s": 48.5,
                "tasks": 40,
            },
            "MapBatches(InferenceActor)": {
                "operator_wall_s": 110.0,
                "task_cpu_s": 30.25,
                "tasks": 120,
            },
            "Write": {"operator_wall_s": 3.0},
        },
        error_reasons={"decode: truncated or corrupt image data": 20},
        gpus_requested=8.0,
    )
    text = format_summary(summary)
    first = text.splitlines()[0]
    assert "880 ok, 20 errors, 100 already done, of 1000 images" in first
    assert "7.50 images/s" in first and "up to 8 GPUs" in first
    assert "20 × decode: truncated or corrupt image data" in text
    assert "phases: prepare 1.0 s, list 2.0 s, annotate 117.0 s (in all 120.0 s)" in text
    inference = next(line for line in text.splitlines() if "InferenceActor" in line)
    assert inference.split() == ["InferenceActor", "110.0", "30.2", "120"]
    read = next(line for line in text.splitlines() if "read_batch → decode_batch" in line)
    assert read.split()[-3:] == ["50.0", "48.5", "40"]
    write = next(line for line in text.splitlines() if line.strip().startswith("Write"))
    assert write.split()[-1] == "3.0"  # no CPU time or tasks recorded: left blank
    on_cpu = format_summary(dataclasses.replace(summary, gpus_requested=0.0)).splitlines()[0]
    assert on_cpu.endswith("(7.50 images/s over the whole run, on CPUs)")
    assert "input.limit" not in first
    limited = format_summary(dataclasses.replace(summary, limit_reached=True)).splitlines()[0]
    assert "of 1000 images (input.limit reached: the rest waits for a later run)" in limited
