"""Infer: the Ray Data actor that holds the DPT models and runs them per batch.

Thin by design: models are built once in ``__init__`` by ``dpt_model``; each call
picks the rows that decoded, runs the predictors and adds their outputs.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from dpt_model import DepthPredictor, SegmentationPredictor
from dpt_model.loading import DEFAULT_CACHE_DIR
from dpt_model.predictor import DepthEncoding, DepthResolution, import_model_code
from pipeline.metrics import record_inference_batch, record_model_load
from pipeline.schema import error_reason

# An error row's map, of the dtype of the encoding's maps: a batch that mixes
# dtypes becomes a column Ray cannot join with an all-ok batch of the same block.
EMPTY_DEPTH = {
    "levels": np.zeros((0, 0), dtype=np.uint16),
    "float16": np.zeros((0, 0), dtype=np.float16),
}
EMPTY_CLASSES = np.zeros((0, 0), dtype=np.uint8)


@dataclass(frozen=True)
class InferenceSettings:
    """How an actor loads and runs its models; ``pipeline.run`` builds it from the
    job config (where each setting is documented), tests directly."""

    device: str = "cpu"
    dtype: str = "float32"
    cache_dir: str | None = None  # None: the default, under this node's home
    storage_options: dict[str, Any] = field(default_factory=dict)
    depth_resolution: DepthResolution = "model"
    depth_encoding: DepthEncoding = "levels"
    cpu_threads: int | Literal["all"] | None = None
    batch_size: int | Literal["auto"] | None = None  # None: each call's images in one pass
    max_batch_size: int = 64
    batch_time_budget_s: float = 2.0
    gpus_per_actor: float = 0.0
    min_confidence: float | None = None  # pseudo-label mode
    flip_tta: bool = False
    segmentation_scales: tuple[float, ...] = (1.0,)


class InferenceActor:
    """Callable class for ``map_batches``: ``<task>_input`` columns in, map columns out."""

    def __init__(
        self,
        depth_model: str | None,
        segmentation_model: str | None,
        settings: InferenceSettings,
    ) -> None:
        if settings.device == "cpu" and settings.cpu_threads:
            # Ray sets OMP_NUM_THREADS to the actor's whole CPUs (1 by default), which
            # would hold a CPU forward pass to one core whatever the node has.
            threads = settings.cpu_threads
            torch.set_num_threads((os.cpu_count() or 1) if threads == "all" else threads)
        options = {
            "device": settings.device,
            "dtype": settings.dtype,
            "cache_dir": Path(settings.cache_dir) if settings.cache_dir else DEFAULT_CACHE_DIR,
            "storage_options": settings.storage_options,
            "flip_tta": settings.flip_tta,
        }
        self.depth = self.segmentation = None
        import_model_code()
        if depth_model:
            started = time.perf_counter()
            self.depth = DepthPredictor(
                depth_model,
                resolution=settings.depth_resolution,
                encoding=settings.depth_encoding,
                **options,
            )
            record_model_load("depth", time.perf_counter() - started)
        if segmentation_model:
            started = time.perf_counter()
            self.segmentation = SegmentationPredictor(
                segmentation_model,
                min_confidence=settings.min_confidence,
                scales=settings.segmentation_scales,
                **options,
            )
            record_model_load("segmentation", time.perf_counter() - started)
        for predictor in (self.depth, self.segmentation):
            if predictor is None:
                continue
            if settings.batch_size == "auto":
                chosen = predictor.choose_batch_size(
                    settings.max_batch_size,
                    settings.batch_time_budget_s,
                    device_share=min(1.0, settings.gpus_per_actor),
                )
                # Printed: Ray forwards an actor's output to the driver's log, but
                # not its logging below WARNING, which it leaves unconfigured.
                print(f"{predictor.task} model: batch size {chosen} (auto)", flush=True)
            else:
                predictor.batch_size = settings.batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        count = len(batch["status"])
        status = batch["status"].astype(object)
        error = batch["error"].astype(object)
        ready = [index for index in range(count) if status[index] == "ok"]
        out = {key: value for key, value in batch.items() if not key.endswith("_input")}

        if self.depth is not None:
            maps = _filled(count, EMPTY_DEPTH[self.depth.encoding])  # levels or float16
            depth_min = np.full(count, np.nan)
            depth_max = np.full(count, np.nan)
            inputs = [batch["depth_input"][i] for i in ready]
            predictions = _timed_predict(self.depth, inputs, _sizes(batch, ready))
            for index, prediction in zip(ready, predictions, strict=True):
                if prediction.error is not None:
                    status[index], error[index] = "error", error_reason("depth", prediction.error)
                    continue
                maps[index] = (
                    prediction.depth_levels
                    if prediction.depth_float16 is None
                    else prediction.depth_float16
                )
                depth_min[index], depth_max[index] = prediction.depth_min, prediction.depth_max
            maps_column = "depth_levels" if self.depth.encoding == "levels" else "depth_float16"
            out.update({maps_column: maps}, depth_min=depth_min, depth_max=depth_max)
            out["model_depth"] = np.full(count, str(self.depth.identity), dtype=object)

        if self.segmentation is not None:
            # An image whose depth failed (out of memory alone, say) is an error row
            # already: running it through a second model would cost as much again
            # and give the row the second failure's stage.
            ready = [index for index in ready if status[index] == "ok"]
            class_ids = _filled(count, EMPTY_CLASSES)
            labels = _filled(count, np.zeros(0, dtype=np.int32))
            confidence_mean = np.full(count, np.nan)
            coverage = np.full(count, np.nan)
            entropy_mean = np.full(count, np.nan)
            inputs = [batch["segmentation_input"][i] for i in ready]
            predictions = _timed_predict(self.segmentation, inputs, _sizes(batch, ready))
            for index, prediction in zip(ready, predictions, strict=True):
                if prediction.error is not None:
                    status[index] = "error"
                    error[index] = error_reason("segmentation", prediction.error)
                    continue
                class_ids[index] = prediction.class_ids
                labels[index] = np.asarray(prediction.labels_present, dtype=np.int32)
                confidence_mean[index] = prediction.confidence_mean
                if prediction.label_coverage is not None:
                    coverage[index] = prediction.label_coverage
                    entropy_mean[index] = prediction.entropy_mean
            out.update(seg_class_ids=class_ids, seg_labels=labels)
            out["seg_confidence_mean"] = confidence_mean
            if self.segmentation.min_confidence is not None:
                out.update(label_coverage=coverage, entropy_mean=entropy_mean)
            out["model_segmentation"] = np.full(
                count, str(self.segmentation.identity), dtype=object
            )

        out.update(status=status, error=error)
        return out


def _timed_predict(
    predictor: DepthPredictor | SegmentationPredictor,
    inputs: list[np.ndarray],
    sizes: list[tuple[int, int]],
) -> list:
    """Predictions, with each forward pass's size and time recorded: a Ray batch
    is split by input shape and by the actor's batch size, so it is not one pass."""
    if not inputs:
        return []

    def record_pass(images: int, seconds: float) -> None:
        record_inference_batch(predictor.task, images, seconds)

    return predictor.predict(inputs, sizes, on_pass=record_pass)


def _sizes(batch: dict[str, np.ndarray], rows: list[int]) -> list[tuple[int, int]]:
    """(height, width) of each of ``rows``: the size their maps come back at."""
    return [(int(batch["height"][row]), int(batch["width"][row])) for row in rows]


def _filled(count: int, value: np.ndarray) -> np.ndarray:
    column = np.empty(count, dtype=object)
    for index in range(count):
        column[index] = value
    return column
