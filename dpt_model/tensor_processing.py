"""Processing that runs where the model runs: DPT's input tensor, and outputs
brought back to each image's size.

* ``to_model_tensor`` rescales, normalises and pads a uint8 batch as one tensor
  on the model's device, with the values :mod:`dpt_model.processing` read from
  the checkpoint.
* ``upsample_depth`` / ``upsample_segmentation`` bring outputs back to each
  image's original size the way transformers' ``post_process_*`` does.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from dpt_model.processing import PreprocessSpec, padding_for

# Upsampled segmentation logits are (classes × H × W) floats: 150 classes at
# 8 MP are 4.8 GB. Above this many bytes they are computed in bands of rows.
SEGMENTATION_UPSAMPLE_BUDGET_BYTES = 256 * 1024 * 1024


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
