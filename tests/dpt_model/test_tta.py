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
    # The network alone is not mirror-symmetric, so the above is TTA's doing.
    plain = SegmentationPredictor(str(checkpoints["segmentation-vit"]))
    plain_agreement = (
        predict(plain, mirrored).class_ids == predict(plain, image).class_ids[:, ::-1]
    ).mean()
    assert plain_agreement < 0.99


def test_multi_scale_segmentation_averages_scales_at_the_unscaled_size(checkpoints, parity_images):
    model = str(checkpoints["segmentation-vit"])
    image = parity_images[0]
    plain = predict(SegmentationPredictor(model, return_confidence=True), image)
    # One scale of 1 is the plain model, and averaging a scale with itself changes nothing.
    same = predict(SegmentationPredictor(model, scales=(1.0, 1.0), return_confidence=True), image)
    np.testing.assert_array_equal(same.class_ids, plain.class_ids)
    np.testing.assert_allclose(same.confidence, plain.confidence, rtol=1e-5)
    several = predict(
        SegmentationPredictor(model, scales=(0.75, 1.0, 1.25), return_confidence=True), image
    )
    assert several.class_ids.shape == plain.class_ids.shape == image.shape[:2]
    assert (several.class_ids != plain.class_ids).mean() > 0.01  # other scales count
