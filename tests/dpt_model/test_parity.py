"""Predictor output equals transformers' own pipeline (Pillow processor + model + post-process)."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForDepthEstimation,
    DPTForSemanticSegmentation,
    DPTImageProcessorPil,
)

from dpt_model import (
    DepthPredictor,
    SegmentationPredictor,
    depth_at_size,
    dequantize_depth,
    resize_for_model,
)


def _reference_run(model_class, model_dir, image: np.ndarray):
    processor = DPTImageProcessorPil.from_pretrained(model_dir)
    model = model_class.from_pretrained(model_dir).eval()
    inputs = processor(images=Image.fromarray(image), return_tensors="pt")
    with torch.inference_mode():
        return processor, model(**inputs)


def reference_depth(model_dir, image: np.ndarray) -> np.ndarray:
    processor, outputs = _reference_run(AutoModelForDepthEstimation, model_dir, image)
    [result] = processor.post_process_depth_estimation(outputs, target_sizes=[image.shape[:2]])
    return result["predicted_depth"].numpy()


def reference_segmentation(model_dir, image: np.ndarray) -> np.ndarray:
    processor, outputs = _reference_run(DPTForSemanticSegmentation, model_dir, image)
    [result] = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.shape[:2]])
    return result.numpy()


@pytest.mark.parametrize(
    "checkpoint", ["depth-vit", "depth-hybrid", "depth-dinov2", "depth-anything"]
)
def test_depth_matches_reference_within_one_step(checkpoints, parity_images, checkpoint):
    model_dir = checkpoints[checkpoint]
    predictor = DepthPredictor(str(model_dir))
    inputs = [resize_for_model(image, predictor.spec) for image in parity_images]
    if checkpoint in ("depth-dinov2", "depth-anything"):
        assert len({i.shape for i in inputs}) > 1, "keep-aspect inputs should differ in shape"
    predictions = predictor.predict(inputs, [image.shape[:2] for image in parity_images])
    for image, prediction in zip(parity_images, predictions, strict=True):
        reference = reference_depth(model_dir, image)
        ours = dequantize_depth(prediction.depth_levels, prediction.depth_min, prediction.depth_max)
        assert ours.shape == image.shape[:2]
        depth_range = float(reference.max() - reference.min())
        step = depth_range / 65535
        assert np.abs(ours - reference).max() <= step + 1e-4 * depth_range


@pytest.mark.parametrize("checkpoint", ["depth-vit", "depth-anything"])
def test_model_resolution_depth_is_the_network_output_and_upsamples_to_reference(
    checkpoints, parity_images, checkpoint
):
    model_dir = checkpoints[checkpoint]
    predictor = DepthPredictor(str(model_dir), resolution="model")
    inputs = [resize_for_model(image, predictor.spec) for image in parity_images]
    predictions = predictor.predict(inputs, [image.shape[:2] for image in parity_images])
    for image, prediction in zip(parity_images, predictions, strict=True):
        _, outputs = _reference_run(AutoModelForDepthEstimation, model_dir, image)
        network = outputs.predicted_depth[0].numpy()
        ours = dequantize_depth(prediction.depth_levels, prediction.depth_min, prediction.depth_max)
        assert ours.shape == network.shape
        step = float(network.max() - network.min()) / 65535
        assert np.abs(ours - network).max() <= step
        # What a reader of a model-resolution map does to get the image's size.
        full = depth_at_size(
            prediction.depth_levels, prediction.depth_min, prediction.depth_max, image.shape[:2]
        )
        reference = reference_depth(model_dir, image)
        depth_range = float(reference.max() - reference.min())
        assert np.abs(full - reference).max() <= depth_range / 65535 + 1e-4 * depth_range


def test_segmentation_matches_reference(checkpoints, parity_images):
    model_dir = checkpoints["segmentation-vit"]
    predictor = SegmentationPredictor(str(model_dir))
    inputs = [resize_for_model(image, predictor.spec) for image in parity_images]
    predictions = predictor.predict(inputs, [image.shape[:2] for image in parity_images])
    for image, prediction in zip(parity_images, predictions, strict=True):
        reference = reference_segmentation(model_dir, image)
        assert prediction.class_ids.shape == reference.shape
        assert (prediction.class_ids == reference).mean() >= 0.999
        assert prediction.labels_present == sorted(np.unique(prediction.class_ids).tolist())
        assert 1 / len(predictor.id2label) <= prediction.confidence_mean <= 1


def test_batching_does_not_change_results(checkpoints, parity_images):
    predictor = DepthPredictor(str(checkpoints["depth-dinov2"]))
    inputs = [resize_for_model(image, predictor.spec) for image in parity_images]
    sizes = [image.shape[:2] for image in parity_images]
    together = predictor.predict(inputs, sizes)
    for index in range(len(inputs)):
        [alone] = predictor.predict([inputs[index]], [sizes[index]])
        diff = np.abs(alone.depth_levels.astype(int) - together[index].depth_levels.astype(int))
        assert diff.max() <= 1


def test_bfloat16_stays_close_to_float32(checkpoints, parity_images):
    model_dir = str(checkpoints["depth-vit"])
    image = parity_images[0]
    results = {}
    for dtype in ("float32", "bfloat16"):
        predictor = DepthPredictor(model_dir, dtype=dtype)
        [prediction] = predictor.predict(
            [resize_for_model(image, predictor.spec)], [image.shape[:2]]
        )
        results[dtype] = dequantize_depth(
            prediction.depth_levels, prediction.depth_min, prediction.depth_max
        )
    depth_range = float(results["float32"].max() - results["float32"].min())
    # bfloat16 keeps 8 mantissa bits: a few percent of the range, not a different map
    assert np.abs(results["bfloat16"] - results["float32"]).mean() < 0.05 * depth_range
