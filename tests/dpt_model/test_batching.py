"""batch_size: auto — the search on made-up measurements, and on a real CPU model."""

import numpy as np
import pytest
import torch

from dpt_model import DepthPredictor, resize_for_model
from dpt_model.batching import BatchProbe, choose_batch_size

GIB = 1024**3


def memory_probe(per_image_gib: float, tried: list[int]):
    def probe(size: int) -> BatchProbe:
        tried.append(size)
        return BatchProbe(seconds=0.01 * size, peak_bytes=int((1 + per_image_gib * size) * GIB))

    return probe


def test_largest_power_of_two_under_the_memory_limit():
    tried = []
    # 1 GiB of weights + 0.5 GiB per image under 8 GiB: 14 images would fit, 8 is chosen.
    assert choose_batch_size(memory_probe(0.5, tried), 64, memory_limit_bytes=8 * GIB) == 8
    assert tried == [1, 2, 4, 8, 16]


def test_ceiling_stops_the_search():
    tried = []
    assert choose_batch_size(memory_probe(0.001, tried), 16, memory_limit_bytes=8 * GIB) == 16
    assert tried == [1, 2, 4, 8, 16]


def test_out_of_memory_during_the_search_keeps_the_last_size_that_ran():
    def probe(size: int) -> BatchProbe:
        if size >= 32:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return BatchProbe(seconds=0.1, peak_bytes=size)

    assert choose_batch_size(probe, 64, memory_limit_bytes=10**9) == 16


def test_cpu_time_budget():
    def probe(size: int) -> BatchProbe:
        return BatchProbe(seconds=0.3 * size)

    assert choose_batch_size(probe, 64, time_budget_s=2.0) == 4
    # One image over the budget still runs alone: there is no smaller batch.
    assert choose_batch_size(probe, 64, time_budget_s=0.1) == 1


def test_predictor_finds_a_cpu_batch_and_chunked_passes_give_the_same_maps(
    checkpoints, parity_images
):
    predictor = DepthPredictor(str(checkpoints["depth-vit"]))
    chosen = predictor.choose_batch_size(ceiling=8, time_budget_s=60.0)
    assert chosen == predictor.batch_size == 8  # the tiny model is far under a minute
    assert predictor.choose_batch_size(ceiling=8, time_budget_s=1e-9) == 1

    inputs = [resize_for_model(image, predictor.spec) for image in parity_images]
    sizes = [image.shape[:2] for image in parity_images]
    predictor.batch_size = 2  # five images: passes of 2, 2 and 1
    chunked = predictor.predict(inputs, sizes)
    predictor.batch_size = None
    together = predictor.predict(inputs, sizes)
    for one, other in zip(chunked, together, strict=True):
        difference = np.abs(one.depth_levels.astype(int) - other.depth_levels.astype(int))
        assert difference.max() <= 1


@pytest.mark.parametrize("value", ["auto", 4])
def test_config_accepts_auto_or_a_positive_size(value):
    from jobs.config import load_config

    config = load_config(
        None, ["input.uri=i", "output.uri=o", "models.depth=m", f"inference.batch_size={value}"]
    )
    assert config.inference.batch_size == value


@pytest.mark.parametrize("value", ["0", "big"])
def test_config_refuses_other_batch_sizes_naming_the_key(value):
    from jobs.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"inference\.batch_size"):
        load_config(
            None, ["input.uri=i", "output.uri=o", "models.depth=m", f"inference.batch_size={value}"]
        )
