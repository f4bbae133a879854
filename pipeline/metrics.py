"""Job metrics for Prometheus, recorded through Ray's metrics API.

Every Ray node serves what its processes record at its metrics export port
(``ray start --metrics-export-port``), with a ``ray_`` prefix on each name, so
a Prometheus that already scrapes the cluster sees these with no extra setup.
The set follows Apache Beam's RunInference: images by outcome, bytes written,
inference batch size and latency, model load time.

Recording costs a dictionary update in the worker; Ray ships the values to the
node's agent every ``RAY_metrics_report_interval_ms`` (10 s by default), so what
a worker recorded in its last interval before exiting (the actor pool shuts down
when a run ends) is never exported. Metrics are for watching runs; the run
report in the output prefix is the exact account. Outside Ray the calls do nothing.
"""

from __future__ import annotations

import collections
import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ParamSpec

from pipeline.schema import reason_group

if TYPE_CHECKING:
    from ray.util.metrics import Counter, Gauge, Histogram

logger = logging.getLogger(__name__)
P = ParamSpec("P")

# Forward passes hold at most inference.batch_size images; with auto, a power of two
# up to inference.max_batch_size (64 by default).
BATCH_SIZE_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
LATENCY_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]


@dataclass(frozen=True)
class _JobMetrics:
    images: Counter
    images_skipped: Counter
    map_bytes: Counter
    batch_size: Histogram
    batch_latency_s: Histogram
    model_load_s: Gauge


@functools.cache
def _job_metrics() -> _JobMetrics:
    """Built once per process: Ray registers a metric by name when it is constructed."""
    from ray.util.metrics import Counter, Gauge, Histogram

    return _JobMetrics(
        images=Counter(
            "dpt_images",
            "Images annotated, by status (ok, error) and error reason (stage: kind).",
            tag_keys=("status", "reason"),
        ),
        images_skipped=Counter(
            "dpt_images_skipped",
            "Images skipped because an earlier run annotated them with the same config.",
        ),
        map_bytes=Counter(
            "dpt_map_bytes_written",
            "Bytes of map files written, by map (depth, segmentation).",
            tag_keys=("map",),
        ),
        batch_size=Histogram(
            "dpt_inference_batch_size",
            "Images per forward pass, by model task.",
            boundaries=BATCH_SIZE_BUCKETS,
            tag_keys=("task",),
        ),
        batch_latency_s=Histogram(
            "dpt_inference_batch_latency_seconds",
            "Seconds per forward pass (with its post-processing), by model task.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=("task",),
        ),
        model_load_s=Gauge(
            "dpt_model_load_seconds",
            "Seconds the last actor to start took to load a model onto its device.",
            tag_keys=("task",),
        ),
    )


def reason_label(reason: str) -> str:
    """An error reason as a label value: its group, ASCII, at most 80 characters.

    Ray's metrics take ASCII tag values only, and every distinct value is a new
    time series: "image is 20000×300; a side exceeds …" must not be one per size.
    """
    label = reason_group(reason).replace("×", "x").replace("…", "...")
    return label.encode("ascii", "ignore").decode()[:80]


def outcome_counts(
    statuses: Iterable[str], errors: Iterable[str | None]
) -> collections.Counter[tuple[str, str]]:
    """(status, reason label) → images; ok rows have the reason ''."""
    return collections.Counter(
        (status, reason_label(error) if status != "ok" and error else "")
        for status, error in zip(statuses, errors, strict=True)
    )


def _never_fails(record: Callable[P, None]) -> Callable[P, None]:
    """Metrics watch the job; a failure to record one must not fail a batch."""

    @functools.wraps(record)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            record(*args, **kwargs)
        except Exception:
            logger.warning("could not record metric in %s", record.__name__, exc_info=True)

    return guarded


@_never_fails
def record_outcomes(statuses: Iterable[str], errors: Iterable[str | None]) -> None:
    counter = _job_metrics().images
    for (status, reason), count in outcome_counts(statuses, errors).items():
        counter.inc(count, tags={"status": status, "reason": reason})


@_never_fails
def record_skipped(count: int) -> None:
    if count:
        _job_metrics().images_skipped.inc(count)


@_never_fails
def record_map_bytes(map_name: str, size: int) -> None:
    if size:
        _job_metrics().map_bytes.inc(size, tags={"map": map_name})


@_never_fails
def record_inference_batch(task: str, images: int, seconds: float) -> None:
    metrics = _job_metrics()
    metrics.batch_size.observe(images, tags={"task": task})
    metrics.batch_latency_s.observe(seconds, tags={"task": task})


@_never_fails
def record_model_load(task: str, seconds: float) -> None:
    _job_metrics().model_load_s.set(seconds, tags={"task": task})
