"""Check a checkpoint's weights against its config.json, from the safetensors headers.

transformers finds weights of other shapes than config.json's only while it
loads them, which happens in the actors: the job then dies in Ray's actor-death
tracebacks, on every node, minutes in. A safetensors file starts with a JSON
header naming each tensor's shape, and the network's own shapes come from
building it on the ``meta`` device (no memory, a few milliseconds), so the
driver can tell a misfit before Ray starts, reading a few kilobytes of each
weights file, also where the weights stay in object storage.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import fsspec

from dpt_model.loading import ModelCard, ModelLoadError, is_fsspec_uri, storage_options_for

if TYPE_CHECKING:
    import torch
    from fsspec import AbstractFileSystem

Shape = tuple[int, ...]

# safetensors itself refuses headers above 100 MB: past that it is not one.
MAX_HEADER_BYTES = 100_000_000


def header_shapes(fs: AbstractFileSystem, path: str) -> dict[str, Shape]:
    """Tensor name → shape from one safetensors file, reading only its header."""
    prefix = fs.cat_file(path, start=0, end=8)
    if len(prefix) < 8:
        raise ValueError("it is shorter than a safetensors header")
    (length,) = struct.unpack("<Q", prefix)
    if length > MAX_HEADER_BYTES:
        raise ValueError(f"its first 8 bytes give a {length}-byte header")
    header = json.loads(fs.cat_file(path, start=8, end=8 + length))
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    return {name: tuple(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}


def weight_shapes(
    card: ModelCard, storage_options: dict[str, Any] | None = None
) -> dict[str, Shape] | None:
    """Every tensor's shape in the checkpoint's weights; None where they cannot be read here.

    The weights are in ``card.checkpoint_dir`` for a local folder and in an
    actor; a driver that fetched only the JSON files reads them where they are
    for an fsspec URI. Hub ids are left to the actors: their weights arrive there.
    """
    local = sorted(card.checkpoint_dir.glob("*.safetensors"))
    if local:
        fs, paths = fsspec.filesystem("file"), [str(path) for path in local]
    elif is_fsspec_uri(card.uri):
        try:
            fs, root = fsspec.core.url_to_fs(
                card.uri, **storage_options_for(card.uri, storage_options or {})
            )
            paths = sorted(
                path for path in fs.ls(root, detail=False) if path.endswith(".safetensors")
            )
        except Exception as error:  # credentials, endpoint, permissions: all surface here
            raise ModelLoadError(
                f"cannot list model {card.uri}: {type(error).__name__}: {error}"
            ) from None
    else:
        return None
    shapes: dict[str, Shape] = {}
    for path in paths:
        name = path.rsplit("/", 1)[-1]
        try:
            shapes.update(header_shapes(fs, path))
        except (ValueError, KeyError, TypeError, struct.error) as error:
            raise ModelLoadError(
                f"model {card.uri}: {name} is not a safetensors file ({error})"
            ) from None
        except Exception as error:
            raise ModelLoadError(
                f"cannot read model {card.uri}: {name}: {type(error).__name__}: {error}"
            ) from None
    return shapes


def network_of(card: ModelCard) -> torch.nn.Module:
    """The network config.json describes, on the ``meta`` device: shapes, no memory."""
    import torch
    from transformers import AutoConfig, AutoModelForDepthEstimation, DPTForSemanticSegmentation

    config = AutoConfig.from_pretrained(str(card.checkpoint_dir), trust_remote_code=False)
    with torch.device("meta"):
        if card.task == "depth":
            return AutoModelForDepthEstimation.from_config(config)
        return DPTForSemanticSegmentation(config)


# A checkpoint tensor's name where transformers loads it into a network, and
# whether its shape stays (False where a converter merges or splits tensors).
LoadedName = Callable[[str], tuple[str, bool]]


def loaded_names(network: torch.nn.Module) -> LoadedName | None:
    """How transformers renames checkpoint tensors for ``network``; None where unknown.

    Checkpoints saved by older transformers keep their tensors' old names
    (Dinov2's ``attention.attention.query`` is ``attention.q_proj`` now), and
    transformers renames them as it loads, with rules of its own per model. They
    are used here as transformers' loader uses them (``core_model_loading``): an
    internal API, so where it changes, only tensors of matching names are compared.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )

        mapping = get_model_conversion_mapping(network)
    except (ImportError, TypeError, AttributeError):
        return None
    renamings = [entry for entry in mapping if isinstance(entry, WeightRenaming)]
    converters = [entry for entry in mapping if isinstance(entry, WeightConverter)]
    prefix, network_tensors = network.base_model_prefix, network.state_dict()

    def loaded_name(name: str) -> tuple[str, bool]:
        renamed, converter = rename_source_key(name, renamings, converters, prefix, network_tensors)
        if renamed not in network_tensors and name in network_tensors:
            renamed, converter = rename_source_key(name, [], [], prefix, network_tensors)
        return renamed, converter is None

    return loaded_name


def compare_shapes(
    weights: dict[str, Shape], network: dict[str, Shape], loaded_name: LoadedName | None
) -> tuple[list[tuple[str, Shape, Shape]], list[str] | None]:
    """(the tensors whose shapes differ: name, in the weights, in the network;
    the network's tensors the weights lack, None where renaming is unknown)."""
    found: dict[str, Shape | None] = {}
    for name, shape in weights.items():
        loaded, keeps_shape = loaded_name(name) if loaded_name else (name, True)
        found[loaded] = shape if keeps_shape else None
    differ = [
        (name, found[name], shape)
        for name, shape in network.items()
        if found.get(name) is not None and found[name] != shape
    ]
    lacking = [name for name in network if name not in found] if loaded_name else None
    return differ, lacking


def check_weights_fit(card: ModelCard, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Refuse weights that do not fit config.json; return the network's tensors they lack.

    Lacking tensors are not refused: transformers starts them at random, which
    some checkpoints mean (a head trained later), and its renaming of old
    tensor names is not repeated here. The caller says so once.
    """
    weights = weight_shapes(card, storage_options)
    if weights is None:
        return []
    network = network_of(card)
    network_tensors = {name: tuple(value.shape) for name, value in network.state_dict().items()}
    differ, lacking = compare_shapes(weights, network_tensors, loaded_names(network))
    if differ:
        name, in_weights, in_network = differ[0]
        more = f" (and {len(differ) - 1} more)" if len(differ) > 1 else ""
        raise ModelLoadError(
            f"model {card.uri}: its weights do not fit its config.json: {name} is "
            f"{list(in_weights)} in the weights and {list(in_network)} by config.json{more}"
        )
    if lacking is not None and len(lacking) == len(network_tensors):
        raise ModelLoadError(
            f"model {card.uri}: its weights hold none of the tensors of the "
            f"{type(network).__name__} its config.json describes"
        )
    return lacking or []
