"""Weights checked against config.json from the safetensors headers, before any load."""

import json
import re
import shutil
import struct

import fsspec
import pytest
import torch
from safetensors.torch import load_file, save_file

from dpt_model import ModelCard, ModelLoadError
from dpt_model.weights import check_weights_fit, compare_shapes, header_shapes

WEIGHTS = "model.safetensors"


def copy_with_config(source, target, **changes):
    shutil.copytree(source, target)
    path = target / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return target


@pytest.mark.parametrize(
    "checkpoint",
    ["depth-vit", "segmentation-vit", "depth-hybrid", "depth-dinov2", "depth-anything"],
)
def test_every_seeded_checkpoint_fits_with_no_tensor_lacking(checkpoints, checkpoint):
    """depth-dinov2 and depth-anything were saved with Dinov2's old tensor names
    (``attention.attention.query``): found through transformers' renaming."""
    task = "segmentation" if checkpoint.startswith("segmentation") else "depth"
    card = ModelCard.fetch(task, str(checkpoints[checkpoint]))
    assert check_weights_fit(card) == []


def test_the_header_gives_every_tensors_shape_without_its_data(checkpoints):
    path = checkpoints["depth-vit"] / WEIGHTS
    shapes = header_shapes(fsspec.filesystem("file"), str(path))
    assert shapes == {name: tuple(tensor.shape) for name, tensor in load_file(path).items()}


def test_a_config_that_does_not_fit_the_weights_names_a_tensor_and_both_shapes(
    checkpoints, tmp_path
):
    model = copy_with_config(checkpoints["depth-vit"], tmp_path / "model", hidden_size=64)
    with pytest.raises(ModelLoadError) as raised:
        check_weights_fit(ModelCard.fetch("depth", str(model)))
    message = str(raised.value)
    assert message.startswith(f"model {model}: its weights do not fit its config.json: ")
    assert (
        "dpt.embeddings.cls_token is [1, 1, 32] in the weights and [1, 1, 64] by config.json"
        in (message)
    )
    assert message.endswith("more)")


def test_the_weights_of_a_bare_backbone_lack_the_head_and_say_which(checkpoints, tmp_path):
    """A DPTModel's weights (no neck, no head) under a depth config: transformers
    would start the head at random and every depth map would be noise."""
    model = shutil.copytree(checkpoints["depth-vit"], tmp_path / "model")
    tensors = load_file(model / WEIGHTS)
    backbone = {
        name.removeprefix("dpt."): tensor
        for name, tensor in tensors.items()
        if name.startswith("dpt.")  # saved from DPTModel: without the task model's prefix
    }
    save_file(backbone, model / WEIGHTS)
    lacking = check_weights_fit(ModelCard.fetch("depth", str(model)))
    assert lacking and all(name.startswith(("neck.", "head.")) for name in lacking)
    assert len(lacking) == len(tensors) - len(backbone)


def test_weights_of_no_tensor_the_network_has_are_refused(checkpoints, tmp_path):
    model = shutil.copytree(checkpoints["depth-vit"], tmp_path / "model")
    save_file({"classifier.weight": torch.zeros(3, 4)}, model / WEIGHTS)
    with pytest.raises(ModelLoadError, match="hold none of the tensors of the DPTForDepth"):
        check_weights_fit(ModelCard.fetch("depth", str(model)))


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"\x00\x01", "shorter than a safetensors header"),
        (struct.pack("<Q", 1 << 40) + b"{}", "give a 1099511627776-byte header"),
        (struct.pack("<Q", 3) + b"[1]", "header is not a JSON object"),
        (struct.pack("<Q", 3) + b"{no", "Expecting property name"),
    ],
)
def test_a_file_that_is_no_safetensors_is_refused_naming_it(checkpoints, tmp_path, content, reason):
    model = shutil.copytree(checkpoints["depth-vit"], tmp_path / "model")
    (model / WEIGHTS).write_bytes(content)
    with pytest.raises(ModelLoadError) as raised:
        check_weights_fit(ModelCard.fetch("depth", str(model)))
    assert str(raised.value).startswith(f"model {model}: {WEIGHTS} is not a safetensors file (")
    assert reason in str(raised.value)


def test_the_driver_reads_the_headers_where_the_weights_are_not_fetched(checkpoints, tmp_path):
    model = copy_with_config(checkpoints["depth-vit"], tmp_path / "model", hidden_size=64)
    uri = f"file://{model}"
    card = ModelCard.fetch("depth", uri, tmp_path / "cache", with_weights=False)
    assert not list(card.checkpoint_dir.glob("*.safetensors"))
    with pytest.raises(ModelLoadError, match=f"model {uri}: its weights do not fit"):
        check_weights_fit(card)


def test_headers_are_read_from_s3_by_byte_range(s3_endpoint, checkpoints, tmp_path):
    import s3fs

    s3 = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    s3.mkdir("weights-check")
    good, bad = "weights-check/good", "weights-check/bad"
    s3.put(f"{checkpoints['depth-vit']}/", f"{good}/", recursive=True)
    s3.put(f"{checkpoints['depth-vit']}/", f"{bad}/", recursive=True)
    config = json.loads((checkpoints["depth-vit"] / "config.json").read_text())
    s3.pipe(f"{bad}/config.json", json.dumps({**config, "intermediate_size": 256}).encode())
    options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    fetch = {"cache_dir": tmp_path / "cache", "storage_options": options, "with_weights": False}
    assert check_weights_fit(ModelCard.fetch("depth", f"s3://{good}", **fetch), options) == []
    with pytest.raises(
        ModelLoadError, match=re.escape("intermediate.dense.weight is [64, 32] in the")
    ):
        check_weights_fit(ModelCard.fetch("depth", f"s3://{bad}", **fetch), options)


def test_without_transformers_renaming_only_matching_names_are_compared():
    weights = {"a": (2,), "b": (3,), "old.name": (9,)}
    network = {"a": (2,), "b": (4,), "new.name": (5,)}
    differ, lacking = compare_shapes(weights, network, None)
    assert differ == [("b", (3,), (4,))] and lacking is None
    renamed = {"old.name": ("new.name", True), "a": ("a", True), "b": ("b", False)}
    differ, lacking = compare_shapes(weights, network, renamed.__getitem__)
    # b reaches the network through a converter (merged or split): its shape is its own
    assert differ == [("new.name", (9,), (5,))] and lacking == []


def test_an_actor_checks_the_weights_it_fetched_before_it_loads_them(checkpoints, tmp_path):
    """The driver leaves hub models' weights to the actors: a predictor checks
    them itself, and transformers' own refusal stays behind that check."""
    from dpt_model import DepthPredictor
    from dpt_model.loading import load_network

    model = copy_with_config(checkpoints["depth-vit"], tmp_path / "model", hidden_size=64)
    with pytest.raises(
        ModelLoadError, match=re.escape("dpt.embeddings.cls_token is [1, 1, 32] in the")
    ):
        DepthPredictor(str(model))
    with pytest.raises(
        ModelLoadError, match=re.escape("its weights do not fit its config.json (transformers")
    ):
        load_network(model, "depth", torch.device("cpu"), torch.float32)
