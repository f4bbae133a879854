"""Parts benchmark: what a long-lived output's many Parquet parts cost, before and after compaction.

Every run appends parts, and every later run reads them all: its done-check at
the start, reports and exports after. On an object store each part costs a
request or more, so the cost grows with the number of runs, not of images. N
synthetic parts (the report benchmark's rows) go to moto on loopback, read
through a proxy that holds each request ``--latency-ms`` first (a real store's
time to first byte); each step is timed with the requests it made:

* done_check: ``load_done_images``, what every incremental run reads first;
* read_predictions: the committed view, as exports and training readers get it;
* compact: ``python -m jobs.compact``'s work (``compact_predictions``);
* done_check and read_predictions again, over the compacted output.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.bench.report import write_synthetic_output
from pipeline.bench.storage import LOOPBACK_NOTE, _storage_options, machine_info, moto_server

BUCKET = "parts-bench"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--parts", type=int, default=1000, help="Parquet parts in the output")
    parser.add_argument("--rows-per-part", type=int, default=20, help="rows (images) per part")
    parser.add_argument(
        "--latency-ms", type=float, default=30.0, help="added to every request by the proxy"
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path("bench_results/parts"),
        help="the generated output, uploaded to moto (reused when present)",
    )


def main(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.bench.fault_proxy import FaultInjectingProxy
    from pipeline.storage import filesystem_for

    local = args.work_dir.resolve() / f"output-{args.parts}-{args.rows_per_part}"
    if not (local / "_complete").exists():
        write_synthetic_output(local, args.parts * args.rows_per_part, args.rows_per_part)
    results: dict[str, Any] = {
        "machine": machine_info(with_aws=False),
        "note": LOOPBACK_NOTE,
        "parts": args.parts,
        "rows_per_part": args.rows_per_part,
        "latency_ms": args.latency_ms,
    }
    output_uri = f"s3://{BUCKET}/output"
    with moto_server() as moto_endpoint:
        direct, _ = filesystem_for(output_uri, _storage_options(moto_endpoint))
        direct.mkdir(BUCKET)
        print(f"uploading {args.parts} parts...", file=sys.stderr)
        direct.put(str(local / "predictions"), f"{BUCKET}/output/predictions", recursive=True)
        with FaultInjectingProxy(moto_endpoint, delay_s=args.latency_ms / 1000) as proxy:
            options = {**_storage_options(proxy.endpoint), "skip_instance_cache": True}
            for step in ("done_check", "read_predictions", "compact"):
                results[step] = _timed(step, output_uri, options, proxy)
            for step in ("done_check", "read_predictions"):
                results[f"{step}_after"] = _timed(step, output_uri, options, proxy)
    print(
        f"\nparts benchmark: {args.parts} parts of {args.rows_per_part} rows, "
        f"{args.latency_ms:g} ms per request, {results['machine']['cpu_count']} CPUs"
    )
    steps = ("done_check", "read_predictions", "compact", "done_check_after")
    for step in (*steps, "read_predictions_after"):
        result = results[step]
        print(f"  {step:<22} {result['seconds']:>7.2f} s  {result['requests']:>6} requests")
    return results


def _timed(step: str, output_uri: str, options: dict[str, Any], proxy: Any) -> dict[str, Any]:
    from pipeline.output.compaction import compact_predictions
    from pipeline.output.done import load_done_images
    from pipeline.output.view import read_predictions
    from pipeline.storage import filesystem_for

    proxy.requests.clear()
    started = time.perf_counter()
    if step == "done_check":
        fs, root = filesystem_for(output_uri, options)
        load_done_images(fs, root, "0123456789abcdef")
        extra: dict[str, Any] = {}
    elif step == "read_predictions":
        extra = {"rows": read_predictions(output_uri, options).num_rows}
    else:
        compaction = compact_predictions(output_uri, options)
        extra = {"parts_after": compaction.parts_after, "rows": compaction.rows}
    return {
        "seconds": round(time.perf_counter() - started, 3),
        "requests": sum(proxy.requests.values()),
        **extra,
    }
