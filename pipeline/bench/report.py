"""Report benchmark: what the quality report costs the driver on a large output.

Every run rebuilds the report from the whole output, so its cost grows with the
output, not the run. N synthetic prediction rows (1 % errors, segmentation and
pseudo-label columns filled, written as Parquet parts) are summarised in a
fresh Python process each, so each peak RSS is its own:

* report: ``write_quality_report`` with its default 24 sampled rows (their
  rows found by a filtered scan of the whole output; their files do not exist,
  so the thumbnails themselves, a fixed cost at any output size, are skipped);
* done_images: ``load_done_images``, what every incremental run reads at its
  start over the same output, for comparison;
* baseline: importing the modules only.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.bench.child import peak_rss_mib, run_in_child
from pipeline.bench.storage import machine_info

MEASUREMENTS = ("baseline", "report", "done_images")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, default=2_000_000, help="prediction rows (images)")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path("bench_results/report"),
        help="generated output (reused when it already holds --rows rows)",
    )
    parser.add_argument(
        "--rows-per-part",
        type=int,
        default=250_000,
        help="rows per Parquet part (a job writes output.rows_per_part, 1,000 by default)",
    )


def main(args: argparse.Namespace) -> dict[str, Any]:
    output = args.work_dir.resolve() / f"output-{args.rows}-{args.rows_per_part}"
    if not (output / "_complete").exists():
        write_synthetic_output(output, args.rows, args.rows_per_part)
    results: dict[str, Any] = {
        "machine": machine_info(with_aws=False),
        "rows": args.rows,
        "rows_per_part": args.rows_per_part,
    }
    for measurement in MEASUREMENTS:
        print(f"{measurement} over {args.rows:,} rows...", file=sys.stderr)
        results[measurement] = run_in_child(__name__, measurement, {"output": str(output)})
    print(
        f"\nreport benchmark, {args.rows:,} rows in parts of {args.rows_per_part:,}, "
        f"{results['machine']['cpu_count']} CPUs"
    )
    for measurement in MEASUREMENTS:
        result = results[measurement]
        seconds, peak = result["seconds"], result["peak_rss_mib"]
        print(f"  {measurement:<12} {seconds:>7.2f} s   peak RSS {peak:>7.0f} MiB")
    return results


def write_synthetic_output(output: Path, rows: int, rows_per_part: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.schema import PREDICTION_SCHEMA

    folder = output / "predictions"
    folder.mkdir(parents=True, exist_ok=True)
    # Local paths that do not exist: the sampled rows' thumbnails fail at once,
    # with no network (an s3:// URI here would wait on AWS's endpoint when
    # credentials are set, for as long as its connect timeouts and retries allow).
    missing = f"file://{output}/missing"
    generator = np.random.default_rng(0)
    for part, start in enumerate(range(0, rows, rows_per_part)):
        count = min(rows_per_part, rows - start)
        ids = [f"{value:032x}" for value in generator.integers(1 << 62, size=count)]
        ok = generator.random(count) >= 0.01
        columns = {field.name: pa.nulls(count, field.type) for field in PREDICTION_SCHEMA}
        columns.update(
            image_id=pa.array(ids),
            source_uri=pa.array([f"{missing}/photos/{image_id}.jpg" for image_id in ids]),
            status=pa.array(np.where(ok, "ok", "error")),
            error=pa.array(
                [None if good else "decode: truncated or corrupt image data: …" for good in ok]
            ),
            width=pa.array(np.full(count, 1920, np.int32)),
            height=pa.array(np.full(count, 1080, np.int32)),
            depth_uri=pa.array([f"{missing}/depth/{image_id}.jpg.png" for image_id in ids]),
            segmentation_uri=pa.array(
                [f"{missing}/segmentation/{image_id}.jpg.png" for image_id in ids]
            ),
            seg_labels=pa.array(
                [
                    sorted(set(labels))
                    for labels in generator.integers(150, size=(count, 4)).tolist()
                ],
                pa.list_(pa.int32()),
            ),
            seg_confidence_mean=pa.array(generator.random(count)),
            label_coverage=pa.array(generator.random(count)),
            entropy_mean=pa.array(generator.random(count)),
            kept=pa.array(generator.random(count) < 0.8),
            depth_kind=pa.array(["relative_inverse"] * count),
            run_id=pa.array(["bench"] * count),
            # webdataset side members: the widest column a real output may hold
            source_metadata=pa.array(
                [f'{{"json": "{{\\"caption\\": \\"photo {value}\\"}}"}}' for value in range(count)]
            ),
            source_version=pa.array(['"0123456789abcdef0123456789abcdef"'] * count),
            config_hash=pa.array(["0123456789abcdef"] * count),
            written_at=pa.array([datetime.now(UTC)] * count, pa.timestamp("us", "UTC")),
        )
        table = pa.table(columns, schema=PREDICTION_SCHEMA)
        pq.write_table(table, folder / f"part-{part:05d}.parquet")
    (output / "_complete").write_text("")


def measure(measurement: str, output: str) -> dict[str, Any]:
    from pipeline.output.done import load_done_images
    from pipeline.report import write_quality_report
    from pipeline.storage import filesystem_for

    started = time.perf_counter()
    if measurement == "report":
        write_quality_report(output, {}, {}, samples=24)
    elif measurement == "done_images":
        fs, root = filesystem_for(output, {})
        load_done_images(fs, root, "0123456789abcdef")
    return {"seconds": round(time.perf_counter() - started, 3), "peak_rss_mib": peak_rss_mib()}


if __name__ == "__main__":
    import json

    name, params, result_path = sys.argv[1:]
    Path(result_path).write_text(json.dumps(measure(name, **json.loads(params))))
