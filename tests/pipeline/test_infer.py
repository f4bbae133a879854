"""The inference actor outside Ray: threads, model-resolution depth, error rows."""

import os

import numpy as np
import torch

from pipeline.infer import InferenceActor
from tests.conftest import SEEDED_VIT_DEPTH_HW


def test_cpu_actor_sets_its_torch_threads_and_keeps_depth_at_model_size(checkpoints):
    threads = torch.get_num_threads()
    try:
        actor = InferenceActor(
            str(checkpoints["depth-vit"]),
            None,
            device="cpu",
            dtype="float32",
            cache_dir=None,
            storage_options={},
            depth_resolution="model",
            cpu_threads=1,
        )
        assert torch.get_num_threads() == 1
        InferenceActor(
            str(checkpoints["depth-vit"]), None, "cpu", "float32", None, {}, cpu_threads="all"
        )
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
