"""DPT depth and segmentation inference, usable without Ray.

loading (hub id, local dir, fsspec URI) → processing (resize on the CPU) →
predictor (batched inference on a device, with ``tensor_processing``: normalise,
upsample) → quantize (16-bit depth contract).

Names resolve on first use: the CPU stages import ``dpt_model.processing`` and
``dpt_model.loading``, and importing the package must not pull torch into them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "IGNORE_LABEL": "dpt_model.predictor",
    "DepthPrediction": "dpt_model.predictor",
    "DepthPredictor": "dpt_model.predictor",
    "ModelCard": "dpt_model.loading",
    "ModelIdentity": "dpt_model.loading",
    "ModelLoadError": "dpt_model.loading",
    "PreprocessSpec": "dpt_model.processing",
    "SegmentationPrediction": "dpt_model.predictor",
    "SegmentationPredictor": "dpt_model.predictor",
    "depth_at_size": "dpt_model.quantize",
    "dequantize_depth": "dpt_model.quantize",
    "model_input_size": "dpt_model.processing",
    "quantize_depth": "dpt_model.quantize",
    "resize_for_model": "dpt_model.processing",
}
__all__ = [
    "IGNORE_LABEL",
    "DepthPrediction",
    "DepthPredictor",
    "ModelCard",
    "ModelIdentity",
    "ModelLoadError",
    "PreprocessSpec",
    "SegmentationPrediction",
    "SegmentationPredictor",
    "depth_at_size",
    "dequantize_depth",
    "model_input_size",
    "quantize_depth",
    "resize_for_model",
]

if TYPE_CHECKING:
    from dpt_model.loading import ModelCard, ModelIdentity, ModelLoadError
    from dpt_model.predictor import (
        IGNORE_LABEL,
        DepthPrediction,
        DepthPredictor,
        SegmentationPrediction,
        SegmentationPredictor,
    )
    from dpt_model.processing import PreprocessSpec, model_input_size, resize_for_model
    from dpt_model.quantize import depth_at_size, dequantize_depth, quantize_depth


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dpt_model' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
