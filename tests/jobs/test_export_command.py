import subprocess
import sys

from pipeline.storage import filesystem_for
from tests.pipeline.test_report import write_output


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
