import argparse

from pipeline.bench import parts


def test_the_parts_benchmark_times_reading_many_parts_and_compacting_them(tmp_path):
    args = argparse.Namespace(parts=6, rows_per_part=4, latency_ms=0.0, work_dir=tmp_path)
    results = parts.main(args)
    assert results["read_predictions"]["rows"] == 24
    assert results["compact"]["parts_after"] == 1 and results["compact"]["rows"] == 24
    assert results["read_predictions_after"]["rows"] == 24
    # Each part was a request or more; after compaction, a few in all.
    assert results["done_check"]["requests"] >= 6
    assert results["done_check_after"]["requests"] < results["done_check"]["requests"]
