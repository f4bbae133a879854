"""Storage benchmark: what listing costs the driver, and how fast small objects are read.

Two measurements, each in a fresh Python process so its peak RSS is its own:

* listing: N generated keys (``listing_server``) through the job driver's path,
  ``list_input`` then ``put_listing_blocks`` into Ray's object store, and the same
  listing without Ray (rows into 256-row Arrow tables, dropped), so the listing's
  own cost and the object store's are separable. The 1 GiB target is checked.
  Then the listing alone once per ``input.list_concurrency`` to compare, on bare
  loopback and behind a proxy that holds each request as long as S3 takes.
* reads: M random objects uploaded to moto on loopback, fetched by ``read_batch``
  a batch at a time (what one read task does), by a one-request-at-a-time loop
  for comparison, and by ``aws s3 cp --recursive`` when the CLI is installed.

Loopback has no network latency or bandwidth limit: read rates here measure
client overhead and concurrency (and moto's own speed), not what a link carries.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pipeline.bench.child import peak_rss_mib, run_in_child
from pipeline.bench.fault_proxy import FaultInjectingProxy
from pipeline.bench.listing_server import endpoint_of, listing_server
from pipeline.listing import AWS_LIST_CONCURRENCY

RSS_TARGET_MIB = 1024
LISTING_BUCKET, LISTING_PREFIX = "bench-listing", "images/"
READS_BUCKET, READS_PREFIX = "bench-reads", "objects/"
# moto accepts any credentials; passed explicitly so nothing here changes os.environ.
DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}
LOOPBACK_NOTE = (
    "loopback: no network latency or bandwidth limit, so read rates measure client "
    "overhead and request concurrency (and moto's own speed), not network throughput"
)
_PACKAGES = ("ray", "s3fs", "fsspec", "aiobotocore", "botocore", "pyarrow", "moto")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keys", type=int, default=1_000_000, help="keys to list")
    parser.add_argument("--objects", type=int, default=400, help="objects to read")
    parser.add_argument("--object-kb", type=int, default=100, help="size of each object, KiB")
    parser.add_argument(
        "--no-aws", action="store_true", help="skip the `aws s3 cp --recursive` comparison"
    )
    parser.add_argument(
        "--list-latency-ms",
        type=float,
        default=100.0,
        help="per-request delay a loopback proxy adds for the listing-concurrency runs, "
        "standing in for S3's time to answer a ListObjectsV2 page (0: loopback only)",
    )
    parser.add_argument(
        "--list-concurrency",
        type=int,
        nargs="+",
        default=[1, 8],
        help="input.list_concurrency values to list the keys with (1: page after page)",
    )
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=20.0,
        help="per-request delay added by a loopback proxy for the second read run, "
        "standing in for an object store's time to first byte (0 skips that run)",
    )


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run both measurements, print a table, and return the results for the JSON file."""
    results: dict[str, Any] = {
        "benchmark": "storage",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_info(with_aws=not args.no_aws),
        "parameters": {
            "keys": args.keys,
            "objects": args.objects,
            "object_kb": args.object_kb,
            "latency_ms": args.latency_ms,
            "list_latency_ms": args.list_latency_ms,
            "list_concurrency": args.list_concurrency,
            "rss_target_mib": RSS_TARGET_MIB,
        },
        "listing": bench_listing(args.keys),
        "listing_concurrency": bench_listing_concurrency(
            args.keys, args.list_concurrency, args.list_latency_ms
        ),
        "reads": bench_reads(
            args.objects, args.object_kb * 1024, use_aws=not args.no_aws, latency_ms=0.0
        ),
    }
    if args.latency_ms:
        results["reads_with_latency"] = bench_reads(
            args.objects, args.object_kb * 1024, not args.no_aws, args.latency_ms
        )
    print_table(results)
    return results


# --- listing ----------------------------------------------------------------------------


def bench_listing(keys: int) -> dict[str, Any]:
    """List ``keys`` generated keys in a child process, without and then with Ray."""
    results = {}
    with listing_server(LISTING_BUCKET, LISTING_PREFIX, keys) as server:
        for mode in ("without_ray", "with_ray"):
            print(f"listing {keys:,} keys {mode.replace('_', ' ')}...", file=sys.stderr)
            server.requests.clear()
            measured = _run_child(
                "listing",
                {
                    "uri": f"s3://{LISTING_BUCKET}/{LISTING_PREFIX.rstrip('/')}",
                    "storage_options": _storage_options(endpoint_of(server)),
                    "with_ray": mode == "with_ray",
                    # As on AWS, with pages listed ahead: the most the driver holds.
                    "list_concurrency": AWS_LIST_CONCURRENCY,
                },
            )
            measured["server_requests"] = dict(server.requests)
            measured["keys_generated"] = keys
            results[mode] = measured
    return results


def bench_listing_concurrency(
    keys: int, concurrencies: list[int], latency_ms: float
) -> dict[str, dict[str, Any]]:
    """List ``keys`` keys with each ``input.list_concurrency``, on loopback and, with
    ``latency_ms``, behind a proxy that holds every request that long (without Ray)."""
    results: dict[str, dict[str, Any]] = {}
    with listing_server(LISTING_BUCKET, LISTING_PREFIX, keys) as server:
        for latency in dict.fromkeys([0.0, latency_ms]):
            with FaultInjectingProxy(endpoint_of(server), delay_s=latency / 1000) as proxy:
                endpoint = proxy.endpoint if latency else endpoint_of(server)
                runs = results.setdefault(f"{latency:g}ms", {})
                for concurrency in concurrencies:
                    print(
                        f"listing {keys:,} keys, {latency:g} ms a request, "
                        f"list_concurrency {concurrency}...",
                        file=sys.stderr,
                    )
                    server.requests.clear()
                    measured = _run_child(
                        "listing",
                        {
                            "uri": f"s3://{LISTING_BUCKET}/{LISTING_PREFIX.rstrip('/')}",
                            "storage_options": _storage_options(endpoint),
                            "with_ray": False,
                            "list_concurrency": concurrency,
                        },
                    )
                    measured["server_requests"] = dict(server.requests)
                    runs[str(concurrency)] = measured
    return results


def measure_listing(
    uri: str, storage_options: dict[str, Any], with_ray: bool, list_concurrency: int | None = None
) -> dict[str, Any]:
    """In the child: list ``uri`` as the job's driver does; rates and memory checkpoints."""
    import pyarrow as pa

    from jobs.config import InputConfig
    from pipeline.listing import list_input

    # Imported in both modes so the baselines compare: it is what the driver imports.
    from pipeline.run import LISTING_BLOCK_ROWS, put_listing_blocks
    from pipeline.storage import filesystem_for

    if with_ray:
        import ray

        # "local": a fresh instance even where RAY_ADDRESS or a running cluster is found.
        ray.init(address="local", num_cpus=1, include_dashboard=False)
    baseline = memory_mib()
    started = time.perf_counter()
    settings = {} if list_concurrency is None else {"list_concurrency": list_concurrency}
    listing_settings = InputConfig(uri=uri, format="files", **settings)
    listing = list_input(listing_settings, storage_options)
    # list_input checks the prefix exists before streaming; see what that costs.
    probed, after_probe = time.perf_counter(), memory_mib()
    first_row: dict[str, str] = {}

    def rows_seen() -> Iterator[dict[str, str]]:
        for row in listing.rows:
            first_row.setdefault("columns", ",".join(row))
            yield row

    if with_ray:
        refs, listed = put_listing_blocks(rows_seen(), sharded=False)
        blocks = len(refs)
    else:
        listed = blocks = 0
        rows = rows_seen()
        while block := list(itertools.islice(rows, LISTING_BLOCK_ROWS)):
            pa.Table.from_pylist(block)  # built and dropped: the driver holds one at a time
            listed, blocks = listed + len(block), blocks + 1
    finished = time.perf_counter()
    fs, _ = filesystem_for(uri, storage_options)  # fsspec's cached instance: the one listed with
    result = {
        "keys_listed": listed,
        "list_concurrency": listing_settings.list_concurrency,
        "blocks": blocks,
        "row_columns": first_row.get("columns", ""),
        "seconds": finished - started,
        "probe_seconds": probed - started,
        "keys_per_s": listed / (finished - started),
        "stream_keys_per_s": listed / (finished - probed),
        "baseline_rss_mib": baseline["rss"],
        "rss_after_probe_mib": after_probe["rss"],
        "final_memory_mib": memory_mib(),
        "peak_rss_mib": peak_rss_mib(),
        "s3fs_dircache_entries": sum(len(entries) for entries in fs.dircache.values()),
    }
    result["within_target"] = result["peak_rss_mib"] <= RSS_TARGET_MIB
    if with_ray:
        ray.shutdown()
    return result


# --- reads ------------------------------------------------------------------------------


def bench_reads(
    objects: int, object_bytes: int, use_aws: bool, latency_ms: float
) -> dict[str, Any]:
    """Upload ``objects`` random objects to moto, then read them back three ways.

    With ``latency_ms``, reads go through a proxy that holds each request that
    long first: loopback answers in microseconds, real stores in tens of
    milliseconds, and that wait is what concurrent reads hide.
    """
    print(
        f"reading {objects} objects of {object_bytes // 1024} KiB, {latency_ms:g} ms added...",
        file=sys.stderr,
    )
    prefix_uri = f"s3://{READS_BUCKET}/{READS_PREFIX.rstrip('/')}"
    with moto_server() as moto_endpoint:
        _upload_random_objects(prefix_uri, objects, object_bytes, _storage_options(moto_endpoint))
        with FaultInjectingProxy(moto_endpoint, delay_s=latency_ms / 1000) as proxy:
            endpoint = proxy.endpoint if latency_ms else moto_endpoint
            storage_options = _storage_options(endpoint)
            results: dict[str, Any] = {
                "note": LOOPBACK_NOTE,
                "latency_ms": latency_ms,
                "objects_uploaded": objects,
                "bytes_uploaded": objects * object_bytes,
                **_run_child(
                    "reads", {"prefix_uri": prefix_uri, "storage_options": storage_options}
                ),
            }
            if not use_aws:
                results["aws_cli"] = {"skipped": "--no-aws"}
            elif shutil.which("aws") is None:
                results["aws_cli"] = {"skipped": "aws not on PATH"}
            else:
                results["aws_cli"] = _aws_cp_recursive(prefix_uri, endpoint)
    return results


def measure_reads(prefix_uri: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """In the child: ``read_batch`` over every object, then a naive one-at-a-time loop."""
    import numpy as np

    from pipeline.read import read_batch
    from pipeline.run import DECODE_BATCH_ROWS
    from pipeline.storage import filesystem_for

    fs, prefix = filesystem_for(prefix_uri, storage_options)
    uris = sorted(fs.unstrip_protocol(path) for path in fs.find(prefix))
    fs.info(uris[0])  # open the connection pool first, so neither timing pays for it

    started = time.perf_counter()
    read_bytes = errors = 0
    for start in range(0, len(uris), DECODE_BATCH_ROWS):
        batch = {"source_uri": np.array(uris[start : start + DECODE_BATCH_ROWS], dtype=object)}
        out = read_batch(batch, storage_options)
        read_bytes += sum(len(content) for content in out["image_bytes"])
        errors += int((out["status"] != "ok").sum())
    batched = _rates(len(uris), read_bytes, time.perf_counter() - started)
    batched.update(errors=errors, batch_rows=DECODE_BATCH_ROWS)

    started = time.perf_counter()
    read_bytes = sum(len(fs.cat_file(fs._strip_protocol(uri))) for uri in uris)
    naive = _rates(len(uris), read_bytes, time.perf_counter() - started)
    return {"read_batch": batched, "naive_loop": naive}


def _upload_random_objects(
    prefix_uri: str, objects: int, object_bytes: int, storage_options: dict[str, Any]
) -> int:
    from pipeline.storage import filesystem_for

    fs, prefix = filesystem_for(prefix_uri, storage_options)
    fs.makedirs(prefix.split("/")[0], exist_ok=True)  # moto keeps state across servers
    # Random bytes: nothing on the way can compress or deduplicate them.
    fs.pipe({f"{prefix}/{index:06d}.jpg": os.urandom(object_bytes) for index in range(objects)})
    return objects * object_bytes


def _aws_cp_recursive(prefix_uri: str, endpoint: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        env = {
            **os.environ,
            **DUMMY_CREDENTIALS,
            # No profile or config of whoever runs the bench may change the client.
            "AWS_CONFIG_FILE": os.path.join(folder, "no-config"),
            "AWS_SHARED_CREDENTIALS_FILE": os.path.join(folder, "no-credentials"),
        }
        started = time.perf_counter()
        subprocess.run(["aws", "--version"], env=env, check=True, capture_output=True)
        startup = time.perf_counter() - started
        target = os.path.join(folder, "copy")
        command = ["aws", "s3", "cp", "--recursive", prefix_uri, target]
        started = time.perf_counter()
        subprocess.run(
            [*command, "--endpoint-url", endpoint, "--quiet"], env=env, check=True, timeout=600
        )
        elapsed = time.perf_counter() - started
        files = [path for path in Path(target).rglob("*") if path.is_file()]
        result = _rates(len(files), sum(path.stat().st_size for path in files), elapsed)
    # Its wall time includes starting the CLI (a Python program) and listing the prefix.
    result.update(cli_startup_seconds=startup, command=" ".join(command))
    return result


@contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 server on a free loopback port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    # Its HTTP server logs every request; hundreds of lines would bury the table.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def _rates(objects: int, total_bytes: int, seconds: float) -> dict[str, Any]:
    return {
        "objects": objects,
        "bytes": total_bytes,
        "seconds": seconds,
        "objects_per_s": objects / seconds,
        "mb_per_s": total_bytes / 1e6 / seconds,
    }


# --- shared -----------------------------------------------------------------------------


def _storage_options(endpoint: str) -> dict[str, Any]:
    return {
        "key": DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "secret": DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "client_kwargs": {"endpoint_url": endpoint},
    }


def memory_mib() -> dict[str, float]:
    """This process's resident memory now, split by kind where Linux says (MiB).

    ``rss`` is the total; ``anon`` is Python's heap, ``shmem`` includes pages of
    Ray's object store that this process wrote (mapped shared memory).
    """
    fields = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem"}
    memory = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                name, _, value = line.partition(":")
                if name in fields:
                    memory[fields[name]] = int(value.split()[0]) / 1024  # kB
    except OSError:  # not Linux: only the peak is known
        memory["rss"] = peak_rss_mib()
    return memory


def machine_info(with_aws: bool = True) -> dict[str, Any]:
    versions = {}
    for package in _PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": versions,
    }
    try:
        with open("/proc/meminfo") as meminfo:
            info["memory_gib"] = round(int(meminfo.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    if with_aws and (aws := shutil.which("aws")):
        found = subprocess.run([aws, "--version"], capture_output=True, text=True, check=False)
        info["aws_cli"] = (found.stdout or found.stderr).strip()
    return info


def _run_child(measurement: str, params: dict[str, Any]) -> dict[str, Any]:
    return run_in_child("pipeline.bench.storage", measurement, params)


def print_table(results: dict[str, Any]) -> None:
    machine = results["machine"]
    print(f"\nstorage benchmark, {machine['cpu_count']} CPUs, {machine['platform']}")
    print(
        f"\nlisting {results['parameters']['keys']:,} keys (peak RSS target {RSS_TARGET_MIB} MiB)"
    )
    print(
        f"{'':12} {'keys/s':>8} {'blocks':>7} {'baseline':>9} {'after probe':>12} "
        f"{'peak RSS':>9} {'dircache':>9}  target"
    )
    for mode, listed in results["listing"].items():
        print(
            f"{mode:12} {listed['keys_per_s']:8.0f} {listed['blocks']:7d} "
            f"{listed['baseline_rss_mib']:6.0f}MiB {listed['rss_after_probe_mib']:9.0f}MiB "
            f"{listed['peak_rss_mib']:6.0f}MiB {listed['s3fs_dircache_entries']:9d}  "
            f"{'ok' if listed['within_target'] else 'EXCEEDED'}"
        )
    print(f"\nlisting {results['parameters']['keys']:,} keys without Ray, by list_concurrency")
    print(f"{'per request':12} {'concurrency':>11} {'keys/s':>8} {'seconds':>8} {'requests':>9}")
    for latency, runs in results["listing_concurrency"].items():
        for concurrency, listed in runs.items():
            requests = listed["server_requests"].get("GET list-type=2", 0)
            print(
                f"{latency:12} {concurrency:>11} {listed['keys_per_s']:8.0f} "
                f"{listed['seconds']:8.2f} {requests:9d}"
            )
    for key in ("reads", "reads_with_latency"):
        if key in results:
            _print_reads(results[key])
    print(f"note: {LOOPBACK_NOTE}\n")


def _print_reads(reads: dict[str, Any]) -> None:
    print(
        f"\nreads: {reads['objects_uploaded']} objects, {reads['bytes_uploaded']:,} bytes, "
        f"{reads['latency_ms']:g} ms added per request"
    )
    print(f"{'':12} {'objects/s':>10} {'MB/s':>8} {'seconds':>8}")
    for method in ("read_batch", "naive_loop", "aws_cli"):
        measured = reads[method]
        if "skipped" in measured:
            print(f"{method:12} skipped: {measured['skipped']}")
            continue
        print(
            f"{method:12} {measured['objects_per_s']:10.1f} {measured['mb_per_s']:8.1f} "
            f"{measured['seconds']:8.2f}"
        )
    if "cli_startup_seconds" in reads["aws_cli"]:
        print(f"(aws_cli includes {reads['aws_cli']['cli_startup_seconds']:.2f} s CLI startup)")


def _child_main(argv: list[str]) -> None:
    measurement, params, result_path = argv
    measure = {"listing": measure_listing, "reads": measure_reads}[measurement]
    result = measure(**json.loads(params))
    with open(result_path, "w") as out:
        json.dump(result, out)


if __name__ == "__main__":
    _child_main(sys.argv[1:])
