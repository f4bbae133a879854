"""Shard markers: which shard versions were read whole, under which read settings,
and when (:func:`~pipeline.keys.shard_marker_key`)."""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

import fsspec

from pipeline.keys import SHARDS_FOLDER
from pipeline.storage import forget_listing, join, modified_time


@dataclass
class ShardMarkers:
    """What the shard markers under an output say (:func:`~pipeline.keys.shard_marker_key`)."""

    # marker stem (shard, version, read settings) → images it held
    images: dict[str, int] = field(default_factory=dict)
    # shard id → when a version of it was last read whole (seconds since the epoch)
    last_read: dict[str, float] = field(default_factory=dict)
    # (marker stem, config hash's first 12) of reads that found every image done
    all_done: set[tuple[str, str]] = field(default_factory=set)
    # <shard id>.<version tag> → the read settings tags its markers carry ("" the defaults')
    settings_read: dict[str, set[str]] = field(default_factory=dict)
    # shard id → its markers' (path, modification time)
    paths: dict[str, list[tuple[str, float]]] = field(default_factory=dict)

    def can_skip(self, stem: str, config_hash: str, images_done: int) -> bool:
        """Whether the shard version of ``stem`` (these read settings) holds nothing to do.

        Read under these settings only, its marker's image count is trusted:
        skipped once that many images are done. Read under others too, the done
        images may be of other settings' (other ids, other extensions): skipped
        only once a read under these found them all done.
        """
        if (stem, config_hash[:12]) in self.all_done:
            return True
        images = self.images.get(stem)
        version, settings = _split_stem(stem)
        read_one_way = self.settings_read.get(version, {settings}) == {settings}
        return images is not None and images_done >= images and read_one_way

    def read_times(
        self, fs: fsspec.AbstractFileSystem, shard_ids: Collection[str]
    ) -> dict[str, float]:
        """``last_read``, with ``shard_ids``'s taken from their markers' own record
        of when they were read (their body), where the files' times may be a copy's.

        One small read per marker of these shards (those with error rows: few);
        a marker written before markers had bodies keeps its modification time.
        """
        markers = [
            (shard_id, path, modified)
            for shard_id in shard_ids
            for path, modified in self.paths.get(shard_id, [])
        ]
        paths = [path for _, path, _ in markers]
        contents = fs.cat_ranges(paths, None, None, on_error="return") if paths else []
        read: dict[str, float] = {}
        for (shard_id, _, modified), content in zip(markers, contents, strict=True):
            try:
                read_at = datetime.fromisoformat(content.decode()).timestamp()
            except (AttributeError, UnicodeDecodeError, ValueError):  # an error, or empty
                read_at = modified
            read[shard_id] = max(read.get(shard_id, 0.0), read_at)
        self.last_read.update(read)
        return self.last_read

    def error_stands(self, shard_id: str, error_written: float | None) -> bool:
        """Whether a shard's error row written then is still its row in the view:
        no read of the shard to its end came after it."""
        return error_written is not None and error_written >= self.last_read.get(shard_id, 0.0)


def read_shard_markers(fs: fsspec.AbstractFileSystem, root: str) -> ShardMarkers:
    """The markers under ``root``, one listing.

    Markers of other read settings have stems of their own
    (:func:`~pipeline.read.read_settings_tag`). Where one stem has markers of
    different counts (an older release counted samples without an image, or
    read other extensions under one stem), the latest read's count stands.
    """
    markers = ShardMarkers()
    for marker in sorted(_shard_markers(fs, root), key=lambda marker: marker.written):
        version, settings = _split_stem(marker.stem)
        markers.settings_read.setdefault(version, set()).add(settings)
        markers.last_read[marker.shard_id] = marker.written
        markers.paths.setdefault(marker.shard_id, []).append((marker.path, marker.written))
        if marker.done_under is not None:
            markers.all_done.add((marker.stem, marker.done_under))
        else:
            markers.images[marker.stem] = marker.images
    return markers


def _split_stem(stem: str) -> tuple[str, str]:
    """``_shards/<id>.<version tag>[.<settings tag>]`` → (``<id>.<version tag>``, settings tag)."""
    shard_id, version_tag, *settings = stem.removeprefix(f"{SHARDS_FOLDER}/").split(".")
    return f"{shard_id}.{version_tag}", "".join(settings)


class _ShardMarker(NamedTuple):
    stem: str  # _shards/<shard id>.<version tag>[.<read settings tag>]
    shard_id: str
    images: int
    written: float  # seconds since the epoch
    done_under: str | None = None  # an all-done marker's config (12 hex digits)
    path: str = ""


def _shard_markers(fs: fsspec.AbstractFileSystem, root: str) -> list[_ShardMarker]:
    """The markers under ``root`` (:func:`~pipeline.keys.shard_marker_key`), one listing."""
    try:
        listed = fs.ls(forget_listing(fs, join(root, SHARDS_FOLDER)), detail=True)
    except FileNotFoundError:
        return []
    markers = []
    for info in listed:
        stem, _, images = info["name"].rsplit("/", 1)[-1].rpartition(".")
        shard_id = stem.split(".", 1)[0]
        written = modified_time(info)
        stem = f"{SHARDS_FOLDER}/{stem}"
        if images.isdigit():
            markers.append(_ShardMarker(stem, shard_id, int(images), written, path=info["name"]))
        elif re.fullmatch("c[0-9a-f]{12}", images):  # shard_done_marker_key
            markers.append(_ShardMarker(stem, shard_id, 0, written, images[1:], info["name"]))
    return markers
