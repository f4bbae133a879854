"""Encode: depth and class maps → PNG or npz bytes (pure functions, no I/O)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

IGNORE_CLASS_ID = 255


def encode_depth_png(levels: np.ndarray, compress_level: int) -> bytes:
    """(H, W) uint16 levels → 16-bit grayscale PNG."""
    if levels.dtype != np.uint16 or levels.ndim != 2:
        raise ValueError(f"expected (H, W) uint16 depth levels, got {levels.shape} {levels.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(levels).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def decode_depth_png(data: bytes) -> np.ndarray:
    """16-bit PNG bytes → (H, W) uint16 levels."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image).astype(np.uint16)


def encode_depth_npz(depth: np.ndarray) -> bytes:
    """(H, W) float16 depth → ``.npz`` (deflate) holding one array named ``depth``.

    Lossless for float16 and readable with numpy alone:
    ``np.load(io.BytesIO(data))["depth"]``.
    """
    if depth.dtype != np.float16 or depth.ndim != 2:
        raise ValueError(f"expected (H, W) float16 depth, got {depth.shape} {depth.dtype}")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, depth=depth)
    return buffer.getvalue()


def decode_depth_npz(data: bytes) -> np.ndarray:
    """``.npz`` bytes from ``encode_depth_npz`` → (H, W) float16 depth."""
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return archive["depth"]


def decode_depth_map(name: str, data: bytes) -> np.ndarray:
    """A depth map file's array, picked by the file's name (``output.depth_format``).

    ``.npz``: float16 depth values; otherwise a 16-bit PNG's uint16 levels, which
    ``dpt_model.dequantize_depth`` turns into values with the row's depth_min/max.
    """
    return decode_depth_npz(data) if name.endswith(".npz") else decode_depth_png(data)


def segmentation_palette() -> list[int]:
    """A fixed 256-colour palette: distinct colours per class id, black for ignore (255)."""
    generator = np.random.default_rng(12345)
    colours = generator.integers(32, 256, size=(256, 3), dtype=np.uint8)
    colours[0] = (120, 120, 120)
    colours[IGNORE_CLASS_ID] = (0, 0, 0)
    return colours.reshape(-1).tolist()


_PALETTE = segmentation_palette()


def encode_segmentation_png(class_ids: np.ndarray, compress_level: int) -> bytes:
    """(H, W) uint8 class ids → 8-bit palette PNG whose pixel values are the ids."""
    if class_ids.dtype != np.uint8 or class_ids.ndim != 2:
        raise ValueError(
            f"expected (H, W) uint8 class ids, got {class_ids.shape} {class_ids.dtype}"
        )
    image = Image.fromarray(class_ids, mode="L").convert("P")
    image.putpalette(_PALETTE)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def decode_segmentation_png(data: bytes) -> np.ndarray:
    """Palette PNG bytes → (H, W) uint8 class ids (palette indices, not colours)."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image).astype(np.uint8)
