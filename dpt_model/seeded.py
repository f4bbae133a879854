"""Small seeded DPT checkpoints, written with ``save_pretrained``.

The demo, the tests and the benchmark use these instead of hub weights, and load
them through the same code path as real checkpoints. transformers' default init
gives a tiny DPT a depth range near 1e-8 and near-tied class logits, on which
nothing can be checked; ``initializer_range=0.1`` gives usable ranges and margins.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch

Backbone = Literal["vit", "hybrid", "dinov2", "depth_anything"]

# Class names for seeded segmentation checkpoints (a few ADE20k-like ones).
SEEDED_LABELS = ("wall", "floor", "sky", "tree", "person", "car")


# ViT-backbone DPT sizes. "tiny" runs the tests in seconds; "base" is
# transformers' DPTConfig defaults (ViT-Base, about 110 M parameters with the
# DPT neck and head); "large" has Intel/dpt-large's shapes (about 340 M).
ViTSize = Literal["tiny", "base", "large"]
VIT_SIZES: dict[str, dict] = {
    "tiny": {
        "hidden_size": 32,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "backbone_out_indices": [0, 1, 2, 3],
        "neck_hidden_sizes": [16, 16, 32, 32],
        "fusion_hidden_size": 16,
        "head_hidden_size": 16,
        "initializer_range": 0.1,
    },
    # At these depths 0.1 makes activations explode (depth ~1e9, inf in
    # float16); transformers' default 0.02 gives depth ranges of ~1e-2.
    "base": {"initializer_range": 0.02},
    "large": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "backbone_out_indices": [5, 11, 17, 23],
        "neck_hidden_sizes": [256, 512, 1024, 1024],
        "initializer_range": 0.02,
    },
}


def _bit_backbone() -> dict:
    """A tiny BiT ResNet stem for the hybrid DPT (stride 16 → a 24×24 grid at 384 px)."""
    return {
        "model_type": "bit",
        "global_padding": "same",
        "layer_type": "bottleneck",
        "depths": [1, 1, 1],
        "hidden_sizes": [16, 32, 64],
        "embedding_size": 16,
        "num_groups": 8,
        "out_features": ["stage1", "stage2", "stage3"],
        "embedding_dynamic_padding": True,
    }


def _dinov2_backbone(hidden_size: int, num_layers: int) -> dict:
    return {
        "model_type": "dinov2",
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "mlp_ratio": 2,
        "image_size": 518,
        "patch_size": 14,
        "out_indices": list(range(num_layers - 3, num_layers + 1)),
        "reshape_hidden_states": False,
        "initializer_range": 0.1,
    }


def build_seeded_checkpoint(
    output_dir: str | Path,
    task: Literal["depth", "segmentation"],
    backbone: Backbone = "vit",
    seed: int = 0,
    size: ViTSize = "tiny",
    labels: Sequence[str] = SEEDED_LABELS,
) -> Path:
    """Write a randomly initialised (seeded) checkpoint and its processor config.

    ``vit``: fixed 384×384 input, as Intel/dpt-large and dpt-large-ade ship, at
    one of ``VIT_SIZES`` (the other backbones are always tiny).
    ``hybrid``: a BiT stem before the ViT, exactly 384×384, as Intel/dpt-hybrid-midas.
    ``dinov2`` / ``depth_anything``: keep-aspect-ratio 518 input, multiple of 14,
    raw 0–255 pixels normalised with ImageNet mean/std in pixel units, as the
    dpt-dinov2 and Depth Anything checkpoints ship (depth only).
    """
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        DPTConfig,
        DPTForDepthEstimation,
        DPTForSemanticSegmentation,
        DPTImageProcessorPil,
    )

    output_dir = Path(output_dir)
    torch.manual_seed(seed)
    id2label = dict(enumerate(labels))
    label_kwargs = (
        {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
        if task == "segmentation"
        else {}
    )
    if backbone in ("vit", "hybrid"):
        hybrid_kwargs = (
            {
                "is_hybrid": True,
                "backbone_config": _bit_backbone(),
                "backbone_featmap_shape": [1, 64, 24, 24],
                "neck_hidden_sizes": [16, 32, 32, 32],
            }
            if backbone == "hybrid"
            else {}
        )
        config = DPTConfig(
            **{**VIT_SIZES[size], **hybrid_kwargs},
            image_size=384,
            patch_size=16,
            **label_kwargs,
        )
        processor = DPTImageProcessorPil(
            size={"height": 384, "width": 384},
            keep_aspect_ratio=False,
            ensure_multiple_of=1,
            resample=3,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )
    else:
        if task != "depth":
            raise ValueError(f"the {backbone} backbone is a depth-only checkpoint here")
        tiny = VIT_SIZES["tiny"]
        backbone_config = _dinov2_backbone(tiny["hidden_size"], tiny["num_hidden_layers"])
        common = {
            "backbone_config": backbone_config,
            "reassemble_factors": [4, 2, 1, 0.5],
            "neck_hidden_sizes": [16, 16, 32, 32],
            "fusion_hidden_size": 16,
            "head_hidden_size": 16,
            "initializer_range": 0.1,
        }
        if backbone == "dinov2":
            config = DPTConfig(is_hybrid=False, hidden_size=tiny["hidden_size"], **common)
        else:
            config = DepthAnythingConfig(reassemble_hidden_size=tiny["hidden_size"], **common)
        processor = DPTImageProcessorPil(
            size={"height": 518, "width": 518},
            keep_aspect_ratio=True,
            ensure_multiple_of=14,
            resample=3,
            do_rescale=False,
            image_mean=[123.675, 116.28, 103.53],
            image_std=[58.395, 57.12, 57.375],
        )
    if backbone == "depth_anything":
        model = DepthAnythingForDepthEstimation(config)
    elif task == "depth":
        model = DPTForDepthEstimation(config)
    else:
        model = DPTForSemanticSegmentation(config)
    model.eval()
    model.save_pretrained(output_dir, safe_serialization=True)
    processor.save_pretrained(output_dir)
    return output_dir
