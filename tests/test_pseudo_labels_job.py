"""A job in pseudo-label mode (ignored pixels, coverage, entropy, kept rows), read back
as a training set with PseudoLabelDataset."""

from __future__ import annotations

import json
import os
import shutil
import statistics
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dpt_model import IGNORE_LABEL, DepthPredictor, depth_at_size, resize_for_model
from dpt_model.labels import PseudoLabelDataset
from jobs.config import load_config
from jobs.sample_images import encoded, synthetic_photo
from pipeline import read_predictions
from pipeline.encode import decode_depth_npz, decode_depth_png, decode_segmentation_png
from tests.conftest import SEEDED_VIT_DEPTH_HW
from tests.corpus import map_tag, write_files

IMAGES = 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pseudo")
    photos = {
        f"{i}.jpg": encoded(synthetic_photo(160 + 40 * i, 120 + 20 * i, seed=i), "JPEG")
        for i in range(IMAGES)
    }
    write_files(root, {**photos, "broken.jpg": b"\xff\xd8\xff not really"})
    return root


def pseudo_label_config(corpus: Path, output: Path, checkpoints, *overrides: str):
    """Depth and segmentation with the seeded ViT checkpoints, in pseudo-label mode."""
    return load_config(
        None,
        [
            f"input.uri={corpus}",
            f"output.uri={output}",
            f"models.depth={checkpoints['depth-vit']}",
            f"models.segmentation={checkpoints['segmentation-vit']}",
            "pseudo_labels.enabled=true",
            # The seeded 6-class model is barely better than chance (max softmax
            # 0.17-0.18 for 1/6 = 0.167), so the bar sits inside that spread.
            "pseudo_labels.min_confidence=0.175",
            *overrides,
        ],
    )


def run(corpus: Path, output: Path, checkpoints, min_coverage: float):
    from pipeline.run import run_annotation

    run_annotation(
        pseudo_label_config(
            corpus, output, checkpoints, f"pseudo_labels.min_coverage={min_coverage}"
        )
    )
    return {Path(row["source_uri"]).name: row for row in read_predictions(str(output)).to_pylist()}


@pytest.mark.slow
def test_pseudo_label_mode_marks_uncertain_pixels_and_weak_images(
    ray_cluster, checkpoints, corpus, tmp_path
):
    everything = run(corpus, tmp_path / "all", checkpoints, min_coverage=0.0)
    photos = [everything[f"{i}.jpg"] for i in range(IMAGES)]
    for row in photos:
        assert row["status"] == "ok" and row["kept"] is True
        assert row["depth_kind"] == "relative_inverse"  # a DPT checkpoint
        labels = decode_segmentation_png(Path(row["segmentation_uri"]).read_bytes())
        # The map's ignored pixels are exactly the share the row reports unlabelled.
        assert (labels != IGNORE_LABEL).mean() == pytest.approx(row["label_coverage"])
        assert 0 <= row["entropy_mean"] <= 1
        assert IGNORE_LABEL not in row["seg_labels"]
    coverages = [row["label_coverage"] for row in photos]
    assert len(set(coverages)) > 1, "the seeded model gave every image the same coverage"
    broken = everything["broken.jpg"]
    assert broken["status"] == "error" and broken["kept"] is False
    assert broken["label_coverage"] is None and broken["depth_kind"] is None

    # The same images with the bar at the median: weaker ones are kept=false, not dropped.
    bar = statistics.median(coverages)
    split = run(corpus, tmp_path / "split", checkpoints, min_coverage=bar)
    assert len(split) == IMAGES + 1
    for name, row in everything.items():
        if row["status"] == "ok":
            assert split[name]["label_coverage"] == pytest.approx(row["label_coverage"])
            assert split[name]["kept"] is (row["label_coverage"] >= bar)
    assert {row["kept"] for row in split.values()} == {True, False}


@pytest.mark.slow
def test_without_pseudo_labels_the_columns_stay_null(ray_cluster, checkpoints, corpus, tmp_path):
    from pipeline.run import run_annotation

    config = load_config(
        None,
        [
            f"input.uri={corpus}",
            f"output.uri={tmp_path / 'plain'}",
            f"models.segmentation={checkpoints['segmentation-vit']}",
        ],
    )
    run_annotation(config)
    table = pq.read_table(tmp_path / "plain" / "predictions")
    for column in ("label_coverage", "entropy_mean", "kept"):
        assert table[column].null_count == table.num_rows
    ok = [row for row in table.to_pylist() if row["status"] == "ok"]
    labels = decode_segmentation_png(Path(ok[0]["segmentation_uri"]).read_bytes())
    assert not np.any(labels == IGNORE_LABEL)


@pytest.mark.slow
def test_the_dataset_yields_the_written_maps_for_kept_images(
    ray_cluster, checkpoints, corpus, tmp_path
):
    # First the coverages, then a run with the bar at their median, as a user would tune it.
    coverages = [
        row["label_coverage"]
        for row in run(corpus, tmp_path / "probe", checkpoints, 0.0).values()
        if row["status"] == "ok"
    ]
    rows = run(corpus, tmp_path / "out", checkpoints, statistics.median(coverages))
    kept = {row["image_id"]: row for row in rows.values() if row["kept"]}
    assert 0 < len(kept) < IMAGES

    dataset = PseudoLabelDataset(str(tmp_path / "out"))
    assert sorted(item["image_id"] for item in dataset) == sorted(kept)
    for item in dataset:
        row = kept[item["image_id"]]
        size_hw = (row["height"], row["width"])
        with Image.open(row["source_uri"]) as source:
            expected_image = np.asarray(source.convert("RGB"))
        assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, *size_hw)
        np.testing.assert_array_equal(item["image"].permute(1, 2, 0).numpy(), expected_image)
        levels = decode_depth_png(Path(row["depth_uri"]).read_bytes())
        expected_depth = depth_at_size(levels, row["depth_min"], row["depth_max"], size_hw)
        np.testing.assert_array_equal(item["depth"].numpy(), expected_depth)
        labels = decode_segmentation_png(Path(row["segmentation_uri"]).read_bytes())
        assert item["label"].dtype == torch.int64
        np.testing.assert_array_equal(item["label"].numpy(), labels)
        np.testing.assert_array_equal(item["mask"].numpy(), labels != IGNORE_LABEL)
        assert item["mask"].float().mean().item() == pytest.approx(row["label_coverage"])

    everything = PseudoLabelDataset(str(tmp_path / "out"), kept_only=False, with_images=False)
    assert len(everything) == IMAGES  # the broken file's error row is never an item
    assert "image" not in everything[0]
    normalized = PseudoLabelDataset(str(tmp_path / "out"), with_images=False, depth="normalized")
    for item in normalized:
        assert (item["depth"].min().item(), item["depth"].max().item()) == (0.0, 1.0)
        assert item["depth_kind"] == "relative_inverse"
    batch = next(iter(torch.utils.data.DataLoader(everything, batch_size=None, num_workers=2)))
    assert batch["label"].ndim == 2


@pytest.mark.slow
def test_float16_depth_maps_hold_the_model_values_and_read_back(
    ray_cluster, checkpoints, corpus, tmp_path
):
    from pipeline.decode import decode_image
    from pipeline.run import run_annotation

    output = tmp_path / "f16"
    config = load_config(
        None,
        [
            f"input.uri={corpus}",
            f"output.uri={output}",
            f"models.depth={checkpoints['depth-vit']}",
            "output.depth_format=npz_float16",
            "inference.batch_size=1",  # one image per pass, as the direct prediction below
        ],
    )
    run_annotation(config)
    rows = [r for r in read_predictions(str(output)).to_pylist() if r["status"] == "ok"]
    assert len(rows) == IMAGES
    predictor = DepthPredictor(
        str(checkpoints["depth-vit"]), resolution="model", encoding="float16"
    )
    dataset = {item["image_id"]: item for item in PseudoLabelDataset(str(output))}
    for row in rows:
        assert row["depth_uri"].endswith(f".jpg.{map_tag(row)}.npz")
        stored = decode_depth_npz(Path(row["depth_uri"]).read_bytes())
        assert stored.dtype == np.float16 and stored.shape == SEEDED_VIT_DEPTH_HW
        # The model's own values: the same pass run here, to one float16 step (the
        # job's actor runs torch with other threads, so float32 sums may round apart).
        rgb = decode_image(Path(row["source_uri"]).read_bytes(), 10**8, 10**4).rgb
        [direct] = predictor.predict([resize_for_model(rgb, predictor.spec)], [rgb.shape[:2]])
        np.testing.assert_array_max_ulp(stored, direct.depth_float16, maxulp=1)
        assert float(stored.min()) == pytest.approx(row["depth_min"], rel=1e-3)
        size_hw = (row["height"], row["width"])
        assert dataset[row["image_id"]]["depth"].shape == size_hw


@pytest.mark.slow
def test_coco_export_holds_every_kept_image_mask_by_mask(
    ray_cluster, checkpoints, corpus, tmp_path, monkeypatch
):
    import jobs.export
    from dpt_model.labels import rle_to_mask
    from dpt_model.seeded import SEEDED_LABELS
    from jobs.export import main as export_main

    rows = run(corpus, tmp_path / "out", checkpoints, min_coverage=0.0)
    # An earlier export in three parts: the new one replaces it whole.
    assert export_main(["coco", str(tmp_path / "out"), "--images-per-file", "2"]) == 0
    assert export_main(["coco", str(tmp_path / "out"), "--images-per-file", "4"]) == 0

    parts = sorted((tmp_path / "out" / "export" / "coco").glob("part-*.json"))
    documents = [json.loads(part.read_text()) for part in parts]
    assert len(parts) == 2  # 6 images, 4 per file

    # An export that fails part-way leaves the earlier one as it was.
    folder = parts[0].parent
    exported = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    decoded = []

    def unreadable_fourth_map(data: bytes) -> np.ndarray:
        decoded.append(data)
        if len(decoded) == 4:
            raise OSError("connection reset by peer")
        return decode_segmentation_png(data)

    monkeypatch.setattr(jobs.export, "decode_segmentation_png", unreadable_fourth_map)
    with pytest.raises(OSError, match="connection reset"):
        jobs.export.export_coco(str(tmp_path / "out"), images_per_file=1)
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == exported

    # A destination whose path holds glob characters, exported to twice.
    odd = tmp_path / "exports [v2]" / "coco*"
    monkeypatch.undo()
    for _ in range(2):
        assert export_main(["coco", str(tmp_path / "out"), "--dest", str(odd)]) == 0
    assert os.listdir(odd) == ["part-00000.json"]
    assert documents[0]["categories"] == [
        {"id": class_id + 1, "name": name} for class_id, name in enumerate(SEEDED_LABELS)
    ]
    images = [image for document in documents for image in document["images"]]
    annotations = [a for document in documents for a in document["annotations"]]
    assert sorted(image["dpt_image_id"] for image in images) == sorted(
        row["image_id"] for row in rows.values() if row["status"] == "ok"
    )
    assert len({a["id"] for a in annotations}) == len(annotations)
    for image in images:
        row = rows[Path(image["file_name"]).name]
        labels = decode_segmentation_png(Path(row["segmentation_uri"]).read_bytes())
        mine = [a for a in annotations if a["image_id"] == image["id"]]
        assert sorted(a["category_id"] - 1 for a in mine) == sorted(row["seg_labels"])
        for annotation in mine:
            mask = rle_to_mask(annotation["segmentation"])
            np.testing.assert_array_equal(mask, labels == annotation["category_id"] - 1)
            assert annotation["score"] == pytest.approx(row["seg_confidence_mean"])
        # Every labelled pixel is in exactly one mask; ignored pixels in none.
        assert sum(a["area"] for a in mine) == (labels != IGNORE_LABEL).sum()

    # The output copied elsewhere, the original gone: the rows still name its
    # maps, and the export finds them in the copy.
    moved = tmp_path / "moved" / "out"
    shutil.copytree(tmp_path / "out", moved)
    shutil.rmtree(tmp_path / "out")
    assert export_main(["coco", str(moved), "--images-per-file", "4"]) == 0
    again = [json.loads(part.read_text()) for part in sorted(moved.glob("export/coco/part-*"))]
    assert [d["annotations"] for d in again] == [d["annotations"] for d in documents]
