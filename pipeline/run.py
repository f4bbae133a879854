"""The job, composed: list → read → decode → infer → encode/write → Parquet."""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpt_model import ModelCard
from dpt_model.loading import DEFAULT_CACHE_DIR, depth_kind
from dpt_model.weights import check_weights_fit
from jobs.config import DecodeConfig, InputConfig, JobConfig
from pipeline.cluster import (
    GIB,
    PoolRequest,
    capacity_problem,
    head_takes_tasks,
    read_cluster_capacity,
)
from pipeline.decode import decode_batch, decode_in_slices
from pipeline.infer import InferenceActor, InferenceSettings
from pipeline.keys import SHARD_FORMATS, SHARDS_FOLDER, image_id_for, shard_marker_stem
from pipeline.listing import InputNotFoundError, list_input
from pipeline.metrics import record_skipped
from pipeline.output.compaction import compacted_since
from pipeline.output.done import DoneImages, done_key, load_done_images, text_key
from pipeline.output.runs import (
    RUN_GOING_WITHIN_S,
    RUNS_FOLDER,
    RunHeartbeat,
    ended_record_path,
    finish_record_path,
    iter_run_records,
    renewed_ago,
    runs_going,
    start_record_path,
)
from pipeline.output.shard_markers import ShardMarkers, read_shard_markers
from pipeline.output.view import (
    PREDICTIONS_FOLDER,
    ok_mask,
    read_again_if_parts_go,
    scan_committed,
)
from pipeline.progress import (
    ProgressBeacon,
    ShardReads,
    ShardReadTeller,
    StallWatchdog,
    wait_for_shard_reads,
)
from pipeline.read import ShardInput, read_batch, read_settings_tag, read_shard
from pipeline.report import REPORT_FOLDER, class_names_or_ids, write_quality_report
from pipeline.retry import TRANSIENT_ERROR_WORDS
from pipeline.schema import error_reason, reason_group, storage_problem, strip_url_secrets
from pipeline.storage import (
    arrow_filesystem,
    check_reachable,
    filesystem_for,
    forget_listing,
    full_uri,
    is_local,
    join,
    remove_files,
)
from pipeline.write import write_maps_batch

if TYPE_CHECKING:
    import ray.data

logger = logging.getLogger(__name__)

# Rows per read/decode task: big enough to amortise task overhead, small enough
# that a task's decoded images (original size, briefly) stay well under 1 GB.
DECODE_BATCH_ROWS = 16
# Listing blocks: decode_rows() each for the first rows, then this many.
SMALL_BLOCKS_ROWS = 1024
LISTING_BLOCK_ROWS = 256
# How often a listing that is still going says how far it has got.
LISTING_PROGRESS_S = 30.0
# output.depth_format → how the actor hands depth to the encode stage.
DEPTH_ENCODINGS = {"png16": "levels", "npz_float16": "float16"}
OUTPUT_FOLDERS = (
    PREDICTIONS_FOLDER,
    "depth",
    "segmentation",
    RUNS_FOLDER,
    SHARDS_FOLDER,
    "export",
    REPORT_FOLDER,
)


class OutputNotWritableError(OSError):
    """output.uri cannot be reached or written."""


class ClusterTooSmallError(RuntimeError):
    """The Ray cluster can never satisfy the requested actors."""


@dataclass
class RunSummary:
    run_id: str
    output_uri: str
    predictions_uri: str
    report_uri: str
    input_format: str
    config_hash: str
    images_listed: int  # for shard formats: images read from the shards, plus skipped
    shards_listed: int
    images_skipped_done: int  # annotated ok by an earlier run with the same config_hash
    images_ok: int
    images_error: int
    elapsed_s: float
    images_per_s: float  # images annotated (ok or error) by this run per second
    timings_s: dict[str, float] = field(default_factory=dict)
    # Per pipeline stage: Ray Data's wall time of its operator, and the CPU and
    # wall time summed over its tasks (several stages fused in one task share one).
    stage_timings_s: dict[str, dict[str, float]] = field(default_factory=dict)
    error_reasons: dict[str, int] = field(default_factory=dict)
    # resources.actors.max × gpus_per_actor: what the pool asks for at most (an
    # autoscaler may bring fewer; the run does not see how many it held).
    gpus_requested: float = 0.0
    # <output>/report/index.html; None when report.enabled is false or it failed.
    quality_report_uri: str | None = None
    # input.limit stopped the run: images to annotate were left after it (for
    # shards: the limit was met, as Ray's limit cannot look past it), so the
    # counts above are of what came before the limit.
    limit_reached: bool = False


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S_%fZ")


def run_annotation(config: JobConfig) -> RunSummary:
    """Annotate every image under ``config.input.uri`` not yet done; returns counts and locations.

    With ``mode: incremental`` (the default) images that committed predictions
    already hold for the same source version and config are skipped, so a rerun
    resumes a crashed job and a scheduled run annotates only new or changed
    objects. New results are appended as new Parquet parts; a run rewrites none.
    """
    import ray

    started, started_at = time.perf_counter(), datetime.now(UTC)
    timings: dict[str, float] = {}
    run_id = config.run_id or new_run_id()
    storage_options = config.storage_options()
    # None: each node's own default (its home), where the driver's would be wrong.
    cache_dir = config.models.cache_dir

    # Everything that can fail for a reason the user must fix fails here, before
    # Ray starts: unreachable stores, unreadable models, a missing input or output.
    for key, uri in _storage_uris(config):
        check_reachable(key, uri, storage_options)
    cards = _fetch_model_cards(config, cache_dir, storage_options)
    config_hash = config_hash_for(cards, config)
    out_fs, out_root = filesystem_for(config.output.uri, storage_options)
    _warn_of_runs_going(out_fs, out_root, run_id)
    if config.run_id is not None:
        _warn_if_run_id_finished(out_fs, out_root, run_id)
    start_record = _record_start(out_fs, out_root, config, run_id, started_at)
    # The start record is rewritten while the run goes on: how others (a later
    # run, jobs.compact) tell a run that is going from one that crashed.
    with RunHeartbeat(
        out_fs,
        start_record_path(out_root, run_id),
        start_record,
        ended_path=ended_record_path(out_root, run_id),
    ) as heartbeat:
        incremental = config.mode == "incremental" and not config.output.overwrite
        done = load_done_images(out_fs, out_root, config_hash) if incremental else DoneImages()
        if incremental and not len(done):
            _warn_if_done_under_other_configs(out_fs, out_root, config_hash)
        if len(done) and config.pseudo_labels.enabled:
            _warn_if_min_coverage_changed(config)
        listing = list_input(config.input, storage_options, config.output.uri)
        logger.info("input.format %s (%s)", listing.format, listing.reason)
        timings["prepare"] = time.perf_counter() - started

        if not ray.is_initialized():
            ray.init(ignore_reinit_error=True)
        _check_cluster_fits(config)
        _retry_transient_parquet_writes()
        timings["ray_start"] = time.perf_counter() - started - timings["prepare"]

        sharded = listing.format in SHARD_FORMATS
        skipped = _ListingCounts()
        shard_markers = read_shard_markers(out_fs, out_root) if sharded and len(done) else None
        if shard_markers is not None and done.shard_errors:
            shard_markers.read_times(out_fs, done.shard_errors.keys())
        listed_rows = _with_listing_progress(
            listing.rows, "shards" if sharded else "images", skipped
        )
        marker_tag = _shard_input(config, listing.format).marker_tag if sharded else ""
        to_annotate = _not_done(
            listed_rows, done, sharded, skipped, shard_markers, marker_tag, config_hash
        )
        if config.input.limit is not None and not sharded:
            # Counted after the done images, as for shards (limited once read below),
            # so a repeated smoke run annotates the next N; earlier errors go last,
            # or a limit filled by images that fail every time would never move on.
            to_annotate = _limited(to_annotate, done, config.input.limit, skipped)
        block_refs, listed = put_listing_blocks(to_annotate, sharded, decode_rows(config))
        listing.close()
        if not listed and not skipped.images and not skipped.shards_skipped:
            raise InputNotFoundError(
                f"no {'shards' if sharded else 'images'} to annotate under input.uri "
                f"{strip_url_secrets(config.input.uri)} (input.format {listing.format}, extensions "
                f"{', '.join(config.input.extensions)})"
            )
        if sharded:
            logger.info(
                "listed %d shards under %s; %d to open (their done images are left out "
                "as they are read), %d skipped with all their %d images done",
                listed + skipped.shards_skipped,
                strip_url_secrets(config.input.uri),
                listed,
                skipped.shards_skipped,
                skipped.images,
            )
        else:
            logger.info(
                "listed %d images under %s; %d already done",
                listed + skipped.images,
                strip_url_secrets(config.input.uri),
                skipped.images,
            )
        if skipped.errors_left:
            logger.info(
                "input.limit: %d images whose last rows are errors are left for a later run "
                "(images not tried yet go first)",
                skipped.errors_left,
            )
        if config.output.overwrite:
            # Only now: a mistyped input or a cluster that cannot run the job must
            # not cost the results already there.
            _clear_earlier_results(out_fs, out_root, config, run_id)
        timings["list"] = time.perf_counter() - started - sum(timings.values())
        record_skipped(skipped.images)

        predictions_path = join(out_root, PREDICTIONS_FOLDER)
        if block_refs:
            _set_block_bytes(sharded)
            beacon = _start_beacon()
            dataset = _annotation_dataset(
                ray.data.from_arrow_refs(block_refs),
                config,
                listing.format,
                cards,
                done,
                run_id,
                config_hash,
                cache_dir,
                beacon,
            )
            from ray.data.datasource import FilenameProvider

            with StallWatchdog(beacon, config.stall_timeout_s):
                dataset.write_parquet(
                    predictions_path,
                    filesystem=arrow_filesystem(out_fs),
                    min_rows_per_file=config.output.rows_per_part,
                    # Parts named <run_id>_…: the run's own count opens only its parts.
                    filename_provider=FilenameProvider(
                        dataset_uuid=part_prefix(run_id), file_format="parquet"
                    ),
                    ray_remote_args={"num_cpus": _write_task_cpus()},
                )
            stage_times = stage_timings(dataset)
            if sharded:
                done_in_shards_skipped = skipped.images
                _count_shard_reads(_shard_reads(beacon, config), skipped)
                record_skipped(skipped.images - done_in_shards_skipped)
                if skipped.errors_left:
                    logger.info(
                        "input.limit: %d shard members whose rows are errors of their bytes "
                        "were left for a run without a limit (their shards' bytes are "
                        "unchanged, so they would fail again)",
                        skipped.errors_left,
                    )
        else:
            stage_times = {}
        timings["annotate"] = time.perf_counter() - started - sum(timings.values())

        this_run = _rows_of_run(out_fs, out_root, run_id, started_at)
        timings["count"] = time.perf_counter() - started - sum(timings.values())
        elapsed_s = time.perf_counter() - started
        reasons = this_run.reasons
        images_ok = this_run.ok
        annotated = this_run.ok + this_run.errors
        report_path = finish_record_path(out_root, run_id)
        summary = RunSummary(
            run_id=run_id,
            output_uri=config.output.uri,
            predictions_uri=full_uri(out_fs, predictions_path),
            report_uri=full_uri(out_fs, report_path),
            input_format=listing.format,
            config_hash=config_hash,
            images_listed=annotated + skipped.images if sharded else listed + skipped.images,
            shards_listed=listed if sharded else 0,
            images_skipped_done=skipped.images,
            images_ok=images_ok,
            images_error=annotated - images_ok,
            elapsed_s=round(elapsed_s, 3),
            images_per_s=round(annotated / elapsed_s, 3),
            timings_s={stage: round(seconds, 3) for stage, seconds in timings.items()},
            stage_timings_s=stage_times,
            error_reasons=_top_reasons(reasons),
            gpus_requested=config.resources.actors.max * config.resources.gpus_per_actor,
            limit_reached=(
                config.input.limit is not None and annotated >= config.input.limit
                if sharded
                else skipped.more_after_limit
            ),
        )
        if config.report.enabled:
            report_started = time.perf_counter()
            summary.quality_report_uri = _write_quality_report(config, cards, summary)
            summary.timings_s["report"] = round(time.perf_counter() - report_started, 3)
        heartbeat.stop_renewing()
        _write_run_report(out_fs, report_path, config, cards, summary, started_at)
        return summary


def _top_reasons(reasons: collections.Counter[str], most: int = 10) -> dict[str, int]:
    """The ``most`` commonest error groups, and the images of all others under one
    entry, so that the counts still add up to the run's errors."""
    top = dict(reasons.most_common(most))
    others = sum(reasons.values()) - sum(top.values())
    if others:
        top[f"({len(reasons) - len(top)} other reasons)"] = others
    return top


def _shard_input(config: JobConfig, input_format: str) -> ShardInput:
    shard_input = ShardInput(
        input_format,
        config.input.extensions,
        config.input.image_column,
        config.input.id_column,
        config.decode.max_image_bytes,
    )
    defaults = ShardInput(
        input_format,
        InputConfig.model_fields["extensions"].default,
        InputConfig.model_fields["image_column"].default,
        InputConfig.model_fields["id_column"].default,
        DecodeConfig.model_fields["max_image_bytes"].default,
    )
    return replace(shard_input, marker_tag=read_settings_tag(shard_input, defaults))


def inference_settings(config: JobConfig, cache_dir: str | None) -> InferenceSettings:
    """What each inference actor is told of the job config."""
    pseudo_labels = config.pseudo_labels
    return InferenceSettings(
        device=config.device,
        dtype=config.inference.dtype,
        cache_dir=cache_dir,
        storage_options=config.storage_options(),
        depth_resolution=config.output.depth_resolution,
        depth_encoding=DEPTH_ENCODINGS[config.output.depth_format],
        cpu_threads=config.inference.cpu_threads or math.ceil(config.resources.cpus_per_actor),
        batch_size=config.inference.batch_size,
        max_batch_size=config.inference.max_batch_size,
        batch_time_budget_s=config.inference.batch_time_budget_s,
        gpus_per_actor=config.resources.gpus_per_actor,
        min_confidence=pseudo_labels.min_confidence if pseudo_labels.enabled else None,
        flip_tta=config.inference.flip_tta,
        segmentation_scales=config.inference.segmentation_scales,
    )


def _start_beacon() -> Any:
    """The :class:`ProgressBeacon` actor, on the driver's node.

    There it lives as long as the job can, and it never takes a GPU worker's
    memory; no CPU is reserved for it (a head with ``num-cpus: 0`` would
    otherwise refuse it).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    driver_node = NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False
    )
    return ray.remote(num_cpus=0, scheduling_strategy=driver_node)(ProgressBeacon).remote()


def _annotation_dataset(
    dataset: ray.data.Dataset,
    config: JobConfig,
    input_format: str,
    cards: dict[str, ModelCard],
    done: DoneImages,
    run_id: str,
    config_hash: str,
    cache_dir: str | None,
    beacon: Any,
) -> ray.data.Dataset:
    """list rows → read → decode → infer → encode/write maps → rows in the Parquet schema.

    The encode stage tells ``beacon`` (a :class:`ProgressBeacon`) of every batch it finished.
    """
    import ray

    storage_options = config.storage_options()
    decode_cpus = config.resources.cpus_per_decode_task
    if input_format in SHARD_FORMATS:
        limited = config.input.limit is not None
        dataset = dataset.map_batches(
            read_shard,
            batch_size=1,
            batch_format="numpy",
            fn_kwargs={
                "shard_input": _shard_input(config, input_format),
                "storage_options": storage_options,
                "rows_per_batch": DECODE_BATCH_ROWS,
                "output_uri": config.output.uri,
                "done": done if len(done) or (limited and len(done.errored)) else None,
                "config_hash": config_hash,
                "leave_errors": limited,
                "shard_reads": ShardReadTeller(beacon),
            },
            num_cpus=decode_cpus,
        )
        if config.input.limit is not None:
            dataset = dataset.limit(config.input.limit)
    else:
        dataset = dataset.map_batches(
            read_batch,
            batch_size=decode_rows(config),
            batch_format="numpy",
            fn_kwargs={
                "storage_options": storage_options,
                "max_image_bytes": config.decode.max_image_bytes,
            },
            num_cpus=decode_cpus,
        )
    decode_settings = {
        "specs": {task: card.spec for task, card in cards.items()},
        "max_image_pixels": config.decode.max_image_pixels,
        "max_side_px": config.decode.max_side_px,
        "jpeg_draft": config.decode.jpeg_draft,
    }
    if input_format in SHARD_FORMATS:
        # Fused read and decode take as many input rows per task as the larger
        # batch size: at decode's 16, sixteen shards were read one after another
        # where each could have had a task. Decode takes read's blocks as they
        # come (several MiB of a shard's rows; hundreds of thumbnails) and
        # decodes them a batch at a time.
        dataset = dataset.map_batches(
            decode_in_slices,
            batch_size=None,
            batch_format="numpy",
            fn_kwargs={"rows_per_slice": decode_rows(config), **decode_settings},
            num_cpus=decode_cpus,
        )
    else:
        dataset = dataset.map_batches(
            decode_batch,
            batch_size=decode_rows(config),
            batch_format="numpy",
            fn_kwargs=decode_settings,
            num_cpus=decode_cpus,
        )
    actors = config.resources.actors
    pseudo_labels = config.pseudo_labels
    # On a GPU actor pool Ray keeps read/decode in separate CPU tasks that overlap
    # with inference; with CPU-only actors of the same CPU request it fuses them
    # into the actor (not yet measured against the unfused layout).
    dataset = dataset.map_batches(
        InferenceActor,
        # With batch_size auto, each actor splits Ray's batches into passes of
        # the size it found; a power-of-two ceiling divides into them evenly.
        batch_size=(
            config.inference.max_batch_size
            if config.inference.batch_size == "auto"
            else config.inference.batch_size
        ),
        batch_format="numpy",
        fn_constructor_kwargs={
            # As the driver resolved them: a hub id pinned to the commit it saw.
            "depth_model": cards["depth"].pinned_uri if "depth" in cards else None,
            "segmentation_model": (
                cards["segmentation"].pinned_uri if "segmentation" in cards else None
            ),
            "settings": inference_settings(config, cache_dir),
        },
        # Start at full size: a pool that ramps one actor at a time wastes the
        # first minutes of a job on a cluster that already has the GPUs.
        compute=ray.data.ActorPoolStrategy(
            min_size=actors.min, max_size=actors.max, initial_size=actors.max
        ),
        num_gpus=config.resources.gpus_per_actor,
        num_cpus=config.resources.cpus_per_actor,
        **(
            {"memory": int(config.resources.memory_per_actor_gb * GIB)}
            if config.resources.memory_per_actor_gb
            else {}
        ),
        # Ray Data restarts a dead actor (preempted node, CUDA error, killed
        # process) and retries its in-flight batches (max_restarts and
        # max_task_retries default to -1 for actor pools); rows are written only
        # after inference, so a retried batch leaves no duplicate.
        # tests/test_actor_death.py holds us to it.
    )
    return dataset.map_batches(
        write_maps_batch,
        # Each inference batch as it comes: bundling more would hold back the
        # first results (and progress) by another inference batch or more.
        batch_size=None,
        batch_format="numpy",
        fn_kwargs={
            "output_uri": config.output.uri,
            "storage_options": storage_options,
            "compress_level": config.output.png_compress_level,
            "run_id": run_id,
            "config_hash": config_hash,
            "min_coverage": pseudo_labels.min_coverage if pseudo_labels.enabled else None,
            "depth_kind": _depth_kind(config, cards),
            "beacon": beacon,
        },
        num_cpus=decode_cpus,
    )


def _write_task_cpus() -> float:
    """The CPU request of a Parquet write task (a few ms of encoding per part).

    Zero where the head takes tasks (one machine, a small cluster): Ray Data
    reserves CPUs for the stages upstream first, and with the actor and the
    encode tasks holding every CPU a write that asked for one ran only after
    the last image, so nothing was committed, or resumable, until then. Where
    the head has no CPUs (infra/), a small share keeps the writes, and their
    worker processes, off it; such clusters have CPUs to spare. Either way the
    request differs from the encode stage's, so Ray does not fuse the two
    (fused, encoding would wait for output.rows_per_part rows and run them all
    in one task).
    """
    import ray

    return 0 if head_takes_tasks(ray.nodes()) else 0.1


def _depth_kind(config: JobConfig, cards: dict[str, ModelCard]) -> str | None:
    if "depth" not in cards:
        return None
    if config.models.depth_kind != "auto":
        return config.models.depth_kind
    return depth_kind(cards["depth"].config)


def stage_timings(dataset: ray.data.Dataset) -> dict[str, dict[str, float]]:
    """Seconds and tasks per executed operator from Ray Data's stats, for the run report."""
    timings = {}
    summaries, operators = [dataset.get_stats_summary()], []
    while summaries:  # the write's summary holds the earlier operators as parents
        summary = summaries.pop()
        operators = summary.operators_stats + operators
        summaries.extend(summary.parents)
    for operator in operators:
        entry = {"operator_wall_s": round(operator.time_total_s, 3)}
        if operator.task_rows is not None:
            # Tasks run (calls, for an actor stage): a read stage runs one per
            # shard, so fewer tasks than shards would mean shards read in turn.
            entry["tasks"] = operator.task_rows.count
        for name, summary in (
            ("task_cpu_s", operator.cpu_time),
            ("task_wall_s", operator.wall_time),
        ):
            if summary is not None:
                entry[name] = round(float(summary.sum), 3)
        timings[operator.operator_name] = entry
    return timings


def config_hash_for(cards: dict[str, ModelCard], config: JobConfig) -> str:
    """16 hex digits naming everything that shapes the outputs' values.

    The models (URI and file versions) and their preprocessing, the dtype, the
    depth maps' resolution and format, JPEG drafting, test-time augmentation and
    pseudo-label settings. Not the batch size, resources or PNG compression
    level: those change how fast results come, not what they are.
    """
    shaping = {
        "models": {
            task: {"uri": _model_key(card), "version": card.version, "spec": asdict(card.spec)}
            for task, card in sorted(cards.items())
        },
        "dtype": config.inference.dtype,
        "depth_resolution": config.output.depth_resolution,
        "jpeg_draft": config.decode.jpeg_draft,
    }
    # Settings added after outputs existed count only away from their defaults,
    # so outputs made before them keep their hashes (and are not redone).
    later_settings = {
        # Not min_coverage: it only sets `kept`, which readers can redo from
        # label_coverage; changing it must not re-run the models.
        "pseudo_labels": (
            {"min_confidence": config.pseudo_labels.min_confidence}
            if config.pseudo_labels.enabled
            else None
        ),
        "flip_tta": config.inference.flip_tta or None,
        "segmentation_scales": (
            config.inference.segmentation_scales
            if config.inference.segmentation_scales != (1.0,)
            else None
        ),
        "depth_format": (
            config.output.depth_format if config.output.depth_format != "png16" else None
        ),
        # An override relabels rows; auto is already in the checkpoint's version.
        "depth_kind": config.models.depth_kind if config.models.depth_kind != "auto" else None,
    }
    shaping.update({key: value for key, value in later_settings.items() if value is not None})
    encoded = json.dumps(shaping, sort_keys=True, default=str).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]


def _model_key(card: ModelCard) -> str | None:
    """What of a model's URI the hash takes, beside its version.

    A hub repo without the revision (the version names the commit: pinning the
    one a run used keeps the hash); nothing for a local folder, whose version is
    its bytes (``m``, ``./m/`` and ``/abs/m`` are one model); an object-store URI
    as written.
    """
    if card.hub_snapshot:
        return card.hub_snapshot[0]
    return None if card.is_local_folder else card.uri


@dataclass
class _ListingCounts:
    images: int = 0  # listed images already done (for shards, see below)
    # Under input.limit: whether images to annotate were left when it was met,
    # and, where the listing was read to its end (or, for shards, the reads
    # left them out), how many of those left have an error as their last row.
    more_after_limit: bool = False
    errors_left: int = 0
    # Shards: those left out whole, their done images counted in ``images``;
    # of those passed on to be read, by done_key(URI, version), the done
    # images the view counts (under any read settings; only those with any),
    # until the reads tell (_count_shard_reads).
    shards_skipped: int = 0
    shards_to_read: dict[int, int] = field(default_factory=dict)


def _not_done(
    rows: Iterator[dict[str, str]],
    done: DoneImages,
    sharded: bool,
    skipped: _ListingCounts,
    shard_markers: ShardMarkers | None = None,
    marker_tag: str = "",
    config_hash: str = "",
) -> Iterator[dict[str, str]]:
    """Listed rows minus images already done.

    A shard is left out when its markers (``shard_markers``, from
    :func:`read_shard_markers`) say it holds nothing to do under these read
    settings (``marker_tag``, :func:`read_settings_tag`) and this config
    (:meth:`ShardMarkers.can_skip`), unless the shard's own error row is its
    row in the view: a shard restored to a version read whole before it broke
    is read again, and its new marker retires that row. Other shards pass and
    are filtered once read.
    """
    markers = shard_markers or ShardMarkers()
    for row in rows:
        if sharded:
            shard = (row["shard_uri"], row["shard_version"])
            images_done = done.per_shard.get(shard, 0)
            stem = shard_marker_stem(*shard, marker_tag)
            shard_id = image_id_for(row["shard_uri"])
            if not markers.can_skip(stem, config_hash, images_done) or markers.error_stands(
                shard_id, done.shard_errors.get(shard_id)
            ):
                if images_done:
                    skipped.shards_to_read[done_key(*shard)] = images_done
                yield row
            else:
                # The view's count may hold rows under other read settings (other
                # ids): the shard has no more images than its marker counted.
                skipped.shards_skipped += 1
                skipped.images += min(images_done, markers.images.get(stem, images_done))
        elif len(done) and done.has(row["image_id"], row["source_version"]):
            skipped.images += 1
        else:
            yield row


# How long the driver waits for shard reads input.limit cut off to tell what
# they left out: Ray cancels them without waiting, and each tells as it stops.
CUT_READS_WAIT_S = 10.0


def _shard_reads(beacon: Any, config: JobConfig) -> ShardReads:
    """What the shard reads told the beacon; none (the view's counts stand) where
    it cannot say: every row is written by now, and a count is not worth the run."""
    wait_s = CUT_READS_WAIT_S if config.input.limit is not None else 0.0
    try:
        reads = wait_for_shard_reads(beacon, wait_s)
    except Exception as error:  # the beacon died or did not answer
        logger.warning(
            "the shard reads' counts are lost (%s); images already done are counted from the view",
            type(error).__name__,
        )
        return ShardReads.none()
    if reads.still_reading:
        logger.warning(
            "%d shard reads did not tell what they left out (a read task died, or the "
            "limit cut it off); their images already done are counted from the view",
            reads.still_reading,
        )
    return reads


def _count_shard_reads(reads: ShardReads, skipped: _ListingCounts) -> None:
    """Add what the shards' reads left out (one entry a shard) to ``skipped``.

    The view's count of a shard's done images holds rows of other read
    settings too (another ``input.id_column`` names its images anew), so a
    read's own count replaces it. A shard whose read never told keeps the
    view's: the limit was met before it began, or its read task was killed.
    A read cut off part-way (the limit, a shard that breaks) counts what it
    left out up to there.
    """
    to_read = skipped.shards_to_read
    keys = np.fromiter(to_read.keys(), dtype=np.uint64, count=len(to_read))
    view_counts = np.fromiter(to_read.values(), dtype=np.int64, count=len(to_read))
    untold = ~np.isin(keys, reads.keys)
    skipped.images += int(reads.images_done.sum()) + int(view_counts[untold].sum())
    skipped.errors_left += int(reads.errors_left.sum())


def _limited(
    rows: Iterator[dict[str, str]], done: DoneImages, limit: int, counts: _ListingCounts
) -> Iterator[dict[str, str]]:
    """The first ``limit`` of ``rows``, taking those whose image's last row is an
    error under this config (and source version) only after all the others:
    images that fail every time would otherwise fill the limit on every run.
    One row past the limit is looked for, to tell a run that stopped there
    from one that took the last images there were. At most ``limit`` rows
    are held back.
    """
    held: list[dict[str, str]] = []
    held_in_all = taken = 0
    for row in rows:
        if taken == limit:
            counts.more_after_limit = True
            return
        if len(done.errored) and done.has_error_row(row["image_id"], row["source_version"]):
            held_in_all += 1
            if len(held) < limit:
                held.append(row)
            continue
        taken += 1
        yield row
    held_taken = min(len(held), limit - taken)
    yield from held[:held_taken]
    counts.errors_left = held_in_all - held_taken
    counts.more_after_limit = counts.errors_left > 0


def _with_listing_progress(
    rows: Iterator[dict[str, str]],
    noun: str,
    skipped: _ListingCounts,
    interval_s: float = LISTING_PROGRESS_S,
) -> Iterator[dict[str, str]]:
    """``rows`` unchanged, with a log line every ``interval_s`` of how far the listing is.

    A prefix of millions takes minutes to list, and nothing else is said until
    it ends: a user watching the driver should see it moving.
    """
    started = time.monotonic()
    next_report = started + interval_s
    for listed, row in enumerate(rows, 1):
        if (now := time.monotonic()) >= next_report:
            logger.info(
                "listing: %s %s so far, %s images already done%s (%.0f s)",
                f"{listed:,}",
                noun,
                f"{skipped.images:,}",
                " in shards skipped whole" if noun == "shards" else "",
                now - started,
            )
            next_report = now + interval_s
        yield row


def part_prefix(run_id: str) -> str:
    """How a run's Parquet parts begin: its id, with "." (which Ray refuses in a
    part's name: run ids such as nightly.v2 failed the write) as "-"."""
    return run_id.replace(".", "-")


@dataclass(frozen=True)
class _RowsOfRun:
    ok: int
    errors: int
    reasons: collections.Counter  # reason_group → images


def _rows_of_run(fs, root: str, run_id: str, started_at: datetime) -> _RowsOfRun:
    """What this run committed: its images ok and in error, errors by reason.

    Only the run's own parts are opened (named after it): an output of years of
    scheduled runs has thousands, each a request on an object store. Parts of
    a compaction that began after the run did (``jobs.compact
    --even-if-running``) may hold rows moved out of them: those are read too.
    Each image counts once (a row of a task Ray ran twice, a row in a compacted
    part and in one not deleted yet), at 9 bytes a row while counting.
    """
    return read_again_if_parts_go(lambda: _count_rows_of_run(fs, root, run_id, started_at))


def _count_rows_of_run(fs, root: str, run_id: str, started_at: datetime) -> _RowsOfRun:
    mine = (pc.field("run_id") == run_id) & (
        pc.field("written_at") >= pa.scalar(started_at, pa.timestamp("us", "UTC"))
    )
    parts_of_run = f"{part_prefix(run_id)}_"
    compacted: list[str] = []

    def of_this_run(name: str) -> bool:
        if compacted_since(name, started_at):
            compacted.append(name)
            return True
        return name.startswith(parts_of_run)

    keys: list[np.ndarray] = []
    is_ok: list[np.ndarray] = []
    reason_of_row: dict[int, str] = {}  # error rows only
    rows = 0
    columns = ["image_id", "status", "error"]
    for batch in scan_committed(fs, root, columns, mine, part_named=of_this_run):
        ok = ok_mask(batch["status"])
        ids = batch["image_id"].to_pylist()
        keys.append(np.fromiter(map(text_key, ids), dtype=np.uint64, count=len(ids)))
        is_ok.append(ok)
        if not ok.all():
            failed = np.flatnonzero(~ok)
            reasons = pc.take(batch["error"], pa.array(failed)).to_pylist()
            for row, reason in zip(failed.tolist(), reasons, strict=True):
                if reason is not None:
                    reason_of_row[rows + row] = reason_group(reason)
        rows += len(ids)
    if compacted:
        logger.warning(
            "a compaction ran during this run (%s): the counts below are of the rows it kept",
            compacted[0],
        )
    if not rows:
        return _RowsOfRun(0, 0, collections.Counter())
    first_rows = np.unique(np.concatenate(keys), return_index=True)[1]
    ok_rows = np.concatenate(is_ok)[first_rows]
    reasons = collections.Counter(
        reason_of_row[int(row)] for row in first_rows[~ok_rows] if int(row) in reason_of_row
    )
    return _RowsOfRun(int(ok_rows.sum()), int((~ok_rows).sum()), reasons)


def decode_rows(config: JobConfig) -> int:
    """Rows per read/decode batch (for shards, per decode slice) and per early
    listing block.

    No more than one inference batch: where read and decode are fused into a
    CPU actor, a task hands nothing on until all its rows are through the
    model, so a 16-row block at batch size 8 would hold the first results back
    by a whole batch (13 s at ViT-Base size on two cores).
    """
    batch_size = config.inference.batch_size
    return DECODE_BATCH_ROWS if batch_size == "auto" else min(DECODE_BATCH_ROWS, batch_size)


def put_listing_blocks(
    rows: Iterator[dict[str, str]], sharded: bool, first_block_rows: int = DECODE_BATCH_ROWS
) -> tuple[list[Any], int]:
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
            target = first_block_rows if listed < SMALL_BLOCKS_ROWS else LISTING_BLOCK_ROWS
        if len(block) == target:
            refs.append(ray.put(pa.Table.from_pylist(block)))
            listed, block = listed + len(block), []
    if block:
        refs.append(ray.put(pa.Table.from_pylist(block)))
        listed += len(block)
    return refs, listed


# Ray Data hands a task's output on in blocks of up to this many bytes (128 MiB
# by default). A shard's read task, fused with decode and (on CPUs) inference,
# held every row of its shard until 128 MiB of them had built up (456 depth
# maps at 384 x 384): a run killed mid-shard had committed none of the maps it
# had written, and its first results waited as long. At 4 MiB a block holds a
# few inference batches' output. Image files keep Ray's default: each of their
# read tasks takes one batch, whose output leaves when the task ends.
SHARD_OUTPUT_BLOCK_BYTES = 4 << 20


def _set_block_bytes(sharded: bool) -> None:
    """For the dataset made next: the context is Ray's, for the whole process, and
    each dataset keeps the one it was made under."""
    import ray
    from ray.data.context import DEFAULT_TARGET_MAX_BLOCK_SIZE

    context = ray.data.DataContext.get_current()
    context.target_max_block_size = (
        SHARD_OUTPUT_BLOCK_BYTES if sharded else DEFAULT_TARGET_MAX_BLOCK_SIZE
    )


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


def _storage_uris(config: JobConfig) -> list[tuple[str, str]]:
    uris = [
        ("output.uri", config.output.uri),
        ("input.uri", config.input.uri),
        ("models.depth", config.models.depth),
        ("models.segmentation", config.models.segmentation),
    ]
    return [(key, uri) for key, uri in uris if uri is not None]


def _fetch_model_cards(
    config: JobConfig, cache_dir: str | None, storage_options: dict[str, Any]
) -> dict[str, ModelCard]:
    uris = {"depth": config.models.depth, "segmentation": config.models.segmentation}
    cards = {
        task: ModelCard.fetch(
            task, uri, Path(cache_dir or DEFAULT_CACHE_DIR), storage_options, with_weights=False
        )
        for task, uri in uris.items()
        if uri is not None
    }
    for card in cards.values():
        lacking = check_weights_fit(card, storage_options)
        if lacking:
            logger.warning(
                "model %s: its weights lack %d of the network's tensors, which transformers "
                "starts at random (%s%s); check that it is a trained %s checkpoint",
                card.uri,
                len(lacking),
                ", ".join(lacking[:3]),
                ", …" if len(lacking) > 3 else "",
                card.task,
            )
    return cards


def _warn_if_done_under_other_configs(fs, root: str, config_hash: str) -> None:
    """Say so where an output's ok rows were all made under other configs.

    Then every image is annotated again, which a user who changed only, say, a
    model's path may not expect: the reason belongs in the log, before the cost.
    """
    # Rows of this very config may be there too, out of the view (another's
    # came after them): the one to name is another.
    others = (pc.field("status") == "ok") & (pc.field("config_hash") != config_hash)
    ok_rows = scan_committed(fs, root, ["config_hash"], others)
    other = next((batch["config_hash"][0] for batch in ok_rows if batch.num_rows), None)
    if other is not None:
        logger.warning(
            "no image is done under this run's config_hash %s, but the output holds rows "
            "made under another (%s, and maybe more): the models, their preprocessing, the "
            "dtype or output settings differ (README: config_hash), so every image is "
            "annotated again",
            config_hash,
            other,
        )


def _warn_if_min_coverage_changed(config: JobConfig) -> None:
    """Say so where the latest pseudo-label run judged ``kept`` by another bar.

    ``min_coverage`` is not part of ``config_hash`` (it decides no pixel), so
    images already done keep the ``kept`` of the bar they were judged by.
    """
    for record in iter_run_records(config.output.uri, config.storage_options()):
        earlier = (record.get("config") or {}).get("pseudo_labels") or {}
        if not earlier.get("enabled"):
            continue
        if earlier.get("min_coverage") != config.pseudo_labels.min_coverage:
            logger.warning(
                "pseudo_labels.min_coverage is %s here and was %s in run %s: images already "
                "done keep the kept of the bar they were judged by; to judge every image by "
                "one, give jobs.export --min-coverage or PseudoLabelDataset min_coverage=",
                config.pseudo_labels.min_coverage,
                earlier.get("min_coverage"),
                (record.get("summary") or {}).get("run_id", "?"),
            )
        return


def _warn_of_runs_going(fs, root: str, run_id: str) -> None:
    """Say so where another run on this output is going.

    Two runs at once stay correct (rows only append; the view keeps one per
    image) but annotate the same images twice, so this warns and goes on.
    """
    try:
        others = runs_going(fs, root, RUN_GOING_WITHIN_S, time.time())
    except OSError:  # a courtesy: the start record's write is the real check
        return
    for other, age_s in others:
        if other != run_id:
            logger.warning(
                "run %s is going on this output (its start record was %s): if it is, both "
                "runs annotate the images neither has committed yet",
                other,
                renewed_ago(age_s),
            )
        else:
            logger.warning(
                "a run under this run_id (%s) is going on this output (its start record was "
                "%s): if it is, both annotate the images neither has committed yet, and "
                "share one start and one finish record",
                run_id,
                renewed_ago(age_s),
            )


def _warn_if_run_id_finished(fs, root: str, run_id: str) -> None:
    """Say so where a run_id the config sets has a finish record here already.

    Going on under the same id is how a stopped run is resumed, but the finish
    record of one that ended is replaced: the report's table of runs loses it.
    """
    finished = finish_record_path(root, run_id)
    try:
        exists = fs.exists(finished)
    except OSError:  # a courtesy, as above
        return
    if exists:
        logger.warning(
            "run_id %s has already finished on this output: its record %s is replaced by "
            "this run's (leave run_id unset for a new one per run)",
            run_id,
            strip_url_secrets(full_uri(fs, finished)),
        )


def _record_start(fs, root: str, config: JobConfig, run_id: str, started_at: datetime) -> bytes:
    """Record that this run started.

    The start record doubles as a write check: missing credentials, a wrong
    endpoint or a read-only bucket fail here, before any actor starts. Its pair,
    ``_runs/<run_id>.json``, is written when the run finishes, so a run with a
    start record and no finish record crashed (its committed rows are still valid).
    """
    record = {"run_id": run_id, "started_at": started_at.isoformat(), "config": config.redacted()}
    data = json.dumps(record, indent=2).encode()
    try:
        fs.pipe_file(start_record_path(root, run_id), data)
    except Exception as error:  # credentials, endpoint, permissions: all surface here
        raise OutputNotWritableError(
            storage_problem("output.uri", config.output.uri, error)
        ) from None
    return data


def _clear_earlier_results(fs, root: str, config: JobConfig, run_id: str) -> None:
    """``output.overwrite``: remove every earlier result, all but this run's start record."""
    keep = start_record_path(root, run_id)
    try:
        for folder in OUTPUT_FOLDERS:
            path = forget_listing(fs, join(root, folder))
            # By name: fs.rm reads "[", "*" and "?" in the output's own path as a
            # glob, and would delete s3://b/run1 for s3://b/run[1].
            if is_local(fs) and folder != RUNS_FOLDER:
                if os.path.isdir(path):
                    shutil.rmtree(path)
            else:
                remove_files(fs, [p for p in fs.find(path) if p.rstrip("/") != keep.rstrip("/")])
    except Exception as error:
        raise OutputNotWritableError(
            storage_problem("output.uri", config.output.uri, error)
        ) from None


def _check_cluster_fits(config: JobConfig) -> None:
    capacity = read_cluster_capacity()
    resources = config.resources
    request = PoolRequest(
        actors_min=resources.actors.min,
        cpus_per_actor=resources.cpus_per_actor,
        gpus_per_actor=resources.gpus_per_actor,
        cpus_per_decode_task=resources.cpus_per_decode_task,
        memory_per_actor_bytes=(resources.memory_per_actor_gb or 0) * GIB,
    )
    problem = capacity_problem(request, capacity)
    if problem is None:
        return
    if capacity.may_grow:
        logger.warning(
            "%s. An autoscaler runs on this cluster, so nodes may still come; the run "
            "stops if nothing finishes within stall_timeout_s (%s s)",
            problem,
            config.stall_timeout_s,
        )
        return
    # Ray Data would otherwise wait forever for resources that never come.
    raise ClusterTooSmallError(problem)


def _write_quality_report(
    config: JobConfig, cards: dict[str, ModelCard], summary: RunSummary
) -> str | None:
    """The report on the whole output; a failure is logged, never the run's failure.

    The run's results are committed by now: a report that cannot be built (a
    storage hiccup, a source deleted mid-read) must not turn a finished run into
    a failed one, and ``python -m jobs.report`` can build it again.
    """
    input_format = summary.input_format
    try:
        uri = write_quality_report(
            config.output.uri,
            config.storage_options(),
            _class_names(config, cards),
            samples=config.report.samples,
            thumbnail_px=config.report.thumbnail_px,
            max_image_pixels=config.decode.max_image_pixels,
            max_side_px=config.decode.max_side_px,
            shard_input=(
                _shard_input(config, input_format) if input_format in SHARD_FORMATS else None
            ),
            this_run=asdict(summary),
        )
    except Exception as problem:
        logger.warning(
            "quality report not written (%s); rebuild it with: python -m jobs.report %s",
            error_reason("report", problem),
            strip_url_secrets(config.output.uri),
        )
        return None
    logger.info("quality report %s", uri)
    return uri


def _class_names(config: JobConfig, cards: dict[str, ModelCard]) -> dict[int, str]:
    """This run's segmentation classes, or those of the latest run that had any:
    a depth-only run over an output holding earlier segmentation maps names them."""
    if "segmentation" in cards:
        return cards["segmentation"].class_names
    cache_dir = Path(config.models.cache_dir or DEFAULT_CACHE_DIR)
    return class_names_or_ids(config.output.uri, config.storage_options(), cache_dir=cache_dir)


def _write_run_report(
    fs,
    path: str,
    config: JobConfig,
    cards: dict[str, ModelCard],
    summary: RunSummary,
    started_at: datetime,
) -> None:
    report = {
        "summary": asdict(summary),
        "started_at": started_at.isoformat(),
        "config": config.redacted(),
        "versions": {
            package: version(package) for package in ("ray", "torch", "transformers", "pyarrow")
        },
        "finished_at": datetime.now(UTC).isoformat(),
    }
    if "segmentation" in cards:
        # Read by jobs.export and the report from the output itself: the model's
        # URI, as written, may be a path relative to where the run was started.
        report["segmentation_classes"] = cards["segmentation"].class_names
    fs.pipe_file(path, json.dumps(report, indent=2).encode())
