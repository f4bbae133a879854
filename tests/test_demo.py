"""`make demo`'s program, end to end: images and checkpoints made from nothing,
a job in pseudo-label mode, the COCO export and the quality report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import read_predictions

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_demo_makes_pseudo_labels_an_export_and_a_report(tmp_path):
    data, output = tmp_path / "demo_data", tmp_path / "demo_output"
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    result = subprocess.run(
        [
            sys.executable, "-m", "jobs.demo",
            f"input.uri={data / 'images'}",
            f"output.uri={output}",
            f"models.depth={data / 'models/depth'}",
            f"models.segmentation={data / 'models/segmentation'}",
        ],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]

    rows = read_predictions(str(output)).to_pylist()
    ok = [row for row in rows if row["status"] == "ok"]
    assert ok and len(ok) < len(rows)  # the sample images include broken files
    assert all(row["label_coverage"] is not None and row["kept"] is not None for row in ok)
    coco = json.loads((output / "export/coco/part-00000.json").read_text())
    assert len(coco["images"]) == sum(row["kept"] for row in ok)
    report = output / "report/index.html"
    assert f"open the report:   {report.resolve().as_uri()}" in result.stdout
    thumbnails = list((output / "report/thumbs").iterdir())
    assert len(thumbnails) == 3 * len(ok)  # fewer images than report.samples: all shown
    assert all(path.stat().st_size > 500 for path in thumbnails)


def test_the_demo_takes_set_and_help_and_names_a_bad_key(capsys):
    from jobs import demo

    with pytest.raises(SystemExit) as exited:
        demo.main(["--help"])
    assert exited.value.code == 0 and "--set KEY=VALUE" in capsys.readouterr().out
    assert demo.main(["--set", "inference.batch_size=0"]) == 2
    assert "key 'inference.batch_size'" in capsys.readouterr().err
    assert demo.main(["bogus"]) == 2
    assert "expected dotted.key=value" in capsys.readouterr().err
