"""Decode: bytes → RGB uint8 at original size, then resized for each model.

The one place images are decoded. Anything that does not decode becomes an error
row with its reason; the rest of the batch carries on.
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Collection, Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from dpt_model.processing import PreprocessSpec, model_input_size, resize_for_model
from pipeline.schema import error_reason

EMPTY_IMAGE = np.zeros((0, 0, 3), dtype=np.uint8)
# The largest decode.max_image_pixels and decode.max_side_px a job accepts:
# readers of an output decode its sources under them, so every image a job
# annotated fits whatever limits it ran with.
LARGEST_IMAGE_PIXELS = 2**31
LARGEST_SIDE_PX = 1 << 16
_PILLOW_LIMIT_LOCK = threading.Lock()


# Every format Pillow reads, but EPS: Pillow renders it by running Ghostscript
# on the file's contents, an interpreter no untrusted input should reach.
Image.init()
OPENABLE_FORMATS = tuple(name for name in Image.OPEN if name != "EPS")
_LOOKS_LIKE_EPS = Image.OPEN["EPS"][1]  # the plugin's test of a file's first bytes

# EXIF orientations that turn the stored image by 90° (width and height swap).
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


class DecodeError(ValueError):
    """Bytes that are not a usable image; the message says why."""


class DecodedImage(NamedTuple):
    rgb: np.ndarray  # (h, w, 3) uint8; smaller than the original when a JPEG was drafted
    original_hw: tuple[int, int]  # the image's own size, EXIF orientation applied


def decode_image(
    data: bytes,
    max_image_pixels: int,
    max_side_px: int,
    reduce_for: Collection[PreprocessSpec] = (),
    reduce_to_px: int | None = None,
) -> DecodedImage:
    """Decode to RGB uint8 with EXIF orientation applied.

    Size limits are checked from the header, before pixel data is decoded.
    Animated images give their first frame. With ``reduce_for``, a JPEG much
    larger than every model's input is decoded at 1/2, 1/4 or 1/8 scale in the
    DCT (Pillow's ``draft``), never below what the largest input needs: an 8 MP
    photo decodes about 4× faster, and the models see the same picture (the
    difference is measured in tests/pipeline/test_decode.py). ``reduce_to_px``
    sets that bound directly (both sides keep at least that many pixels), for
    pictures such as thumbnails that no model sees.
    """
    if not data:
        raise DecodeError("empty file")
    try:
        return _decode(data, max_image_pixels, max_side_px, reduce_for, reduce_to_px)
    except _OverPillowsLimit:
        # Pillow's own bomb limit is process-wide: raised for this image only,
        # under a lock, so that other decodes in the process (a user's training
        # loop, say) keep theirs.
        with _PILLOW_LIMIT_LOCK:
            previous = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = max_image_pixels
            try:
                return _decode(data, max_image_pixels, max_side_px, reduce_for, reduce_to_px)
            finally:
                Image.MAX_IMAGE_PIXELS = previous


class _OverPillowsLimit(Exception):
    """Pillow refused an image by its own limit, which ours is above."""


def _bomb(error: Exception, max_image_pixels: int) -> Exception:
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and max_image_pixels > limit:
        return _OverPillowsLimit()
    return DecodeError(f"decompression bomb: {error} (decode.max_image_pixels={max_image_pixels})")


def _corrupt(error: Exception) -> DecodeError:
    if "Decompressed data too large" in str(error):
        # A PNG text chunk that inflates past Pillow's bound: a bomb of another kind.
        return DecodeError(f"decompression bomb: {error}")
    return DecodeError(f"truncated or corrupt image data: {error}")


def _decode(
    data: bytes,
    max_image_pixels: int,
    max_side_px: int,
    reduce_for: Collection[PreprocessSpec],
    reduce_to_px: int | None,
) -> DecodedImage:
    with warnings.catch_warnings():
        # Pillow only warns between its limit and twice it; treat that as an error too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=OPENABLE_FORMATS)
        except UnidentifiedImageError:
            if _LOOKS_LIKE_EPS(data[:16]):
                raise DecodeError(
                    "not an image: EPS is refused (Pillow would run Ghostscript on it)"
                ) from None
            raise DecodeError("not an image: unrecognised format") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise _bomb(error, max_image_pixels) from None
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            # A header that breaks off or lies: what a damaged file is, grouped as such.
            raise _corrupt(error) from None
        width, height = image.size
        if width * height > max_image_pixels:
            raise DecodeError(
                f"decompression bomb: {width}×{height} = {width * height} pixels exceeds "
                f"decode.max_image_pixels={max_image_pixels}"
            )
        if max(width, height) > max_side_px:
            raise DecodeError(
                f"image is {width}×{height}; a side exceeds decode.max_side_px={max_side_px}"
            )
        try:
            image.seek(0)
            # Reading EXIF can touch chunks past the header, so it sits in the try.
            orientation = image.getexif().get(ExifTags.Base.Orientation)
            turned = orientation in _TRANSPOSING_ORIENTATIONS
            original_hw = (width, height) if turned else (height, width)
            side_px = reduce_to_px or draft_side_px(original_hw, reduce_for)
            if side_px is not None and image.format == "JPEG":
                image.draft(image.mode, (side_px, side_px))
            image.load()
            if turned and image.getexif().get(ExifTags.Base.Orientation) is None:
                # Pillow turned it itself (TIFF, since Pillow 12): its size was
                # given turned from the start, and loading dropped the tag.
                original_hw = (height, width)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise _bomb(error, max_image_pixels) from None  # a later frame's size
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise _corrupt(error) from None
        return DecodedImage(to_rgb(ImageOps.exif_transpose(image)), original_hw)


def draft_side_px(original_hw: tuple[int, int], specs: Collection[PreprocessSpec]) -> int | None:
    """The side both decoded dimensions must keep so every model's resize still downsamples.

    None when no reduction is allowed: no models given, or one takes images unresized.
    A square bound is independent of orientation and of which side a model fits.
    """
    if not specs or not all(spec.do_resize for spec in specs):
        return None
    return max(max(model_input_size(*original_hw, spec)) for spec in specs)


def to_rgb(image: Image.Image) -> np.ndarray:
    """Any Pillow mode → (H, W, 3) uint8; 16-bit and float images are scaled, not clipped."""
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image)
    if mode.startswith("I") or mode == "F":
        values = np.nan_to_num(np.asarray(image).astype(np.float64))
        low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
        if mode.startswith("I;16") or (mode == "I" and low >= 0 and 255 < high <= 65535):
            values = values / 257.0  # 16 bits: 0..65535 → 0..255
        elif mode == "F" and low >= 0 and high <= 1.0:
            values = values * 255.0
        elif low < 0 or high > 255:
            # 32-bit or float data of no fixed range (depth, scientific): its own
            # range is spread over 0..255 rather than clipped to black or white.
            values = (values - low) * (255.0 / (high - low))
        gray = np.clip(np.round(values), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"))


def decode_batch(
    batch: dict[str, np.ndarray],
    specs: Mapping[str, PreprocessSpec],
    max_image_pixels: int,
    max_side_px: int,
    jpeg_draft: bool = True,
) -> dict[str, np.ndarray]:
    """Replace ``image_bytes`` with ``width``, ``height`` and one ``<task>_input`` per model."""
    count = len(batch["image_bytes"])
    status = batch["status"].astype(object)
    error = batch["error"].astype(object)
    width = np.zeros(count, dtype=np.int32)
    height = np.zeros(count, dtype=np.int32)
    model_inputs = {task: np.empty(count, dtype=object) for task in specs}
    reduce_for = list(specs.values()) if jpeg_draft else []
    for index in range(count):
        for column in model_inputs.values():
            column[index] = EMPTY_IMAGE
        if status[index] != "ok":
            continue
        try:
            rgb, original_hw = decode_image(
                batch["image_bytes"][index],
                max_image_pixels,
                max_side_px,
                reduce_for=reduce_for,
            )
            for task, spec in specs.items():
                model_inputs[task][index] = resize_for_model(rgb, spec, original_hw)
        except DecodeError as problem:
            status[index], error[index] = "error", error_reason("decode", str(problem))
            continue
        except Exception as problem:  # a decoder bug on odd input is still one bad row
            status[index], error[index] = "error", error_reason("decode", problem)
            continue
        height[index], width[index] = original_hw
    out = {key: value for key, value in batch.items() if key != "image_bytes"}
    out.update(status=status, error=error, width=width, height=height)
    out.update({f"{task}_input": column for task, column in model_inputs.items()})
    return out


def decode_in_slices(
    batch: dict[str, np.ndarray], rows_per_slice: int, **decode_settings: Any
) -> Iterator[dict[str, np.ndarray]]:
    """:func:`decode_batch` over ``batch`` ``rows_per_slice`` rows at a time.

    For a batch of any size (a whole block of a shard's rows, hundreds of
    thumbnails): the decoded model inputs leave one slice at a time, not all at
    once.
    """
    count = len(batch["image_bytes"])
    for start in range(0, count, rows_per_slice):
        part = {key: column[start : start + rows_per_slice] for key, column in batch.items()}
        yield decode_batch(part, **decode_settings)
