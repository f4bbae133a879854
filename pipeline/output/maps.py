"""Reading a row's maps back: where its files are now, and what its class ids mean."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dpt_model import ModelCard
from dpt_model.loading import DEFAULT_CACHE_DIR
from pipeline.output.runs import iter_run_records
from pipeline.storage import filesystem_for, full_uri


class MapLocator:
    """Where a row's map file is in the output as it is now, also after a move.

    Rows name their maps by the URI they were written at (``<output>/depth/…``).
    An output copied or synced elsewhere (``aws s3 sync`` down to train
    locally, ``cp -r``) keeps those URIs, which point at the original or at
    nothing. A URI outside this output is looked for here under each place in
    it where a ``depth/`` or ``segmentation/`` folder could start, nearest the
    bucket first; once one is found, every URI of that earlier output is moved
    here without another look. Where none is found the URI stays as written.
    """

    def __init__(self, output_uri: str, storage_options: dict[str, Any] | None = None) -> None:
        self.fs, root = filesystem_for(output_uri, storage_options or {})
        self.root = full_uri(self.fs, root).rstrip("/")
        self.earlier_roots: list[str] = []

    def __call__(self, uri: str | None, kind: str) -> str | None:
        if uri is None or uri.startswith(f"{self.root}/"):
            return uri
        for earlier in self.earlier_roots:
            if uri.startswith(f"{earlier}/"):
                return self.root + uri[len(earlier) :]
        at = uri.find(f"/{kind}/")
        while at >= 0:
            here = self.root + uri[at:]
            if self.fs.exists(here):
                self.earlier_roots.append(uri[:at])
                return here
            at = uri.find(f"/{kind}/", at + 1)
        return uri


def segmentation_class_names(
    output_uri: str,
    storage_options: dict[str, Any] | None = None,
    model_uri: str | None = None,
    cache_dir: Path = DEFAULT_CACHE_DIR,
) -> dict[int, str] | None:
    """Class id → name from ``model_uri``'s ``id2label``, else as the latest finished
    run with a segmentation model recorded them; None when no run used one.

    A run records its classes (``segmentation_classes``), so they are read where
    the output is, from any folder, also in a copy. For a run recorded before
    that, its checkpoint's JSON files are fetched (never its weights), by the
    URI as the run wrote it.
    """
    if model_uri is None:
        latest = _latest_segmentation_run(output_uri, storage_options)
        if latest is None:
            return None
        recorded = latest.get("segmentation_classes")
        if isinstance(recorded, dict):
            return {int(class_id): str(name) for class_id, name in recorded.items()}
        model_uri = latest["config"]["models"]["segmentation"]
    card = ModelCard.fetch("segmentation", model_uri, cache_dir, storage_options, False)
    return card.class_names


def _latest_segmentation_run(
    output_uri: str, storage_options: dict[str, Any] | None
) -> dict[str, Any] | None:
    for record in iter_run_records(output_uri, storage_options):
        models = (record.get("config") or {}).get("models") or {}
        if models.get("segmentation"):
            return record
    return None
