"""Batched DPT inference: model-sized uint8 images in, full-size maps out.

A predictor is built once (weights on the device) and called per batch. Images of
different model-input sizes in one batch (keep-aspect-ratio checkpoints) are run
as one forward pass per distinct size rather than padded to a common size:
padding would change what the attention layers see and so the predictions, while
grouping keeps every image's output equal to running it alone.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from dpt_model.batching import BatchProbe, choose_batch_size
from dpt_model.loading import (
    DEFAULT_CACHE_DIR,
    ModelCard,
    ModelIdentity,
    ModelLoadError,
    Task,
    load_network,
    model_name,
    weights_sha256,
)
from dpt_model.quantize import quantize_depth
from dpt_model.tensor_processing import to_model_tensor, upsample_depth, upsample_segmentation
from dpt_model.weights import check_weights_fit

# Class id of pixels left unlabelled in pseudo-label mode: training losses'
# usual ignore_index.
IGNORE_LABEL = 255
# batch_size: auto on CUDA keeps a pass's peak under this share of device memory.
AUTO_BATCH_MEMORY_SHARE = 0.8
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class DepthPrediction:
    """Depth at the image's original size, quantised to 16 bits (see ``quantize``)."""

    depth_levels: np.ndarray | None  # (H, W) uint16
    depth_min: float | None
    depth_max: float | None
    error: str | None = None
    # encoding="float16": the model's values themselves (depth_levels is None).
    depth_float16: np.ndarray | None = None


@dataclass(frozen=True)
class SegmentationPrediction:
    """Class ids at the image's original size with the mean max-softmax confidence."""

    class_ids: np.ndarray | None  # (H, W) uint8
    labels_present: list[int]
    confidence_mean: float | None
    confidence: np.ndarray | None = None  # (H, W) float32, only when asked for
    error: str | None = None
    # Pseudo-label mode (``min_confidence`` set): share of pixels labelled, the
    # rest being IGNORE_LABEL, and the mean normalised entropy (0 certain, 1 uniform).
    label_coverage: float | None = None
    entropy_mean: float | None = None


def import_model_code() -> None:
    """Import what building a predictor imports on its first use in a process (about
    1.5 s on two cores): whoever times model loads does this first, so that the
    first model's time is its own and not the process's imports."""
    import transformers.conversion_mapping
    import transformers.models.dpt.modeling_dpt  # noqa: F401


class _Predictor:
    task: Task
    output_field: str  # the model output's tensor that post-processing reads

    def __init__(
        self,
        model_uri: str,
        device: str = "cpu",
        dtype: str = "float32",
        cache_dir: Path = DEFAULT_CACHE_DIR,
        storage_options: dict[str, Any] | None = None,
        flip_tta: bool = False,
    ) -> None:
        card = ModelCard.fetch(self.task, model_uri, cache_dir, storage_options)
        # The driver checked local and object-store weights; a hub model's are here first.
        check_weights_fit(card)
        # Test-time augmentation: average each output with the mirrored image's
        # output mirrored back (two forward passes per batch).
        self.flip_tta = flip_tta
        self.spec = card.spec
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.identity = ModelIdentity(model_name(model_uri), weights_sha256(card.checkpoint_dir))
        self.model = load_network(card.checkpoint_dir, self.task, self.device, self.dtype)
        self.id2label = {int(k): v for k, v in (self.model.config.id2label or {}).items()}
        # Images per forward pass; None runs each call's images of one shape together.
        self.batch_size: int | None = None

    def choose_batch_size(
        self, ceiling: int, time_budget_s: float, device_share: float = 1.0
    ) -> int:
        """Set ``batch_size`` to the largest power of two up to ``ceiling`` that fits.

        On CUDA: the pass peaks under ``AUTO_BATCH_MEMORY_SHARE`` of this actor's
        part of the device's memory (``device_share``: 0.5 when two actors share a
        GPU); the rest is headroom for upsampling to large originals and for
        keep-aspect inputs larger than the probe. On CPU: the pass takes at most
        ``time_budget_s``, so results and progress keep coming.
        """
        shape = (self.spec.height_px, self.spec.width_px, 3)
        is_cuda = self.device.type == "cuda"

        def probe(size: int) -> BatchProbe:
            pixels = np.zeros((size, *shape), dtype=np.uint8)
            if is_cuda:
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
            started = time.perf_counter()
            with torch.inference_mode():
                self._forward(pixels)
            if is_cuda:
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - started
            peak = torch.cuda.max_memory_allocated(self.device) if is_cuda else None
            return BatchProbe(seconds, peak)

        probe(1)  # warm-up: lazy initialisation and kernel selection are not the batch's cost
        memory_limit = None
        if is_cuda:
            total = torch.cuda.get_device_properties(self.device).total_memory
            memory_limit = int(total * AUTO_BATCH_MEMORY_SHARE * device_share)
        self.batch_size = choose_batch_size(
            probe, ceiling, memory_limit, None if is_cuda else time_budget_s
        )
        if is_cuda:
            torch.cuda.empty_cache()
        return self.batch_size

    def predict(
        self,
        model_inputs: Sequence[np.ndarray],
        original_sizes: Sequence[tuple[int, int]],
        on_pass: Callable[[int, float], None] | None = None,
    ) -> list[Any]:
        """model_inputs: (h, w, 3) uint8 from ``resize_for_model``; sizes: (H, W) each.

        One forward pass per distinct input shape (and per ``batch_size`` images
        when set). A pass that runs out of device
        memory is retried in halves, down to one image; an image that does not
        fit alone gets a prediction with ``error`` set, and the batch goes on.
        ``on_pass(images, seconds)`` is told of each pass that gave predictions
        (its forward pass and postprocessing).
        """
        results: list[Any] = [None] * len(model_inputs)
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for index, pixels in enumerate(model_inputs):
            groups[pixels.shape].append(index)
        step = self.batch_size or len(model_inputs) or 1
        for indices in groups.values():
            for start in range(0, len(indices), step):
                chunk = indices[start : start + step]
                self._predict_group(chunk, model_inputs, original_sizes, results, on_pass)
        return results

    def _predict_group(
        self,
        indices: list[int],
        model_inputs: Sequence[np.ndarray],
        original_sizes: Sequence[tuple[int, int]],
        results: list[Any],
        on_pass: Callable[[int, float], None] | None = None,
    ) -> None:
        try:
            started = time.perf_counter()
            with torch.inference_mode():
                output = self._forward(np.stack([model_inputs[i] for i in indices]))
                for row, index in enumerate(indices):
                    results[index] = self._postprocess(output, row, original_sizes[index])
            if on_pass is not None:
                on_pass(len(indices), time.perf_counter() - started)
            return
        except torch.OutOfMemoryError:
            pass
        # Retried only out here: inside the except block the exception's
        # traceback keeps the failed attempt's frames, and with them its
        # activations, alive through every smaller attempt.
        output = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(indices) == 1:
            height, width = original_sizes[indices[0]]
            results[indices[0]] = self._failed(
                f"out of device memory even alone ({width}×{height}); "
                "lower decode.max_image_pixels or use a larger GPU"
            )
            return
        half = len(indices) // 2
        self._predict_group(indices[:half], model_inputs, original_sizes, results, on_pass)
        self._predict_group(indices[half:], model_inputs, original_sizes, results, on_pass)

    def _forward(self, stacked: np.ndarray) -> torch.Tensor:
        """(B, h, w, 3) uint8 → the output tensor: (B, h', w') depth or (B, C, h', w') logits."""
        pixels = torch.from_numpy(stacked)
        if self.device.type == "cuda":
            pixels = pixels.pin_memory().to(self.device, non_blocking=True)
        values = to_model_tensor(pixels, self.spec, self.dtype)
        output = self._run(values)
        if not self.flip_tta:
            return output
        # Mirror after padding, so the padding mirrors with the image and back again.
        return (output + self._run(values.flip(-1)).flip(-1)) / 2

    def _run(self, values: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(pixel_values=values), self.output_field)

    def _postprocess(self, output: torch.Tensor, row: int, original_size: tuple[int, int]) -> Any:
        raise NotImplementedError

    def _failed(self, reason: str) -> Any:
        raise NotImplementedError


DepthResolution = Literal["original", "model"]
# levels: 16-bit quantised over each map's range (PNG); float16: the values (npz).
DepthEncoding = Literal["levels", "float16"]


class DepthPredictor(_Predictor):
    """``DPTForDepthEstimation`` / Depth Anything checkpoints.

    ``resolution="original"`` upsamples each map to its image's size, as
    transformers' post-processing does; ``"model"`` keeps the network's output
    size, which holds the same information in a fraction of the pixels (an 8 MP
    photo's map is 60× smaller to quantise, move and encode) and can be brought
    to the image's size later with ``upsample_depth``.
    """

    task: Task = "depth"
    output_field = "predicted_depth"

    def __init__(
        self,
        *args: Any,
        resolution: DepthResolution = "original",
        encoding: DepthEncoding = "levels",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.resolution = resolution
        self.encoding = encoding

    def _postprocess(
        self, output: torch.Tensor, row: int, original_size: tuple[int, int]
    ) -> DepthPrediction:
        depth = output[row]
        if self.resolution == "original":
            depth = upsample_depth(depth, original_size)
        if self.encoding == "float16":
            return self._as_float16(depth)
        try:
            levels, depth_min, depth_max = quantize_depth(depth)
        except ValueError as error:
            return self._failed(str(error))
        return DepthPrediction(levels, depth_min, depth_max)

    def _as_float16(self, depth: torch.Tensor) -> DepthPrediction:
        depth = depth.to(torch.float32)
        if not bool(torch.isfinite(depth).all()):
            return self._failed("model produced non-finite depth values")
        half = depth.to(torch.float16)
        if not bool(torch.isfinite(half).all()):
            return self._failed(f"depth up to {float(depth.abs().max()):g} overflows float16")
        return DepthPrediction(
            None, float(depth.min()), float(depth.max()), depth_float16=half.cpu().numpy()
        )

    def _failed(self, reason: str) -> DepthPrediction:
        return DepthPrediction(None, None, None, error=reason)


class SegmentationPredictor(_Predictor):
    """``DPTForSemanticSegmentation`` checkpoints.

    With ``min_confidence`` set (pseudo-label mode), pixels whose max softmax
    probability is below it get ``IGNORE_LABEL``, the value training losses skip
    (``ignore_index=255``), and each prediction carries its label coverage and
    mean entropy.
    """

    task: Task = "segmentation"
    output_field = "logits"

    def __init__(
        self,
        *args: Any,
        return_confidence: bool = False,
        min_confidence: float | None = None,
        scales: Sequence[float] = (1.0,),
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.return_confidence = return_confidence
        # Checkpoints have at most 255 classes (loading.check_supported), so 255 is free.
        self.min_confidence = min_confidence
        # Multi-scale test-time augmentation: the model input resized by each
        # scale (to whole patches), logits brought back to the unscaled output
        # size and averaged.
        self.scales = tuple(scales)
        if self.scales != (1.0,) and getattr(self.model.config, "is_hybrid", False):
            raise ModelLoadError(
                f"{self.identity.name}: a hybrid (BiT) backbone takes only its trained "
                "input size; multi-scale segmentation needs a ViT backbone"
            )
        self._patch_px = int(getattr(self.model.config, "patch_size", None) or 16)

    def _run(self, values: torch.Tensor) -> torch.Tensor:
        if self.scales == (1.0,):
            return super()._run(values)
        height, width = values.shape[-2:]
        total, target = None, None
        for scale in self.scales:
            size = [
                max(self._patch_px, round(side * scale / self._patch_px) * self._patch_px)
                for side in (height, width)
            ]
            scaled = _resized(values, size)
            logits = super()._run(scaled)
            if target is None:  # the head's output per input pixel, at scale 1
                target = [
                    round(side * logits.shape[axis] / scaled.shape[axis])
                    for side, axis in ((height, -2), (width, -1))
                ]
            logits = _resized(logits, target)
            total = logits if total is None else total + logits
        return total / len(self.scales)

    def _postprocess(
        self, output: torch.Tensor, row: int, original_size: tuple[int, int]
    ) -> SegmentationPrediction:
        labelling = self.min_confidence is not None
        maps = upsample_segmentation(output[row], original_size, with_entropy=labelling)
        class_ids = maps.class_ids
        coverage = entropy_mean = None
        if labelling:
            labelled = maps.confidence >= self.min_confidence
            class_ids = torch.where(labelled, class_ids, IGNORE_LABEL)
            coverage = float(labelled.float().mean())
            entropy_mean = float(maps.entropy.mean())
        # A count per value, not torch.unique: that sorts every pixel (0.28 s
        # against 0.01 s for a 3.3 MP map on a CPU).
        counts = torch.bincount(class_ids.flatten())
        present = [
            int(v) for v in counts.nonzero()[:, 0].cpu() if v != IGNORE_LABEL or not labelling
        ]
        return SegmentationPrediction(
            class_ids=class_ids.to(torch.uint8).cpu().numpy(),
            labels_present=present,
            confidence_mean=float(maps.confidence.mean()),
            confidence=maps.confidence.cpu().numpy() if self.return_confidence else None,
            label_coverage=coverage,
            entropy_mean=entropy_mean,
        )

    def _failed(self, reason: str) -> SegmentationPrediction:
        return SegmentationPrediction(None, [], None, error=reason)


def _resized(tensor: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, C, h, w) → (B, C, *size), bilinear; unchanged when already that size."""
    if list(tensor.shape[-2:]) == list(size):
        return tensor
    return torch.nn.functional.interpolate(
        tensor, size=tuple(size), mode="bilinear", align_corners=False
    )
