"""Small pictures for the quality report: colorised depth, segmentation overlays.

Pure functions over numpy arrays; the report's builder does the reading and writing.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pipeline.encode import IGNORE_CLASS_ID, segmentation_palette

# Turbo (Anton Mikhailov, Google, 2019) as the degree-5 polynomial fit Google
# published with it (Ruofei Du; Apache-2.0): smoother than jet, with more
# distinct steps than viridis, which matters when depth differences are small.
# Rows: red, green, blue; columns: coefficients of x^0 … x^5.
_TURBO_COEFFICIENTS = np.array(
    [
        [0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943],
        [0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604],
        [0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973],
    ]
)
TURBO_LUT = np.clip(
    np.vander(np.linspace(0.0, 1.0, 256), 6, increasing=True) @ _TURBO_COEFFICIENTS.T * 255 + 0.5,
    0,
    255,
).astype(np.uint8)
PALETTE = np.array(segmentation_palette(), dtype=np.uint8).reshape(256, 3)
# Percentiles that set a depth thumbnail's colour range: a few stray pixels at
# either end would otherwise squeeze the rest of the map into one colour.
_DEPTH_RANGE_PERCENTILES = (1.0, 99.0)


def fit_within(width: int, height: int, max_side_px: int) -> tuple[int, int]:
    """(width, height) scaled down, aspect kept, so neither side exceeds ``max_side_px``."""
    scale = min(1.0, max_side_px / max(width, height, 1))
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize_rgb(rgb: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 → ``size_wh``, with a box filter: sharp, cheap shrinking."""
    if (rgb.shape[1], rgb.shape[0]) == size_wh:
        return rgb
    image = Image.fromarray(rgb)
    return np.asarray(image.resize(size_wh, Image.Resampling.BOX, reducing_gap=2.0))


def colorize_depth(depth: np.ndarray, size_wh: tuple[int, int], near_is_high: bool) -> np.ndarray:
    """(H, W) depth values → (h, w, 3) uint8 turbo colours: red near, blue far.

    ``near_is_high``: true for relative inverse depth (MiDaS-style outputs, larger
    is nearer), false for metric depth in metres.
    """
    values = np.asarray(depth, dtype=np.float32)
    resized = np.asarray(
        Image.fromarray(values, mode="F").resize(size_wh, Image.Resampling.BILINEAR)
    )
    finite = resized[np.isfinite(resized)]
    if finite.size == 0:
        return np.zeros((size_wh[1], size_wh[0], 3), dtype=np.uint8)
    low, high = np.percentile(finite, _DEPTH_RANGE_PERCENTILES)
    scaled = np.clip((resized - low) / ((high - low) or 1.0), 0.0, 1.0)
    scaled = np.nan_to_num(scaled, nan=0.0)
    nearness = scaled if near_is_high else 1.0 - scaled
    return TURBO_LUT[np.round(nearness * 255).astype(np.uint8)]


def overlay_segmentation(
    background: np.ndarray | None, class_ids: np.ndarray, size_wh: tuple[int, int], alpha: float
) -> np.ndarray:
    """Class colours blended over the image at ``size_wh`` (grey where there is none).

    Ignored pixels (class 255, under pseudo_labels.min_confidence) show the image
    dimmed, so a reader sees where labels are missing, not a class.
    """
    ids = np.asarray(Image.fromarray(class_ids, mode="L").resize(size_wh, Image.Resampling.NEAREST))
    if background is None:
        base = np.full((size_wh[1], size_wh[0], 3), 128, dtype=np.float32)
    else:
        base = resize_rgb(background, size_wh).astype(np.float32)
    colours = PALETTE[ids].astype(np.float32)
    blended = base * (1 - alpha) + colours * alpha
    ignored = ids == IGNORE_CLASS_ID
    blended[ignored] = base[ignored] * 0.35
    return np.round(blended).astype(np.uint8)


def encode_jpeg(rgb: np.ndarray, quality: int = 80) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


def colour_hex(class_id: int) -> str:
    """The class's colour in segmentation maps and overlays, as CSS ``#rrggbb``."""
    red, green, blue = PALETTE[class_id]
    return f"#{red:02x}{green:02x}{blue:02x}"
