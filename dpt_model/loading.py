"""Find, fetch and load DPT checkpoints: hub id, local directory or fsspec URI.

Weights load from safetensors only and never run remote code. A checkpoint at an
fsspec URI (``s3://bucket/models/dpt-large``) is copied once into a local cache
directory and loaded from there, like a hub download.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import fsspec
from filelock import FileLock

from dpt_model.processing import PreprocessSpec

if TYPE_CHECKING:  # torch loads in the actor only, with the weights
    import torch

Task = Literal["depth", "segmentation"]

# model_type values whose checkpoints this project knows how to run, per task.
SUPPORTED_MODEL_TYPES: dict[Task, frozenset[str]] = {
    "depth": frozenset({"dpt", "depth_anything"}),
    "segmentation": frozenset({"dpt"}),
}
# The only files a checkpoint directory needs; anything else (pickled .bin
# weights, remote code) is never fetched.
CHECKPOINT_FILE_SUFFIXES = (".json", ".safetensors")
# Expanded where it is used: on each node, under that node's home.
DEFAULT_CACHE_DIR = Path("~/.cache/dpt-annotate/models")


class ModelLoadError(RuntimeError):
    """A checkpoint that cannot be found, fetched or run; the message names the URI."""


@dataclass(frozen=True)
class ModelIdentity:
    """What produced an output: the name the user gave plus a hash of the weights."""

    name: str
    weights_sha256: str

    def __str__(self) -> str:
        return f"{self.name}@sha256:{self.weights_sha256[:16]}"


def is_fsspec_uri(uri: str) -> bool:
    return "://" in uri


def resolve_checkpoint_dir(
    model_uri: str,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    storage_options: dict[str, Any] | None = None,
    with_weights: bool = True,
) -> Path:
    """Return a local directory holding the checkpoint's config and safetensors files.

    ``with_weights=False`` fetches only the JSON files, which is all the job's
    driver needs to validate a model and plan preprocessing: weights are then
    downloaded once per node, by the first actor that needs them.
    """
    local = Path(model_uri).expanduser()
    if not is_fsspec_uri(model_uri) and local.is_dir():
        # Checked here, on the driver, so that a folder of other weight formats
        # fails the run before any actor starts.
        if not any(local.glob("*.safetensors")):
            found = ", ".join(sorted(path.name for path in local.iterdir())[:8]) or "nothing"
            raise ModelLoadError(
                f"model {model_uri} holds no .safetensors weights (found: {found};"
                " other weight formats are refused)"
            )
        return local
    cache_dir = Path(cache_dir).expanduser()
    suffixes = CHECKPOINT_FILE_SUFFIXES if with_weights else (".json",)
    if is_fsspec_uri(model_uri):
        return _fetch_fsspec_checkpoint(model_uri, cache_dir, storage_options or {}, suffixes)
    if model_uri.startswith(("/", "./", "../", "~")) or local.exists():
        # Written as a path, so not a hub id: say what is wrong with the path.
        problem = "is a file, not a checkpoint folder" if local.exists() else "does not exist"
        raise ModelLoadError(f"model {model_uri}: {local} {problem}")
    return _fetch_hub_checkpoint(model_uri, suffixes)


def storage_options_for(uri: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """The job's storage options apply to S3 only; other protocols take none."""
    protocol = fsspec.core.split_protocol(uri)[0]
    return dict(storage_options) if protocol in ("s3", "s3a") else {}


def _fetch_fsspec_checkpoint(
    uri: str, cache_dir: Path, storage_options: dict[str, Any], suffixes: tuple[str, ...]
) -> Path:
    """Copy a checkpoint into ``cache_dir`` once; reuse it while the remote files are unchanged.

    The cache folder is named by a hash of the URI and each remote file's name,
    size and ETag (or mtime), so new weights at the same URI get a new folder.
    A folder is used only once complete (download to a staging folder, then an
    atomic rename) and only while every file still has its recorded size, so a
    partial or truncated cache is fetched again.
    """
    try:
        fs, root = fsspec.core.url_to_fs(uri, **storage_options_for(uri, storage_options))
        listed = {
            Path(entry["name"]).name: entry
            for entry in fs.ls(root, detail=True)
            if entry["type"] == "file" and entry["name"].endswith(CHECKPOINT_FILE_SUFFIXES)
        }
    except Exception as error:  # credentials, endpoint, permissions: all surface here
        raise ModelLoadError(
            f"cannot list model {uri}: {type(error).__name__}: {error}"
            " (check the URI, storage.endpoint_url and credentials)"
        ) from None
    if not any(name.endswith(".safetensors") for name in listed):
        raise ModelLoadError(
            f"model {uri} holds no .safetensors weights (found: {', '.join(listed) or 'nothing'};"
            " other weight formats are refused)"
        )
    remote_files = {name: entry for name, entry in listed.items() if name.endswith(suffixes)}
    # The version covers every file, weights included, even when only JSON is fetched.
    fingerprint = hashlib.sha256(uri.encode())
    for name, entry in sorted(listed.items()):
        version_tag = entry.get("ETag") or entry.get("mtime") or entry.get("LastModified")
        fingerprint.update(f"{name}\0{entry.get('size')}\0{version_tag}\0".encode())
    version = fingerprint.hexdigest()
    target = cache_dir / (version[:24] + ("" if ".safetensors" in suffixes else "-json"))
    expected_sizes = {name: entry.get("size") for name, entry in remote_files.items()}
    if _cache_is_complete(target, expected_sizes):
        return target
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ModelLoadError(
            f"models.cache_dir {cache_dir} cannot be made ({error.strerror}): set "
            "models.cache_dir to a writable folder to fetch model " + uri
        ) from None
    # Several actors on one node may start at once: one downloads, the others wait.
    with FileLock(str(target) + ".lock"):
        if _cache_is_complete(target, expected_sizes):
            return target
        # Under the lock, a staging folder for this target is a killed download's
        # (a preempted node): gigabytes nothing else would ever remove.
        # (A "." after the name: "<hex>-" would also match "<hex>-json", the JSON-only
        # fetch of the same model, which holds another lock.)
        for stale in cache_dir.glob(f".partial-{target.name}.*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".partial-{target.name}."))
        try:
            for name, entry in remote_files.items():
                fs.get_file(entry["name"], str(staging / name))  # get would glob "[" in names
            (staging / _COMPLETE_MARKER).write_text(
                # No URI: it may hold credentials (user:password@, a signed query).
                json.dumps({"version": version, "files": expected_sizes})
            )
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        except Exception as error:
            raise ModelLoadError(
                f"cannot download model {uri}: {type(error).__name__}: {error}"
            ) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


_COMPLETE_MARKER = ".complete.json"


def checkpoint_version(checkpoint_dir: Path) -> str:
    """A short fingerprint that changes whenever the checkpoint's files do.

    For a cached copy: the remote files' names, sizes and ETags, recorded at
    download. For a hub snapshot: its repository and commit (the folder names
    of the hub's cache), which stay the same when the weights join the JSON
    files the driver fetched. For a local folder: its files' names and bytes,
    so a copy (``cp -r``, an image rebuilt with the model in it) keeps the
    version where modification times would not (about a second per GB, once
    per run on the driver). So the driver tells, without loading weights,
    whether earlier results came from the same model.
    """
    marker = checkpoint_dir / _COMPLETE_MARKER
    if marker.is_file():
        recorded = json.loads(marker.read_text()).get("version")
        if recorded:
            return recorded[:16]
    snapshots = checkpoint_dir.parent
    if hub_snapshot_of(checkpoint_dir):
        revision = f"{snapshots.parent.name}@{checkpoint_dir.name}"
        return hashlib.sha256(revision.encode()).hexdigest()[:16]
    fingerprint = hashlib.sha256()
    for path in sorted(checkpoint_dir.iterdir()):
        if path.name.endswith(CHECKPOINT_FILE_SUFFIXES):
            fingerprint.update(f"{path.name}\0{path.stat().st_size}\0".encode())
            with path.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 22), b""):
                    fingerprint.update(chunk)
    return fingerprint.hexdigest()[:16]


def _cache_is_complete(target: Path, expected_sizes: dict[str, int | None]) -> bool:
    if not (target / _COMPLETE_MARKER).is_file():
        return False
    for name, size in expected_sizes.items():
        path = target / name
        if not path.is_file() or (size is not None and path.stat().st_size != size):
            return False
    return True


def split_hub_revision(model_id: str) -> tuple[str, str | None]:
    """``org/name@revision`` → (``org/name``, revision); no ``@``: (id, None).

    A hub id never holds ``@``, so the last one starts the revision: a commit,
    branch or tag.
    """
    repo_id, at, revision = model_id.rpartition("@")
    return (repo_id, revision) if at and repo_id and revision else (model_id, None)


def hub_snapshot_of(checkpoint_dir: Path) -> tuple[str, str] | None:
    """(repo id, commit) of a folder in the hub's cache: models--org--name/snapshots/<commit>."""
    snapshots = checkpoint_dir.parent
    if snapshots.name != "snapshots" or not snapshots.parent.name.startswith("models--"):
        return None
    return snapshots.parent.name.removeprefix("models--").replace("--", "/"), checkpoint_dir.name


def _fetch_hub_checkpoint(model_id: str, suffixes: tuple[str, ...]) -> Path:
    from huggingface_hub import snapshot_download

    repo_id, revision = split_hub_revision(model_id)
    try:
        path = snapshot_download(
            repo_id, revision=revision, allow_patterns=[f"*{suffix}" for suffix in suffixes]
        )
    except Exception as error:  # the hub client raises many unrelated types
        raise ModelLoadError(f"model {model_id!r} {hub_failure(error, revision)}") from None
    return Path(path)


def hub_failure(error: Exception, revision: str | None = None) -> str:
    """Why a hub download failed, in words, and the error's type only.

    The hub client's messages quote request URLs and ids; the type is enough
    to search for, and these cases are the ones a user can act on.
    """
    from huggingface_hub import errors

    if isinstance(error, errors.HFValidationError):
        why = "is not a local directory here, nor a hub id (org/name, or org/name@revision)"
    elif isinstance(error, errors.GatedRepoError):
        why = "is gated on the model hub: accept its terms there and set HF_TOKEN"
    elif isinstance(error, errors.RevisionNotFoundError):
        why = f"has no revision {revision or 'main'!r} on the model hub"
    elif isinstance(error, errors.RepositoryNotFoundError):
        why = "is not a local directory here, nor a model on the hub (a private one needs HF_TOKEN)"
    elif (status := _http_status(error)) == 401:
        why = "was refused by the model hub (401): HF_TOKEN is not valid there"
    elif status == 403:
        why = "was refused by the model hub (403): disabled, or HF_TOKEN lacks access to it"
    elif status == 429 or (status or 0) >= 500:
        why = f"could not be fetched: the model hub answered {status}; try again later"
    elif isinstance(error, errors.LocalEntryNotFoundError | errors.OfflineModeIsEnabled):
        why = (
            "is not a local directory here, and the model hub cannot be reached "
            "(offline, or HF_HUB_OFFLINE set) nor holds it in its cache"
        )
    else:
        why = "is neither a local directory nor reachable on the model hub"
    return f"{why}: {type(error).__name__}"


def _http_status(error: BaseException) -> int | None:
    """The HTTP status behind a hub error; ``snapshot_download`` wraps most in
    LocalEntryNotFoundError, as if the hub could not be reached at all."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        status = getattr(getattr(current, "response", None), "status_code", None)
        if isinstance(status, int):
            return status
        current = current.__cause__ or current.__context__
    return None


def read_model_config(checkpoint_dir: Path) -> dict[str, Any]:
    path = checkpoint_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError("no config.json")
    config = json.loads(path.read_text())
    if not isinstance(config, dict):
        raise ValueError("config.json does not hold a JSON object")
    return config


def check_supported(config: dict[str, Any], task: Task, model_uri: str) -> None:
    model_type = config.get("model_type")
    supported = SUPPORTED_MODEL_TYPES[task]
    if model_type not in supported:
        raise ModelLoadError(
            f"model {model_uri} has model_type {model_type!r}; {task} supports {sorted(supported)}"
        )
    # The other task's head (a segmentation checkpoint named as models.depth)
    # would load with its weights left out and fail only in the actors.
    other_heads = "ForSemanticSegmentation" if task == "depth" else "ForDepthEstimation"
    if any(other_heads in name for name in config.get("architectures") or []):
        raise ModelLoadError(
            f"model {model_uri} is a {config['architectures'][0]} checkpoint, not a {task} one"
        )
    if task == "segmentation":
        num_labels = len(config.get("id2label") or {}) or config.get("num_labels", 0)
        # Class maps are 8-bit PNGs and 255 means "ignore".
        if num_labels > 255:
            raise ModelLoadError(
                f"model {model_uri} has {num_labels} classes; segmentation maps hold at most 255"
            )


DepthKind = Literal["relative_inverse", "metric"]


def depth_kind(config: dict[str, Any]) -> DepthKind:
    """What a depth checkpoint's output means, from its config.json.

    DPT checkpoints (MiDaS-style training) and Depth Anything's relative ones
    predict relative inverse depth: larger is nearer, with an unknown scale and
    shift per image. Depth Anything's metric checkpoints say
    ``depth_estimation_type: metric`` and predict metres.
    """
    return "metric" if config.get("depth_estimation_type") == "metric" else "relative_inverse"


def weights_sha256(checkpoint_dir: Path) -> str:
    """Hash of every safetensors file (names and bytes), stable across copies of a checkpoint."""
    digest = hashlib.sha256()
    files = sorted(checkpoint_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"{checkpoint_dir} has no .safetensors weights (other formats are refused)"
        )
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def model_name(model_uri: str) -> str:
    """The name outputs record for a model: a folder's name, or the hub id without
    its revision (the weights' hash beside it says which weights)."""
    if is_fsspec_uri(model_uri) or Path(model_uri).expanduser().is_dir():
        return Path(model_uri.rstrip("/")).name
    return split_hub_revision(model_uri)[0]


def load_network(
    checkpoint_dir: Path, task: Task, device: torch.device, dtype: torch.dtype
) -> torch.nn.Module:
    """Instantiate the network from safetensors weights, in eval mode, on ``device``."""
    from transformers import AutoModelForDepthEstimation, DPTForSemanticSegmentation
    from transformers.utils import logging as transformers_logging

    # One progress bar per actor per model is noise in a cluster's logs.
    transformers_logging.disable_progress_bar()

    model_class = AutoModelForDepthEstimation if task == "depth" else DPTForSemanticSegmentation
    try:
        model = model_class.from_pretrained(
            str(checkpoint_dir), use_safetensors=True, trust_remote_code=False, dtype=dtype
        )
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load {task} model from {checkpoint_dir}: {error}") from None
    except RuntimeError as error:
        if "ignore_mismatched_sizes" not in str(error):
            raise
        # transformers' answer to weights of other shapes than config.json's
        raise ModelLoadError(
            f"cannot load {task} model from {checkpoint_dir}: its weights do not fit its "
            "config.json (transformers logged the tensors whose shapes differ)"
        ) from None
    model.eval().to(device)
    _enable_non_square_grids(model)
    return model


def check_input_geometry(config: dict[str, Any], spec: PreprocessSpec, model_uri: str) -> None:
    """Refuse processor settings the network cannot run, before any image is read."""
    if config.get("is_hybrid"):
        image_size = config.get("image_size", 384)
        if spec.keep_aspect_ratio or (spec.height_px, spec.width_px) != (image_size, image_size):
            raise ModelLoadError(
                f"model {model_uri} is a hybrid DPT, which accepts exactly "
                f"{image_size}×{image_size} input; its processor config must resize to that "
                "size without keep_aspect_ratio"
            )


def _enable_non_square_grids(model: torch.nn.Module) -> None:
    """Let ViT-backbone DPT run on non-square inputs.

    transformers' DPT reshapes the ViT tokens into a square grid unless the model
    passes the grid's height and width to its neck, which only the Dinov2-style
    ``backbone_config`` path does; ``DPTForSemanticSegmentation`` never does. A
    keep-aspect-ratio input then crashes ("shape '[1, 29, 29, 32]' is invalid").
    The patch embedding and position-embedding interpolation already handle any
    grid, so passing the real grid to the neck is all MiDaS-style non-square
    inference needs.
    """
    config = model.config
    neck = getattr(model, "neck", None)
    if config.model_type != "dpt" or config.is_hybrid or neck is None:
        return
    if getattr(model, "backbone", None) is not None:
        return  # the backbone_config path already passes the grid
    patch_size = config.patch_size
    grid: dict[str, tuple[int, int]] = {}

    def remember_grid(_module, args, kwargs):
        pixel_values = kwargs["pixel_values"] if "pixel_values" in kwargs else args[0]
        grid["hw"] = (pixel_values.shape[-2] // patch_size, pixel_values.shape[-1] // patch_size)

    def pass_grid_to_neck(_module, args, kwargs):
        hidden_states = kwargs.pop("hidden_states") if "hidden_states" in kwargs else args[0]
        passed = [value for value in args[1:3] if value is not None]
        passed += [kwargs.get(key) for key in ("patch_height", "patch_width") if kwargs.get(key)]
        if passed:
            return None
        patch_height, patch_width = grid["hw"]
        return (hidden_states,), {"patch_height": patch_height, "patch_width": patch_width}

    model.register_forward_pre_hook(remember_grid, with_kwargs=True)
    neck.register_forward_pre_hook(pass_grid_to_neck, with_kwargs=True)


@dataclass(frozen=True)
class ModelCard:
    """What the CPU stages need to know about a checkpoint, without its weights."""

    task: Task
    uri: str
    checkpoint_dir: Path
    spec: PreprocessSpec
    config: dict[str, Any]

    @functools.cached_property
    def version(self) -> str:
        """Changes with the checkpoint's files (:func:`checkpoint_version`).

        On first use: for a local folder it reads every file, which the driver
        needs (``config_hash``) and an actor, loading the weights, does not.
        """
        return checkpoint_version(self.checkpoint_dir)

    @property
    def pinned_uri(self) -> str:
        """The URI that loads exactly these files on every node.

        A hub id resolves to the repository's latest commit wherever it is
        fetched; an actor starting after a new commit would run other weights
        than the driver planned for. Pinned to the commit the driver saw, all
        actors load the same ones.
        """
        snapshot = self.hub_snapshot
        return self.uri if snapshot is None else f"{snapshot[0]}@{snapshot[1]}"

    @property
    def hub_snapshot(self) -> tuple[str, str] | None:
        """(repo id, commit) where the model came from the hub; None for folders and URIs."""
        if is_fsspec_uri(self.uri) or self.is_local_folder:
            return None
        return hub_snapshot_of(self.checkpoint_dir)

    @property
    def is_local_folder(self) -> bool:
        return not is_fsspec_uri(self.uri) and Path(self.uri).expanduser().is_dir()

    @property
    def class_names(self) -> dict[int, str]:
        """Class id → name from the checkpoint's ``id2label`` (empty for depth models)."""
        return {int(key): name for key, name in (self.config.get("id2label") or {}).items()}

    @classmethod
    def fetch(
        cls,
        task: Task,
        model_uri: str,
        cache_dir: Path = DEFAULT_CACHE_DIR,
        storage_options: dict[str, Any] | None = None,
        with_weights: bool = True,
    ) -> ModelCard:
        """Fetch (or find in the cache) and validate a checkpoint.

        ``with_weights=False`` fetches only its JSON files: enough to validate it
        and to plan preprocessing, without pulling gigabytes to the job's driver.
        """
        checkpoint_dir = resolve_checkpoint_dir(
            model_uri, cache_dir, storage_options, with_weights=with_weights
        )
        try:
            config = read_model_config(checkpoint_dir)
            spec = PreprocessSpec.from_pretrained_dir(checkpoint_dir)
        except (OSError, ValueError, KeyError, TypeError) as error:  # missing, not JSON, wrong
            raise ModelLoadError(
                f"model {model_uri} is not a usable DPT checkpoint: {type(error).__name__}: {error}"
            ) from None
        check_supported(config, task, model_uri)
        check_input_geometry(config, spec, model_uri)
        return cls(task, model_uri, checkpoint_dir, spec, config)
