import http.server
import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import DPTForSemanticSegmentation

from dpt_model import (
    DepthPredictor,
    ModelCard,
    ModelLoadError,
    SegmentationPredictor,
    resize_for_model,
)
from dpt_model.loading import (
    checkpoint_version,
    depth_kind,
    resolve_checkpoint_dir,
    weights_sha256,
)
from dpt_model.processing import PreprocessSpec


def copy_checkpoint(source, target, **processor_changes):
    shutil.copytree(source, target)
    if processor_changes:
        path = target / "preprocessor_config.json"
        config = json.loads(path.read_text())
        config.update(processor_changes)
        path.write_text(json.dumps(config))
    return target


def test_loads_from_an_fsspec_uri_through_the_cache(checkpoints, tmp_path):
    # "[1]" in the path: fetched by name, not read as a glob.
    uri = f"file://{copy_checkpoint(checkpoints['depth-vit'], tmp_path / 'dpt[1]')}"
    cache_dir = tmp_path / "cache"
    local = resolve_checkpoint_dir(uri, cache_dir)
    assert local.parent == cache_dir and (local / "config.json").is_file()
    assert weights_sha256(local) == weights_sha256(checkpoints["depth-vit"])
    predictor = DepthPredictor(uri, cache_dir=cache_dir)
    assert predictor.identity.weights_sha256 == weights_sha256(checkpoints["depth-vit"])
    assert str(predictor.identity).startswith("dpt[1]@sha256:")


def test_refuses_checkpoints_without_safetensors(checkpoints, tmp_path):
    model_dir = copy_checkpoint(checkpoints["depth-vit"], tmp_path / "pickled")
    state = DepthPredictor(str(model_dir)).model.state_dict()
    for path in model_dir.glob("*.safetensors"):
        path.unlink()
    torch.save(state, model_dir / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors"):
        DepthPredictor(str(model_dir))


def test_refuses_a_segmentation_checkpoint_for_depth_by_type(checkpoints, tmp_path):
    model_dir = copy_checkpoint(checkpoints["depth-vit"], tmp_path / "other")
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["model_type"] = "segformer"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="model_type 'segformer'"):
        ModelCard.fetch("depth", str(model_dir))


@pytest.mark.parametrize(
    "damage,reason",
    [
        (lambda model_dir: (model_dir / "preprocessor_config.json").unlink(), "no preprocessor"),
        (lambda model_dir: (model_dir / "config.json").unlink(), "no config.json"),
        (lambda model_dir: (model_dir / "config.json").write_text("{not json"), "JSONDecodeError"),
        (
            lambda model_dir: (model_dir / "preprocessor_config.json").write_text("[]"),
            "JSON object",
        ),
    ],
)
def test_a_damaged_checkpoint_is_a_model_load_error_naming_the_uri(
    checkpoints, tmp_path, damage, reason
):
    model_dir = copy_checkpoint(checkpoints["depth-vit"], tmp_path / "damaged")
    damage(model_dir)
    with pytest.raises(ModelLoadError, match=f"model {model_dir} is not a usable") as raised:
        ModelCard.fetch("depth", str(model_dir))
    assert reason in str(raised.value)


def test_a_checkpoint_of_the_other_task_is_refused_before_loading(checkpoints):
    with pytest.raises(ModelLoadError, match="DPTForSemanticSegmentation checkpoint, not a depth"):
        ModelCard.fetch("depth", str(checkpoints["segmentation-vit"]))
    with pytest.raises(ModelLoadError, match="not a segmentation one"):
        ModelCard.fetch("segmentation", str(checkpoints["depth-vit"]))


def test_missing_model_names_the_uri(tmp_path):
    with pytest.raises(ModelLoadError, match="nothing-here"):
        ModelCard.fetch("depth", f"file://{tmp_path}/nothing-here")
    with pytest.raises(ModelLoadError, match="nothing-here does not exist"):
        ModelCard.fetch("depth", f"{tmp_path}/nothing-here")  # a path, so not a hub id


def test_non_square_vit_segmentation_runs_at_the_real_grid(checkpoints, tmp_path):
    """transformers' DPTForSemanticSegmentation crashes on non-square input; ours must not."""
    model_dir = copy_checkpoint(
        checkpoints["segmentation-vit"],
        tmp_path / "seg-keep-aspect",
        keep_aspect_ratio=True,
        ensure_multiple_of=32,
    )
    spec = PreprocessSpec.from_pretrained_dir(model_dir)
    image = np.random.default_rng(0).integers(0, 256, (200, 500, 3), dtype=np.uint8)
    model_input = resize_for_model(image, spec)
    assert model_input.shape[0] != model_input.shape[1]

    plain = DPTForSemanticSegmentation.from_pretrained(model_dir).eval()
    pixel_values = torch.zeros(1, 3, *model_input.shape[:2])
    with pytest.raises(RuntimeError, match="shape"), torch.inference_mode():
        plain(pixel_values=pixel_values)

    predictor = SegmentationPredictor(str(model_dir))
    [prediction] = predictor.predict([model_input], [(200, 500)])
    assert prediction.class_ids.shape == (200, 500)


def test_grid_hook_leaves_square_inputs_unchanged(checkpoints, parity_images):
    model_dir = checkpoints["segmentation-vit"]
    plain = DPTForSemanticSegmentation.from_pretrained(model_dir).eval()
    predictor = SegmentationPredictor(str(model_dir))
    pixel_values = torch.randn(2, 3, 384, 384)
    with torch.inference_mode():
        torch.testing.assert_close(
            predictor.model(pixel_values=pixel_values).logits,
            plain(pixel_values=pixel_values).logits,
        )


def test_hybrid_with_keep_aspect_ratio_is_refused_before_loading(checkpoints, tmp_path):
    model_dir = copy_checkpoint(
        checkpoints["depth-vit"], tmp_path / "hybrid", keep_aspect_ratio=True
    )
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["is_hybrid"] = True
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="hybrid"):
        ModelCard.fetch("depth", str(model_dir))


def test_truncated_cache_is_fetched_again(checkpoints, tmp_path):
    uri = f"file://{checkpoints['depth-vit']}"
    cache_dir = tmp_path / "cache"
    first = resolve_checkpoint_dir(uri, cache_dir)
    [weights] = first.glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:100])
    # A download killed part-way left its staging folder (another model's stays).
    killed = cache_dir / f".partial-{first.name}.x1"
    other = cache_dir / ".partial-0123abcd.x2"
    # The same model's JSON-only fetch, under its own lock: maybe still going.
    json_fetch = cache_dir / f".partial-{first.name}-json.x3"
    for staging in (killed, other, json_fetch):
        staging.mkdir()
        (staging / "model.safetensors").write_bytes(b"half")
    second = resolve_checkpoint_dir(uri, cache_dir)
    assert second == first
    assert weights_sha256(second) == weights_sha256(checkpoints["depth-vit"])
    assert not killed.exists() and other.exists() and json_fetch.exists()


def test_changed_remote_weights_get_a_new_cache_folder(checkpoints, tmp_path):
    remote = copy_checkpoint(checkpoints["depth-vit"], tmp_path / "remote")
    cache_dir = tmp_path / "cache"
    first = resolve_checkpoint_dir(f"file://{remote}", cache_dir)
    copy_checkpoint(checkpoints["depth-hybrid"], tmp_path / "other")
    for path in remote.glob("*"):
        path.unlink()
    for path in (tmp_path / "other").glob("*"):
        shutil.copy(path, remote / path.name)
    second = resolve_checkpoint_dir(f"file://{remote}", cache_dir)
    assert second != first
    assert weights_sha256(second) == weights_sha256(checkpoints["depth-hybrid"])


def test_a_card_without_weights_fetches_only_json_but_checks_weights_exist(checkpoints, tmp_path):
    uri = f"file://{checkpoints['depth-vit']}"
    card = ModelCard.fetch("depth", uri, tmp_path / "cache", with_weights=False)
    fetched = sorted(p.name for p in card.checkpoint_dir.iterdir() if not p.name.startswith("."))
    assert fetched == ["config.json", "preprocessor_config.json"]
    assert card.spec == PreprocessSpec.from_pretrained_dir(checkpoints["depth-vit"])
    full = resolve_checkpoint_dir(uri, tmp_path / "cache")
    assert full != card.checkpoint_dir and list(full.glob("*.safetensors"))

    unweighted = copy_checkpoint(checkpoints["depth-vit"], tmp_path / "unweighted")
    for path in unweighted.glob("*.safetensors"):
        path.unlink()
    with pytest.raises(ModelLoadError, match=r"no \.safetensors weights"):
        ModelCard.fetch("depth", f"file://{unweighted}", tmp_path / "cache", with_weights=False)
    # A local folder too: the driver's card, not the first actor, finds it out.
    (unweighted / "pytorch_model.bin").write_bytes(b"pickled")
    with pytest.raises(
        ModelLoadError, match=r"holds no \.safetensors weights \(found: config\.json, p.*bin"
    ):
        ModelCard.fetch("depth", str(unweighted), tmp_path / "cache", with_weights=False)


def test_a_cache_folder_that_cannot_be_made_names_the_key(checkpoints, tmp_path):
    (tmp_path / "a-file").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"models\.cache_dir .*a-file/cache cannot be made"):
        resolve_checkpoint_dir(f"file://{checkpoints['depth-vit']}", tmp_path / "a-file/cache")


@pytest.mark.parametrize("checkpoint", ["depth-vit", "segmentation-vit", "depth-dinov2"])
def test_networks_use_scaled_dot_product_attention(checkpoints, checkpoint):
    """SDPA (fused attention kernels on GPU) rather than the eager softmax(QKᵀ)V."""
    from dpt_model.loading import load_network

    task = "segmentation" if checkpoint.startswith("segmentation") else "depth"
    network = load_network(checkpoints[checkpoint], task, torch.device("cpu"), torch.float32)
    assert network.config._attn_implementation == "sdpa"


def test_depth_kind_comes_from_the_checkpoint_config():
    assert depth_kind({"model_type": "dpt"}) == "relative_inverse"
    assert depth_kind({"model_type": "depth_anything"}) == "relative_inverse"
    metric = {"model_type": "depth_anything", "depth_estimation_type": "metric", "max_depth": 20}
    assert depth_kind(metric) == "metric"


def test_a_hub_snapshot_keeps_its_version_when_its_weights_arrive(checkpoints, tmp_path):
    # The driver fetches a hub checkpoint's JSON files only; on one machine an
    # actor then downloads the weights into the same snapshot folder. The
    # version (and so every row's config_hash) must not change with that.
    snapshot = tmp_path / "models--Intel--dpt-large" / "snapshots" / "bc15f29"
    snapshot.mkdir(parents=True)
    for path in Path(checkpoints["depth-vit"]).glob("*.json"):
        shutil.copy(path, snapshot)
    json_only = checkpoint_version(snapshot)
    for path in Path(checkpoints["depth-vit"]).glob("*.safetensors"):
        shutil.copy(path, snapshot)
    assert checkpoint_version(snapshot) == json_only
    other_commit = snapshot.parent / "0d1e2f3"
    shutil.copytree(snapshot, other_commit)
    assert checkpoint_version(other_commit) != json_only


def _hub_cache(tmp_path, checkpoint, commits, main):
    """The hub client's cache layout, as a download leaves it (no network needed)."""
    repo = tmp_path / "hub" / "models--Intel--dpt-large"
    for commit in commits:
        shutil.copytree(checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(main)
    return tmp_path / "hub"


def test_a_hub_model_is_pinned_to_the_commit_the_driver_saw(checkpoints, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from dpt_model.loading import ModelCard, model_name
    from jobs.config import load_config
    from pipeline.run import config_hash_for

    old, new = "a" * 40, "b" * 40
    cache = _hub_cache(tmp_path, checkpoints["depth-vit"], [old, new], main=new)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    latest = ModelCard.fetch("depth", "Intel/dpt-large", with_weights=False)
    assert latest.checkpoint_dir.name == new
    # Actors load the commit the driver planned for, whatever main says by then.
    assert latest.pinned_uri == f"Intel/dpt-large@{new}"
    pinned_old = ModelCard.fetch("depth", f"Intel/dpt-large@{old}", with_weights=False)
    assert pinned_old.checkpoint_dir.name == old and pinned_old.version != latest.version
    assert model_name(f"Intel/dpt-large@{old}") == "Intel/dpt-large"
    # Pinning the commit a run used keeps every row's config_hash.
    config = load_config(None, ["input.uri=in", "output.uri=out", "models.depth=Intel/dpt-large"])
    pinned_new = ModelCard.fetch("depth", f"Intel/dpt-large@{new}", with_weights=False)
    assert config_hash_for({"depth": latest}, config) == config_hash_for(
        {"depth": pinned_new}, config
    )
    # A folder is loaded as it is: nothing to pin.
    folder = ModelCard.fetch("depth", str(checkpoints["depth-vit"]), with_weights=False)
    assert folder.pinned_uri == str(checkpoints["depth-vit"])


def test_a_local_checkpoints_version_follows_its_bytes_not_its_copy_times(checkpoints, tmp_path):
    original = Path(checkpoints["depth-vit"])
    copy = copy_checkpoint(original, tmp_path / "copied")  # new modification times
    for path in copy.iterdir():
        os.utime(path, (1, 1))
    assert checkpoint_version(copy) == checkpoint_version(original)
    config = copy / "config.json"
    config.write_text(config.read_text().replace("}", ', "note": "changed"}', 1))
    assert checkpoint_version(copy) != checkpoint_version(original)


def test_one_local_folder_spelt_three_ways_is_one_model_in_the_config_hash(checkpoints, tmp_path):
    from dpt_model.loading import ModelCard
    from jobs.config import load_config
    from pipeline.run import config_hash_for

    model = copy_checkpoint(Path(checkpoints["depth-vit"]), tmp_path / "m")
    config = load_config(None, ["input.uri=in", "output.uri=out", f"models.depth={model}"])
    spellings = (str(model), f"{model}/", f"{tmp_path}/./m")
    hashes = {
        config_hash_for({"depth": ModelCard.fetch("depth", uri, with_weights=False)}, config)
        for uri in spellings
    }
    assert len(hashes) == 1


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """The hub's API as it answers for a missing, a gated and a revision-less model."""

    def do_GET(self) -> None:
        # /api/models/<org>/<name>/revision/<revision>
        name = self.path.split("/")[4] if self.path.startswith("/api/models/") else ""
        error_code, status = {
            "gated": ("GatedRepo", 403),
            "no-such-revision": ("RevisionNotFound", 404),
            "bad-token": ("", 401),
            "disabled": ("", 403),
            "busy": ("", 503),
        }.get(name, ("RepoNotFound", 404))
        self.send_response(status)
        if error_code:
            self.send_header("X-Error-Code", error_code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("model", "says"),
    [
        ("org/missing", r"nor a model on the hub \(a private one needs HF_TOKEN\): Repository"),
        ("org/gated", "is gated on the model hub: accept its terms there and set HF_TOKEN"),
        ("org/no-such-revision@v9", "has no revision 'v9' on the model hub"),
        ("org/no-such-revision", "has no revision 'main' on the model hub"),
        ("org/bad-token", r"refused by the model hub \(401\): HF_TOKEN is not valid"),
        ("org/disabled", r"refused by the model hub \(403\)"),
        ("org/busy", "the model hub answered 503; try again later"),
        ("demo_data/models/depth-typo", r"nor a hub id \(org/name, or org/name@revision\)"),
    ],
)
def test_a_hub_model_that_cannot_be_had_says_what_to_do(fake_hub, model, says):
    with pytest.raises(ModelLoadError, match=says) as raised:
        resolve_checkpoint_dir(model, with_weights=False)
    assert "127.0.0.1" not in str(raised.value)  # no request URL


def test_an_offline_hub_without_the_model_cached_says_so(fake_hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="the model hub cannot be reached"):
        resolve_checkpoint_dir("org/missing", with_weights=False)
