"""Depth quantisation to 16-bit and back; the PNG contract in one place.

``depth = depth_min + v / 65535 * (depth_max - depth_min)`` for a stored value v.
"""

from __future__ import annotations

import numpy as np
import torch

from dpt_model.tensor_processing import upsample_depth

DEPTH_LEVELS = 65535


def quantize_depth(depth: torch.Tensor) -> tuple[np.ndarray, float, float]:
    """(H, W) float depth → (uint16 array, depth_min, depth_max).

    Runs on the tensor's device, so on a GPU only the 2-byte result is copied back.
    Raises ValueError on non-finite values (a float16 overflow, say), which no
    16-bit encoding can represent.
    """
    depth = depth.to(torch.float32)
    if not bool(torch.isfinite(depth).all()):
        raise ValueError("model produced non-finite depth values")
    depth_min = float(depth.min())
    depth_max = float(depth.max())
    depth_range = depth_max - depth_min
    if depth_range == 0.0:
        levels = torch.zeros_like(depth, dtype=torch.int32)
    else:
        # Divide before scaling: DEPTH_LEVELS / range overflows for tiny (subnormal) ranges.
        levels = torch.round((depth - depth_min) / depth_range * DEPTH_LEVELS).to(torch.int32)
        levels = levels.clamp_(0, DEPTH_LEVELS)
    return levels.cpu().numpy().astype(np.uint16), depth_min, depth_max


def dequantize_depth(levels: np.ndarray, depth_min: float, depth_max: float) -> np.ndarray:
    """Inverse of ``quantize_depth``: uint16 levels → float32 depth."""
    scale = (depth_max - depth_min) / DEPTH_LEVELS
    return (depth_min + levels.astype(np.float64) * scale).astype(np.float32)


def depth_at_size(
    levels: np.ndarray,
    depth_min: float,
    depth_max: float,
    size_hw: tuple[int, int] | None = None,
) -> np.ndarray:
    """A stored depth map back to float32 depth, at ``size_hw`` when given.

    Maps stored at the model's resolution (``output.depth_resolution: model``)
    come back at the image's size, from the Parquet's ``height``/``width``, by the
    same bicubic upsampling transformers' post-processing applies.
    """
    depth = dequantize_depth(levels, depth_min, depth_max)
    if size_hw is None or depth.shape == tuple(size_hw):
        return depth
    return upsample_depth(torch.from_numpy(depth), tuple(size_hw)).numpy()
