"""The inference actor outside Ray: threads, model-resolution depth, error rows, batch sizes."""

import os

import numpy as np
import pytest
import torch

from pipeline.infer import InferenceActor, InferenceSettings
from tests.conftest import SEEDED_VIT_DEPTH_HW


def test_cpu_actor_sets_its_torch_threads_and_keeps_depth_at_model_size(checkpoints):
    threads = torch.get_num_threads()
    try:
        actor = InferenceActor(
            str(checkpoints["depth-vit"]), None, InferenceSettings(cpu_threads=1)
        )
        assert torch.get_num_threads() == 1
        InferenceActor(str(checkpoints["depth-vit"]), None, InferenceSettings(cpu_threads="all"))
        assert torch.get_num_threads() == os.cpu_count()
    finally:
        torch.set_num_threads(threads)
    model_input = np.zeros((*SEEDED_VIT_DEPTH_HW, 3), dtype=np.uint8)
    inputs = np.empty(2, dtype=object)
    inputs[0], inputs[1] = model_input, np.zeros((0, 0, 3), dtype=np.uint8)
    out = actor(
        {
            "status": np.array(["ok", "error"], dtype=object),
            "error": np.array(["", "decode: not an image"], dtype=object),
            "height": np.array([1080, 0]),
            "width": np.array([1920, 0]),
            "depth_input": inputs,
        }
    )
    assert out["depth_levels"][0].shape == SEEDED_VIT_DEPTH_HW
    assert out["depth_levels"][1].size == 0 and list(out["status"]) == ["ok", "error"]
    assert "depth_input" not in out


def actor_for(checkpoints, **options) -> InferenceActor:
    return InferenceActor(
        str(checkpoints["depth-vit"]),
        str(checkpoints["segmentation-vit"]),
        InferenceSettings(depth_resolution="model", **options),
    )


def ok_batch(ok_rows: int) -> dict[str, np.ndarray]:
    """``ok_rows`` decoded rows at the seeded models' input size, then one error row."""
    count = ok_rows + 1
    depth_inputs, segmentation_inputs = np.empty(count, dtype=object), np.empty(count, dtype=object)
    generator = np.random.default_rng(0)
    for index in range(ok_rows):
        pixels = generator.integers(0, 256, (*SEEDED_VIT_DEPTH_HW, 3), dtype=np.uint8)
        depth_inputs[index] = segmentation_inputs[index] = pixels
    depth_inputs[ok_rows] = segmentation_inputs[ok_rows] = np.zeros((0, 0, 3), dtype=np.uint8)
    return {
        "status": np.array(["ok"] * ok_rows + ["error"], dtype=object),
        "error": np.array([""] * ok_rows + ["decode: empty file"], dtype=object),
        "height": np.array([48] * ok_rows + [0]),
        "width": np.array([64] * ok_rows + [0]),
        "depth_input": depth_inputs,
        "segmentation_input": segmentation_inputs,
    }


def test_auto_batch_size_is_a_power_of_two_within_the_maximum_and_splits_larger_batches(
    checkpoints,
):
    # The tiny models run 4 images far inside a minute; 6 is not a power of two.
    actor = actor_for(checkpoints, batch_size="auto", max_batch_size=6, batch_time_budget_s=60.0)
    assert actor.depth.batch_size == actor.segmentation.batch_size == 4

    passes = {"depth": [], "segmentation": []}  # images per forward pass of each network

    def counting(task):
        return lambda module, args, kwargs: passes[task].append(len(kwargs["pixel_values"]))

    hooks = [
        predictor.model.register_forward_pre_hook(counting(predictor.task), with_kwargs=True)
        for predictor in (actor.depth, actor.segmentation)
    ]
    try:
        out = actor(ok_batch(7))
    finally:
        for hook in hooks:
            hook.remove()
    assert passes == {"depth": [4, 3], "segmentation": [4, 3]}
    assert list(out["status"]) == ["ok"] * 7 + ["error"]
    assert len(out["depth_levels"]) == len(out["seg_class_ids"]) == 8
    assert all(levels.shape == SEEDED_VIT_DEPTH_HW for levels in out["depth_levels"][:7])
    assert all(class_ids.shape == (48, 64) for class_ids in out["seg_class_ids"][:7])
    assert out["depth_levels"][7].size == 0 and out["seg_class_ids"][7].size == 0


def test_auto_batch_size_respects_the_cpu_time_budget(checkpoints, capsys):
    # No pass takes a nanosecond: the search keeps the one image that always fits.
    actor = actor_for(checkpoints, batch_size="auto", max_batch_size=8, batch_time_budget_s=1e-9)
    assert actor.depth.batch_size == actor.segmentation.batch_size == 1
    # What the job's log shows of the choice.
    assert capsys.readouterr().out.splitlines() == [
        "depth model: batch size 1 (auto)",
        "segmentation model: batch size 1 (auto)",
    ]


def test_a_fixed_batch_size_is_kept_not_searched(checkpoints):
    actor = actor_for(checkpoints, batch_size=3, max_batch_size=64, batch_time_budget_s=60.0)
    assert actor.depth.batch_size == actor.segmentation.batch_size == 3
    unset = actor_for(checkpoints, batch_size=None)
    assert unset.depth.batch_size is None and unset.segmentation.batch_size is None


@pytest.mark.parametrize(("encoding", "column", "dtype"), [
    ("levels", "depth_levels", np.uint16),
    ("float16", "depth_float16", np.float16),
])  # fmt: skip
def test_an_error_rows_empty_map_has_the_dtype_of_the_others(checkpoints, encoding, column, dtype):
    # Mixed dtypes in one batch make a column Ray cannot join with an all-ok
    # batch of the same block: the job failed on npz_float16 with one bad image.
    actor = actor_for(checkpoints, batch_size=2, depth_encoding=encoding)
    maps = actor(ok_batch(2))[column]
    assert [m.dtype for m in maps] == [dtype] * 3 and maps[2].size == 0


def test_an_image_whose_depth_failed_is_not_segmented_and_keeps_its_first_reason(checkpoints):
    import dataclasses

    actor = actor_for(checkpoints)
    real_depth, real_segmentation = actor.depth.predict, actor.segmentation.predict
    segmented = []

    def depth_failing_first(inputs, sizes, on_pass=None):
        predictions = real_depth(inputs, sizes, on_pass)
        return [dataclasses.replace(predictions[0], error="out of memory alone"), *predictions[1:]]

    def counting_segmentation(inputs, sizes, on_pass=None):
        segmented.append(len(inputs))
        return real_segmentation(inputs, sizes, on_pass)

    actor.depth.predict, actor.segmentation.predict = depth_failing_first, counting_segmentation
    out = actor(ok_batch(3))
    assert list(out["status"]) == ["error", "ok", "ok", "error"]
    assert out["error"][0] == "depth: out of memory alone"
    assert segmented == [2]  # the two images whose depth succeeded
    assert out["seg_class_ids"][0].size == 0 and out["seg_class_ids"][1].size > 0


def test_the_actors_settings_follow_the_job_config():
    from jobs.config import load_config
    from pipeline.run import inference_settings

    config = load_config(
        None,
        [
            "input.uri=in",
            "output.uri=out",
            "models.depth=m",
            "models.segmentation=s",
            "pseudo_labels.enabled=true",
            "pseudo_labels.min_confidence=0.7",
            "output.depth_format=npz_float16",
            "resources.cpus_per_actor=2.5",
            "inference.batch_size=auto",
        ],
    )
    settings = inference_settings(config, cache_dir=None)
    assert (settings.min_confidence, settings.depth_encoding) == (0.7, "float16")
    assert settings.cpu_threads == 3  # the actor's CPUs, rounded up, when not set
    assert settings.batch_size == "auto" and settings.depth_resolution == "model"
    assert settings.storage_options == config.storage_options()
