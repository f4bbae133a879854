import os
import subprocess
import sys

import pyarrow as pa
import pytest

from pipeline.storage import filesystem_for
from tests.pipeline.test_report import write_output


@pytest.mark.slow
def test_export_without_a_segmentation_run_says_how_to_name_the_classes(tmp_path):
    fs, root = filesystem_for(str(tmp_path), {})
    write_output(fs, root, images=1)  # its run records name no segmentation model
    result = subprocess.run(
        [sys.executable, "-m", "jobs.export", "coco", root],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "used a segmentation model; name a checkpoint with --labels-from" in result.stderr
    assert not (tmp_path / "export").exists()


@pytest.mark.slow
def test_export_and_report_of_an_output_without_predictions_say_so_in_one_line(tmp_path):
    for command in (["jobs.export", "coco"], ["jobs.report"], ["jobs.compact"]):
        result = subprocess.run(
            [sys.executable, "-m", *command, str(tmp_path / "typo")],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 2
        assert result.stderr.strip() == f"error: no predictions under {tmp_path / 'typo'}"


@pytest.mark.slow
def test_export_and_report_of_an_unreachable_store_fail_in_one_line(tmp_path):
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "y",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    for command in (["jobs.export", "coco"], ["jobs.report"], ["jobs.compact"]):
        result = subprocess.run(
            [sys.executable, "-m", *command, "s3://bucket/out", "--endpoint-url=http://127.0.0.1:9"],
            capture_output=True, text=True, check=False, env=env, timeout=60,
        )  # fmt: skip
        assert result.returncode == 1
        [line] = result.stderr.strip().splitlines()
        assert line.startswith("error: cannot reach output s3://bucket/out")


@pytest.mark.parametrize("command", ["export", "report"])
def test_a_labels_from_that_names_no_classes_is_one_line_and_exit_2(
    tmp_path, checkpoints, capsys, command
):
    from jobs import export, report

    fs, root = filesystem_for(str(tmp_path), {})
    write_output(fs, root, images=1)
    main = export.main if command == "export" else report.main
    prefix = ["coco"] if command == "export" else []
    for labels_from, says in (
        (str(tmp_path / "nowhere"), "does not exist"),
        (
            str(checkpoints["depth-vit"]),
            "is a DPTForDepthEstimation checkpoint, not a segmentation",
        ),
    ):
        assert main([*prefix, root, "--labels-from", labels_from]) == 2
        error = capsys.readouterr().err
        assert error.startswith("error: ") and says in error and error.count("\n") == 1
    assert not (tmp_path / "export").exists() and not (tmp_path / "report").exists()


def test_an_export_of_weak_images_only_says_how_to_include_them(tmp_path, checkpoints, capsys):
    import pyarrow.parquet as pq

    from jobs import export

    fs, root = filesystem_for(str(tmp_path), {})
    write_output(fs, root, images=2)
    part = tmp_path / "predictions" / "part-0.parquet"
    table = pq.read_table(part)
    weak = table.set_column(
        table.schema.get_field_index("kept"), "kept", pa.array([False] * table.num_rows)
    )
    pq.write_table(weak, part)
    labels = ["--labels-from", str(checkpoints["segmentation-vit"])]
    assert export.main(["coco", root, *labels]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "wrote 0 COCO part(s)",
        "all 2 images with a segmentation map are weak (kept = false): "
        "--include-weak exports them too",
    ]
    assert export.main(["coco", root, *labels, "--include-weak"]) == 0
    assert capsys.readouterr().out.startswith("wrote 1 COCO part(s), first ")


def _record_classes(fs, root: str, classes: dict[int, str], model: str = "relative/seg") -> None:
    """A newest run record as runs now write them: the model as written, and its classes."""
    import json

    record = {"config": {"models": {"segmentation": model}}, "segmentation_classes": classes}
    fs.pipe_file(f"{root}/_runs/latest.json", json.dumps(record).encode())


def test_the_classes_a_run_recorded_name_the_categories_from_any_folder(tmp_path, monkeypatch):
    """The run named its model by a path relative to where it ran, which means
    nothing (or another model) from here: the classes it recorded stand."""
    import json

    from jobs import export

    fs, root = filesystem_for(str(tmp_path / "out"), {})
    write_output(fs, root, images=2)
    _record_classes(fs, root, {0: "wall", 4: "person"})
    monkeypatch.chdir(tmp_path)
    assert export.main(["coco", root]) == 0
    document = json.loads((tmp_path / "out/export/coco/part-00000.json").read_text())
    assert document["categories"] == [{"id": 1, "name": "wall"}, {"id": 5, "name": "person"}]
    assert {a["category_id"] for a in document["annotations"]} == {1, 5}


def test_class_ids_the_names_lack_fail_the_export_and_leave_the_earlier_one(tmp_path, capsys):
    from jobs import export

    fs, root = filesystem_for(str(tmp_path), {})
    write_output(fs, root, images=2)
    _record_classes(fs, root, {0: "wall", 4: "person"})
    assert export.main(["coco", root]) == 0
    earlier = (tmp_path / "export/coco/part-00000.json").read_bytes()
    _record_classes(fs, root, {0: "wall", 1: "floor", 2: "sky"})  # of another checkpoint
    assert export.main(["coco", root]) == 2
    [line] = capsys.readouterr().err.splitlines()
    source = fs.unstrip_protocol(f"{root}/src/img 0.jpg")
    assert line.startswith(f"error: {source} has class ids [4], which the class names")
    assert "(3 classes) lack: with --labels-from, name the checkpoint the run used" in line
    assert (tmp_path / "export/coco/part-00000.json").read_bytes() == earlier


def test_a_missing_map_fails_the_export_in_one_line_naming_it(tmp_path, capsys):
    from jobs import export

    fs, root = filesystem_for(str(tmp_path), {})
    write_output(fs, root, images=2)
    _record_classes(fs, root, {0: "wall", 4: "person"})
    (tmp_path / "segmentation" / "1.png").unlink()
    assert export.main(["coco", root]) == 1
    source = fs.unstrip_protocol(f"{root}/src/img 1.jpg")
    assert capsys.readouterr().err.splitlines() == [
        f"error: the segmentation map of {source} is missing: {root}/segmentation/1.png"
    ]


def test_min_coverage_judges_every_image_by_one_bar(tmp_path, capsys):
    """kept was judged by the bar of the run that annotated each image."""
    import json

    from jobs import export

    fs, root = filesystem_for(str(tmp_path), {})
    write_output(fs, root, images=3)  # label_coverage 0.8 each, kept
    _record_classes(fs, root, {0: "wall", 4: "person"})

    def exported(*options: str) -> int:
        assert export.main(["coco", root, *options]) == 0
        part = tmp_path / "export/coco/part-00000.json"
        return len(json.loads(part.read_text())["images"]) if part.exists() else 0

    assert exported() == 3
    assert exported("--min-coverage", "0.8") == 3
    assert exported("--min-coverage", "0.81") == 0
    assert "--include-weak exports them too" in capsys.readouterr().out
    assert exported("--min-coverage", "0.81", "--include-weak") == 3
    with pytest.raises(SystemExit):
        export.parse_args(["coco", root, "--min-coverage", "1.5"])


def test_pycocotools_reads_the_export_mask_for_mask(tmp_path):
    """The reference reader, which COCO loaders build on, decodes each mask to the
    map's pixels of that class; every labelled pixel is in one mask, 255 in none."""
    import numpy as np
    from pycocotools.coco import COCO

    from jobs import export
    from pipeline.encode import decode_segmentation_png

    fs, root = filesystem_for(str(tmp_path), {})
    rows = write_output(fs, root, images=3)
    _record_classes(fs, root, {0: "wall", 4: "person"})
    assert export.main(["coco", root, "--images-per-file", "2"]) == 0
    by_id = {row["image_id"]: row for row in rows}
    parts = sorted((tmp_path / "export/coco").glob("part-*.json"))
    assert len(parts) == 2
    for part in parts:
        coco = COCO(str(part))
        assert sorted(coco.getCatIds()) == [1, 5]
        for image in coco.loadImgs(coco.getImgIds()):
            row = by_id[image["dpt_image_id"]]
            label = decode_segmentation_png(fs.cat_file(row["segmentation_uri"]))
            annotations = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
            assert {a["category_id"] for a in annotations} == {1, 5}
            covered = np.zeros(label.shape, dtype=int)
            for annotation in annotations:
                mask = coco.annToMask(annotation)
                np.testing.assert_array_equal(mask, label == annotation["category_id"] - 1)
                assert annotation["area"] == mask.sum()
                covered += mask
            np.testing.assert_array_equal(covered, (label != 255).astype(int))
