"""A job's output as a training set: ``PseudoLabelDataset``.

Reads an output prefix back (local or any fsspec URI, e.g. S3): the committed
rows (one per image, streamed by ``pipeline.output.view.iter_predictions``),
and per item the source image and its map files. It is the one ``dpt_model``
module that imports ``pipeline``, whose reader of the output contract it
reuses; nothing here imports Ray, so it runs in a plain training process and
its DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import Dataset

from dpt_model.predictor import IGNORE_LABEL
from dpt_model.quantize import depth_at_size
from dpt_model.tensor_processing import upsample_depth
from pipeline.decode import LARGEST_IMAGE_PIXELS, LARGEST_SIDE_PX, decode_image
from pipeline.encode import decode_depth_map, decode_segmentation_png
from pipeline.keys import shard_uris
from pipeline.output.maps import MapLocator
from pipeline.output.view import iter_predictions
from pipeline.schema import schema_for, strip_url_secrets
from pipeline.storage import filesystem_for, read_bytes

_COLUMNS = [
    "image_id",
    "source_uri",
    "status",
    "width",
    "height",
    "depth_uri",
    "depth_min",
    "depth_max",
    "depth_kind",
    "segmentation_uri",
    "kept",
    "label_coverage",
]


class PseudoLabelDataset(Dataset):
    """Items of image, depth, label and mask tensors from a job's output.

    Each item is a dict: ``image_id``; ``image`` (3, H, W) uint8 with EXIF
    orientation applied, as the job saw it; ``depth`` (H, W) float32, the model's
    raw output brought to the image's size; ``label`` (H, W) int64 class ids with
    ``IGNORE_LABEL`` (255) where pseudo-label mode left a pixel unlabelled; and
    ``mask`` (H, W) bool, true where ``label`` is a class; ``depth_kind``
    (``relative_inverse`` or ``metric``). Keys are left out for maps the run did
    not make, and ``image`` with ``with_images=False``. ``depth="normalized"``
    scales each image's depth to [0, 1] (its minimum to 0, maximum to 1), the
    usual target for relative models, whose scale and shift mean nothing.

    Rows are the ok ones; with ``kept_only`` (the default) also only those with
    ``kept`` true, or null (runs without pseudo-label mode keep everything).
    ``kept`` was judged by the ``min_coverage`` of the run that annotated the
    image; ``min_coverage=`` judges every row by one bar, from ``label_coverage``.
    ``transform`` is called on each item dict.
    """

    def __init__(
        self,
        output_uri: str,
        storage_options: dict[str, Any] | None = None,
        kept_only: bool = True,
        with_images: bool = True,
        depth: Literal["raw", "normalized"] = "raw",
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        min_coverage: float | None = None,
    ) -> None:
        self.storage_options = storage_options or {}
        self.maps = MapLocator(output_uri, self.storage_options)
        self.depth = depth
        self.with_images = with_images
        self.transform = transform
        chosen = []
        for batch in iter_predictions(output_uri, _COLUMNS, self.storage_options):
            wanted = pc.equal(batch["status"], "ok")
            # Nulls: a run without pseudo-label mode, which keeps all (as is_kept).
            if kept_only and min_coverage is None:
                wanted = pc.and_(wanted, pc.fill_null(batch["kept"], True))
            elif kept_only:
                covered = pc.greater_equal(batch["label_coverage"], min_coverage)
                wanted = pc.and_(wanted, pc.fill_null(covered, True))
            chosen.append(batch.filter(wanted))
        # Arrow columns, not a list of dicts: a few hundred bytes a row, and
        # DataLoader workers share them after fork (Python objects would be
        # copied page by page as their reference counts change).
        self.rows = pa.Table.from_batches(chosen, schema=schema_for(_COLUMNS))
        if with_images:
            named = self.rows["source_uri"].filter(pc.is_valid(shard_uris(self.rows["source_uri"])))
            if member := _first_shard_member(named, self.storage_options):
                # A webdataset sample or Parquet row is not an object of its own.
                raise ValueError(
                    f"{len(named)} images come from shards (e.g. {member}); "
                    "read them from their shards, or pass with_images=False for maps only"
                )

    def __len__(self) -> int:
        return self.rows.num_rows

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        [row] = self.rows.slice(index, 1).to_pylist()
        size_hw = (row["height"], row["width"])
        item: dict[str, Any] = {"image_id": row["image_id"]}
        if self.with_images:
            data = self._read(row["source_uri"], "image")
            rgb = decode_image(data, LARGEST_IMAGE_PIXELS, LARGEST_SIDE_PX).rgb
            if rgb.shape[:2] != size_hw:
                raise ValueError(
                    f"{row['source_uri']} is {rgb.shape[1]}×{rgb.shape[0]} now and was "
                    f"{row['width']}×{row['height']} when annotated: it changed since, and its "
                    "maps are of the image it was (run the job again to annotate it anew)"
                )
            # Writable, for in-place transforms: decoded arrays are read-only, and
            # a 1×1 image's is contiguous already, so not copied by transposing.
            chw = np.require(rgb.transpose(2, 0, 1), requirements=["C", "W"])
            item["image"] = torch.from_numpy(chw)
        if depth_uri := self.maps(row["depth_uri"], "depth"):
            stored = decode_depth_map(depth_uri, self._read(depth_uri, "depth map"))
            if depth_uri.endswith(".npz"):  # output.depth_format: npz_float16
                values = torch.from_numpy(stored).float()
                same_size = tuple(values.shape) == size_hw
                depth = (values if same_size else upsample_depth(values, size_hw)).numpy()
            else:
                depth = depth_at_size(stored, row["depth_min"], row["depth_max"], size_hw)
            if self.depth == "normalized":
                # The map as delivered, at the image's size, spans exactly [0, 1].
                low, high = float(depth.min()), float(depth.max())
                depth = (depth - low) / ((high - low) or 1.0)
            item["depth"] = torch.from_numpy(depth)
            item["depth_kind"] = row["depth_kind"]
        if segmentation_uri := self.maps(row["segmentation_uri"], "segmentation"):
            label = decode_segmentation_png(self._read(segmentation_uri, "segmentation map"))
            item["label"] = torch.from_numpy(label.astype(np.int64))
            item["mask"] = item["label"] != IGNORE_LABEL
        return self.transform(item) if self.transform else item

    def _read(self, uri: str, what: str) -> bytes:
        try:
            return read_bytes(uri, self.storage_options)
        except FileNotFoundError:
            # The client's own message names no key ("The specified key does not
            # exist."): one gone file must say which, or an epoch stops blind.
            gone_because = (
                "deleted since it was annotated (its row stays in the output), or not "
                "reachable from here"
                if what == "image"
                else "missing: the output was copied or cleared without its maps"
            )
            raise FileNotFoundError(
                f"{what} {strip_url_secrets(uri)} not found: {gone_because}"
            ) from None


def is_kept(kept: bool | None, label_coverage: float | None, min_coverage: float | None) -> bool:
    """Whether an ok row is a training target: by its ``kept``, or with
    ``min_coverage`` by that bar; rows of runs without pseudo-labels (nulls) always are."""
    if min_coverage is None:
        return kept is not False
    return label_coverage is None or label_coverage >= min_coverage


def _first_shard_member(named: pa.ChunkedArray, storage_options: dict[str, Any]) -> str | None:
    """The first of ``named`` (source URIs named like ``<shard>#<sample>``) that is
    an image inside a shard, not a file of its own; None where all are files.

    The name alone cannot tell: ``a.tar#1.jpg`` may be a plain file. Only such
    names are looked up, and the first that is no file ends the search, so a
    shard output costs one lookup.
    """
    for chunk in named.chunks:
        for uri in chunk:
            fs, path = filesystem_for(uri.as_py(), storage_options)
            try:
                if not fs.isfile(path):
                    return uri.as_py()
            except OSError:
                return uri.as_py()
    return None


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """(H, W) bool mask → COCO's uncompressed RLE: run lengths in column-major order,
    starting with a run of zeros (pycocotools' ``frPyObjects`` reads it)."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Inverse of ``mask_to_rle``."""
    height, width = rle["size"]
    values = np.zeros(height * width, dtype=bool)
    position, value = 0, False
    for run in rle["counts"]:
        values[position : position + run] = value
        position, value = position + run, not value
    return values.reshape((height, width), order="F")


def coco_annotations(
    label: np.ndarray, image_id: int, first_annotation_id: int, score: float | None
) -> list[dict[str, Any]]:
    """One COCO annotation per class present in a class-id map (``IGNORE_LABEL`` left out).

    COCO category ids are the model's class ids plus one (COCO reserves 0).
    """
    annotations = []
    for class_id in np.unique(label):
        if class_id == IGNORE_LABEL:
            continue
        mask = label == class_id
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        annotation = {
            "id": first_annotation_id + len(annotations),
            "image_id": image_id,
            "category_id": int(class_id) + 1,
            "segmentation": mask_to_rle(mask),
            "area": int(mask.sum()),
            "bbox": [
                int(cols[0]),
                int(rows[0]),
                int(cols[-1] - cols[0] + 1),
                int(rows[-1] - rows[0] + 1),
            ],
            "iscrowd": 0,
        }
        if score is not None:
            annotation["score"] = score
        annotations.append(annotation)
    return annotations
