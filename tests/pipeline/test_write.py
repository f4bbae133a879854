"""The write stage outside Ray: map files under their keys, rows in the Parquet schema."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from pipeline.encode import decode_depth_map, decode_depth_png, decode_segmentation_png
from pipeline.keys import annotation_tag, image_id_for, map_file_key
from pipeline.schema import PREDICTION_SCHEMA
from pipeline.write import write_maps_batch

CONFIG_HASH = "c0ffee"
RUN_ID = "run-1"


class RefusingFileSystem(MemoryFileSystem):
    """An in-memory store that refuses writes to some paths, as a read-only prefix would.

    ``refused``: path fragments whose writes fail with a permission error (not
    transient: never retried). ``flaky``: the first write to each path fails
    with a dropped connection (transient: retried).
    """

    protocol = ("refusing",)
    refused: tuple[str, ...] = ()
    flaky = False
    # Raised, instead of writing, for every path: what an HTTP stack raises.
    failing_with: Exception | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Its own store, not MemoryFileSystem's process-wide one.
        self.store, self.pseudo_dirs = {}, [""]
        self.dropped: list[str] = []  # paths whose first write failed as flaky

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("refusing://"))

    def _open(self, path, mode="rb", **kwargs):
        if "w" in mode or "x" in mode:
            if self.failing_with is not None:
                raise self.failing_with
            if any(fragment in path for fragment in self.refused):
                raise PermissionError(errno.EACCES, "Access Denied", path)
            if self.flaky and path not in self.dropped:
                self.dropped.append(path)
                raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        return super()._open(path, mode=mode, **kwargs)


fsspec.register_implementation("refusing", RefusingFileSystem, clobber=True)


@pytest.fixture
def refusing():
    """A fresh, empty RefusingFileSystem: the one the write stage will get for
    ``refusing://`` URIs in this test (fsspec caches instances); tests set what
    it refuses on it."""
    RefusingFileSystem.clear_instance_cache()
    yield fsspec.filesystem("refusing")
    RefusingFileSystem.clear_instance_cache()


def objects(values: list) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def depth_levels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 65536, (12, 16), dtype=np.uint16)


def class_ids(seed: int) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(0, 6, (24, 32), dtype=np.uint8)
    ids[0, :3] = 255  # ignore
    return ids


def inferred_batch(
    source_keys: list[str], errors: dict[str, str] | None = None, depth_float16: bool = False
) -> dict[str, np.ndarray]:
    """What inference hands the write stage: depth and segmentation maps per ok row.

    ``errors``: source key → reason of a row an earlier stage failed (empty maps).
    """
    errors = errors or {}
    count = len(source_keys)
    failed = [key in errors for key in source_keys]
    empty_depth = np.zeros((0, 0), dtype=np.float32 if depth_float16 else np.uint16)
    depth = [
        empty_depth
        if failed[index]
        # Ray's hand-over between stages widens float16 to float32.
        else (depth_levels(index) / 7).astype(np.float16).astype(np.float32)
        if depth_float16
        else depth_levels(index)
        for index in range(count)
    ]
    batch = {
        "image_id": np.array([image_id_for(f"s3://in/{key}") for key in source_keys], dtype=object),
        "source_uri": np.array([f"s3://in/{key}" for key in source_keys], dtype=object),
        "source_key": np.array(source_keys, dtype=object),
        "source_version": np.array([f"etag-{index}" for index in range(count)], dtype=object),
        "status": np.array(["error" if bad else "ok" for bad in failed], dtype=object),
        "error": np.array([errors.get(key, "") for key in source_keys], dtype=object),
        "width": np.array([0 if bad else 32 for bad in failed], dtype=np.int32),
        "height": np.array([0 if bad else 24 for bad in failed], dtype=np.int32),
        "depth_float16" if depth_float16 else "depth_levels": objects(depth),
        "depth_min": np.array([np.nan if bad else 0.5 for bad in failed]),
        "depth_max": np.array([np.nan if bad else 9.5 for bad in failed]),
        "model_depth": np.full(count, "depth-model@abc", dtype=object),
        "seg_class_ids": objects(
            [np.zeros((0, 0), np.uint8) if bad else class_ids(i) for i, bad in enumerate(failed)]
        ),
        "seg_labels": objects(
            [np.zeros(0, np.int32) if bad else np.array([0, 3, 5], np.int32) for bad in failed]
        ),
        "seg_confidence_mean": np.array([np.nan if bad else 0.75 for bad in failed]),
        "model_segmentation": np.full(count, "seg-model@def", dtype=object),
    }
    return batch


def write(batch, output_uri: str, **options) -> list[dict]:
    table = write_maps_batch(batch, output_uri, {}, 1, RUN_ID, CONFIG_HASH, **options)
    assert table.schema == PREDICTION_SCHEMA
    return table.to_pylist()


def expected_key(batch, index: int, kind: str, suffix: str = ".png") -> str:
    tag = annotation_tag(batch["image_id"][index], batch["source_version"][index], CONFIG_HASH)
    return map_file_key(kind, batch["source_key"][index], tag, suffix)


def files_under(folder: Path) -> set[str]:
    return {
        os.path.relpath(os.path.join(root, name), folder)
        for root, _, names in os.walk(folder)
        for name in names
    }


def test_ok_rows_write_their_maps_under_keys_named_by_source_key_and_annotation_tag(tmp_path):
    batch = inferred_batch(["photos/cat.jpg", "photos/dog #2.png"])
    rows = write(batch, str(tmp_path), depth_kind="relative_inverse")

    for index, row in enumerate(rows):
        depth_key = expected_key(batch, index, "depth")
        segmentation_key = expected_key(batch, index, "segmentation")
        assert row["depth_uri"] == str(tmp_path / depth_key)
        assert row["segmentation_uri"] == str(tmp_path / segmentation_key)
        np.testing.assert_array_equal(
            decode_depth_png(Path(row["depth_uri"]).read_bytes()), depth_levels(index)
        )
        np.testing.assert_array_equal(
            decode_segmentation_png(Path(row["segmentation_uri"]).read_bytes()), class_ids(index)
        )
        assert row["status"] == "ok" and row["error"] is None
        assert (row["width"], row["height"]) == (32, 24)
        assert (row["depth_min"], row["depth_max"]) == (0.5, 9.5)
        assert row["depth_kind"] == "relative_inverse"
        assert row["seg_labels"] == [0, 3, 5] and row["seg_confidence_mean"] == 0.75
        assert row["source_version"] == f"etag-{index}" and row["config_hash"] == CONFIG_HASH
        assert row["run_id"] == RUN_ID and row["kept"] is None
    # The naming, spelled out once: the source's folders, its name with "#"
    # percent-encoded, the 8-digit tag, the map's suffix.
    tag = annotation_tag(batch["image_id"][1], "etag-1", CONFIG_HASH)
    assert rows[1]["depth_uri"].endswith(f"/depth/photos/dog %232.png.{tag}.png")
    assert files_under(tmp_path) == {
        expected_key(batch, index, kind) for index in (0, 1) for kind in ("depth", "segmentation")
    }


def test_error_rows_from_earlier_stages_pass_through_with_their_reason_and_no_map_files(
    tmp_path,
):
    reason = "decode: truncated or corrupt image data: image file is truncated"
    batch = inferred_batch(["a.jpg", "broken.jpg"], errors={"broken.jpg": reason})
    good, broken = write(batch, str(tmp_path), depth_kind="relative_inverse")

    assert good["status"] == "ok" and good["depth_uri"] and good["segmentation_uri"]
    assert broken["status"] == "error" and broken["error"] == reason
    assert broken["source_uri"] == "s3://in/broken.jpg"
    for column in (
        "depth_uri",
        "segmentation_uri",
        "width",
        "height",
        "depth_min",
        "depth_max",
        "depth_kind",
        "seg_labels",
        "seg_confidence_mean",
    ):
        assert broken[column] is None, column
    assert files_under(tmp_path) == {
        expected_key(batch, 0, "depth"),
        expected_key(batch, 0, "segmentation"),
    }


def test_a_refused_write_becomes_an_error_row_naming_the_write_and_the_batch_goes_on(refusing):
    refusing.refused = ("forbidden.jpg",)
    batch = inferred_batch(["a.jpg", "forbidden.jpg"])
    good, refused = write(batch, "refusing://out")  # does not raise

    assert refused["status"] == "error"
    assert refused["error"].startswith("write: PermissionError: [Errno 13] Access Denied")
    assert refused["depth_uri"] is None and refused["segmentation_uri"] is None
    assert refused["width"] is None and refused["depth_kind"] is None
    assert good["status"] == "ok" and good["error"] is None
    np.testing.assert_array_equal(
        decode_depth_png(fsspec.open(good["depth_uri"]).open().read()), depth_levels(0)
    )
    assert not [path for path in refusing.store if "forbidden" in path]


def test_a_failed_segmentation_write_after_the_depth_map_makes_the_row_an_error(refusing):
    """Current behaviour: the row is an error and points at no map, and the depth
    map already written stays in storage, referenced by no row (a rerun with the
    same source version and config writes over it: its name holds the same tag)."""
    refusing.refused = ("/segmentation/",)
    batch = inferred_batch(["a.jpg"])
    [row] = write(batch, "refusing://out", depth_kind="metric")

    assert row["status"] == "error"
    assert row["error"].startswith("write: PermissionError")
    assert "/segmentation/a.jpg." in row["error"]  # the reason names the refused map
    assert row["depth_uri"] is None and row["segmentation_uri"] is None
    assert row["depth_min"] is None and row["depth_kind"] is None
    assert list(refusing.store) == ["/out/" + expected_key(batch, 0, "depth")]


def test_a_transient_write_error_is_retried_and_the_row_stays_ok(refusing):
    refusing.flaky = True
    [row] = write(inferred_batch(["a.jpg"]), "refusing://out")
    assert row["status"] == "ok" and row["depth_uri"] and row["segmentation_uri"]
    assert sorted(refusing.store) == sorted(refusing.dropped)  # each map's first write failed
    assert len(refusing.store) == 2


def test_float16_depth_is_written_as_npz_and_reads_back_exactly(tmp_path):
    batch = inferred_batch(["a.jpg", "b.jpg"], depth_float16=True)
    rows = write(batch, str(tmp_path), depth_kind="metric")
    for index, row in enumerate(rows):
        assert row["depth_uri"] == str(tmp_path / expected_key(batch, index, "depth", ".npz"))
        depth = decode_depth_map(row["depth_uri"], Path(row["depth_uri"]).read_bytes())
        assert depth.dtype == np.float16
        np.testing.assert_array_equal(depth, batch["depth_float16"][index].astype(np.float16))
        assert row["depth_kind"] == "metric"
        assert row["segmentation_uri"].endswith(".png")  # segmentation keeps its PNG
    assert not [name for name in files_under(tmp_path / "depth") if name.endswith(".png")]


def test_pseudo_label_rows_are_kept_by_coverage_and_error_rows_never(tmp_path):
    batch = inferred_batch(["a.jpg", "b.jpg", "c.jpg"], errors={"c.jpg": "decode: empty file"})
    # An error row can carry a coverage: depth failed where segmentation did not.
    batch["label_coverage"] = np.array([0.9, 0.2, 0.95])
    rows = write(batch, str(tmp_path), min_coverage=0.5)
    assert [row["kept"] for row in rows] == [True, False, False]
    assert [row["label_coverage"] for row in rows] == [0.9, 0.2, None]
    assert [row["kept"] for row in write(batch, str(tmp_path))] == [None, None, None]


def test_the_beacon_hears_of_each_written_batch(tmp_path):
    told = []

    class LocalBeacon:  # a ProgressBeacon actor handle's interface: .add.remote(rows)
        class add:
            remote = told.append

    write(
        inferred_batch(["a.jpg", "b.jpg"], errors={"b.jpg": "read: gone"}),
        str(tmp_path),
        beacon=LocalBeacon(),
    )
    assert told == [2]  # error rows are finished rows too


def test_a_store_failure_outside_oserror_is_an_error_row_after_its_retries(refusing, monkeypatch):
    """aiohttp's dropped payloads are no OSError: they used to fail the whole batch."""
    import aiohttp

    monkeypatch.setattr("pipeline.retry.backoff_delays", lambda attempts=6: iter([0.0, 0.0]))
    refusing.failing_with = aiohttp.ClientPayloadError("Response payload is not completed")
    [row] = write(inferred_batch(["a.jpg"]), "refusing://out")
    assert row["status"] == "error"
    assert row["error"].startswith("write: ClientPayloadError: Response payload is not completed")


def test_a_bug_in_writing_is_raised_not_hidden_as_an_error_row(refusing):
    refusing.failing_with = TypeError("a bug, not the store")
    with pytest.raises(TypeError, match="a bug"):
        write(inferred_batch(["a.jpg"]), "refusing://out")


def test_a_map_that_cannot_be_encoded_is_an_encode_error_row(tmp_path):
    batch = inferred_batch(["a.jpg", "b.jpg"])
    batch["depth_levels"][1] = np.zeros((2, 2, 2, 2), dtype=np.uint16)  # no image shape
    good, bad = write(batch, str(tmp_path))
    assert good["status"] == "ok"
    assert bad["status"] == "error" and bad["error"].startswith("encode: ")
    assert bad["depth_uri"] is None and files_under(tmp_path) == {
        expected_key(batch, 0, "depth"),
        expected_key(batch, 0, "segmentation"),
    }
