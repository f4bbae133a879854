"""Flip test-time augmentation: outputs become exactly mirror-symmetric, at two passes' cost."""

from __future__ import annotations

import numpy as np

from dpt_model import DepthPredictor, SegmentationPredictor, resize_for_model


def predict(predictor, image: np.ndarray):
    [prediction] = predictor.predict([resize_for_model(image, predictor.spec)], [image.shape[:2]])
    return prediction


def test_flip_averaged_depth_of_a_mirrored_image_is_the_mirrored_depth(checkpoints, parity_images):
    image = parity_images[2]  # square: the 384×384 input needs no padding
    mirrored = np.ascontiguousarray(image[:, ::-1])
    model = str(checkpoints["depth-vit"])
    with_tta = DepthPredictor(model, resolution="model", flip_tta=True)
    depth = predict(with_tta, image).depth_levels.astype(int)
    depth_of_mirror = predict(with_tta, mirrored).depth_levels.astype(int)
    assert np.abs(depth_of_mirror - depth[:, ::-1]).max() <= 1
    # Without it the network alone is not mirror-symmetric: the test above has teeth.
    plain = DepthPredictor(model, resolution="model")
    plain_depth = predict(plain, image).depth_levels.astype(int)
    plain_of_mirror = predict(plain, mirrored).depth_levels.astype(int)
    assert np.abs(plain_of_mirror - plain_depth[:, ::-1]).max() > 1


def test_flip_averaged_segmentation_is_mirror_symmetric(checkpoints, parity_images):
    image = parity_images[2]
    mirrored = np.ascontiguousarray(image[:, ::-1])
    predictor = SegmentationPredictor(str(checkpoints["segmentation-vit"]), flip_tta=True)
    labels = predict(predictor, image)
    labels_of_mirror = predict(predictor, mirrored)
    agreement = (labels_of_mirror.class_ids == labels.class_ids[:, ::-1]).mean()
    assert agreement >= 0.999  # float rounding may flip a near-tie
    assert abs(labels_of_mirror.confidence_mean - labels.confidence_mean) < 1e-5
