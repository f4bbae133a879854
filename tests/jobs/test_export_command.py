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
