"""DPT depth and segmentation inference, usable without Ray.

loading (hub id, local dir, fsspec URI) → processing (resize, normalise, upsample)
→ predictor (batched inference on a device) → quantize (16-bit depth contract).
"""

from dpt_model.loading import ModelIdentity, ModelLoadError
from dpt_model.predictor import (
    IGNORE_LABEL,
    DepthPrediction,
    DepthPredictor,
    ModelCard,
    SegmentationPrediction,
    SegmentationPredictor,
)
from dpt_model.processing import PreprocessSpec, model_input_size, resize_for_model
from dpt_model.quantize import depth_at_size, dequantize_depth, quantize_depth

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
