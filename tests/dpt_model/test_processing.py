import math

import numpy as np
import pytest
import torch
from transformers import DPTImageProcessorPil
from transformers.models.dpt.image_processing_pil_dpt import get_resize_output_image_size

from dpt_model.processing import PreprocessSpec, model_input_size, resize_for_model
from dpt_model.tensor_processing import to_model_tensor, upsample_segmentation

KEEP_ASPECT_518 = {
    "size": {"height": 518, "width": 518},
    "keep_aspect_ratio": True,
    "ensure_multiple_of": 14,
    "do_rescale": False,
    "image_mean": [123.675, 116.28, 103.53],
    "image_std": [58.395, 57.12, 57.375],
}
PADDED = {**KEEP_ASPECT_518, "ensure_multiple_of": 1, "do_pad": True, "size_divisor": 14}
FIXED_480_BILINEAR = {"size": {"height": 480, "width": 480}, "resample": 2}


@pytest.mark.parametrize("height,width", [(240, 320), (401, 97), (1, 1), (64, 4000), (518, 518)])
@pytest.mark.parametrize("processor_config", [KEEP_ASPECT_518, FIXED_480_BILINEAR, {}])
def test_model_input_size_matches_transformers(height, width, processor_config):
    spec = PreprocessSpec.from_processor_config(processor_config)
    expected = get_resize_output_image_size(
        np.zeros((3, height, width)),
        output_size=(spec.height_px, spec.width_px),
        keep_aspect_ratio=spec.keep_aspect_ratio,
        multiple=spec.ensure_multiple_of,
    )
    got = model_input_size(height, width, spec)
    # transformers can round a side to 0; we clamp to one multiple instead.
    assert got == (
        max(expected.height, spec.ensure_multiple_of),
        max(expected.width, spec.ensure_multiple_of),
    )


@pytest.mark.parametrize("processor_config", [KEEP_ASPECT_518, FIXED_480_BILINEAR, PADDED, {}])
def test_resize_and_normalise_equal_the_pillow_processor(processor_config):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(123, 201, 3), dtype=np.uint8)
    reference = DPTImageProcessorPil(**processor_config)(images=image, return_tensors="pt")
    spec = PreprocessSpec.from_processor_config(reference_config(processor_config))
    ours = to_model_tensor(
        torch.from_numpy(resize_for_model(image, spec))[None], spec, torch.float32
    )
    assert ours.shape == reference["pixel_values"].shape
    torch.testing.assert_close(ours, reference["pixel_values"], rtol=0, atol=1e-5)


def reference_config(processor_config):
    return DPTImageProcessorPil(**processor_config).to_dict()


def test_spec_reads_every_value_from_the_processor_config():
    spec = PreprocessSpec.from_processor_config(reference_config(PADDED))
    assert (spec.height_px, spec.keep_aspect_ratio, spec.do_rescale) == (518, True, False)
    assert spec.do_pad and spec.size_divisor == 14
    assert spec.image_mean == (123.675, 116.28, 103.53)
    assert PreprocessSpec.from_processor_config(FIXED_480_BILINEAR).resample == 2


@pytest.mark.parametrize(
    "size, height_width",
    [(384, (384, 384)), ({"height": 300, "width": 400}, (300, 400)), ([300, 400], (300, 400))],
)
def test_a_size_reads_as_transformers_reads_it(size, height_width):
    """[height, width] is how feature-extractor configs from before transformers 4.26 say it."""
    spec = PreprocessSpec.from_processor_config({"size": size})
    reference = DPTImageProcessorPil(size=size).size
    assert (spec.height_px, spec.width_px) == height_width == (reference.height, reference.width)


def test_a_size_of_no_fixed_shape_is_refused():
    with pytest.raises(ValueError, match=r"must be an int, \[height, width\] or have"):
        PreprocessSpec.from_processor_config({"size": {"shortest_edge": 384}})


@pytest.mark.parametrize(
    ("size", "budget_bytes"),
    [
        ((203, 157), 10**12),  # one band
        ((203, 157), 2 * 7 * 157 * 4 * 9),  # bands of 9 rows
        ((203, 157), 1),  # bands of one row
        ((17, 13), 1),  # smaller than the logits: bilinear, no antialiasing
    ],
)
def test_segmentation_upsample_matches_interpolate(size, budget_bytes):
    torch.manual_seed(0)
    # A strided view, as a row of a batch of model outputs can be
    batch = torch.randn(2, 7, 24, 31).contiguous(memory_format=torch.channels_last) * 3
    logits = batch[1]
    class_ids, confidence, entropy = upsample_segmentation(
        logits, size, budget_bytes=budget_bytes, with_entropy=True
    )
    # confidence is the max softmax probability of the upsampled logits, entropy
    # the softmax's entropy over log(classes)
    reference = torch.nn.functional.interpolate(
        logits[None], size=size, mode="bilinear", align_corners=False
    )[0]
    probabilities = reference.softmax(0)
    assert class_ids.shape == size and class_ids.dtype == torch.int64
    assert (class_ids == reference.argmax(0)).float().mean() >= 0.999
    torch.testing.assert_close(confidence, probabilities.max(0).values, rtol=1e-4, atol=1e-5)
    expected_entropy = -(probabilities * probabilities.log()).sum(0) / math.log(7)
    torch.testing.assert_close(entropy, expected_entropy, rtol=1e-4, atol=1e-5)
    without = upsample_segmentation(logits, size, budget_bytes=budget_bytes)
    assert without.entropy is None
    assert torch.equal(without.class_ids, class_ids)


def test_entropy_is_zero_for_a_certain_pixel_and_one_for_a_uniform_one():
    logits = torch.zeros(5, 1, 2)
    logits[2, 0, 0] = 100.0  # pixel 0: class 2, certain; pixel 1: all classes equal
    maps = upsample_segmentation(logits, (1, 2), with_entropy=True)
    torch.testing.assert_close(maps.entropy, torch.tensor([[0.0, 1.0]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(maps.confidence, torch.tensor([[1.0, 0.2]]), atol=1e-5, rtol=0)


def test_rejects_non_rgb_input():
    with pytest.raises(ValueError, match="uint8"):
        resize_for_model(np.zeros((4, 4), dtype=np.uint8), PreprocessSpec())
