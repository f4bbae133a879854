"""Pre- and post-processing for DPT checkpoints, separate from the network.

Every value comes from the checkpoint's ``preprocessor_config.json``: checkpoints
differ in resample filter, input size, normalisation and padding, so nothing here
assumes a particular one. The split mirrors transformers' Pillow backend
(``DPTImageProcessorPil``) so results match it:

* ``resize_for_model`` runs on the CPU, on uint8, with Pillow and the checkpoint's
  filter (the exact operation the Pillow backend performs), so only small uint8
  arrays travel to the model.
* ``to_model_tensor`` rescales, normalises and pads a batch as one tensor on the
  model's device.
* ``upsample_depth`` / ``upsample_segmentation`` bring outputs back to each
  image's original size the way ``post_process_*`` does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

# transformers' DPT processor defaults (``DPTImageProcessorPil`` class attributes),
# used for any key a checkpoint's preprocessor config leaves out.
_IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
_IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
_DEFAULT_SIZE_PX = 384
_PIL_BICUBIC = 3

# Upsampled segmentation logits are (classes × H × W) floats: 150 classes at
# 8 MP are 4.8 GB. Above this many bytes they are computed in bands of rows.
SEGMENTATION_UPSAMPLE_BUDGET_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class PreprocessSpec:
    """The preprocessing a checkpoint expects, read from its processor config."""

    height_px: int = _DEFAULT_SIZE_PX
    width_px: int = _DEFAULT_SIZE_PX
    do_resize: bool = True
    keep_aspect_ratio: bool = False
    ensure_multiple_of: int = 1
    resample: int = _PIL_BICUBIC
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = _IMAGENET_STANDARD_MEAN
    image_std: tuple[float, float, float] = _IMAGENET_STANDARD_STD
    do_pad: bool = False
    size_divisor: int | None = None

    @classmethod
    def from_processor_config(cls, config: Mapping[str, Any]) -> PreprocessSpec:
        """Build from the dict in ``preprocessor_config.json``; missing keys take defaults."""
        size = config.get("size", _DEFAULT_SIZE_PX)
        if isinstance(size, int):
            height_px = width_px = size
        elif isinstance(size, Mapping) and "height" in size and "width" in size:
            height_px, width_px = int(size["height"]), int(size["width"])
        else:
            raise ValueError(
                f"preprocessor config 'size' must be an int or have 'height' and 'width'; "
                f"got {size!r}"
            )
        return cls(
            height_px=height_px,
            width_px=width_px,
            do_resize=bool(config.get("do_resize", True)),
            keep_aspect_ratio=bool(config.get("keep_aspect_ratio", False)),
            ensure_multiple_of=int(config.get("ensure_multiple_of", 1) or 1),
            resample=int(config.get("resample", _PIL_BICUBIC)),
            do_rescale=bool(config.get("do_rescale", True)),
            rescale_factor=float(config.get("rescale_factor", 1 / 255)),
            do_normalize=bool(config.get("do_normalize", True)),
            image_mean=_three_floats(config.get("image_mean", _IMAGENET_STANDARD_MEAN)),
            image_std=_three_floats(config.get("image_std", _IMAGENET_STANDARD_STD)),
            do_pad=bool(config.get("do_pad", False)),
            size_divisor=(
                int(config["size_divisor"]) if config.get("size_divisor") is not None else None
            ),
        )

    @classmethod
    def from_pretrained_dir(cls, model_dir: str | Path) -> PreprocessSpec:
        path = Path(model_dir) / "preprocessor_config.json"
        if not path.is_file():
            raise FileNotFoundError(
                "no preprocessor_config.json: a DPT checkpoint needs its processor config"
            )
        config = json.loads(path.read_text())
        if not isinstance(config, dict):
            raise ValueError("preprocessor_config.json does not hold a JSON object")
        return cls.from_processor_config(config)


def _three_floats(value: float | Sequence[float]) -> tuple[float, float, float]:
    if isinstance(value, int | float):
        return (float(value),) * 3
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"expected 3 channel values, got {list(values)}")
    return values  # type: ignore[return-value]


def _constrain_to_multiple_of(value: float, multiple: int) -> int:
    # Same rounding as transformers' DPT processor (Python's round, half to even).
    return int(round(value / multiple) * multiple)


def model_input_size(height_px: int, width_px: int, spec: PreprocessSpec) -> tuple[int, int]:
    """The (height, width) the checkpoint's resize step produces for an image."""
    if not spec.do_resize:
        return height_px, width_px
    scale_height = spec.height_px / height_px
    scale_width = spec.width_px / width_px
    if spec.keep_aspect_ratio:
        # Scale as little as possible, as DPT's processor does.
        if abs(1 - scale_width) < abs(1 - scale_height):
            scale_height = scale_width
        else:
            scale_width = scale_height
    new_height = _constrain_to_multiple_of(scale_height * height_px, spec.ensure_multiple_of)
    new_width = _constrain_to_multiple_of(scale_width * width_px, spec.ensure_multiple_of)
    # An extreme aspect ratio (4000×64) can round one side to 0; one multiple is
    # the smallest input the network accepts.
    return max(new_height, spec.ensure_multiple_of), max(new_width, spec.ensure_multiple_of)


def resize_for_model(
    rgb: np.ndarray, spec: PreprocessSpec, original_hw: tuple[int, int] | None = None
) -> np.ndarray:
    """Resize an (H, W, 3) uint8 image to the model's input size with Pillow.

    ``original_hw``: the image's full size when ``rgb`` was decoded reduced (a
    drafted JPEG); the input size is computed from it, as for the full image.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {rgb.shape} {rgb.dtype}")
    height, width = rgb.shape[:2]
    target_height, target_width = model_input_size(*(original_hw or (height, width)), spec)
    if (target_height, target_width) == (height, width):
        return rgb
    image = Image.fromarray(rgb, mode="RGB")
    resized = image.resize((target_width, target_height), resample=spec.resample)
    return np.asarray(resized)


def padding_for(height_px: int, width_px: int, spec: PreprocessSpec) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding the checkpoint adds after normalising."""
    if not spec.do_pad or not spec.size_divisor:
        return 0, 0, 0, 0

    def split(size: int) -> tuple[int, int]:
        total = math.ceil(size / spec.size_divisor) * spec.size_divisor - size
        return total // 2, total - total // 2

    top, bottom = split(height_px)
    left, right = split(width_px)
    return top, bottom, left, right


def to_model_tensor(
    pixels_uint8: torch.Tensor, spec: PreprocessSpec, dtype: torch.dtype
) -> torch.Tensor:
    """(B, H, W, 3) uint8 → (B, 3, H', W') model input in ``dtype``.

    The arithmetic runs in float32 (as the reference does) and is cast at the end,
    so float16/bfloat16 models see the same values rounded once.
    """
    if pixels_uint8.dtype != torch.uint8 or pixels_uint8.ndim != 4:
        raise ValueError(f"expected a (B, H, W, 3) uint8 tensor, got {tuple(pixels_uint8.shape)}")
    values = pixels_uint8.permute(0, 3, 1, 2).to(torch.float32)
    if spec.do_rescale:
        values = values * spec.rescale_factor
    if spec.do_normalize:
        mean = torch.tensor(spec.image_mean, dtype=torch.float32, device=values.device)
        std = torch.tensor(spec.image_std, dtype=torch.float32, device=values.device)
        values = (values - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    top, bottom, left, right = padding_for(values.shape[2], values.shape[3], spec)
    if top or bottom or left or right:
        values = torch.nn.functional.pad(values, (left, right, top, bottom), value=0.0)
    return values.to(dtype).contiguous()


def upsample_depth(predicted_depth: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """(h, w) model depth → (H, W) float32, bicubic like ``post_process_depth_estimation``."""
    depth = predicted_depth.to(torch.float32)[None, None]
    return torch.nn.functional.interpolate(
        depth, size=size_hw, mode="bicubic", align_corners=False
    )[0, 0]


def _bilinear_matrix(out_size: int, in_size: int, device: torch.device) -> torch.Tensor:
    """(out, in) weights equal to 1-D bilinear interpolation with align_corners=False."""
    scale = in_size / out_size
    source = (
        (torch.arange(out_size, device=device, dtype=torch.float64) + 0.5) * scale - 0.5
    ).clamp(min=0)
    lower = source.floor().long().clamp(max=in_size - 1)
    upper = (lower + 1).clamp(max=in_size - 1)
    upper_weight = source - lower
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64, device=device)
    rows = torch.arange(out_size, device=device)
    matrix[rows, lower] += 1 - upper_weight
    matrix[rows, upper] += upper_weight
    return matrix.to(torch.float32)


class UpsampledSegmentation(NamedTuple):
    class_ids: torch.Tensor  # (H, W) int64
    confidence: torch.Tensor  # (H, W) float32, the max softmax probability
    # (H, W) float32 softmax entropy over log(classes): 0 one class certain, 1 all
    # equally likely; only when asked for.
    entropy: torch.Tensor | None = None


def upsample_segmentation(
    logits: torch.Tensor,
    size_hw: tuple[int, int],
    budget_bytes: int = SEGMENTATION_UPSAMPLE_BUDGET_BYTES,
    with_entropy: bool = False,
) -> UpsampledSegmentation:
    """(C, h, w) logits → class ids, confidence and optionally entropy at (H, W).

    Small outputs use ``F.interpolate`` exactly as ``post_process_semantic_segmentation``
    does. Large ones use the same bilinear weights as two matrix products over bands
    of rows, so memory stays under ``budget_bytes`` whatever the image size.
    """
    logits = logits.to(torch.float32)
    num_classes = logits.shape[0]
    height, width = size_hw
    full_bytes = num_classes * height * width * 4
    if full_bytes <= budget_bytes:
        upsampled = torch.nn.functional.interpolate(
            logits[None], size=size_hw, mode="bilinear", align_corners=False
        )[0]
        return _per_pixel(upsampled, with_entropy)

    rows_weights = _bilinear_matrix(height, logits.shape[1], logits.device)
    cols_weights = _bilinear_matrix(width, logits.shape[2], logits.device)
    band_rows = max(1, budget_bytes // (num_classes * width * 4))
    class_ids = torch.empty(size_hw, dtype=torch.int64, device=logits.device)
    confidence = torch.empty(size_hw, dtype=torch.float32, device=logits.device)
    entropy = (
        torch.empty(size_hw, dtype=torch.float32, device=logits.device) if with_entropy else None
    )
    for start in range(0, height, band_rows):
        stop = min(start + band_rows, height)
        band = torch.matmul(rows_weights[start:stop], logits) @ cols_weights.T
        maps = _per_pixel(band, with_entropy)
        class_ids[start:stop], confidence[start:stop] = maps.class_ids, maps.confidence
        if with_entropy:
            entropy[start:stop] = maps.entropy
    return UpsampledSegmentation(class_ids, confidence, entropy)


def _per_pixel(upsampled: torch.Tensor, with_entropy: bool) -> UpsampledSegmentation:
    top_logit, class_ids = upsampled.max(dim=0)
    # With z = l - l_max and S = Σ exp(z): max softmax = 1 / S, and entropy =
    # log S - Σ exp(z)·z / S; no (C, H, W) probability tensor is kept.
    shifted = upsampled - top_logit[None]
    exp_shifted = torch.exp(shifted)
    total = exp_shifted.sum(dim=0)
    confidence = 1.0 / total
    if not with_entropy:
        return UpsampledSegmentation(class_ids, confidence)
    entropy = torch.log(total) - (exp_shifted * shifted).sum(dim=0) / total
    num_classes = upsampled.shape[0]
    scale = 1.0 / math.log(num_classes) if num_classes > 1 else 0.0
    return UpsampledSegmentation(class_ids, confidence, (entropy * scale).clamp(0, 1))
