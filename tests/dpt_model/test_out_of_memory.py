"""A batch that runs out of device memory is split, down to one image."""

import weakref

import numpy as np
import pytest
import torch

from dpt_model import DepthPredictor, SegmentationPredictor, resize_for_model
from jobs.sample_images import synthetic_photo


class MemoryLimit:
    """Wraps a model: any forward pass over more than ``max_images`` (or over
    inputs ``too_large_height`` high) raises the error a full GPU raises."""

    def __init__(self, model, max_images: int, too_large_height: int | None = None):
        self.model, self.max_images, self.too_large_height = model, max_images, too_large_height
        self.batch_sizes: list[int] = []

    def __call__(self, pixel_values):
        self.batch_sizes.append(len(pixel_values))
        if len(pixel_values) > self.max_images or pixel_values.shape[-2] == self.too_large_height:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.model(pixel_values=pixel_values)


def inputs_for(predictor, count, width=96):
    images = [np.asarray(synthetic_photo(width, 64, seed=i)) for i in range(count)]
    return [resize_for_model(image, predictor.spec) for image in images], [(64, width)] * count


@pytest.mark.parametrize("predictor_class", [DepthPredictor, SegmentationPredictor])
def test_an_out_of_memory_batch_is_split_until_it_fits(checkpoints, predictor_class):
    task = "depth" if predictor_class is DepthPredictor else "segmentation"
    predictor = predictor_class(str(checkpoints[f"{task}-vit"]))
    inputs, sizes = inputs_for(predictor, 6)
    expected = predictor.predict(inputs, sizes)
    limit = MemoryLimit(predictor.model, max_images=2)
    predictor.model = lambda pixel_values: limit(pixel_values)
    passes = []
    split = predictor.predict(inputs, sizes, on_pass=lambda images, _: passes.append(images))
    assert limit.batch_sizes == [6, 3, 1, 2, 3, 1, 2]
    assert passes == [1, 2, 1, 2]  # those that gave predictions: what the metrics observe
    for alone, together in zip(expected, split, strict=True):
        assert together.error is None
        if task == "depth":
            assert np.abs(alone.depth_levels.astype(int) - together.depth_levels).max() <= 1
        else:
            assert (alone.class_ids == together.class_ids).mean() >= 0.999


def test_an_image_too_large_alone_is_an_error_and_the_rest_go_on(checkpoints):
    predictor = DepthPredictor(str(checkpoints["depth-dinov2"]))  # keep-aspect: sizes differ
    small, small_sizes = inputs_for(predictor, 2)
    wide, wide_sizes = inputs_for(predictor, 1, width=300)
    limit = MemoryLimit(predictor.model, max_images=8, too_large_height=wide[0].shape[0])
    predictor.model = lambda pixel_values: limit(pixel_values)
    results = predictor.predict(small + wide, small_sizes + wide_sizes)
    assert [result.error is None for result in results] == [True, True, False]
    assert "out of device memory even alone (300×64)" in results[2].error


def test_a_failed_attempts_memory_is_freed_before_the_smaller_attempts(checkpoints):
    # A GPU that ran out of memory for a batch must get that attempt's memory
    # back before it tries the halves; here the attempt's "activations" are a
    # tensor its frame holds when the error is raised.
    predictor = DepthPredictor(str(checkpoints["depth-vit"]))
    inputs, sizes = inputs_for(predictor, 4)
    failed_attempts, alive_at_retry = [], []

    def model(pixel_values):
        alive_at_retry.append(sum(ref() is not None for ref in failed_attempts))
        if len(pixel_values) > 1:
            activations = torch.empty(len(pixel_values), 1024)
            failed_attempts.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return predictor_model(pixel_values=pixel_values)

    predictor_model, predictor.model = predictor.model, model
    results = predictor.predict(inputs, sizes)
    assert all(result.error is None for result in results)
    assert len(failed_attempts) == 3 and alive_at_retry == [0] * 7
