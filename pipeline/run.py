"""The job, composed: list → read → decode → infer → encode/write → Parquet."""

from __future__ import annotations

import collections
import json
import logging
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dpt_model import ModelCard
from dpt_model.loading import DEFAULT_CACHE_DIR
from jobs.config import JobConfig
from pipeline.decode import decode_batch
from pipeline.infer import InferenceActor
from pipeline.listing import SHARD_FORMATS, InputNotFoundError, list_input
from pipeline.read import read_batch, read_shard
from pipeline.retry import TRANSIENT_ERROR_WORDS
from pipeline.storage import arrow_filesystem, filesystem_for, full_uri, join
from pipeline.write import write_maps_batch

logger = logging.getLogger(__name__)

# Rows per read/decode task: big enough to amortise task overhead, small enough
# that a task's decoded images (original size, briefly) stay well under 1 GB.
DECODE_BATCH_ROWS = 16
# Listing blocks: DECODE_BATCH_ROWS each for the first rows, then this many.
SMALL_BLOCKS_ROWS = 1024
LISTING_BLOCK_ROWS = 256
OUTPUT_FOLDERS = ("predictions", "depth", "segmentation")


class OutputExistsError(FileExistsError):
    """output.uri already holds results of an earlier run."""


class ClusterTooSmallError(RuntimeError):
    """The Ray cluster can never satisfy the requested actors."""


@dataclass
class RunSummary:
    run_id: str
    output_uri: str
    predictions_uri: str
    report_uri: str
    input_format: str
    images_listed: int  # for shard formats: image rows read from the shards
    shards_listed: int
    images_ok: int
    images_error: int
    elapsed_s: float
    images_per_s: float
    error_reasons: dict[str, int] = field(default_factory=dict)


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def run_annotation(config: JobConfig) -> RunSummary:
    """Annotate every image under ``config.input.uri``; returns counts and locations."""
    import ray

    started = time.perf_counter()
    run_id = config.run_id or new_run_id()
    storage_options = config.storage_options()
    cache_dir = config.models.cache_dir or str(DEFAULT_CACHE_DIR)

    # Everything that can fail for a reason the user must fix fails here, before
    # Ray starts: unreadable models, a missing input, an occupied output.
    cards = _fetch_model_cards(config, cache_dir, storage_options)
    out_fs, out_root = filesystem_for(config.output.uri, storage_options)
    _prepare_output(out_fs, out_root, config)
    listing = list_input(config.input, storage_options)
    logger.info("input.format %s (%s)", listing.format, listing.reason)

    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True)
    _check_cluster_fits(config)
    _retry_transient_parquet_writes()

    sharded = listing.format in SHARD_FORMATS
    block_refs, listed = put_listing_blocks(listing.rows, sharded)
    if not listed:
        raise InputNotFoundError(
            f"no {'shards' if sharded else 'images'} to annotate under input.uri "
            f"{config.input.uri} (input.format {listing.format}, extensions "
            f"{', '.join(config.input.extensions)})"
        )
    unit = "shards" if sharded else "images"
    logger.info("listed %d %s under %s", listed, unit, config.input.uri)

    dataset = ray.data.from_arrow_refs(block_refs)
    if sharded:
        dataset = dataset.map_batches(
            read_shard,
            batch_size=1,
            batch_format="numpy",
            fn_kwargs={
                "input_format": listing.format,
                "storage_options": storage_options,
                "extensions": config.input.extensions,
                "image_column": config.input.image_column,
                "id_column": config.input.id_column,
                "rows_per_batch": DECODE_BATCH_ROWS,
            },
            num_cpus=config.resources.cpus_per_decode_task,
        )
        if config.input.limit is not None:
            dataset = dataset.limit(config.input.limit)
    else:
        dataset = dataset.map_batches(
            read_batch,
            batch_size=DECODE_BATCH_ROWS,
            batch_format="numpy",
            fn_kwargs={"storage_options": storage_options},
            num_cpus=config.resources.cpus_per_decode_task,
        )
    dataset = dataset.map_batches(
        decode_batch,
        batch_size=DECODE_BATCH_ROWS,
        batch_format="numpy",
        fn_kwargs={
            "specs": {task: card.spec for task, card in cards.items()},
            "max_image_pixels": config.decode.max_image_pixels,
            "max_side_px": config.decode.max_side_px,
        },
        num_cpus=config.resources.cpus_per_decode_task,
    )
    actors = config.resources.actors
    # On a GPU actor pool Ray keeps read/decode in separate CPU tasks that overlap
    # with inference; with CPU-only actors of the same CPU request it fuses them
    # into the actor (not yet measured against the unfused layout).
    dataset = dataset.map_batches(
        InferenceActor,
        batch_size=config.inference.batch_size,
        batch_format="numpy",
        fn_constructor_kwargs={
            "depth_model": config.models.depth,
            "segmentation_model": config.models.segmentation,
            "device": config.device,
            "dtype": config.inference.dtype,
            "cache_dir": cache_dir,
            "storage_options": storage_options,
        },
        # Start at full size: a pool that ramps one actor at a time wastes the
        # first minutes of a job on a cluster that already has the GPUs.
        compute=ray.data.ActorPoolStrategy(
            min_size=actors.min, max_size=actors.max, initial_size=actors.max
        ),
        num_gpus=config.resources.gpus_per_actor,
        num_cpus=config.resources.cpus_per_actor,
    )
    dataset = dataset.map_batches(
        write_maps_batch,
        batch_size=DECODE_BATCH_ROWS,
        batch_format="numpy",
        fn_kwargs={
            "output_uri": config.output.uri,
            "storage_options": storage_options,
            "compress_level": config.output.png_compress_level,
            "run_id": run_id,
        },
        num_cpus=config.resources.cpus_per_decode_task,
    )
    predictions_path = join(out_root, "predictions")
    dataset.write_parquet(
        predictions_path, filesystem=arrow_filesystem(out_fs), min_rows_per_file=10_000
    )

    statuses = pq.read_table(
        predictions_path, filesystem=arrow_filesystem(out_fs), columns=["status", "error"]
    ).to_pydict()
    elapsed_s = time.perf_counter() - started
    reasons = collections.Counter(
        _reason_group(reason) for reason in statuses["error"] if reason is not None
    )
    images_ok = statuses["status"].count("ok")
    report_path = join(out_root, f"_runs/{run_id}.json")
    summary = RunSummary(
        run_id=run_id,
        output_uri=config.output.uri,
        predictions_uri=full_uri(out_fs, predictions_path),
        report_uri=full_uri(out_fs, report_path),
        input_format=listing.format,
        images_listed=len(statuses["status"]) if sharded else listed,
        shards_listed=listed if sharded else 0,
        images_ok=images_ok,
        images_error=len(statuses["status"]) - images_ok,
        elapsed_s=round(elapsed_s, 3),
        images_per_s=round(len(statuses["status"]) / elapsed_s, 3),
        error_reasons=dict(reasons.most_common(10)),
    )
    _write_run_report(out_fs, report_path, config, summary)
    return summary


def put_listing_blocks(rows: Iterator[dict[str, str]], sharded: bool) -> tuple[list[Any], int]:
    """Move listed rows into Ray's object store in blocks as they stream in.

    The driver holds one block at a time, not the listing. Blocks are what Ray
    Data schedules, so their size sets the read parallelism: one shard per
    block, and for images small blocks first (a short job still spreads over
    every CPU) and larger ones after (a million images stay a few thousand
    objects).
    """
    import ray

    refs, listed, block = [], 0, []
    for row in rows:
        block.append(row)
        if sharded:
            target = 1
        else:
            target = DECODE_BATCH_ROWS if listed < SMALL_BLOCKS_ROWS else LISTING_BLOCK_ROWS
        if len(block) == target:
            refs.append(ray.put(pa.Table.from_pylist(block)))
            listed, block = listed + len(block), []
    if block:
        refs.append(ray.put(pa.Table.from_pylist(block)))
        listed += len(block)
    return refs, listed


def _retry_transient_parquet_writes() -> None:
    """Ray Data retries file writes whose error text matches one of these patterns.

    Its defaults only name pyarrow's own S3 client; our Parquet goes through
    fsspec, whose transient errors read differently.
    """
    import ray

    context = ray.data.DataContext.get_current()
    words = [re.escape(word) for word in TRANSIENT_ERROR_WORDS]
    with warnings.catch_warnings():
        # Ray warns on any change here that substring matching is going away;
        # these patterns are already escaped regexes.
        warnings.simplefilter("ignore", DeprecationWarning)
        context.retried_io_errors = list(dict.fromkeys([*context.retried_io_errors, *words]))


def _fetch_model_cards(
    config: JobConfig, cache_dir: str, storage_options: dict[str, Any]
) -> dict[str, ModelCard]:
    uris = {"depth": config.models.depth, "segmentation": config.models.segmentation}
    return {
        task: ModelCard.fetch(task, uri, Path(cache_dir), storage_options, with_weights=False)
        for task, uri in uris.items()
        if uri is not None
    }


def _prepare_output(fs, root: str, config: JobConfig) -> None:
    predictions = join(root, "predictions")
    if fs.exists(predictions) and fs.ls(predictions):
        if not config.output.overwrite:
            raise OutputExistsError(
                f"output.uri {config.output.uri} already holds predictions from an earlier run; "
                "choose a new output.uri or set output.overwrite=true to replace them"
            )
        for folder in OUTPUT_FOLDERS:
            path = join(root, folder)
            if fs.exists(path):
                fs.rm(path, recursive=True)
    fs.makedirs(root, exist_ok=True)


def _check_cluster_fits(config: JobConfig) -> None:
    import ray

    resources = ray.cluster_resources()
    needed_gpus = config.resources.gpus_per_actor * config.resources.actors.min
    if needed_gpus > resources.get("GPU", 0):
        # Ray Data would otherwise wait forever for GPUs that never come.
        raise ClusterTooSmallError(
            f"the job needs {needed_gpus:g} GPUs (resources.gpus_per_actor × "
            f"resources.actors.min) but the Ray cluster has {resources.get('GPU', 0):g}; "
            "lower them, or use a cluster with GPUs"
        )
    needed_cpus = config.resources.cpus_per_actor * config.resources.actors.min
    if needed_cpus + config.resources.cpus_per_decode_task > resources.get("CPU", 0):
        raise ClusterTooSmallError(
            f"the job needs {needed_cpus:g} CPUs for actors plus "
            f"{config.resources.cpus_per_decode_task:g} for decode tasks but the Ray cluster "
            f"has {resources.get('CPU', 0):g}; lower resources.cpus_per_actor or actors.min"
        )


def _reason_group(reason: str) -> str:
    """'decode: truncated or corrupt image data: …' → 'decode: truncated or corrupt image data'."""
    return ":".join(reason.split(":")[:2]).strip()


def _write_run_report(fs, path: str, config: JobConfig, summary: RunSummary) -> None:
    report = {
        "summary": asdict(summary),
        "config": config.redacted(),
        "versions": {
            package: version(package) for package in ("ray", "torch", "transformers", "pyarrow")
        },
        "finished_at": datetime.now(UTC).isoformat(),
    }
    fs.pipe_file(path, json.dumps(report, indent=2).encode())
