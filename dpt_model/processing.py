"""Preprocessing for DPT checkpoints on the CPU, separate from the network.

Every value comes from the checkpoint's ``preprocessor_config.json``: checkpoints
differ in resample filter, input size, normalisation and padding, so nothing here
assumes a particular one. The split mirrors transformers' Pillow backend
(``DPTImageProcessorPil``) so results match it: ``resize_for_model`` runs on the
CPU, on uint8, with Pillow and the checkpoint's filter (the exact operation the
Pillow backend performs), so only small uint8 arrays travel to the model; the
rest (rescale, normalise, pad, and bringing outputs back to each image's size)
runs where the model runs, in :mod:`dpt_model.tensor_processing`.

No torch here: the CPU decode tasks import this module, and torch would add
about a second and 130 MB to every worker process that runs them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# transformers' DPT processor defaults (``DPTImageProcessorPil`` class attributes),
# used for any key a checkpoint's preprocessor config leaves out.
_IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
_IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
_DEFAULT_SIZE_PX = 384
_PIL_BICUBIC = 3


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
        elif isinstance(size, list | tuple) and len(size) == 2:
            # Feature-extractor configs from before transformers 4.26: (height, width),
            # as transformers' get_size_dict reads them.
            height_px, width_px = int(size[0]), int(size[1])
        else:
            raise ValueError(
                "preprocessor config 'size' must be an int, [height, width] or have "
                f"'height' and 'width'; got {size!r}"
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
