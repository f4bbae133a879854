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
# 8 MP are 4.8 GB, so they are computed in bands of rows, each band's logits and
# probabilities under this many bytes together.
SEGMENTATION_UPSAMPLE_BUDGET_BYTES = 256 * 1024 * 1024
# On the CPU the per-pixel passes are bound by memory traffic: bands that stay in
# cache run them several times faster (docs/benchmarks.md, "Segmentation"). A GPU
# keeps the larger bands, which take fewer kernel launches.
CPU_SEGMENTATION_BAND_BYTES = 16 * 1024 * 1024


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


def _bilinear_taps(
    out_size: int, in_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each output row's two source rows and the second one's weight, computed in
    float32 as ``F.interpolate(mode="bilinear", align_corners=False)`` does."""
    scale = torch.tensor(in_size / out_size, dtype=torch.float32, device=device)
    source = (torch.arange(out_size, dtype=torch.float32, device=device) + 0.5) * scale - 0.5
    source = source.clamp(min=0)
    lower = source.long().clamp(max=in_size - 1)
    upper = (lower + 1).clamp(max=in_size - 1)
    return lower, upper, (source - lower).clamp(0, 1)


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

    Bilinear like ``post_process_semantic_segmentation``, in bands of rows so memory
    stays under ``budget_bytes`` whatever the image size. A band's rows are blended
    from their two source rows with ``F.interpolate``'s weights, then widened by
    ``F.interpolate`` itself (rows stay in place when their count is unchanged).
    Pixels are laid out with their classes side by side (channels last): the
    per-pixel softmax and max then read memory in order.
    """
    num_classes, in_height, _ = logits.shape
    height, width = size_hw
    band_bytes = budget_bytes
    if logits.device.type == "cpu":
        band_bytes = min(budget_bytes, CPU_SEGMENTATION_BAND_BYTES)
    # Two band-sized tensors at a time: the logits and their probabilities.
    band_rows = max(1, band_bytes // (2 * num_classes * width * 4))
    by_pixel = logits.to(torch.float32).permute(1, 2, 0).contiguous()  # (h, w, C)
    lower, upper, upper_weight = _bilinear_taps(height, in_height, logits.device)
    class_ids = torch.empty(size_hw, dtype=torch.int64, device=logits.device)
    confidence = torch.empty(size_hw, dtype=torch.float32, device=logits.device)
    entropy = (
        torch.empty(size_hw, dtype=torch.float32, device=logits.device) if with_entropy else None
    )
    for start in range(0, height, band_rows):
        stop = min(start + band_rows, height)
        rows = torch.lerp(
            by_pixel.index_select(0, lower[start:stop]),
            by_pixel.index_select(0, upper[start:stop]),
            upper_weight[start:stop, None, None],
        )
        band = torch.nn.functional.interpolate(
            rows[None].permute(0, 3, 1, 2),  # (1, C, rows, w), channels last in memory
            size=(stop - start, width),
            mode="bilinear",
            align_corners=False,
        )[0].permute(1, 2, 0)  # (rows, W, C)
        maps = _per_pixel(band, with_entropy)
        class_ids[start:stop], confidence[start:stop] = maps.class_ids, maps.confidence
        if with_entropy:
            entropy[start:stop] = maps.entropy
    return UpsampledSegmentation(class_ids, confidence, entropy)


def _per_pixel(upsampled: torch.Tensor, with_entropy: bool) -> UpsampledSegmentation:
    """Class ids, confidence and entropy of (H, W, C) logits."""
    probabilities = torch.softmax(upsampled, dim=-1)
    confidence, class_ids = probabilities.max(dim=-1)
    if not with_entropy:
        return UpsampledSegmentation(class_ids, confidence)
    # With z = l - l_max and S = Σ exp(z): max softmax = 1 / S, and entropy =
    # -Σ p·log p = log S - Σ p·z = -log(max softmax) - (Σ p·l - l_max).
    top_logit = upsampled.gather(-1, class_ids[..., None])[..., 0]
    expected_logit = (probabilities * upsampled).sum(dim=-1)
    entropy = -torch.log(confidence) - (expected_logit - top_logit)
    num_classes = upsampled.shape[-1]
    scale = 1.0 / math.log(num_classes) if num_classes > 1 else 0.0
    return UpsampledSegmentation(class_ids, confidence, (entropy * scale).clamp(0, 1))
