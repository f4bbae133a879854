"""Pseudo-label mode: uncertain pixels ignored, coverage and entropy per image."""

from __future__ import annotations

import numpy as np
import pytest

from dpt_model import IGNORE_LABEL, SegmentationPredictor, resize_for_model


def predict(predictor: SegmentationPredictor, image: np.ndarray):
    [prediction] = predictor.predict([resize_for_model(image, predictor.spec)], [image.shape[:2]])
    return prediction


def test_pixels_under_min_confidence_are_ignored_and_counted(checkpoints, parity_images):
    model = str(checkpoints["segmentation-vit"])
    plain = SegmentationPredictor(model, return_confidence=True)
    image = parity_images[0]
    reference = predict(plain, image)
    # A threshold inside the image's spread of confidences, so both sides are exercised.
    threshold = float(np.quantile(reference.confidence, 0.4))
    labelled = predict(SegmentationPredictor(model, min_confidence=threshold), image)

    uncertain = reference.confidence < threshold
    assert 0 < uncertain.mean() < 1
    assert (labelled.class_ids == IGNORE_LABEL).sum() == uncertain.sum()
    np.testing.assert_array_equal(labelled.class_ids[~uncertain], reference.class_ids[~uncertain])
    assert labelled.label_coverage == pytest.approx(1 - uncertain.mean())
    assert IGNORE_LABEL not in labelled.labels_present
    assert set(labelled.labels_present) <= set(reference.labels_present)
    assert 0 <= labelled.entropy_mean <= 1
    # Off, nothing is ignored and no pseudo-label statistics are reported.
    assert reference.label_coverage is None and reference.entropy_mean is None


def test_a_zero_threshold_labels_every_pixel(checkpoints, parity_images):
    predictor = SegmentationPredictor(str(checkpoints["segmentation-vit"]), min_confidence=0.0)
    prediction = predict(predictor, parity_images[2])
    assert prediction.label_coverage == 1.0
    assert IGNORE_LABEL not in prediction.class_ids
