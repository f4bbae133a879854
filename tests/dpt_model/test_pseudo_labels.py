"""Pseudo-label mode: uncertain pixels ignored, coverage and entropy per image."""

from __future__ import annotations

import re

import numpy as np
import pytest

from dpt_model import IGNORE_LABEL, SegmentationPredictor, resize_for_model
from dpt_model.labels import coco_annotations, mask_to_rle, rle_to_mask


def predict(predictor: SegmentationPredictor, image: np.ndarray):
    [prediction] = predictor.predict([resize_for_model(image, predictor.spec)], [image.shape[:2]])
    return prediction


def test_pixels_under_min_confidence_are_ignored_and_counted(checkpoints, parity_images):
    model = str(checkpoints["segmentation-vit"])
    plain = SegmentationPredictor(model, return_confidence=True)
    image = parity_images[0]
    reference = predict(plain, image)
    # A threshold inside the image's spread of confidences, so both sides are exercised.
    threshold = float(np.quantile(reference.confidence, 0.4))
    labelled = predict(SegmentationPredictor(model, min_confidence=threshold), image)

    uncertain = reference.confidence < threshold
    assert 0 < uncertain.mean() < 1
    assert (labelled.class_ids == IGNORE_LABEL).sum() == uncertain.sum()
    np.testing.assert_array_equal(labelled.class_ids[~uncertain], reference.class_ids[~uncertain])
    assert labelled.label_coverage == pytest.approx(1 - uncertain.mean())
    assert IGNORE_LABEL not in labelled.labels_present
    assert set(labelled.labels_present) <= set(reference.labels_present)
    assert 0 <= labelled.entropy_mean <= 1
    # Off, nothing is ignored and no pseudo-label statistics are reported.
    assert reference.label_coverage is None and reference.entropy_mean is None


def test_a_zero_threshold_labels_every_pixel(checkpoints, parity_images):
    predictor = SegmentationPredictor(str(checkpoints["segmentation-vit"]), min_confidence=0.0)
    prediction = predict(predictor, parity_images[2])
    assert prediction.label_coverage == 1.0
    assert IGNORE_LABEL not in prediction.class_ids


@pytest.mark.parametrize("seed", range(5))
def test_rle_round_trips_masks_in_cocos_column_major_order(seed):
    mask = np.random.default_rng(seed).random((13, 7)) > 0.6
    mask[0, 0] = bool(seed % 2)  # runs that start with ones and with zeros
    rle = mask_to_rle(mask)
    assert rle["size"] == [13, 7] and sum(rle["counts"]) == 13 * 7
    np.testing.assert_array_equal(rle_to_mask(rle), mask)
    # COCO's order: down the first column first, beginning with a run of zeros.
    column_first = mask.ravel(order="F")
    first_one = int(np.argmax(column_first)) if column_first.any() else column_first.size
    assert rle["counts"][0] == first_one


def test_coco_annotations_cover_every_labelled_pixel_once():
    label = np.array([[0, 0, 3], [255, 3, 3], [0, 255, 255]], dtype=np.uint8)
    annotations = coco_annotations(label, image_id=7, first_annotation_id=40, score=0.8)
    assert [a["category_id"] for a in annotations] == [1, 4]  # class id + 1, 255 left out
    assert [a["id"] for a in annotations] == [40, 41]
    assert sum(a["area"] for a in annotations) == (label != IGNORE_LABEL).sum()
    three = annotations[1]
    np.testing.assert_array_equal(rle_to_mask(three["segmentation"]), label == 3)
    assert three["bbox"] == [1, 0, 2, 2] and three["score"] == 0.8 and three["image_id"] == 7


def test_the_dataset_holds_ok_kept_rows_as_columns_and_indexes_like_a_sequence(tmp_path):
    from dpt_model.labels import PseudoLabelDataset
    from tests.pipeline.output.parts import row, write_part

    write_part(
        tmp_path,
        "a.parquet",
        [
            {**row("a", "ok", 0), "kept": True},
            {**row("b", "ok", 0), "kept": False},  # weak
            {**row("c", "ok", 0), "kept": None},  # a run without pseudo-label mode
            {**row("d", "error", 0), "kept": False},
            {**row("e", "ok", 0), "source_uri": f"{tmp_path}/set/a-000.tar#e"},
        ],
    )
    dataset = PseudoLabelDataset(str(tmp_path), with_images=False)
    assert [item["image_id"] for item in dataset] == ["a", "c", "e"]
    assert dataset[-1]["image_id"] == "e" and len(dataset) == 3
    with pytest.raises(IndexError):
        dataset[3]
    everything = PseudoLabelDataset(str(tmp_path), kept_only=False, with_images=False)
    assert [item["image_id"] for item in everything] == ["a", "b", "c", "e"]
    member = re.escape(f"{tmp_path}/set/a-000.tar#e")
    with pytest.raises(ValueError, match=rf"1 images come from shards \(e\.g\. {member}\)"):
        PseudoLabelDataset(str(tmp_path))
    # Named like a shard member, but a file: an image-file input's output.
    (tmp_path / "set").mkdir()
    (tmp_path / "set/a-000.tar#e").write_bytes(b"an image file")
    assert len(PseudoLabelDataset(str(tmp_path))) == 3


def test_min_coverage_judges_every_row_by_one_bar(tmp_path):
    """kept was judged by the bar of the run that annotated each image."""
    from dpt_model.labels import PseudoLabelDataset, is_kept
    from tests.pipeline.output.parts import row, write_part

    write_part(
        tmp_path,
        "a.parquet",
        [
            {**row("strong", "ok", 0), "kept": False, "label_coverage": 0.9},  # a stricter run's
            {**row("weak", "ok", 0), "kept": True, "label_coverage": 0.2},  # a laxer run's
            {**row("plain", "ok", 0)},  # a run without pseudo-labels: always kept
        ],
    )

    def ids(**options):
        return [
            i["image_id"] for i in PseudoLabelDataset(str(tmp_path), with_images=False, **options)
        ]

    assert ids() == ["weak", "plain"]
    assert ids(min_coverage=0.5) == ["strong", "plain"]
    assert ids(min_coverage=0.9) == ["strong", "plain"]
    assert ids(min_coverage=0.5, kept_only=False) == ["strong", "weak", "plain"]
    assert [is_kept(False, 0.9, None), is_kept(False, 0.9, 0.5), is_kept(None, None, 0.5)] == [
        False,
        True,
        True,
    ]


def test_the_dataset_refuses_an_image_changed_since_and_gives_writable_images(tmp_path):
    import warnings

    from dpt_model.labels import PseudoLabelDataset
    from jobs.sample_images import encoded, synthetic_photo
    from tests.pipeline.output.parts import row, write_part

    narrow = tmp_path / "narrow.png"  # one pixel: its CHW array is contiguous as decoded
    narrow.write_bytes(encoded(synthetic_photo(1, 1, seed=1), "PNG"))
    changed = tmp_path / "changed.jpg"
    changed.write_bytes(encoded(synthetic_photo(30, 20, seed=2), "JPEG"))
    write_part(
        tmp_path,
        "a.parquet",
        [
            {**row("narrow", "ok", 0), "source_uri": str(narrow), "width": 1, "height": 1},
            {**row("changed", "ok", 0), "source_uri": str(changed), "width": 60, "height": 40},
        ],
    )
    dataset = PseudoLabelDataset(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns of a read-only array
        image = dataset[0]["image"]
    image += 1  # a transform's in-place step
    assert image.shape == (3, 1, 1)
    with pytest.raises(ValueError, match=r"changed.jpg is 30×20 now and was 60×40 when annotated"):
        dataset[1]


def test_the_dataset_names_an_image_or_map_that_is_gone(tmp_path):
    from dpt_model.labels import PseudoLabelDataset
    from tests.pipeline.output.parts import row, write_part

    gone = tmp_path / "deleted.jpg"
    write_part(
        tmp_path,
        "a.parquet",
        [
            {**row("deleted", "ok", 0), "source_uri": str(gone), "width": 6, "height": 4},
            {**row("mapless", "ok", 0), "depth_uri": "depth/mapless.png", "width": 6, "height": 4},
        ],
    )
    with pytest.raises(
        FileNotFoundError, match=r"image .*deleted.jpg not found: deleted since it was"
    ):
        PseudoLabelDataset(str(tmp_path))[0]
    with pytest.raises(FileNotFoundError, match=r"depth map .*mapless.png not found: missing"):
        PseudoLabelDataset(str(tmp_path), with_images=False)[1]
